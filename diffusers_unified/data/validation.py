"""Checks that make bad data fail loudly: whole data sets when built, and batches.

`validate_dataset` runs when a `Dataset` is constructed (shapes, labels,
dtypes, value ranges); `validate_batch` checks a batch against what the
config expects. Both raise `DataError` (exit code 4) with a message naming
the expected and observed shape, dtype, range or batch index.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from diffusers_unified.data.scaling import Scaling
from diffusers_unified.errors import ConfigError, DataError
from diffusers_unified.typing import Array

KINDS = ("vector", "image")


def describe_values(x: np.ndarray) -> str:
    lo, hi = (x.min(), x.max()) if x.size else (float("nan"), float("nan"))
    return f"dtype {x.dtype}, min {lo:.6g}, max {hi:.6g}"


def nonfinite_examples(x: np.ndarray) -> np.ndarray:
    """Indices of the examples (first axis) holding a NaN or an infinity."""
    return np.flatnonzero(~np.isfinite(x).reshape(x.shape[0], -1).all(axis=1))


def validate_dataset(ds) -> None:
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
                f"dataset {name!r}: {label} has {describe_values(x)}, but bits={bits} "
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
            f"dataset {name!r}: {label} has {describe_values(x)}, but no bit depth is "
            f"declared, so {expected} are expected. Declare the data as quantised "
            f"(bits=8 for 0..255 pixels) to have them scaled to [0, 1], or [-1, 1] with "
            "data.centered=True"
        )
    bad = nonfinite_examples(x)
    if bad.size:
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
                f"dataset {name!r}: {label} has {describe_values(x)}; stored float images "
                f"must lie in [0, 1] (data.centered=True maps them to [-1, 1] later){hint}"
            )


def _validate_labels(ds) -> None:
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
        bad = nonfinite_examples(x)
        if bad.size:
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
            f"dataset {name!r} batch {batch_index} has {describe_values(x)}; "
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
