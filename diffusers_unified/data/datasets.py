"""In-memory data sets, deterministic batches, and the checks that make bad data fail loudly.

A `Dataset` holds its train and held-out arrays on the host in their stored
form, and says how they become model inputs (`Scaling`):

- vector data (toy sets, Gaussian mixtures, float `.npz` vectors) are stored
  in model units and used as they are;
- quantised data with b bits (L = 2^b levels: 8-bit images, the 4-bit
  digits) are stored as integer levels v in {0, ..., L - 1}. A batch maps
  them to [0, 1] by x = v / (L - 1), or, with uniform dequantisation, by
  x = (v + u) / L with u ~ U[0, 1)^D drawn afresh for every batch (Theis et
  al. 2016, "A note on the evaluation of generative models", sec. 3.1; the
  score SDE code's `uniform_dequantization`, which divides by 256 too). The
  dequantised values fill [0, 1]: each v owns the bin [v/L, (v+1)/L], so a
  density on them bounds the discrete likelihood of the levels (see
  `Scaling.bpd_offset`);
- float images are stored in [0, 1].

Image data (NHWC) then go to [-1, 1] by x -> 2 x - 1 when `centered`, as in
the score SDE code (`data.centered`); otherwise they stay in [0, 1].

`batch(arrays, seed, step, batch_size)` is a pure function of (seed, step):
a resumed run sees exactly the batches an uninterrupted run would have seen.
`validate_batch` checks a batch against what the config expects and raises
`DataError` (exit code 4) with a message naming the expected and observed
shape, dtype, range or batch index.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from diffusers_unified.data.gaussian import GaussianMixture, example_mixture
from diffusers_unified.data.toy import (
    TOY_NAMES,
    TOY_NUM_CLASSES,
    eight_gaussians_mixture,
    sample_toy_with_labels,
)
from diffusers_unified.errors import ConfigError, DataError
from diffusers_unified.typing import Array

KINDS = ("vector", "image")

# Streams folded into PRNGKey(seed) before the epoch or step: the training loop
# derives its noise keys as fold_in(PRNGKey(seed), step), and the data order and
# dequantisation noise must not reuse those keys.
_ORDER_STREAM = 0x0DA7A0D5
_DEQUANT_STREAM = 0x0DE0A7
_EVAL_STREAM = 0x0E7A1


# -- scaling ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scaling:
    """How stored values become model inputs, and model outputs become pixels.

    `bounded` data (images, or any quantised data) are a [0, 1] quantity,
    which the model sees in [0, 1], or in [-1, 1] when `centered`. `bits` is
    the bit depth of quantised data (None for continuous data). Unbounded
    data (vectors) are stored in model units; `centered` is ignored for
    them (and False by convention).
    """

    centered: bool = False
    bits: int | None = None
    bounded: bool = True

    def __post_init__(self):
        if self.bits is not None and not (isinstance(self.bits, int) and 1 <= self.bits <= 16):
            raise ConfigError(f"bits must be an integer in 1..16 or None, got {self.bits!r}")
        if self.bits is not None and not self.bounded:
            raise ConfigError("quantised data (bits set) are bounded: they map to [0, 1]")

    @property
    def levels(self) -> int | None:
        return None if self.bits is None else 2**self.bits

    @property
    def model_range(self) -> tuple[float, float] | None:
        """The interval the model's inputs lie in: (-1, 1), (0, 1), or None (unbounded)."""
        if not self.bounded:
            return None
        return (-1.0, 1.0) if self.centered else (0.0, 1.0)

    def to_model(self, x, key=None) -> Array:
        """Stored values -> float32 model inputs; with `key`, dequantised uniformly.

        x / (L - 1) reaches both ends of [0, 1]; (x + u) / L with u ~ U[0, 1)
        lies in x's bin [x/L, (x+1)/L] (its right end only through float32
        rounding). `key` is only meaningful for quantised data.
        """
        x = jnp.asarray(x).astype(jnp.float32)  # integer levels < 2^16 are exact in float32
        if not self.bounded:
            return x
        if self.bits is not None:
            if key is None:
                x = x / (self.levels - 1)
            else:
                # Drawn flat: a rank-1 threefry draw compiles several times faster on CPU.
                u = jax.random.uniform(key, (x.size,), jnp.float32).reshape(x.shape)
                x = (x + u) / self.levels
        elif key is not None:
            raise ValueError("dequantisation needs quantised data (bits), but bits is None")
        return 2.0 * x - 1.0 if self.centered else x

    def to_unit(self, x) -> Array:
        """Model outputs -> [0, 1] units (unclipped); unbounded data pass unchanged."""
        x = jnp.asarray(x)
        return (x + 1.0) / 2.0 if self.bounded and self.centered else x

    def to_uint8(self, x) -> np.ndarray:
        """Model outputs of bounded data -> uint8 pixels 0..255, clipped (for PNG files)."""
        if not self.bounded:
            raise ValueError("only bounded (image) data can be turned into pixels")
        unit = np.clip(np.asarray(self.to_unit(x), np.float64), 0.0, 1.0)
        return np.round(unit * 255).astype(np.uint8)

    @property
    def bpd_offset(self) -> float:
        """Add to -log2 p_model(x) / D to get bits/dim of the stored levels.

        With dequantised inputs x = a (v + u) / L + b (a = 2 when centered,
        else 1), a model density p_model(x) is the density a^D p_model(x) of
        y = (v + u) / L, and a bin has volume L^-D, so by Jensen
        log P(v) = log E_u[a^D p_model(x)] - D log L >= E_u[log p_model(x)] + D log a - D log L.
        Hence bits/dim <= E_u[-log2 p_model(x)] / D + bits - log2 a: the offset
        is 7 for centered 8-bit data, as in the score SDE code's
        `offset = 7 - inverse_scaler(-1)`. Continuous data: 0, i.e. bits/dim
        of the density in model units.
        """
        if self.bits is None:
            return 0.0
        return float(self.bits) - (1.0 if self.centered else 0.0)


