"""Image data sets the user already has in TensorFlow Datasets or Hugging Face `datasets`.

Both libraries are optional extras (`pip install 'diffusers_unified[tfds]'`,
`[hf]`), imported inside these functions only, never at package import.
Neither reader downloads anything: TFDS reads a prepared data set from its
`data_dir` (`tfds.load(..., download=False)`); `datasets` reads a directory
written by `save_to_disk`, or a hub name from the local cache with the
library's offline mode on. Examples are decoded one at a time into one
uint8 NHWC array, centre-cropped and resized like an image folder
(`pixels.fit_image`), so the result is the same `Dataset` as the other
image builders: 8-bit, labels and class names when the data have them.
The score SDE code reads its data sets through TFDS (`datasets.py`), with
the same official splits (e.g. CelebA's "validation" as its test split).
"""

from __future__ import annotations

import importlib
import io
import itertools
import os
import sys
from pathlib import Path

import numpy as np

from diffusers_unified.data.dataset import Dataset, split_indices
from diffusers_unified.data.pixels import Growing, fit_image, image_options
from diffusers_unified.data.scaling import Scaling
from diffusers_unified.errors import ConfigError, DataError


def _require(module: str, extra: str, dataset: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"data.dataset={dataset!r} reads data through the optional library {module}, which "
            f"is not installed here ({exc}); install it with "
            f"pip install 'diffusers_unified[{extra}]'"
        ) from exc


def tfds_dataset(
    name: str,
    *,
    data_dir=None,
    split_train: str = "train",
    split_test: str = "test",
    image_size=None,
    num_channels: int = 3,
    centered: bool = False,
    crop_size: int = 0,
    resample: str = "bicubic",
    image_key: str = "image",
    label_key: str = "label",
    max_examples: int = 0,
    test_size=0.1,
    seed: int = 0,
) -> Dataset:
    """A TFDS image data set that is already prepared under `data_dir` (None: TFDS's default).

    `name` is the TFDS name ("cifar10", "celeb_a", "lsun/church_outdoor");
    `split_train` / `split_test` are split names or TFDS slices
    ("train[:10%]"); `split_test` "" holds out `test_size` of the train split
    at random under `seed`. `image_key` / `label_key` name the features
    (`label_key` "" reads no labels); class names come from the label
    feature's `names`. `max_examples` > 0 keeps the first that many
    examples of each split. Other options as `image_folder_dataset`.
    """
    tfds = _require("tensorflow_datasets", "tfds", "tfds")
    if not name:
        raise ConfigError("data.dataset='tfds' needs data.tfds_name (e.g. 'cifar10', 'celeb_a')")

    def load(split: str):
        where = f"TFDS {name!r} split {split!r} in {data_dir or 'the default data_dir'}"
        try:
            ds, info = tfds.load(
                name, split=split, data_dir=data_dir, download=False, with_info=True
            )
        except Exception as exc:  # the library's own errors vary by version and cause
            raise DataError(
                f"cannot read {where} ({type(exc).__name__}: {exc}); prepare it first with "
                "TFDS (e.g. `tfds build` or tfds.load(..., download=True)); this package "
                "never downloads"
            ) from exc
        return tfds.as_numpy(ds), _split_size(info, split), _label_names(info, label_key), where

    return _build(
        f"tfds:{name}",
        load,
        split_train=split_train,
        split_test=split_test,
        test_size=test_size,
        seed=seed,
        centered=centered,
        image_size=image_size,
        num_channels=num_channels,
        crop_size=crop_size,
        resample=resample,
        image_key=image_key,
        label_key=label_key,
        max_examples=max_examples,
    )


def hf_dataset(
    name_or_path: str,
    *,
    cache_dir=None,
    split_train: str = "train",
    split_test: str = "test",
    image_size=None,
    num_channels: int = 3,
    centered: bool = False,
    crop_size: int = 0,
    resample: str = "bicubic",
    image_key: str = "image",
    label_key: str = "label",
    max_examples: int = 0,
    test_size=0.1,
    seed: int = 0,
) -> Dataset:
    """A Hugging Face image data set: a `save_to_disk` directory, or a hub name in the cache.

    An existing directory is read with `datasets.load_from_disk`; anything
    else is a hub name ("uoft-cs/cifar10", whose image column is "img")
    read by `datasets.load_dataset` from `cache_dir` (None: the library's
    default), offline: unless `datasets` was imported before, the package
    sets HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1 first, so a data set not
    in the cache fails instead of downloading. Images may be pillow images,
    arrays or {"bytes": ...} records. Options as `tfds_dataset`.
    """
    if not name_or_path:
        raise ConfigError("data.dataset='hf' needs data.hf_name (a hub name or a saved directory)")
    if "datasets" not in sys.modules:
        # `datasets` reads these when imported; with them a cache miss is an error.
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
    hf = _require("datasets", "hf", "hf")
    saved = Path(name_or_path).is_dir()
    where_all = f"{'saved data set' if saved else 'cached data set'} {name_or_path!r}"
    whole = None
    if saved:
        try:
            whole = hf.load_from_disk(str(name_or_path))
        except Exception as exc:  # the library's own errors vary by version and cause
            raise DataError(f"cannot read the {where_all} ({type(exc).__name__}: {exc})") from exc

    def load(split: str):
        where = f"{where_all} split {split!r}"
        try:
            if saved:
                ds = whole[split] if hasattr(whole, "keys") else _only_split(whole, split, where)
            else:
                ds = hf.load_dataset(name_or_path, split=split, cache_dir=cache_dir)
        except DataError:
            raise
        except Exception as exc:  # the library's own errors vary by version and cause
            raise DataError(
                f"cannot read the {where} ({type(exc).__name__}: {exc}); this package reads "
                "local data only (save_to_disk or the datasets cache) and never downloads"
            ) from exc
        features = getattr(ds, "features", None) or {}
        names = getattr(features.get(label_key), "names", None) if label_key else None
        return ds, _len(ds), names, where

    return _build(
        f"hf:{name_or_path}",
        load,
        split_train=split_train,
        split_test=split_test,
        test_size=test_size,
        seed=seed,
        centered=centered,
        image_size=image_size,
        num_channels=num_channels,
        crop_size=crop_size,
        resample=resample,
        image_key=image_key,
        label_key=label_key,
        max_examples=max_examples,
    )


