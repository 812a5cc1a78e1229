"""Config files: the shipped ones inside the package, found by name, and any by path.

The package carries its configs (`diffusers_unified/experiment/configs/`: the
experiment layer is the one that reads configs), so a wheel or `pip install .`
has them: `--config=cifar10/ddpm` works from any working
directory, `--config=configs/vpsde/toy2d.py` too (the spelling of a checkout,
where the README's commands are written), and any other file by its path.
"""

from __future__ import annotations

import difflib
import importlib.abc
import importlib.util
import os
import sys

from diffusers_unified.errors import ConfigError

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


class _ConfigsAlias(importlib.abc.MetaPathFinder):
    """Makes `import configs` mean the shipped configs when nothing else provides it.

    Config files written against a checkout (the score SDE code's convention,
    and this repository's tests and studies) say `from configs import
    formulations`. Appended last to `sys.meta_path`, this finder is asked only
    after the regular path search found no `configs` package or folder, so a
    project's own `configs/` (or the score SDE repository's, which
    `experiment.imports` puts on the path) always wins.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "configs":
            return None
        return importlib.util.spec_from_file_location(
            "configs",
            os.path.join(CONFIGS_DIR, "__init__.py"),
            submodule_search_locations=[CONFIGS_DIR],
        )


if not any(isinstance(f, _ConfigsAlias) for f in sys.meta_path):
    sys.meta_path.append(_ConfigsAlias())


def shipped_configs() -> list[str]:
    """The shipped configs' names, as `--config` takes them ("cifar10/ddpm", "quickstart")."""
    names = []
    for root, _, files in os.walk(CONFIGS_DIR):
        for file in files:
            if file.endswith(".py") and file not in ("__init__.py", "formulations.py"):
                rel = os.path.relpath(os.path.join(root, file[:-3]), CONFIGS_DIR)
                names.append(rel.replace(os.sep, "/"))
    return sorted(names)


def resolve_config_path(spec: str) -> str:
    """A `--config` value's file: a path that exists, else a shipped config's name.

    `spec` may be a file path (absolute, or relative to the working
    directory), or a shipped config named with or without a leading
    `configs/` and a trailing `.py` (`cifar10/ddpm`, `configs/vpsde/toy2d.py`),
    so README commands written for a checkout work from anywhere.
    Raises ConfigError naming the closest shipped config.
    """
    if os.path.isfile(spec):
        return os.path.abspath(spec)
    name = spec.replace(os.sep, "/")
    name = name[len("configs/") :] if name.startswith("configs/") else name
    name = name[: -len(".py")] if name.endswith(".py") else name
    shipped = shipped_configs()
    if name in shipped:
        return os.path.join(CONFIGS_DIR, *name.split("/")) + ".py"
    raise ConfigError(
        f"config {spec!r} is neither a file nor a shipped config.{did_you_mean(name, shipped)} "
        f"Shipped configs: {', '.join(shipped)}"
    )


def load_module(path: str):
    """Imports a config file, given by path or by a shipped config's name."""
    path = resolve_config_path(path)
    spec = importlib.util.spec_from_file_location(f"_du_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001  any error in user code is a config error
        raise ConfigError(f"config file {path} failed to load: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config()")
    return module


def did_you_mean(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""