# -- the data set -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Train and held-out arrays in their stored form, with what downstream code needs.

    Arrays are NumPy arrays on the host: `x_*` of shape (n, d) for vector
    data or (n, H, W, C) for images; `y_*` integer labels (n,) in
    [0, num_classes), or None. `device_arrays` puts a split on the device
    once; `batch` draws from it. Construction validates everything and raises
    `DataError` on inconsistent shapes, labels, dtypes or ranges.
    """

    name: str
    x_train: np.ndarray = dataclasses.field(repr=False)
    x_test: np.ndarray = dataclasses.field(repr=False)
    kind: str = "vector"
    scaling: Scaling = Scaling(bounded=False)
    y_train: np.ndarray | None = dataclasses.field(default=None, repr=False)
    y_test: np.ndarray | None = dataclasses.field(default=None, repr=False)
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None

    def __post_init__(self):
        _validate_dataset(self)

    def __repr__(self):
        return (
            f"Dataset({self.name!r}, kind={self.kind!r}, data_shape={self.data_shape}, "
            f"num_train={self.num_train}, num_test={self.num_test}, "
            f"num_classes={self.num_classes}, scaling={self.scaling})"
        )

    @property
    def data_shape(self) -> tuple[int, ...]:
        """The shape of one example: (d,) or (H, W, C)."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.x_test.shape[0])

    @property
    def centered(self) -> bool:
        return self.scaling.centered

    @property
    def bits(self) -> int | None:
        return self.scaling.bits

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(x, y) of "train" or "test", stored form."""
        if split == "train":
            return self.x_train, self.y_train
        if split == "test":
            return self.x_test, self.y_test
        raise ValueError(f"unknown split {split!r}; valid: train, test")

    def model_data(self, split: str = "test") -> tuple[np.ndarray, np.ndarray | None]:
        """A whole split in model units (no dequantisation), as NumPy arrays."""
        x, y = self.split(split)
        return np.asarray(self.scaling.to_model(x)), y

    def device_arrays(self, split: str = "train", device=None) -> DataArrays:
        """The split as device arrays, put there once (`device`: a device or a sharding).

        Labels become int32. The result feeds `batch` and `eval_batches`.
        """
        x, y = self.split(split)
        if x.shape[0] == 0:
            raise DataError(f"dataset {self.name!r} has no {split} examples")
        y = None if y is None else np.asarray(y, np.int32)
        x, y = jax.device_put((x, y), device)
        return DataArrays(x=x, y=y, scaling=self.scaling, name=self.name)


class DataArrays(struct.PyTreeNode):
    """One split on the device: stored-form `x`, int32 labels `y` (or None), and its scaling.

    A pytree, so it can be an argument of `jax.jit` (the arrays are traced,
    not baked into the compiled code as constants).
    """

    x: Array
    y: Array | None
    scaling: Scaling = struct.field(pytree_node=False)
    name: str = struct.field(pytree_node=False, default="dataset")

    @property
    def num_examples(self) -> int:
        return int(self.x.shape[0])

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x.shape[1:])


def _describe_values(x: np.ndarray) -> str:
    lo, hi = (x.min(), x.max()) if x.size else (float("nan"), float("nan"))
    return f"dtype {x.dtype}, min {lo:.6g}, max {hi:.6g}"


def _validate_dataset(ds: Dataset) -> None:
    """Shapes, labels, dtypes and value ranges of a whole data set (at build time)."""
    name = ds.name
    if ds.kind not in KINDS:
        raise ConfigError(f"dataset {name!r}: kind must be one of {KINDS}, got {ds.kind!r}")
    if not isinstance(ds.scaling, Scaling):
        raise ConfigError(f"dataset {name!r}: scaling must be a Scaling, got {ds.scaling!r}")
    want_rank = 2 if ds.kind == "vector" else 4
    layout = "(n, d)" if ds.kind == "vector" else "(n, H, W, C)"
    for label, x in (("x_train", ds.x_train), ("x_test", ds.x_test)):
        if not isinstance(x, np.ndarray):
            raise DataError(f"dataset {name!r}: {label} must be a NumPy array, got {type(x)}")
        if x.ndim != want_rank:
            raise DataError(
                f"dataset {name!r}: {label} has shape {x.shape}; {ds.kind} data need {layout}"
            )
    if ds.x_train.shape[0] == 0:
        raise DataError(f"dataset {name!r} has no training examples")
    if ds.x_test.shape[1:] != ds.x_train.shape[1:]:
        raise DataError(
            f"dataset {name!r}: x_test examples have shape {ds.x_test.shape[1:]}, "
            f"x_train examples {ds.x_train.shape[1:]}"
        )
    if ds.kind == "image" and not ds.scaling.bounded:
        raise ConfigError(f"dataset {name!r}: image data must have a bounded scaling")
    for label, x in (("x_train", ds.x_train), ("x_test", ds.x_test)):
        if x.size:
            _validate_values(name, label, x, ds.scaling)
    _validate_labels(ds)


def _validate_values(name: str, label: str, x: np.ndarray, scaling: Scaling) -> None:
    bits = scaling.bits
    if bits is not None:
        if not np.issubdtype(x.dtype, np.integer):
            raise DataError(
                f"dataset {name!r}: {label} has {_describe_values(x)}, but bits={bits} "
                f"declares integer levels 0..{2**bits - 1}; store the levels as integers "
                "(uint8 for 8-bit data)"
            )
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 2**bits - 1:
            raise DataError(
                f"dataset {name!r}: {label} has values in [{lo}, {hi}], outside the "
                f"{bits}-bit levels 0..{2**bits - 1}"
            )
        return
    expected = "floats in [0, 1]" if scaling.bounded else "floats"
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(
            f"dataset {name!r}: {label} has {_describe_values(x)}, but no bit depth is "
            f"declared, so {expected} are expected. Declare the data as quantised "
            f"(bits=8 for 0..255 pixels) to have them scaled to [0, 1], or [-1, 1] with "
            "data.centered=True"
        )
    finite = np.isfinite(x).reshape(x.shape[0], -1).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise DataError(
            f"dataset {name!r}: {label} has non-finite values (NaN or inf) in "
            f"{bad.size} example(s), the first at index {bad[0]}"
        )
    if scaling.bounded:
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            hint = ""
            if hi > 1.0 and hi <= 255.0 and lo >= 0.0 and np.all(x == np.round(x)):
                hint = "; they look like 0..255 pixels: store them as uint8 or declare bits=8"
            raise DataError(
                f"dataset {name!r}: {label} has {_describe_values(x)}; stored float images "
                f"must lie in [0, 1] (data.centered=True maps them to [-1, 1] later){hint}"
            )


def _validate_labels(ds: Dataset) -> None:
    name = ds.name
    pairs = (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test))
    has = [y is not None for _, _, y in pairs]
    if has[0] != has[1] and ds.x_test.shape[0] > 0:
        raise DataError(f"dataset {name!r}: labels must be given for both splits or neither")
    if not any(has):
        if ds.num_classes is not None:
            raise DataError(f"dataset {name!r}: num_classes={ds.num_classes} but no labels")
        return
    if not (isinstance(ds.num_classes, int) and ds.num_classes >= 1):
        raise DataError(
            f"dataset {name!r} has labels, so num_classes must be a positive integer, "
            f"got {ds.num_classes!r}"
        )
    if ds.class_names is not None and len(ds.class_names) != ds.num_classes:
        raise DataError(
            f"dataset {name!r}: {len(ds.class_names)} class names for num_classes={ds.num_classes}"
        )
    for split, x, y in pairs:
        if y is None:
            continue
        if not isinstance(y, np.ndarray) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(
                f"dataset {name!r}: y_{split} must be an integer NumPy array, "
                f"got {getattr(y, 'dtype', type(y))}"
            )
        if y.shape != (x.shape[0],):
            raise DataError(
                f"dataset {name!r}: y_{split} has shape {y.shape}; expected ({x.shape[0]},), "
                f"one label per example of x_{split}"
            )
        if y.size and (y.min() < 0 or y.max() >= ds.num_classes):
            raise DataError(
                f"dataset {name!r}: y_{split} has labels in [{y.min()}, {y.max()}]; "
                f"expected 0..{ds.num_classes - 1} (num_classes={ds.num_classes})"
            )


# -- splitting ------------------------------------------------------------------------


def _num_held_out(n: int, test_size) -> int:
    """test_size: a fraction in [0, 1) of n, or a count in [0, n - 1]."""
    if isinstance(test_size, bool) or not isinstance(test_size, int | float):
        raise ConfigError(f"test_size must be a fraction or a count, got {test_size!r}")
    if isinstance(test_size, float):
        if not 0.0 <= test_size < 1.0:
            raise ConfigError(f"test_size={test_size} as a fraction must lie in [0, 1)")
        count = round(n * test_size)
    else:
        count = test_size
    if not 0 <= count <= n - 1:
        raise ConfigError(
            f"test_size={test_size} holds out {count} of {n} examples; at least one must "
            "remain for training"
        )
    return count


def split_indices(n: int, test_size, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: a seeded random split, each part in its original order."""
    num_test = _num_held_out(n, test_size)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[num_test:]), np.sort(perm[:num_test])


