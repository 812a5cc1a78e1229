"""Loading and checking configs: the schema is `configs/default.py`, and nothing else is read.

The config files themselves (the shipped ones, found by name, and any by path)
are loaded by `config_files`.

Every check here runs before JAX computes anything or the work directory is
touched, and fails with a `ConfigError` (exit code 2) that names the key, what
was expected and what was given.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import ml_collections

from diffusers_unified.errors import CheckpointError, ConfigError
from diffusers_unified.experiment import config_values
from diffusers_unified.experiment.config_files import (  # noqa: F401  (re-exported)
    CONFIGS_DIR,
    did_you_mean,
    load_module,
    resolve_config_path,
    shipped_configs,
)
from diffusers_unified.experiment.config_values import (  # noqa: F401  (re-exported)
    AUTO,
    AUTO_KEYS,
    CHOICES,
    LIBRARY_CHOICES,
)

logger = logging.getLogger("diffusers_unified")


def default_config() -> ml_collections.ConfigDict:
    """The schema: configs/default.py's get_config()."""
    return load_module(os.path.join(CONFIGS_DIR, "default.py")).get_config()


def flatten(config, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) for every leaf of a ConfigDict."""
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from flatten(value, name + ".")
        else:
            yield name, value


def unknown_key_error(key: str, schema_keys, where: str = "") -> ConfigError:
    return ConfigError(f"Unknown config key '{key}'{where}.{did_you_mean(key, schema_keys)}")


def check_against_schema(config, source: str = "") -> None:
    """No keys absent from the defaults, and every value of the default's type."""
    schema = dict(flatten(default_config()))
    where = f" in {source}" if source else ""
    for key, value in flatten(config):
        if key not in schema:
            raise unknown_key_error(key, schema, where)
        expected = schema[key]
        if not _same_type(value, expected):
            raise ConfigError(
                f"config key '{key}'{where} must be of type {type(expected).__name__} "
                f"(like its default {expected!r}), got {type(value).__name__} {value!r}"
            )
    missing = sorted(set(schema) - {k for k, _ in flatten(config)})
    if missing:
        raise ConfigError(
            f"config{where} lacks keys {', '.join(missing)}: derive it from "
            "configs/default.py's get_config()"
        )


def _same_type(value, expected) -> bool:
    if isinstance(expected, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(expected, bool)
    if isinstance(expected, float):
        return isinstance(value, int | float)
    if isinstance(expected, tuple | list):
        return isinstance(value, tuple | list)
    return isinstance(value, type(expected))


def check_overrides(argv: list[str], config) -> None:
    """Each `--config.a.b=value` names an existing key (before config_flags parses it)."""
    schema = dict(flatten(config))
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config.") :].split("=", 1)[0]
        if key not in schema:
            raise unknown_key_error(key, schema)


def apply_overrides(config, args: list[str], source: str = ""):
    """A copy of `config` with `--config.a.b=value` arguments applied, typed like its values.

    For a config read from a work directory's config.json, where no config
    file is given for ml_collections' flags to parse overrides against.
    Values are read as the key's type: bools as true/false, numbers, tuples
    as Python literals, strings as they are.
    """
    import ast

    config = ml_collections.ConfigDict(config.to_dict())
    schema = dict(flatten(config))
    for arg in args:
        key, sep, text = arg[len("--config.") :].partition("=")
        if key not in schema:
            raise unknown_key_error(key, schema, f" (overriding {source})" if source else "")
        if not sep:
            raise ConfigError(f"--config.{key} needs a value (--config.{key}=VALUE)")
        current = schema[key]
        try:
            if isinstance(current, bool):
                if text.lower() not in ("true", "false"):
                    raise ValueError(text)
                value = text.lower() == "true"
            elif isinstance(current, int | float):
                value = ast.literal_eval(text)
                if isinstance(value, bool) or not isinstance(value, type(current) | int):
                    raise ValueError(text)
                value = type(current)(value)
            elif isinstance(current, tuple | list):
                value = tuple(ast.literal_eval(text))
            else:
                value = text
        except (ValueError, SyntaxError, TypeError):
            raise ConfigError(
                f"--config.{key}={text!r} is not a {type(current).__name__} (like its value "
                f"{current!r})"
            ) from None
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


# -- values (the rules live in config_values) -----------------------------------------------


def auto_keys(config) -> list[str]:
    """The AUTO_KEYS that the config leaves to be computed from the data."""
    return config_values.auto_keys(dict(flatten(config)))


def check_values(config, device_count: int | None = None) -> None:
    """Names, signs, ranges and the rules that tie keys together (`config_values.check`)."""
    config_values.check(dict(flatten(config)), device_count)


# -- the run's resolved config ------------------------------------------------------------

# Keys that may change between a run and its resumption: schedules, sampling and
# evaluation settings. Anything else (model, data, process, loss, optimiser,
# seed) changes what the checkpoint means.
RESUMABLE_CHANGES = (
    "training.n_iters",
    "training.log_freq",
    "training.checkpoint_freq",
    "training.snapshot_freq",
    "training.keep",
    "training.eval_freq",
    "data.validate_batches",
    "logging.",
    "sampling.",
    "eval.",
    "distributed.",
)


def to_json(config) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def fill_missing(saved, source: str):
    """A saved config (a work directory's config.json) with the keys added to the schema since
    it was written set to their defaults, and a note naming them."""
    defaults = dict(flatten(default_config()))
    missing = sorted(set(defaults) - {k for k, _ in flatten(saved)})
    if not missing:
        return saved
    logger.info("%s predates config keys %s: using their defaults", source, ", ".join(missing))
    config = ml_collections.ConfigDict(saved.to_dict())
    for key in missing:
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            if part not in node:
                node[part] = ml_collections.ConfigDict()
            node = node[part]
        node[leaf] = defaults[key]
    return config


def from_json(text: str) -> ml_collections.ConfigDict:
    data = json.loads(text)

    def tuples(node):
        if isinstance(node, dict):
            return {k: tuples(v) for k, v in node.items()}
        return tuple(node) if isinstance(node, list) else node

    return ml_collections.ConfigDict(tuples(data))


def incompatible_changes(saved, current) -> list[str]:
    """Lines `key: saved -> current` for the changes a resumed run may not make."""
    old, new = dict(flatten(saved)), dict(flatten(current))
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, list | tuple) and isinstance(b, list | tuple):
            a, b = tuple(a), tuple(b)
        if a != b and not key.startswith(RESUMABLE_CHANGES):
            lines.append(f"  {key}: {a!r} -> {b!r}")
    return lines


def check_resume_compatible(saved, current, allow_change: bool) -> list[str]:
    """Raises CheckpointError listing incompatible changes; returns the allowed ones."""
    incompatible = incompatible_changes(saved, current)
    if incompatible and not allow_change:
        raise CheckpointError(
            "the config differs from the one this work directory was trained with, in keys "
            "that change what its checkpoints mean:\n" + "\n".join(incompatible) + "\n"
            "Use a new --workdir, or pass --allow_config_change to resume anyway."
        )
    old, new = dict(flatten(saved)), dict(flatten(current))
    return [
        f"  {k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(new)
        if old.get(k) != new.get(k) and k.startswith(RESUMABLE_CHANGES)
    ]
