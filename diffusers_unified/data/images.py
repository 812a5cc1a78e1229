"""Image data sets: scikit-learn's 8x8 digits, in-memory arrays, `.npz` files, image folders.

Everything is read from files the user has (or that a dependency ships);
nothing is downloaded. Images are stored as integer levels (8-bit, or the
digits' 4-bit) or as floats in [0, 1]; see `scaling` for how they reach the
model.
"""

from __future__ import annotations

import functools
import os
import zipfile
from pathlib import Path

import numpy as np

from diffusers_unified.data.dataset import Dataset, split_indices
from diffusers_unified.data.pixels import fill, fit_image, image_options
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
    crop_size: int = 0,
    resample: str = "bicubic",
    max_examples: int = 0,
    workers: int | None = None,
    progress: bool = False,
) -> Dataset:
    """8-bit images of any size from a folder, read with pillow, into one uint8 NHWC array.

    Layout: either class subfolders (`path/<class>/**/<image>`, labels = the
    index of the class name in sorted order, as torchvision's ImageFolder) or
    a flat folder of images (no labels), e.g. CelebA's `img_align_celeba/`.
    Hidden files and folders are skipped. `num_channels` 1 reads grayscale
    ("L"), 3 reads RGB (alpha dropped). `image_size` (int for square, or
    (H, W)): each image is centre-cropped to that aspect ratio, then resized
    with pillow's antialiased `resample` filter (`pixels.fit_image`, after the
    score SDE code's `crop_resize`); `crop_size` > 0 first cuts the centred
    crop_size square (the score SDE code's CelebA pipeline: 140, then resize
    to 64). None keeps the images' own size (or the crop_size square), which
    must then be the same for all.

    `max_examples` > 0 keeps a random subset of that many files (drawn under
    `seed`, so every class keeps its share) before `test_size` (a fraction
    or a count) is held out at random under `seed`. The images are decoded
    in `workers` threads straight into one preallocated array, train split
    first, so tens of thousands of files never exist as pillow images at
    once; the splits are views of that array.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise DataError(
            f"image folder {path} {what}; expected a folder of images or of class subfolders"
        )
    size, mode = image_options(image_size, num_channels, crop_size, resample)
    if not isinstance(max_examples, int) or max_examples < 0:
        raise ConfigError(f"max_examples must be an int >= 0 (0 = all), got {max_examples!r}")
    files, class_names = _folder_files(path)
    if max_examples and max_examples < len(files):
        keep = np.random.default_rng((seed, 1)).choice(len(files), max_examples, replace=False)
        files = [files[i] for i in np.sort(keep)]
    train, test = split_indices(len(files), test_size, seed)
    order = np.concatenate([train, test])

    def open_image(file: Path):
        try:
            im = Image.open(file)
            im.load()
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DataError(f"cannot read image {file} ({exc})") from exc
        return im

    first = files[0][0]
    if size is None and not crop_size:
        with open_image(first) as im:
            own = (im.size[1], im.size[0])

    def load(j: int) -> np.ndarray:
        file = files[order[j]][0]
        with open_image(file) as im:
            if size is None and not crop_size and (im.size[1], im.size[0]) != own:
                raise DataError(
                    f"image folder {path}: {file} is {im.size[0]}x{im.size[1]} (WxH) but "
                    f"{first} is {own[1]}x{own[0]}; give image_size to resize"
                )
            return fit_image(im, size, mode, crop_size=crop_size, resample=resample, where=file)

    shape = size or ((crop_size, crop_size) if crop_size else own)
    x = np.empty((len(files), *shape, num_channels), np.uint8)
    fill(x, load, workers=workers, desc=f"reading {path.name}", progress=progress)
    y = None if class_names is None else np.array([files[i][1] for i in order], np.int32)
    n_train = len(train)
    return Dataset(
        name=name or path.name,
        x_train=x[:n_train],
        x_test=x[n_train:],
        kind="image",
        scaling=Scaling(centered=centered, bits=8),
        y_train=None if y is None else y[:n_train],
        y_test=None if y is None else y[n_train:],
        num_classes=None if class_names is None else len(class_names),
        class_names=class_names,
    )


def _folder_files(path: Path) -> tuple[list[tuple[Path, int]], tuple[str, ...] | None]:
    """[(file, label)] in sorted order (label -1 without classes), and the class names."""
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
        return [(f, i) for i, c in enumerate(class_names) for f in per_class[c]], class_names
    if top:
        return [(f, -1) for f in top], None
    raise DataError(
        f"image folder {path} holds no images (looked for files such as *.png, *.jpg, "
        "*.bmp that pillow can read, at its top level and in class subfolders)"
    )
