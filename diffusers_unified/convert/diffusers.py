"""diffusers' DDPM checkpoints in: a `UNet2DModel` directory and its DDPM / DDIM scheduler.

`load_unet2d(directory)` reads `config.json` and `diffusion_pytorch_model.safetensors`
(with safetensors' NumPy API: no torch) and returns the keyword arguments of this
package's `nets.UNet` and its parameters. The networks it accepts are those of
diffusers' DDPM checkpoints (`google/ddpm-cifar10-32`, `-celebahq-256`, `-church-256`,
...): `DownBlock2D` / `AttnDownBlock2D` / `UpBlock2D` / `AttnUpBlock2D` blocks, a
`UNetMidBlock2D`, single-head attention, DDPM's sinusoidal time embedding
(`freq_shift` 1; `flip_sin_to_cos` either way: the flip is a permutation of the
embedding, absorbed into the first layer of the time MLP), `resnet_time_scale_shift`
"default" and `downsample_padding` 0 (which pads (0, 1, 0, 1) before the stride-2
convolution, as this package's SAME padding does). On this package's side that is
`UNet(up_attention="per_block", ...)`. Anything else raises `ConfigError` naming the
option and what is supported.

`load_ddpm_scheduler(path)` reads a `DDPMScheduler` / `DDIMScheduler` config and returns
what this package's DDPM process and samplers need (see its docstring).

safetensors is the optional extra `convert`; nothing here imports torch.

(Longer than this package's ~400-line guide: a diffusers checkpoint is one format
in two halves, network and scheduler, read together and checked by the same rules.)
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from diffusers_unified.errors import CheckpointError, ConfigError
from diffusers_unified.nets.unet import _groups

CONFIG = "config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
SCHEDULER_CONFIG = "scheduler_config.json"

# UNet2DModel's options with diffusers' defaults (used when config.json omits one), and
# for each the values this converter can express (None: any value, checked below).
_UNET_OPTIONS: dict[str, tuple[Any, tuple | None]] = {
    "sample_size": (None, None),
    "in_channels": (3, None),
    "out_channels": (3, None),
    "center_input_sample": (False, (False,)),
    "time_embedding_type": ("positional", ("positional",)),
    "time_embedding_dim": (None, None),
    "freq_shift": (0, (1,)),
    "flip_sin_to_cos": (True, (False, True)),
    "down_block_types": (None, None),
    "mid_block_type": ("UNetMidBlock2D", ("UNetMidBlock2D",)),
    "up_block_types": (None, None),
    "block_out_channels": ((224, 448, 672, 896), None),
    "layers_per_block": (2, None),
    "mid_block_scale_factor": (1, (1,)),
    "downsample_padding": (1, (0,)),
    "downsample_type": ("conv", ("conv",)),
    "upsample_type": ("conv", ("conv",)),
    "dropout": (0.0, None),
    "act_fn": ("silu", ("silu", "swish")),
    "attention_head_dim": (8, None),
    "norm_num_groups": (32, None),
    "attn_norm_num_groups": (None, None),
    "norm_eps": (1e-5, None),
    "resnet_time_scale_shift": ("default", ("default",)),
    "add_attention": (True, (True,)),
    "class_embed_type": (None, (None,)),
    "num_class_embeds": (None, (None,)),
    "num_train_timesteps": (None, None),  # only read by the "learned" time embedding
}
_DOWN_BLOCKS = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP_BLOCKS = {"UpBlock2D": False, "AttnUpBlock2D": True}

# The attention tensors of diffusers' pre-0.14 `AttentionBlock`, and their new names
# (diffusers' `_convert_deprecated_attention_blocks` does the same renaming).
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


# -- the network's config ----------------------------------------------------------


def read_config(path: str | pathlib.Path) -> dict:
    """A JSON config file as a dict; CheckpointError if it is missing or not JSON."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (expected a diffusers config JSON file)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not a JSON config file ({err})") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _options(config: dict) -> dict:
    """config.json completed with diffusers' defaults; ConfigError for what cannot be expressed."""
    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise ConfigError(f"config.json: _class_name is {name!r}; supported: UNet2DModel")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _UNET_OPTIONS)
    if unknown:
        raise ConfigError(
            f"config.json: unsupported UNet2DModel option(s) {', '.join(unknown)}; "
            f"supported: {', '.join(_UNET_OPTIONS)}"
        )
    options = {key: config.get(key, default) for key, (default, _) in _UNET_OPTIONS.items()}
    for key, (_, allowed) in _UNET_OPTIONS.items():
        if allowed is not None and options[key] not in allowed:
            raise ConfigError(
                f"config.json: {key}={options[key]!r} cannot be expressed by this package's "
                f"U-Net; supported: {' | '.join(repr(a) for a in allowed)}"
            )
    return options


