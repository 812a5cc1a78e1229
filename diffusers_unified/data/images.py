"""Image data sets: scikit-learn's 8x8 digits, in-memory arrays and `.npz` files.

Everything is read from files the user has (or that a dependency ships);
nothing is downloaded. Images are stored as integer levels (8-bit, or the
digits' 4-bit) or as floats in [0, 1]; see `scaling` for how they reach the
model. Image folders are read by `folders`, CIFAR's python batches by
`cifar`, TFDS and Hugging Face data sets by `external`.
"""

from __future__ import annotations

import functools
import zipfile
from pathlib import Path

import numpy as np

from diffusers_unified.data.dataset import Dataset, split_indices
from diffusers_unified.data.scaling import Scaling
from diffusers_unified.data.validation import KINDS, describe_values, nonfinite_examples
from diffusers_unified.errors import ConfigError, DataError


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


def shape_only_dataset(image_size: int, num_channels: int, *, centered: bool) -> Dataset:
    """No data, only their shape: one black 8-bit image in each split.

    For a model trained elsewhere (an imported checkpoint) that is sampled
    without its training data; evaluation against data needs a real data set.
    """
    x = np.zeros((1, image_size, image_size, num_channels), np.uint8)
    return Dataset(
        name="none", x_train=x, x_test=x, kind="image", scaling=Scaling(centered=centered, bits=8)
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
                    f"{x.dtype} with non-integer values ({describe_values(x)})"
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
            f"{where}: integer data ({describe_values(x)}) need a declared bit depth "
            "(bits); uint8 arrays are taken as 8-bit"
        )
    x = x.astype(np.float32)
    if not scaling.bounded:
        return x
    lo, hi = (float(v) for v in float_range)
    if not hi > lo:
        raise ConfigError(f"float_range must be (low, high) with low < high, got {float_range}")
    bad = nonfinite_examples(x)
    if bad.size:
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
            f"{where}: float images have {describe_values(x)}; expected values in "
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
