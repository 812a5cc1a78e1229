"""pytorch-fid's Inception weights -> the `.npz` file that `eval.inception_weights` names.

pytorch-fid distributes the TF graph `inception-2015-12-05` ported to PyTorch
as `pt_inception-2015-12-05-6726825d.pth`, a state dict of its
`fid_inception_v3` (torchvision's Inception-v3 layout). Download it once
yourself, then

    diffusers-unified-convert inception --weights=pt_inception-2015-12-05-6726825d.pth \
        --out=inception_fid.npz

(`convert_pytorch_fid_weights` in Python). Reading the `.pth`
needs torch (the optional extra `convert`); nothing else in the package does.

The mapping is one key to one key, with the module names unchanged
(`Mixed_5b.branch1x1.conv.weight` -> `params/Mixed_5b/branch1x1/conv/kernel`):
conv weights OIHW -> HWIO, batch norm weight/bias -> params scale/bias and
running mean/var -> batch_stats mean/var, `fc.weight` (out, in) -> kernel
(in, out); `num_batches_tracked` counters are dropped. `convert_state_dict`
does it on NumPy arrays, so tests use the same code without torch. The
output is written under a temporary name and renamed: a failed conversion
leaves no file behind.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from diffusers_unified.errors import CheckpointError, ConfigError
from diffusers_unified.nets.inception import check_weights, expected_shapes

# torch suffix -> (Flax collection, Flax suffix); the module path in front is shared.
_SUFFIXES = {
    "conv.weight": ("params", "conv/kernel"),
    "bn.weight": ("params", "bn/scale"),
    "bn.bias": ("params", "bn/bias"),
    "bn.running_mean": ("batch_stats", "bn/mean"),
    "bn.running_var": ("batch_stats", "bn/var"),
    "fc.weight": ("params", "fc/kernel"),
    "fc.bias": ("params", "fc/bias"),
}
_IGNORED = ("num_batches_tracked",)  # BatchNorm's step counter: unused in inference


def flax_key(torch_key: str) -> str | None:
    """The flat Flax key of a pytorch-fid state-dict key (None for an ignored key)."""
    if torch_key.endswith(_IGNORED):
        return None
    for suffix, (collection, flax_suffix) in _SUFFIXES.items():
        if torch_key == suffix or torch_key.endswith("." + suffix):
            path = torch_key[: -len(suffix)].rstrip(".").replace(".", "/")
            return "/".join(p for p in (collection, path, flax_suffix) if p)
    raise CheckpointError(f"unexpected key {torch_key!r}: not a layer of the FID Inception-v3")


def torch_key(key: str) -> str:
    """The pytorch-fid state-dict key of a flat Flax key (the inverse of `flax_key`)."""
    collection, rest = key.split("/", 1)
    for suffix, (coll, flax_suffix) in _SUFFIXES.items():
        if coll == collection and (rest == flax_suffix or rest.endswith("/" + flax_suffix)):
            path = rest[: -len(flax_suffix)].rstrip("/").replace("/", ".")
            return f"{path}.{suffix}" if path else suffix
    raise ValueError(f"no pytorch-fid key for {key!r}")


def _to_flax_layout(array: np.ndarray) -> np.ndarray:
    if array.ndim == 4:  # conv OIHW -> HWIO
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 2:  # linear (out, in) -> (in, out)
        return array.T
    return array


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 4:
        h, w, i, o = shape
        return (o, i, h, w)
    return tuple(reversed(shape)) if len(shape) == 2 else shape


def expected_torch_shapes() -> dict[str, tuple[int, ...]]:
    """{pytorch-fid key: shape} of every tensor the conversion needs (counters excluded)."""
    return {torch_key(k): _torch_shape(s) for k, s in expected_shapes().items()}


def convert_state_dict(state_dict: Mapping[str, np.ndarray], source: str = "state dict") -> dict:
    """pytorch-fid state dict (NumPy arrays) -> {flat Flax key: float32 array}, all checked.

    Raises `CheckpointError` naming `source` and the key, with the expected
    and the found shape, for a missing, unexpected or misshapen tensor.
    """
    expected = expected_torch_shapes()
    for key, shape in expected.items():
        if key not in state_dict:
            raise CheckpointError(f"{source}: missing key {key!r} (expected shape {shape})")
        found = tuple(np.shape(state_dict[key]))
        if found != shape:
            raise CheckpointError(f"{source}: key {key!r} has shape {found}, expected {shape}")
    unexpected = sorted(k for k in state_dict if k not in expected and not k.endswith(_IGNORED))
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected keys {unexpected[:5]} ({len(unexpected)} in all); "
            "is this pytorch-fid's FID Inception (pt_inception-2015-12-05-*.pth)?"
        )
    out = {
        flax_key(k): np.ascontiguousarray(_to_flax_layout(np.asarray(v, np.float32)))
        for k, v in state_dict.items()
        if k in expected
    }
    check_weights(out, source)
    return out


def save_weights(arrays: Mapping[str, np.ndarray], out_path: str) -> None:
    """Write the flat arrays to `out_path` (`.npz`) through a temporary file and a rename."""
    directory = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(directory):
        raise ConfigError(f"output directory {directory!r} does not exist")
    tmp = f"{out_path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _load_torch_state_dict(pth_path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ConfigError(
            "reading a .pth file needs torch: pip install 'diffusers_unified[convert]'"
        ) from e
    try:
        state = torch.load(pth_path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt or foreign file
        raise CheckpointError(f"{pth_path}: cannot be read as a PyTorch state dict ({e})") from e
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{pth_path}: expected a state dict of tensors, got {type(state)}")
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def convert_pytorch_fid_weights(pth_path: str, out_path: str) -> str:
    """Convert pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` to `out_path`; returns it."""
    if not os.path.isfile(pth_path):
        raise CheckpointError(f"weights file {pth_path!r} not found")
    arrays = convert_state_dict(_load_torch_state_dict(pth_path), source=pth_path)
    save_weights(arrays, out_path)
    return out_path