def _check_blocks(options: dict) -> list[bool]:
    """Whether each resolution level has attention; ConfigError unless down and up mirror."""
    down, up = list(options["down_block_types"] or []), list(options["up_block_types"] or [])
    channels = list(options["block_out_channels"])
    if not down or len(down) != len(channels) or len(up) != len(channels):
        raise ConfigError(
            f"config.json: down_block_types ({len(down)}), up_block_types ({len(up)}) and "
            f"block_out_channels ({len(channels)}) must be non-empty and of the same length"
        )
    for key, blocks, valid in [
        ("down_block_types", down, _DOWN_BLOCKS),
        ("up_block_types", up, _UP_BLOCKS),
    ]:
        for block in blocks:
            if block not in valid:
                raise ConfigError(
                    f"config.json: {key} has {block!r}; supported: {' | '.join(valid)}"
                )
    attention = [_DOWN_BLOCKS[b] for b in down]
    if attention != [_UP_BLOCKS[b] for b in reversed(up)]:
        raise ConfigError(
            f"config.json: attention in down_block_types {down} and up_block_types {up} must "
            f"sit at the same resolutions (this package's attn_resolutions serves both paths)"
        )
    return attention


def unet_kwargs(config: dict) -> dict:
    """Keyword arguments of `nets.UNet` for a diffusers `UNet2DModel` config.json (a dict).

    Raises ConfigError, naming the option, for a network this package's U-Net cannot
    express exactly.
    """
    options = _options(config)
    attention = _check_blocks(options)
    channels = [int(c) for c in options["block_out_channels"]]
    ch = channels[0]
    if any(c % ch for c in channels):
        raise ConfigError(
            f"config.json: block_out_channels {channels} must be multiples of the first "
            f"({ch}), as ch * ch_mult"
        )
    if options["in_channels"] != options["out_channels"]:
        raise ConfigError(
            f"config.json: in_channels={options['in_channels']} and out_channels="
            f"{options['out_channels']} differ; supported: equal (the output is shaped like x)"
        )
    if options["time_embedding_dim"] not in (None, 4 * ch):
        raise ConfigError(
            f"config.json: time_embedding_dim={options['time_embedding_dim']}; supported: "
            f"None or 4 * block_out_channels[0] = {4 * ch}"
        )
    if not (isinstance(options["layers_per_block"], int) and options["layers_per_block"] >= 1):
        raise ConfigError(
            f"config.json: layers_per_block={options['layers_per_block']!r}; expected an int >= 1"
        )
    groups = options["norm_num_groups"]
    if options["attn_norm_num_groups"] not in (None, groups):
        raise ConfigError(
            f"config.json: attn_norm_num_groups={options['attn_norm_num_groups']}; supported: "
            f"None or norm_num_groups ({groups})"
        )
    for c in _norm_widths(channels, options["layers_per_block"]):
        if not isinstance(groups, int) or c % groups or _groups(c, groups) != groups:
            raise ConfigError(
                f"config.json: norm_num_groups={groups!r} at a GroupNorm of {c} channels; "
                f"supported: a divisor of every width that leaves at least 4 channels per group "
                f"(this package's U-Net would use {_groups(c, groups)} groups there)"
            )
    levels_with_attention = [i for i, a in enumerate(attention) if a]
    head_dim = options["attention_head_dim"]
    for i in [*levels_with_attention, len(channels) - 1]:  # the middle attends at the last
        if head_dim is not None and head_dim != channels[i]:
            raise ConfigError(
                f"config.json: attention_head_dim={head_dim} gives "
                f"{channels[i] // head_dim} heads at {channels[i]} channels; supported: None "
                f"(one head, as DDPM) or the channel count of every attention layer"
            )
    size = options["sample_size"]
    height = size[0] if isinstance(size, list | tuple) else size
    if levels_with_attention and not isinstance(height, int):
        raise ConfigError(
            f"config.json: sample_size={size!r}; expected the image size (an int or [H, W]) "
            f"to place attention by resolution"
        )
    dropout = float(options["dropout"])
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"config.json: dropout={dropout}; expected a value in [0, 1)")
    return dict(
        ch=ch,
        ch_mult=tuple(c // ch for c in channels),
        num_res_blocks=options["layers_per_block"],
        attn_resolutions=tuple(height // 2**i for i in levels_with_attention),
        dropout=dropout,
        resamp_with_conv=True,
        embedding="sinusoidal",
        skip_rescale=False,
        num_groups=groups,
        act="silu",
        up_attention="per_block",
        norm_eps=float(options["norm_eps"]),
    )


def _norm_widths(channels: list[int], layers: int) -> set[int]:
    """The channel counts of every GroupNorm of the network (attention adds none)."""
    return {shape[0] for _, _, kind, shape in _layout(channels, layers, [], 1) if kind == "norm"}


# -- the tensors -------------------------------------------------------------------


def _layout(
    channels: list[int], layers: int, attention: list[bool], image_channels: int
) -> Iterator[tuple[str, tuple[str, ...], str, tuple[int, ...]]]:
    """Every layer of the network, in the order `nets.UNet` creates its modules.

    Yields (diffusers prefix, flax path, kind, shape), kind being "conv" (a 3x3
    convolution, shape (out, in)), "linear" (out, in), "nin" (a 1x1 convolution, out,
    in) or "norm" (channels,). Flax names modules by class and creation order, which
    is what the counters below reproduce.
    """
    count = {"ResnetBlock": 0, "AttnBlock": 0, "Downsample": 0, "Upsample": 0}

    def new(cls: str) -> str:
        count[cls] += 1
        return f"{cls}_{count[cls] - 1}"

    def resnet(prefix: str, c_in: int, c_out: int):
        path = (new("ResnetBlock"),)
        yield f"{prefix}.norm1", (*path, "GroupNorm_0"), "norm", (c_in,)
        yield f"{prefix}.conv1", (*path, "Conv_0"), "conv", (c_out, c_in)
        yield f"{prefix}.time_emb_proj", (*path, "Dense_0"), "linear", (c_out, 4 * channels[0])
        yield f"{prefix}.norm2", (*path, "GroupNorm_1"), "norm", (c_out,)
        yield f"{prefix}.conv2", (*path, "Conv_1"), "conv", (c_out, c_out)
        if c_in != c_out:
            yield f"{prefix}.conv_shortcut", (*path, "Dense_1"), "nin", (c_out, c_in)

    def attn(prefix: str, c: int):
        path = (new("AttnBlock"),)
        yield f"{prefix}.group_norm", (*path, "GroupNorm_0"), "norm", (c,)
        for i, name in enumerate(["to_q", "to_k", "to_v", "to_out.0"]):
            yield f"{prefix}.{name}", (*path, f"Dense_{i}"), "linear", (c, c)

    ch, last = channels[0], len(channels) - 1
    yield "time_embedding.linear_1", ("NoiseEmbedding_0", "Dense_0"), "linear", (4 * ch, ch)
    yield "time_embedding.linear_2", ("NoiseEmbedding_0", "Dense_1"), "linear", (4 * ch, 4 * ch)
    yield "conv_in", ("Conv_0",), "conv", (ch, image_channels)
    skips, c_in = [ch], ch
    for i, c in enumerate(channels):
        for j in range(layers):
            yield from resnet(f"down_blocks.{i}.resnets.{j}", c_in, c)
            if attention and attention[i]:
                yield from attn(f"down_blocks.{i}.attentions.{j}", c)
            skips.append(c_in := c)
        if i != last:
            path = (new("Downsample"), "Conv_0")
            yield f"down_blocks.{i}.downsamplers.0.conv", path, "conv", (c, c)
            skips.append(c)
    yield from resnet("mid_block.resnets.0", c_in, c_in)
    yield from attn("mid_block.attentions.0", c_in)
    yield from resnet("mid_block.resnets.1", c_in, c_in)
    for k, i in enumerate(reversed(range(len(channels)))):
        c = channels[i]
        for j in range(layers + 1):
            yield from resnet(f"up_blocks.{k}.resnets.{j}", c_in + skips.pop(), c)
            if attention and attention[i]:
                yield from attn(f"up_blocks.{k}.attentions.{j}", c)
            c_in = c
        if i != 0:
            yield f"up_blocks.{k}.upsamplers.0.conv", (new("Upsample"), "Conv_0"), "conv", (c, c)
    yield "conv_norm_out", ("GroupNorm_0",), "norm", (ch,)
    yield "conv_out", ("Conv_1",), "conv", (image_channels, ch)


def expected_tensors(config: dict) -> dict[str, tuple[int, ...]]:
    """The tensor names of a diffusers checkpoint for this config.json, with their shapes."""
    shapes = {}
    for prefix, _, kind, shape in _layout_for(config):
        weight = {"conv": shape + (3, 3), "nin": shape + (1, 1)}.get(kind, shape)
        shapes[f"{prefix}.weight"] = weight
        shapes[f"{prefix}.bias"] = shape[:1]
    return shapes


def _layout_for(config: dict):
    """`_layout` of the network of a config.json (ConfigError if it cannot be expressed)."""
    kwargs, options = unet_kwargs(config), _options(config)
    channels = [kwargs["ch"] * m for m in kwargs["ch_mult"]]
    attention = _check_blocks(options)
    return _layout(channels, kwargs["num_res_blocks"], attention, options["in_channels"])


def convert_state_dict(tensors: dict[str, np.ndarray], config: dict, source: str = WEIGHTS):
    """A diffusers `UNet2DModel` state dict (NumPy arrays) -> parameters of `nets.UNet`.

    Convolutions OIHW -> HWIO, linear layers and 1x1 convolutions (out, in) -> Dense
    kernels (in, out), GroupNorm weight -> scale; attention tensors under either the
    old (`query`, `key`, `value`, `proj_attn`) or the new (`to_q`, `to_k`, `to_v`,
    `to_out.0`) names. Every tensor must be there with the shape config.json implies,
    and no other: CheckpointError names `source`, the tensor and expected vs found.
    """
    flip = _options(config)["flip_sin_to_cos"]
    tensors = _rename_old_attention(tensors, source)
    expected = expected_tensors(config)
    problems = [
        f"tensor {k!r} is missing (expected shape {expected[k]})"
        for k in expected
        if k not in tensors
    ]
    problems += [
        f"unexpected tensor {k!r} of shape {tuple(tensors[k].shape)}"
        for k in sorted(tensors)
        if k not in expected
    ]
    problems += [
        f"tensor {k!r} has shape {tuple(tensors[k].shape)}, expected {expected[k]}"
        for k in expected
        if k in tensors and tuple(tensors[k].shape) != expected[k]
    ]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(
            f"{source} does not match the UNet2DModel of its config.json: "
            + "; ".join(problems[:5])
            + more
        )

    params: dict = {}
    for prefix, path, kind, _ in _layout_for(config):
        weight = np.asarray(tensors[f"{prefix}.weight"], np.float32)
        bias = np.asarray(tensors[f"{prefix}.bias"], np.float32)
        if kind == "norm":
            leaves = {"scale": weight, "bias": bias}
        elif kind == "conv":
            leaves = {"kernel": weight.transpose(2, 3, 1, 0), "bias": bias}
        else:  # linear, or a 1x1 convolution
            kernel = weight.reshape(weight.shape[:2]).T
            if prefix == "time_embedding.linear_1" and flip:
                kernel = kernel[_unflip(kernel.shape[0])]
            leaves = {"kernel": kernel, "bias": bias}
        node = params
        for name in path:
            node = node.setdefault(name, {})
        node.update({k: np.ascontiguousarray(v) for k, v in leaves.items()})
    return params


def _unflip(dim: int) -> np.ndarray:
    """Rows of diffusers' [cos, sin] embedding in this package's [sin, cos] order."""
    half = dim // 2
    order = np.concatenate([np.arange(half, 2 * half), np.arange(half)])
    return np.concatenate([order, np.arange(2 * half, dim)])  # the zero pad of an odd dim


def _rename_old_attention(tensors: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    renamed = {}
    for key, value in tensors.items():
        prefix, _, rest = key.rpartition(".attentions.")
        new = key
        if prefix:
            index, _, tail = rest.partition(".")
            layer, _, leaf = tail.rpartition(".")
            if layer in _OLD_ATTENTION_NAMES:
                new = f"{prefix}.attentions.{index}.{_OLD_ATTENTION_NAMES[layer]}.{leaf}"
        if new in renamed:
            raise CheckpointError(
                f"{source}: tensor {new!r} appears under both its old and its new name"
            )
        renamed[new] = value
    return renamed


def load_unet2d(directory: str | pathlib.Path) -> tuple[dict, dict]:
    """A diffusers `UNet2DModel` directory -> (`nets.UNet` keyword arguments, parameters).

    `directory` holds `config.json` and `diffusion_pytorch_model.safetensors` (or is a
    pipeline directory with them under `unet/`). The parameters are float32 NumPy
    arrays (a float16 checkpoint is upcast) for `UNet(**kwargs).apply({'params':
    params}, x, noise_cond)`, with x in NHWC and noise_cond the diffusers timestep
    (999 t for the package's DDPM process with N = 1000). The image size and
    channels stay in config.json (`sample_size`, `in_channels`).
    """
    directory = pathlib.Path(directory)
    if not (directory / CONFIG).is_file() and (directory / "unet" / CONFIG).is_file():
        directory = directory / "unet"
    config = read_config(directory / CONFIG)
    kwargs = unet_kwargs(config)
    weights = directory / WEIGHTS
    if not weights.is_file():
        found = sorted(p.name for p in directory.glob("diffusion_pytorch_model*"))
        raise CheckpointError(
            f"{weights}: no such file (found {found or 'no weights'}); this converter reads "
            f"safetensors only: save the model with safe_serialization=True"
        )
    return kwargs, convert_state_dict(_read_safetensors(weights), config, str(weights))


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file
    except ImportError as err:
        raise ConfigError(
            "reading diffusers weights needs safetensors: pip install 'diffusers_unified[convert]'"
        ) from err
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types, and TypeError for bf16
        raise CheckpointError(f"{path}: cannot read it as NumPy safetensors ({err})") from err


# -- the scheduler -----------------------------------------------------------------

_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
_VARIANCES = {
    "fixed_small": "small",
    "fixed_small_log": "small",  # the same variance, exponentiated from its log
    "fixed_large": "large",
    "fixed_large_log": "large",
}
# diffusers' schedule name -> this package's `DDPM(schedule=...)`, where it has one.
_SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}
_SCHEDULER_OPTIONS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "variance_type": "fixed_small",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "set_alpha_to_one": True,  # DDIMScheduler only
}


def load_ddpm_scheduler(path: str | pathlib.Path) -> dict:
    """A diffusers `DDPMScheduler` / `DDIMScheduler` config -> what the DDPM process needs.

    `path` is a `scheduler_config.json`, or a directory holding one (also under
    `scheduler/`). Missing options take diffusers' defaults. Returns a dict:

    - `scheduler`: the class name; `num_train_timesteps` (the DDPM process's N);
    - `beta_schedule`: this package's `DDPM(schedule=...)` name, "linear" or "cosine"
      (diffusers' "squaredcos_cap_v2", Nichol and Dhariwal's s = 0.008 with betas
      capped at 0.999, which `schedules.cosine_betas` computes), or None where the DDPM
      process has no such schedule ("scaled_linear", "sigmoid", `trained_betas`);
      `beta_start`, `beta_end`; and always `betas`, the N betas in float64, computed
      as diffusers does;
    - `variance`: the ancestral sampler's "small" (fixed_small) or "large" (fixed_large);
    - `clip_x0` (diffusers' clip_sample) and `clip_sample_range`;
    - `parametrization`: "eps", "x0" or "v" (diffusers' prediction_type epsilon,
      sample, v_prediction);
    - `timestep_spacing`, `steps_offset` (for `inference_timesteps`) and, for DDIM,
      `set_alpha_to_one` (this package's samplers always end on clean data, which is
      diffusers' True).

    ConfigError, naming the option, for what the package cannot follow: learned
    variances, dynamic thresholding, zero-terminal-SNR rescaling, another scheduler.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        candidates = [path / SCHEDULER_CONFIG, path / "scheduler" / SCHEDULER_CONFIG]
        path = next((c for c in candidates if c.is_file()), candidates[0])
    config = read_config(path)
    name = config.get("_class_name", "DDPMScheduler")
    if name not in _SCHEDULERS:
        raise ConfigError(f"{path}: _class_name is {name!r}; supported: {', '.join(_SCHEDULERS)}")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _SCHEDULER_OPTIONS)
    if unknown:
        raise ConfigError(
            f"{path}: unsupported scheduler option(s) {', '.join(unknown)}; supported: "
            f"{', '.join(_SCHEDULER_OPTIONS)}"
        )
    opts = {k: config.get(k, default) for k, default in _SCHEDULER_OPTIONS.items()}

    def reject(key: str, supported: str):
        raise ConfigError(f"{path}: {key}={opts[key]!r} is not supported; supported: {supported}")

    if opts["variance_type"] not in _VARIANCES:
        reject("variance_type", " | ".join(_VARIANCES))
    if opts["prediction_type"] not in _PREDICTIONS:
        reject("prediction_type", " | ".join(_PREDICTIONS))
    if opts["thresholding"]:
        reject("thresholding", "false (clip_sample is)")
    if opts["rescale_betas_zero_snr"]:
        reject("rescale_betas_zero_snr", "false (alpha_N = 0 leaves no Gaussian prior to start)")
    n = opts["num_train_timesteps"]
    if not (isinstance(n, int) and n >= 2):
        reject("num_train_timesteps", "an int >= 2")

    betas = _betas(opts, reject)
    schedule = None if opts["trained_betas"] is not None else _SCHEDULES.get(opts["beta_schedule"])
    out = {
        "scheduler": name,
        "num_train_timesteps": n,
        "beta_schedule": schedule,
        "beta_start": float(opts["beta_start"]),
        "beta_end": float(opts["beta_end"]),
        "betas": betas,
        "variance": _VARIANCES[opts["variance_type"]],
        "clip_x0": bool(opts["clip_sample"]),
        "clip_sample_range": float(opts["clip_sample_range"]),
        "parametrization": _PREDICTIONS[opts["prediction_type"]],
        "timestep_spacing": opts["timestep_spacing"],
        "steps_offset": int(opts["steps_offset"]),
    }
    if name == "DDIMScheduler":
        out["set_alpha_to_one"] = bool(opts["set_alpha_to_one"])
    return out


def _betas(opts: dict, reject) -> np.ndarray:
    """diffusers' betas for a scheduler config, in float64."""
    n, start, end = opts["num_train_timesteps"], opts["beta_start"], opts["beta_end"]
    if opts["trained_betas"] is not None:
        betas = np.asarray(opts["trained_betas"], np.float64)
        if betas.shape != (n,):
            reject("trained_betas", f"a list of num_train_timesteps = {n} betas")
        return betas
    schedule = opts["beta_schedule"]
    if schedule == "linear":
        return np.linspace(start, end, n, dtype=np.float64)
    if schedule == "scaled_linear":  # latent diffusion's
        return np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    if schedule == "squaredcos_cap_v2":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.asarray([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)])
    if schedule == "sigmoid":  # GeoDiff's
        return 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, n))) * (end - start) + start
    reject("beta_schedule", "linear | scaled_linear | squaredcos_cap_v2 | sigmoid | trained_betas")


def inference_timesteps(scheduler: dict, num_steps: int) -> np.ndarray:
    """The timesteps diffusers' `set_timesteps(num_steps)` chooses, descending.

    For `scheduler` as `load_ddpm_scheduler` returns it ("leading" spacing by default:
    980, 960, ..., 0 for 50 of 1000 steps). This package's time grid is
    `timesteps / (N - 1)`: DDPM level i sits at t_i = i / (N - 1).
    """
    n, spacing, offset = scheduler["num_train_timesteps"], scheduler["timestep_spacing"], 0
    if not (isinstance(num_steps, int) and 1 <= num_steps <= n):
        raise ConfigError(f"num_steps={num_steps!r}; expected an int in [1, {n}]")
    if spacing == "linspace":
        steps = np.linspace(0, n - 1, num_steps).round()[::-1]
    elif spacing == "leading":
        steps, offset = np.arange(num_steps)[::-1] * (n // num_steps), scheduler["steps_offset"]
    elif spacing == "trailing":
        steps = np.round(np.arange(n, 0, -n / num_steps)) - 1
    else:
        raise ConfigError(f"timestep_spacing={spacing!r}; supported: linspace | leading | trailing")
    return (steps + offset).astype(np.int64)