# -- builders ---------------------------------------------------------------------------


def exact_mixture(name: str, dim: int = 2) -> GaussianMixture | None:
    """The exact law of a `toy_dataset` when it is a Gaussian mixture, else None."""
    if name == "gmm":
        return example_mixture(dim)
    if name == "eight_gaussians":
        return eight_gaussians_mixture()
    return None


@functools.partial(jax.jit, static_argnums=2)
def _sample_mixture(mixture: GaussianMixture, key, n: int):
    return mixture.sample(key, n)


def toy_dataset(
    name: str, num_train: int = 10_000, num_test: int = 2_000, seed: int = 0, *, dim: int = 2
) -> Dataset:
    """A toy vector data set: one of `TOY_NAMES`, or "gmm" (`example_mixture(dim)`).

    Train and test points are num_train + num_test iid draws under
    PRNGKey(seed), split in that order. Labels: the mixture component for "gmm" and
    eight_gaussians, the moon for two_moons, the ring for rings; none for
    the others. The data are already zero-centred at unit scale, so there is
    no `centered` option. `dim` applies to "gmm" only.
    """
    if name not in (*TOY_NAMES, "gmm"):
        raise ConfigError(f"unknown toy data set {name!r}; valid: {', '.join((*TOY_NAMES, 'gmm'))}")
    if name != "gmm" and dim != 2:
        raise ConfigError(f"toy data set {name!r} is 2-D; dim={dim} applies to 'gmm' only")
    for label, n, least in (("num_train", num_train, 1), ("num_test", num_test, 0)):
        if isinstance(n, bool) or not isinstance(n, int) or n < least:
            raise ConfigError(f"{label} must be an int >= {least}, got {n!r}")
    # One draw of num_train + num_test iid points (one compilation), split in two.
    key, n = jax.random.PRNGKey(seed), num_train + num_test
    if name == "gmm":
        mixture = example_mixture(dim)
        x, y = _sample_mixture(mixture, key, n)
        num_classes = mixture.num_components
    else:
        x, y = sample_toy_with_labels(name, key, n)
        num_classes = TOY_NUM_CLASSES.get(name)
    x = np.asarray(x, np.float32)
    y = None if y is None else np.asarray(y, np.int32)
    x_train, x_test = x[:num_train], x[num_train:]
    y_train, y_test = (None, None) if y is None else (y[:num_train], y[num_train:])
    return Dataset(
        name=name,
        x_train=x_train,
        x_test=x_test,
        kind="vector",
        scaling=Scaling(bounded=False),
        y_train=y_train,
        y_test=y_test,
        num_classes=num_classes,
    )


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits as 4-bit levels (1797, 8, 8, 1) uint8 and labels (1797,) int32, read once."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "digits_dataset needs scikit-learn, which ships the 8x8 digits: "
            "pip install 'diffusers_unified[data]'"
        ) from exc
    digits = load_digits()
    x = np.minimum(digits.images, 15).astype(np.uint8)[..., None]
    x.flags.writeable = False  # shared by every call
    y = digits.target.astype(np.int32)
    y.flags.writeable = False
    return x, y