def _only_split(ds, split: str, where: str):
    """A saved single `Dataset` (not a DatasetDict) is its train split."""
    if split != "train":
        raise DataError(f"{where}: the directory holds one split, read as 'train' only")
    return ds


def _len(ds) -> int | None:
    try:
        return len(ds)
    except TypeError:
        return None


def _split_size(info, split: str) -> int | None:
    try:
        return int(info.splits[split].num_examples)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _label_names(info, label_key: str):
    if not label_key:
        return None
    try:
        return info.features[label_key].names
    except (AttributeError, KeyError, TypeError):
        return None


# -- the conversion, shared by both readers ------------------------------------------------------


def _build(
    name: str,
    load,
    *,
    split_train: str,
    split_test: str,
    test_size,
    seed: int,
    centered: bool,
    image_size,
    num_channels: int,
    crop_size: int,
    resample: str,
    image_key: str,
    label_key: str,
    max_examples: int,
) -> Dataset:
    """`load(split)` -> (examples, count or None, class names or None, where) into a Dataset."""
    size, mode = image_options(image_size, num_channels, crop_size, resample)
    if not isinstance(max_examples, int) or max_examples < 0:
        raise ConfigError(f"max_examples must be an int >= 0 (0 = all), got {max_examples!r}")
    convert = dict(size=size, mode=mode, crop_size=crop_size, resample=resample)
    keys = dict(image_key=image_key, label_key=label_key, max_examples=max_examples)
    examples, count, names, where = load(split_train)
    x, y = examples_to_arrays(examples, count, where=where, **keys, **convert)
    if split_test:
        examples, count, _, where = load(split_test)
        x_test, y_test = examples_to_arrays(examples, count, where=where, **keys, **convert)
        if x_test.shape[1:] != x.shape[1:]:
            raise DataError(
                f"{where}: images of shape {x_test.shape[1:]}, but the train split's are "
                f"{x.shape[1:]}; give image_size to resize both"
            )
    else:
        train, test = split_indices(x.shape[0], test_size, seed)
        x, x_test = x[train], x[test]
        y, y_test = (None, None) if y is None else (y[train], y[test])
    num_classes = None
    if y is not None:
        seen = int(max(y.max(), y_test.max() if y_test.size else 0)) + 1
        num_classes = len(names) if names else seen
        names = tuple(str(n) for n in names) if names else None
    return Dataset(
        name=name,
        x_train=x,
        x_test=x_test,
        kind="image",
        scaling=Scaling(centered=centered, bits=8),
        y_train=y,
        y_test=y_test,
        num_classes=num_classes,
        class_names=names if y is not None else None,
    )


def examples_to_arrays(
    examples,
    count: int | None,
    *,
    image_key: str = "image",
    label_key: str = "label",
    size=None,
    mode: str = "RGB",
    crop_size: int = 0,
    resample: str = "bicubic",
    max_examples: int = 0,
    where: str = "data set",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Records {image_key: image, label_key: int} -> uint8 (n, H, W, C) images, int32 labels.

    The interface both libraries share once decoded: TFDS's `as_numpy`
    yields dicts of NumPy arrays, a Hugging Face `Dataset` yields dicts with
    pillow images. `count` (when known) sizes the array up front.
    """
    from PIL import Image

    if max_examples:
        examples = itertools.islice(examples, max_examples)
        count = min(count, max_examples) if count is not None else max_examples
    images, labels = Growing(count), []
    for i, example in enumerate(examples):
        at = f"{where} example {i}"
        if not isinstance(example, dict) or image_key not in example:
            found = sorted(example) if isinstance(example, dict) else type(example).__name__
            raise DataError(f"{at} has no image under {image_key!r} (found: {found})")
        im = _as_pil(example[image_key], Image, at)
        images.append(
            fit_image(im, size, mode, crop_size=crop_size, resample=resample, where=at), at
        )
        if label_key:
            if label_key not in example:
                raise DataError(
                    f"{at} has no label under {label_key!r} (found: {sorted(example)}); set "
                    "data.label_key, or '' for unlabelled data"
                )
            labels.append(_as_label(example[label_key], at))
    x = images.array()
    if x is None:
        raise DataError(f"{where} holds no examples")
    return x, (np.asarray(labels, np.int32) if label_key else None)


def _as_pil(image, Image, at: str):
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, dict) and image.get("bytes"):  # a `datasets` Image not yet decoded
        try:
            return Image.open(io.BytesIO(image["bytes"]))
        except OSError as exc:
            raise DataError(f"cannot decode the image bytes of {at} ({exc})") from exc
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        raise DataError(
            f"{at}: image is a {a.dtype} array of shape {a.shape}; expected uint8 pixels "
            "(H, W), (H, W, 1), (H, W, 3) or (H, W, 4), or a pillow image"
        )
    return Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a)


def _as_label(label, at: str) -> int:
    value = np.asarray(label)
    if value.shape != () or value.dtype.kind not in "iu" or value < 0:
        raise DataError(f"{at}: label {label!r} is not a non-negative integer class index")
    return int(value)
