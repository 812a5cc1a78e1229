"""Score SDE checkpoints in: NCSN++ / DDPM++ and NCSNv2 parameters from the reference code's files.

The score SDE code (https://github.com/yang-song/score_sde, JAX) saves its
training state with flax's `checkpoints.save_checkpoint`: a msgpack file of

    {step, optimizer: {target: params, state: ...}, lr, model_state, ema_rate, params_ema, rng}

Its parameter names are flax's automatic ones, `<Class>_<k>` with k counting
the sublayers of that class in the order the parent creates them (e.g.
`ResnetBlockBigGANpp_13/Conv_1/kernel`). This package's networks create the
same sublayers in the same order under descriptive names (`NCSNpp`,
`RefineNet`), so the reference name of each of them follows mechanically:
`reference_layout` records the order in which a module calls its sublayers
(flax's method interception, on shapes only), and counts per reference class
name as flax does. A few parameters are renamed or reshaped on the way
(`_LEAVES`). Nothing is matched by position in a flat list: every name and
every shape is checked, and anything missing, extra or misshapen raises
`CheckpointError` naming the file, the key and both shapes.

`module_kwargs_from_score_sde_config` turns the reference config's `model`
section (a plain dict) into this package's constructor kwargs.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from diffusers_unified.errors import CheckpointError, ConfigError
from diffusers_unified.nets.embeddings import FOURIER_WEIGHTS
from diffusers_unified.nets.ncsnpp import NCSNpp
from diffusers_unified.nets.refinenet import RefineNet, refinenet_kwargs
from diffusers_unified.typing import Params

# The reference's class for each module class of this package's two networks.
REFERENCE_CLASS = {
    # NCSN++ (models/layerspp.py, layers.py, up_or_down_sampling.py)
    "Conv": "Conv",
    "Dense": "Dense",
    "GroupNorm": "GroupNorm",
    "NIN": "NIN",
    "FourierFeatures": "GaussianFourierProjection",
    "FIRConv": "Conv2d",
    "Combine": "Combine",
    "AttnBlock": "AttnBlockpp",
    "Upsample": "Upsample",
    "Downsample": "Downsample",
    "ResnetBlockDDPM": "ResnetBlockDDPMpp",
    "ResnetBlockBigGAN": "ResnetBlockBigGANpp",
    # NCSNv2 (models/ncsnv2.py, layers.py, normalization.py)
    "InstanceNorm2dPlus": "InstanceNorm2dPlus",
    "ConvMeanPool": "ConvMeanPool",
    "ResidualBlock": "ResidualBlock",
    "RCUBlock": "RCUBlock",
    "CRPBlock": "CRPBlock",
    "MSFBlock": "MSFBlock",
    "RefineBlock": "RefineBlock",
}

# Parameters stored under another name or shape: (class, our name) -> (reference name,
# reference shape from ours).
_LEAVES = {
    ("NIN", "kernel"): ("W", None),
    ("NIN", "bias"): ("b", None),
    ("FourierFeatures", FOURIER_WEIGHTS): ("W", None),
    ("FIRConv", "kernel"): ("weight", None),
    ("InstanceNorm2dPlus", "alpha"): ("alpha", lambda s: (1, 1, 1, *s)),
    ("InstanceNorm2dPlus", "gamma"): ("gamma", lambda s: (1, 1, 1, *s)),
    ("InstanceNorm2dPlus", "beta"): ("beta", lambda s: (1, 1, 1, *s)),
}

Path = tuple[str, ...]


def reference_layout(
    module: nn.Module, image_shape: tuple[int, int, int]
) -> dict[Path, tuple[Path, tuple[int, ...], tuple[int, ...]]]:
    """Each parameter of `module` (on images of shape (H, W, C)) -> (reference path, its shape
    there, its shape here).

    Computed from shapes only (`jax.eval_shape`), in well under a second.
    Raises ConfigError for a sublayer with no reference counterpart (such as
    a label embedding).
    """
    classes: dict[Path, str] = {}

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            classes.setdefault(tuple(context.module.path), type(context.module).__name__)
        return next_fun(*args, **kwargs)

    x = jnp.zeros((1, *image_shape), jnp.float32)
    noise_cond = jnp.ones((1,), jnp.float32)
    with nn.intercept_methods(record):
        shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x, noise_cond))

    # flax's automatic naming: <Class>_<k>, k counting that class among the
    # parent's sublayers in creation order (dicts keep the order of the calls).
    reference: dict[Path, Path] = {(): ()}
    counts: Counter = Counter()
    for path, cls in classes.items():
        if not path:
            continue
        if cls not in REFERENCE_CLASS:
            raise ConfigError(
                f"{'/'.join(path)} ({cls}) has no counterpart in score SDE checkpoints"
            )
        parent, ref_cls = path[:-1], REFERENCE_CLASS[cls]
        reference[path] = (*reference[parent], f"{ref_cls}_{counts[parent, ref_cls]}")
        counts[parent, ref_cls] += 1

    layout = {}
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(shapes["params"]):
        path = tuple(k.key for k in key_path)
        owner, name = path[:-1], path[-1]
        ref_name, reshape = _LEAVES.get((classes[owner], name), (name, None))
        ref_shape = reshape(leaf.shape) if reshape else leaf.shape
        layout[path] = ((*reference[owner], ref_name), tuple(ref_shape), tuple(leaf.shape))
    return layout


def _flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, Any]:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(_flatten(v, (*prefix, str(k))))
        else:
            flat[(*prefix, str(k))] = v
    return flat


def convert_score_sde_params(
    ref_params: Mapping,
    module: nn.Module,
    image_shape: tuple[int, int, int],
    source: str = "the score SDE parameters",
) -> Params:
    """A reference parameter tree -> the parameters of `module` (float32); every key, shape checked.

    `source` names where the tree came from in error messages (the file).
    """
    found = _flatten(ref_params)
    layout = reference_layout(module, image_shape)
    expected = {ref_path for ref_path, _, _ in layout.values()}
    unknown = sorted("/".join(p) for p in found if p not in expected)
    if unknown:
        shown = ", ".join(unknown[:5]) + (
            f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        )
        raise CheckpointError(
            f"{source}: {len(unknown)} parameter(s) that {type(module).__name__} does not have: "
            f"{shown} (is the model config the one the checkpoint was trained with?)"
        )
    params: dict = {}
    for path, (ref_path, ref_shape, shape) in layout.items():
        key = "/".join(ref_path)
        if ref_path not in found:
            raise CheckpointError(f"{source}: missing parameter {key} (expected shape {ref_shape})")
        value = np.asarray(found[ref_path])
        if value.shape != ref_shape:
            raise CheckpointError(
                f"{source}: parameter {key} has shape {value.shape}, expected {ref_shape}"
            )
        node = params
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = jnp.asarray(value.reshape(shape), jnp.float32)
    return params


# -- checkpoint files -----------------------------------------------------------

WHICH = {"ema": ("params_ema",), "params": ("optimizer", "target")}


def read_score_sde_checkpoint(path: str | os.PathLike, which: str = "ema") -> Mapping:
    """The parameter tree stored in a score SDE checkpoint file: `params_ema` or the raw params.

    `which` is "ema" (the `params_ema` the paper samples with) or "params"
    (the optimiser's target; a tree stored under `params` is accepted too).
    """
    if which not in WHICH:
        raise ConfigError(f"which must be one of {', '.join(WHICH)}, got {which!r}")
    try:
        with open(path, "rb") as f:
            state = serialization.msgpack_restore(f.read())
    except FileNotFoundError as err:
        raise CheckpointError(f"no score SDE checkpoint at {path}") from err
    except Exception as err:  # msgpack raises several unrelated types on corrupt input
        raise CheckpointError(f"{path} is not a readable flax msgpack checkpoint: {err}") from err
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a training state")
    keys = WHICH[which]
    if which == "params" and "params" in state and "optimizer" not in state:
        keys = ("params",)
    tree = state
    for k in keys:
        if not isinstance(tree, Mapping) or k not in tree:
            raise CheckpointError(
                f"{path} has no {'/'.join(keys)} (top-level keys: {', '.join(map(str, state))}); "
                "expected a score SDE training state"
            )
        tree = tree[k]
    return tree


def score_sde_step(path: str | os.PathLike) -> int:
    """The training step a score SDE checkpoint file records (0 if it has none)."""
    with open(path, "rb") as f:
        state = serialization.msgpack_restore(f.read())
    step = state.get("step", 0) if isinstance(state, Mapping) else 0
    return int(step)


def load_score_sde_checkpoint(
    path: str | os.PathLike, config: Mapping, which: str = "ema"
) -> Params:
    """Parameters of `module_from_score_sde_config(config)` from a score SDE checkpoint file.

    `config` is the reference config as a plain dict, with its `model` and
    `data` sections (`data.image_size`, `data.num_channels`, `data.centered`).
    """
    module = module_from_score_sde_config(config)
    data = config["data"]
    image_shape = (data["image_size"], data["image_size"], data.get("num_channels", 3))
    tree = read_score_sde_checkpoint(path, which)
    return convert_score_sde_params(tree, module, image_shape, source=os.fspath(path))


# -- configs --------------------------------------------------------------------

# The reference's NCSN++ options (config.model.<name>) and this package's kwarg names.
_NCSNPP_OPTIONS = {
    "nf": "nf",
    "ch_mult": "ch_mult",
    "num_res_blocks": "num_res_blocks",
    "attn_resolutions": "attn_resolutions",
    "dropout": "dropout",
    "resamp_with_conv": "resamp_with_conv",
    "conditional": "conditional",
    "fir": "fir",
    "fir_kernel": "fir_kernel",
    "skip_rescale": "skip_rescale",
    "resblock_type": "resblock_type",
    "progressive": "progressive",
    "progressive_input": "progressive_input",
    "progressive_combine": "progressive_combine",
    "embedding_type": "embedding_type",
    "init_scale": "init_scale",
    "fourier_scale": "fourier_scale",
    "scale_by_sigma": "scale_by_sigma",
    "nonlinearity": "act",
}
_NCSNV2_OPTIONS = {
    "nf": "ngf",
    "interpolation": "interpolation",
    "scale_by_sigma": "scale_by_sigma",
    "nonlinearity": "act",
}
_NCSNV2_ARCHITECTURES = {
    "ncsnv2_64": "ncsnv2",
    "ncsnv2_128": "ncsnv2_deeper",
    "ncsnv2_256": "ncsnv2_deepest",
}
# Options that only one value of is implemented (the one every reference config uses).
_FIXED = {
    "ncsnpp": {"normalization": "GroupNorm", "attention_type": "ddpm", "conv_size": 3},
    "ncsnv2": {"normalization": "InstanceNorm++"},
}
# Options of the model section that are not the network's: the process, the
# noise levels, EMA. NCSNv2 configs also inherit NCSN++'s dropout and
# embedding_type from the default config, which its network never reads.
_NOT_NETWORK = {
    "name",
    "sigma_min",
    "sigma_max",
    "sigma_begin",
    "num_scales",
    "beta_min",
    "beta_max",
    "ema_rate",
}
_NCSNV2_IGNORED = {"dropout", "embedding_type"}
_OPTIONAL = {"fourier_scale"}  # read by the reference only with Fourier features


def module_kwargs_from_score_sde_config(model_section: Mapping, *, centered: bool) -> dict:
    """This package's kwargs for the network of a score SDE config's `model` section.

    For model.name "ncsnpp", `NCSNpp` kwargs; for "ncsnv2_64" / "ncsnv2_128" /
    "ncsnv2_256", `RefineNet` kwargs of the JAX port (see `refinenet_kwargs`).
    `centered` is the config's `data.centered` (False in the reference's VE
    and NCSNv2 configs, True in its VP and sub-VP ones), which decides whether
    the network maps inputs from [0, 1] to [-1, 1]. Raises ConfigError for an
    option the reference network does not read, a value not implemented, or
    a missing option.
    """
    name = str(model_section.get("name", ""))
    if name == "ncsnpp":
        options, fixed, ignored = _NCSNPP_OPTIONS, _FIXED["ncsnpp"], set()
    elif name in _NCSNV2_ARCHITECTURES:
        options, fixed, ignored = _NCSNV2_OPTIONS, _FIXED["ncsnv2"], _NCSNV2_IGNORED
    else:
        raise ConfigError(
            f"model.name {name!r} is not a network this converter reads; valid: ncsnpp, "
            f"{', '.join(_NCSNV2_ARCHITECTURES)}"
        )
    for key, value in model_section.items():
        if key in fixed and _normalise(value) != _normalise(fixed[key]):
            raise ConfigError(f"model.{key}={value!r} is not implemented; only {fixed[key]!r} is")
        if key not in options and key not in fixed and key not in _NOT_NETWORK | ignored:
            raise ConfigError(f"model.{key} is not an option of the score SDE {name} network")

    kwargs: dict[str, Any] = {"centered": bool(centered)}
    if name in _NCSNV2_ARCHITECTURES:
        kwargs.update(refinenet_kwargs(_NCSNV2_ARCHITECTURES[name], score_sde_port=True))
    for key, kwarg in options.items():
        if key not in model_section:
            if key in _OPTIONAL or (name != "ncsnpp" and key == "interpolation"):
                continue
            raise ConfigError(f"model.{key} is missing from the score SDE {name} config")
        kwargs[kwarg] = _normalise(model_section[key])
    if name == "ncsnpp" and kwargs["embedding_type"] != "fourier":
        kwargs.pop("fourier_scale", None)
    return kwargs


def _normalise(value: Any) -> Any:
    """Config values as module fields: lists as (hashable) tuples, names in lower case."""
    if isinstance(value, list | tuple):
        return tuple(_normalise(v) for v in value)
    if isinstance(value, str):
        return value if value in {"GroupNorm", "InstanceNorm++"} else value.lower()
    return value


def module_from_score_sde_config(config: Mapping) -> NCSNpp | RefineNet:
    """The `NCSNpp` or `RefineNet` of a score SDE config (a plain dict with `model` and `data`)."""
    model, data = config["model"], config["data"]
    kwargs = module_kwargs_from_score_sde_config(model, centered=data.get("centered", False))
    return NCSNpp(**kwargs) if model["name"] == "ncsnpp" else RefineNet(**kwargs)