def digits_dataset(*, centered: bool = False, test_size=0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1797 images, NHWC (8, 8, 1), labels 0-9).

    Each pixel counts the inked pixels of a 4x4 block of a 32x32 bitmap, so
    it takes 17 values 0..16. We store them as 4-bit data (16 levels) and
    merge 16 ("all inked", the commonest non-zero value) into 15: a
    power-of-two level count lets dequantisation bins tile [0, 1] and gives
    the usual bits/dim offset, and it changes only the darkest ink. The data
    ship inside scikit-learn (the `data` extra); nothing is downloaded.
    """
    x, y = _digits_arrays()
    train, test = split_indices(x.shape[0], test_size, seed)
    return Dataset(
        name="digits",
        x_train=x[train],
        x_test=x[test],
        kind="image",
        scaling=Scaling(centered=centered, bits=4),
        y_train=y[train],
        y_test=y[test],
        num_classes=10,
        class_names=tuple(str(d) for d in range(10)),
    )


def array_dataset(
    name: str,
    x,
    y=None,
    *,
    kind: str | None = None,
    bits: int | None = None,
    centered: bool = False,
    float_range: tuple[float, float] = (0.0, 1.0),
    num_classes: int | None = None,
    test_size=0.1,
    seed: int = 0,
    x_test=None,
    y_test=None,
    source: str | None = None,
) -> Dataset:
    """A data set from arrays already in memory (what `npz_dataset` builds on).

    `x`: (n, d) vectors, (n, H, W, C) images, or (n, H, W) grayscale images
    (a channel axis is added); `kind` is inferred from the rank unless given.
    Values: uint8 arrays are 8-bit data unless `bits` says otherwise; other
    integer arrays need `bits`; float images must lie in `float_range`, which
    maps linearly to [0, 1]; float vectors are used as they are. With
    `x_test` (and `y_test`) the held-out split is given; otherwise
    `test_size` (fraction or count) of x is held out at random under `seed`.
    `num_classes` defaults to max(y) + 1. `source` (a path) names the data
    in error messages.
    """
    where = source or f"dataset {name!r}"
    x = _as_examples(x, kind, where)
    kind = kind or ("vector" if x.ndim == 2 else "image")
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
    if x_test is not None:
        x_test = _as_examples(x_test, kind, where + " (x_test)")
    if bits is None and x.dtype == np.uint8:
        bits = 8
    scaling = Scaling(centered=centered, bits=bits, bounded=kind == "image" or bits is not None)
    x = _to_stored(x, scaling, float_range, where)
    if x_test is not None:
        x_test = _to_stored(x_test, scaling, float_range, where + " (x_test)")
    y = None if y is None else _as_labels(y, x.shape[0], where)
    if x_test is None:
        if y_test is not None:
            raise DataError(f"{where}: y_test given without x_test")
        train, test = split_indices(x.shape[0], test_size, seed)
        x, x_test = x[train], x[test]
        y, y_test = (None, None) if y is None else (y[train], y[test])
    else:
        y_test = None if y_test is None else _as_labels(y_test, x_test.shape[0], where)
    if y is not None and num_classes is None:
        num_classes = int(max(y.max(), y_test.max() if y_test is not None and y_test.size else 0))
        num_classes += 1
    return Dataset(
        name=name,
        x_train=x,
        x_test=x_test,
        kind=kind,
        scaling=scaling,
        y_train=y,
        y_test=y_test,
        num_classes=num_classes,
    )


def _as_examples(x, kind: str | None, where: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == object or not (
        np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
    ):
        raise DataError(f"{where}: data must be numeric, got dtype {x.dtype}")
    if x.ndim == 3 and kind != "vector":
        x = x[..., None]  # (n, H, W) grayscale
    if x.ndim not in (2, 4) or (kind == "vector" and x.ndim != 2):
        raise DataError(
            f"{where}: data have shape {x.shape}; expected (n, d) vectors or "
            "(n, H, W, C) / (n, H, W) images"
        )
    if x.shape[0] == 0:
        raise DataError(f"{where}: the data array is empty (shape {x.shape})")
    return x


def _to_stored(x: np.ndarray, scaling: Scaling, float_range, where: str) -> np.ndarray:
    """Cast to the stored form: integer levels, float32 in [0, 1], or float32 vectors."""
    if scaling.bits is not None:
        if np.issubdtype(x.dtype, np.floating):
            # Float arrays of whole numbers (a common result of np.save on pixels).
            if not np.all(np.isfinite(x)) or np.any(x != np.round(x)):
                raise DataError(
                    f"{where}: bits={scaling.bits} declares integer levels, but the data are "
                    f"{x.dtype} with non-integer values ({_describe_values(x)})"
                )
        lo, hi = x.min(), x.max()
        if lo < 0 or hi > 2**scaling.bits - 1:
            raise DataError(
                f"{where}: values in [{lo:.6g}, {hi:.6g}] ({x.dtype}) lie outside the "
                f"{scaling.bits}-bit levels 0..{2**scaling.bits - 1}; pass the right bits"
            )
        return x.astype(np.uint8 if scaling.bits <= 8 else np.uint16)
    if np.issubdtype(x.dtype, np.integer):
        raise DataError(
            f"{where}: integer data ({_describe_values(x)}) need a declared bit depth "
            "(bits); uint8 arrays are taken as 8-bit"
        )
    x = x.astype(np.float32)
    if not scaling.bounded:
        return x
    lo, hi = (float(v) for v in float_range)
    if not hi > lo:
        raise ConfigError(f"float_range must be (low, high) with low < high, got {float_range}")
    if not np.all(np.isfinite(x)):
        bad = np.flatnonzero(~np.isfinite(x).reshape(x.shape[0], -1).all(axis=1))
        raise DataError(
            f"{where}: non-finite values (NaN or inf) in {bad.size} example(s), "
            f"the first at index {bad[0]}"
        )
    tol = 1e-5 * (hi - lo)  # float round-off in files written as e.g. 2 x - 1
    if x.min() < lo - tol or x.max() > hi + tol:
        hint = ""
        if x.max() > 1.0 and x.max() <= 255.0 and x.min() >= 0.0 and np.all(x == np.round(x)):
            hint = "; they look like 0..255 pixels: store them as uint8 or pass bits=8"
        raise DataError(
            f"{where}: float images have {_describe_values(x)}; expected values in "
            f"[{lo:g}, {hi:g}] (float_range; data.centered then sets the model's range, "
            f"[-1, 1] or [0, 1]){hint}"
        )
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _as_labels(y, n: int, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.shape != (n,):
        raise DataError(f"{where}: labels have shape {y.shape}; expected ({n},)")
    if np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.integer) or (y.size and y.min() < 0):
        raise DataError(f"{where}: labels must be non-negative integers, got dtype {y.dtype}")
    return y.astype(np.int32)


def npz_dataset(
    path,
    *,
    name: str | None = None,
    kind: str | None = None,
    bits: int | None = None,
    centered: bool = False,
    float_range: tuple[float, float] = (0.0, 1.0),
    num_classes: int | None = None,
    test_size=0.1,
    seed: int = 0,
) -> Dataset:
    """A data set from a NumPy `.npz` archive: data under 'x', optional labels under 'y'.

    'x' holds (n, d) vectors or (n, H, W, C) images (NHWC; (n, H, W) is read
    as grayscale); uint8 images are 8-bit. Optional 'x_test' (and 'y_test')
    give a fixed held-out split; otherwise `test_size` of x is held out at
    random under `seed`. See `array_dataset` for the value conventions.
    """
    path = Path(path)
    expected = "a NumPy .npz archive with the data under 'x' (optional labels under 'y')"
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise DataError(f"data file {path} {what}; expected {expected}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path} ({exc}); expected {expected}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path} holds a single array, not an archive; expected {expected}")
    with archive:
        if "x" not in archive.files:
            found = ", ".join(sorted(archive.files)) or "none"
            raise DataError(f"{path} has no array 'x' (found: {found}); expected {expected}")
        try:
            arrays = {k: archive[k] for k in ("x", "y", "x_test", "y_test") if k in archive.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"cannot read the arrays of {path} ({exc})") from exc
    return array_dataset(
        name or path.stem,
        arrays["x"],
        arrays.get("y"),
        kind=kind,
        bits=bits,
        centered=centered,
        float_range=float_range,
        num_classes=num_classes,
        test_size=test_size,
        seed=seed,
        x_test=arrays.get("x_test"),
        y_test=arrays.get("y_test"),
        source=str(path),
    )


def _image_extensions() -> set[str]:
    from PIL import Image

    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _list_images(folder: Path, extensions: set[str], recursive: bool) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        found += [
            Path(root) / f
            for f in sorted(files)
            if not f.startswith(".") and Path(f).suffix.lower() in extensions
        ]
    return found


def image_folder_dataset(
    path,
    image_size: int | tuple[int, int] | None,
    *,
    num_channels: int = 3,
    centered: bool = False,
    test_size=0.1,
    seed: int = 0,
    name: str | None = None,
) -> Dataset:
    """8-bit images from a folder, read with pillow.

    Layout: either class subfolders (`path/<class>/**/<image>`, labels = the
    index of the class name in sorted order, as torchvision's ImageFolder) or
    a flat folder of images (no labels). Hidden files and folders are
    skipped. `num_channels` 1 reads grayscale ("L"), 3 reads RGB (alpha
    dropped). `image_size` (int for square, or (H, W)): each image is
    centre-cropped to that aspect ratio, then resized with pillow's
    antialiased bicubic filter; None keeps the images' own size, which must
    then be the same for all.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise DataError(
            f"image folder {path} {what}; expected a folder of images or of class subfolders"
        )
    if num_channels not in (1, 3):
        raise ConfigError(f"num_channels must be 1 (grayscale) or 3 (RGB), got {num_channels}")
    if image_size is not None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or not all(isinstance(s, int) and s >= 1 for s in size):
            raise ConfigError(f"image_size must be a positive int or (H, W), got {image_size!r}")
    extensions = _image_extensions()
    top = _list_images(path, extensions, recursive=False)
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = {d.name: _list_images(d, extensions, recursive=True) for d in subdirs}
    with_images = {k: v for k, v in per_class.items() if v}
    if with_images and top:
        raise DataError(
            f"image folder {path} has both images at its top level (e.g. {top[0].name}) and "
            f"class subfolders ({', '.join(with_images)}); use one layout"
        )
    if with_images:
        empty = [k for k, v in per_class.items() if not v]
        if empty:
            raise DataError(
                f"image folder {path}: class subfolder(s) {', '.join(empty)} hold no images"
            )
        class_names = tuple(per_class)
        files = [(f, i) for i, c in enumerate(class_names) for f in per_class[c]]
    elif top:
        class_names = None
        files = [(f, -1) for f in top]
    else:
        raise DataError(
            f"image folder {path} holds no images (looked for files such as *.png, *.jpg, "
            "*.bmp that pillow can read, at its top level and in class subfolders)"
        )
    mode = "L" if num_channels == 1 else "RGB"
    images, first = [], None
    for file, _ in files:
        try:
            with Image.open(file) as im:
                im = im.convert(mode)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DataError(f"cannot read image {file} ({exc})") from exc
        if image_size is None:
            if first is None:
                first = (file, im.size)
            elif im.size != first[1]:
                raise DataError(
                    f"image folder {path}: {file} is {im.size[0]}x{im.size[1]} (WxH) but "
                    f"{first[0]} is {first[1][0]}x{first[1][1]}; give image_size to resize"
                )
        else:
            im = _crop_resize(im, size)
        images.append(np.asarray(im, np.uint8))
    x = np.stack(images)
    if num_channels == 1:
        x = x[..., None]
    y = None if class_names is None else np.array([c for _, c in files], np.int32)
    train, test = split_indices(x.shape[0], test_size, seed)
    return Dataset(
        name=name or path.name,
        x_train=x[train],
        x_test=x[test],
        kind="image",
        scaling=Scaling(centered=centered, bits=8),
        y_train=None if y is None else y[train],
        y_test=None if y is None else y[test],
        num_classes=None if class_names is None else len(class_names),
        class_names=class_names,
    )


def _crop_resize(im, size: tuple[int, int]):
    """Centre-crop `im` to the aspect ratio of size (H, W), then resize to it."""
    from PIL import Image

    h, w = size
    width, height = im.size
    if width * h > height * w:  # too wide
        new_w = round(height * w / h)
        left = (width - new_w) // 2
        im = im.crop((left, 0, left + new_w, height))
    elif width * h < height * w:  # too tall
        new_h = round(width * h / w)
        top = (height - new_h) // 2
        im = im.crop((0, top, width, top + new_h))
    if im.size != (w, h):
        im = im.resize((w, h), Image.Resampling.BICUBIC)
    return im


# -- deterministic batches --------------------------------------------------------------


def _order_key(seed) -> Array:
    return jax.random.fold_in(jax.random.PRNGKey(seed), _ORDER_STREAM)


def epoch_permutation(seed, epoch, n: int) -> Array:
    """The order of the n training examples in `epoch`: a permutation of range(n).

    Drawn from fold_in(fold_in(PRNGKey(seed), stream), epoch), where the
    stream constant keeps it apart from the training loop's fold_in(PRNGKey
    (seed), step) noise keys.
    """
    return jax.random.permutation(jax.random.fold_in(_order_key(seed), epoch), n)


def _epochs_per_batch(n: int, batch_size: int) -> int:
    """The most epochs one batch of `batch_size` positions can touch."""
    if batch_size % n == 0:
        return batch_size // n  # batches start on epoch boundaries
    if n % batch_size == 0:
        return 1  # batches tile each epoch
    return (batch_size - 1) // n + 2


def batch_indices(seed, step, n: int, batch_size: int) -> Array:
    """The example indices of batch `step`: positions step*B .. step*B + B - 1 of the stream.

    The stream is the concatenation of epoch_permutation(seed, 0, n),
    epoch_permutation(seed, 1, n), ...: position p is example
    perm_{p // n}[p % n]. So every example appears exactly once per epoch, a
    batch that straddles an epoch boundary takes the tail of one permutation
    and the head of the next, and the result depends on (seed, step) only.
    Traceable (step may be traced; n and batch_size are static).
    """
    step = jnp.asarray(step)
    # epoch and offset of step * B, without forming step * B (int32 overflow)
    q, r = step // n, step % n
    first_epoch = q * batch_size + (r * batch_size) // n
    offsets = (r * batch_size) % n + jnp.arange(batch_size)
    m = _epochs_per_batch(n, batch_size)
    perms = jax.vmap(lambda j: epoch_permutation(seed, first_epoch + j, n))(jnp.arange(m))
    return perms[offsets // n, offsets % n]


def gather(arrays: DataArrays, idx: Array, key=None) -> dict:
    """{'x': model inputs, 'y': labels or None} of the examples `idx` (dequantised with `key`)."""
    return _gather(arrays, idx, key)


def dequantize_key(seed, step) -> Array:
    """The key of batch `step`'s dequantisation noise (shared by `batch` and `Batcher`)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), _DEQUANT_STREAM), step)


def _gather(arrays: DataArrays, idx: Array, key) -> dict:
    x = arrays.scaling.to_model(jnp.take(arrays.x, idx, axis=0), key)
    y = None if arrays.y is None else jnp.take(arrays.y, idx, axis=0)
    return {"x": x, "y": y}


@functools.partial(jax.jit, static_argnames=("batch_size", "dequantize"))
def _batch(arrays: DataArrays, seed, step, batch_size: int, dequantize: bool) -> dict:
    idx = batch_indices(seed, step, arrays.num_examples, batch_size)
    key = None
    if dequantize:
        key = dequantize_key(seed, step)
    return _gather(arrays, idx, key)


def batch(
    arrays: DataArrays, seed, step, batch_size: int, *, dequantize: bool = False
) -> dict[str, Array | None]:
    """Training batch `step`: {'x': float32 model inputs (B, ...), 'y': int32 (B,) or None}.

    A pure function of (seed, step) (see `batch_indices`), compiled once per
    (batch_size, dequantize, array shapes); it may also be called inside a
    jitted function with a traced step. With `dequantize`, quantised data get
    uniform noise u/L before scaling (module docstring), keyed by
    fold_in(fold_in(PRNGKey(seed), stream), step): the same noise on resume.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    if dequantize and arrays.scaling.bits is None:
        raise ConfigError(
            f"dequantisation needs quantised data, but dataset {arrays.name!r} declares no bits"
        )
    return _batch(arrays, seed, step, batch_size, dequantize)


class Batcher:
    """`batcher(step)` == `batch(arrays, seed, step, batch_size, ...)`, for a training loop.

    `batch` draws the permutations of the epochs a batch touches every time it
    is called (it must, to stay a traceable function of the step), which on
    CPU costs more than a small model's update. A Batcher computes each epoch's
    permutation once, with the same `epoch_permutation`, keeps the last two,
    and only gathers per step: the batches are identical (a test checks it).
    """

    def __init__(self, arrays: DataArrays, seed: int, batch_size: int, *, dequantize=False):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        if dequantize and arrays.scaling.bits is None:
            raise ConfigError(
                f"dequantisation needs quantised data, but dataset {arrays.name!r} declares no bits"
            )
        self.arrays, self.seed, self.batch_size = arrays, seed, batch_size
        self.dequantize = dequantize
        self._perms: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            n = self.arrays.num_examples
            self._perms[epoch] = np.asarray(_permutation_jit(self.seed, epoch, n))
        return self._perms[epoch]

    def indices(self, step: int) -> np.ndarray:
        """The example indices of batch `step` (== `batch_indices(seed, step, n, B)`)."""
        n, b = self.arrays.num_examples, self.batch_size
        positions = step * b + np.arange(b, dtype=np.int64)  # Python ints: no overflow
        epochs = positions // n
        idx = np.empty(b, np.int32)
        for epoch in np.unique(epochs):
            where = epochs == epoch
            idx[where] = self._permutation(int(epoch))[positions[where] % n]
        return idx

    def __call__(self, step: int) -> dict[str, Array | None]:
        key = dequantize_key(self.seed, step) if self.dequantize else None
        return _gather_jit(self.arrays, self.indices(step), key)


_permutation_jit = jax.jit(epoch_permutation, static_argnums=2)
_gather_jit = jax.jit(_gather)


@functools.partial(jax.jit, static_argnames=("batch_size",))
def _eval_batch(arrays: DataArrays, start, batch_size: int, key) -> dict:
    idx = start + jnp.arange(batch_size)
    out = _gather(arrays, jnp.minimum(idx, arrays.num_examples - 1), key)
    out["mask"] = idx < arrays.num_examples
    return out


def eval_batches(
    arrays: DataArrays, batch_size: int, *, dequantize_seed: int | None = None
) -> Iterator[dict[str, Array | None]]:
    """All examples once, in order: {'x', 'y', 'mask'} batches of a fixed size.

    The last batch is padded by repeating the final example; `mask` is False
    on the padding, so one compiled evaluation step serves every batch. With
    `dequantize_seed`, batch i is dequantised with a key from (seed, i).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    if dequantize_seed is not None and arrays.scaling.bits is None:
        raise ConfigError(
            f"dequantisation needs quantised data, but dataset {arrays.name!r} declares no bits"
        )
    for i, start in enumerate(range(0, arrays.num_examples, batch_size)):
        key = None
        if dequantize_seed is not None:
            base = jax.random.fold_in(jax.random.PRNGKey(dequantize_seed), _EVAL_STREAM)
            key = jax.random.fold_in(base, i)
        yield _eval_batch(arrays, start, batch_size, key)


# -- batch validation -------------------------------------------------------------------


def _fmt_shape(shape) -> str:
    """(B, 8, 8, 1), and (B,) for one entry, like a tuple's repr without quotes."""
    inner = ", ".join(str(s) for s in shape)
    return f"({inner},)" if len(shape) == 1 else f"({inner})"


def validate_batch(
    batch: Mapping[str, Array | None],
    expected_shape: tuple[int, ...],
    centered: bool | None,
    dtype=jnp.float32,
    batch_index: int = 0,
    *,
    name: str = "dataset",
    shape_source: str | None = None,
    centered_flag: str = "data.centered",
    num_classes: int | None = None,
    num_classes_flag: str = "model.num_classes",
) -> None:
    """Checks a batch against what the model expects; raises `DataError` naming the problem.

    `expected_shape` is the per-example shape, e.g. (8, 8, 1); `centered`
    picks the expected range [-1, 1] (True) or [0, 1] (False), or None for
    unbounded (vector) data. `shape_source` and `centered_flag` name the
    config keys behind the expectation (e.g. "data.image_size=8,
    data.num_channels=1"), so the message says what to change. With
    `num_classes`, labels must be present, int and in [0, num_classes).
    Runs on the host (it reads the batch back), so call it on the first few
    batches, before the compiled step.
    """
    if "x" not in batch or batch["x"] is None:
        raise DataError(f"dataset {name!r} batch {batch_index} has no 'x' entry")
    x = np.asarray(batch["x"])
    expected_shape = tuple(int(d) for d in expected_shape)
    what = (
        "images" if len(expected_shape) == 3 else "vectors" if len(expected_shape) == 1 else "data"
    )
    if x.shape[1:] != expected_shape or x.ndim != len(expected_shape) + 1:
        got = _fmt_shape(("B", *x.shape[1:])) if x.ndim >= 1 else _fmt_shape(x.shape)
        source = f" from {shape_source}" if shape_source else ""
        raise DataError(
            f"dataset {name!r} yields {what} of shape {got}; config expects "
            f"{_fmt_shape(('B', *expected_shape))}{source}"
        )
    if x.dtype.kind == "f":
        finite = np.isfinite(x).reshape(x.shape[0], -1).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise DataError(
                f"dataset {name!r} batch {batch_index} has non-finite values (NaN or inf) in "
                f"{bad.size} of {x.shape[0]} examples (first: example {bad[0]} of the batch)"
            )
    expected_range = None if centered is None else ((-1.0, 1.0) if centered else (0.0, 1.0))
    dtype = np.dtype(dtype)
    in_range = expected_range is None or (
        x.size == 0 or (x.min() >= expected_range[0] - 1e-6 and x.max() <= expected_range[1] + 1e-6)
    )
    if x.dtype != dtype or not in_range:
        if expected_range is None:
            want = f"{dtype}"
        else:
            lo, hi = expected_range
            want = f"{dtype} values in [{lo:g}, {hi:g}] ({centered_flag}={centered})"
        hint = ""
        if x.size and x.max() > 1.5 and x.max() <= 255 and x.min() >= 0:
            hint = (
                "; these look like raw 0..255 pixels, which reach the model scaled only when "
                "the dataset declares them 8-bit (bits=8; uint8 arrays and image folders are)"
            )
        raise DataError(
            f"dataset {name!r} batch {batch_index} has {_describe_values(x)}; "
            f"the model expects {want}{hint}"
        )
    if num_classes is not None:
        y = batch.get("y")
        if y is None:
            raise DataError(
                f"dataset {name!r} yields no labels, but {num_classes_flag}={num_classes} "
                "asks for class-conditional training"
            )
        y = np.asarray(y)
        if y.shape != (x.shape[0],) or y.dtype.kind not in "iu":
            raise DataError(
                f"dataset {name!r} batch {batch_index} has labels of shape {y.shape} and "
                f"dtype {y.dtype}; expected integers of shape ({x.shape[0]},)"
            )
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(
                f"dataset {name!r} batch {batch_index} has labels in [{y.min()}, {y.max()}]; "
                f"{num_classes_flag}={num_classes} expects 0..{num_classes - 1}"
            )
