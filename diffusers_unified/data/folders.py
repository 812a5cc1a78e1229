"""Image folders at any size: class subfolders or a flat folder, read with pillow.

Images of any size and colour mode become one uint8 NHWC array, centre-cropped
and resized the way `pixels` describes (after the score SDE code's
`crop_resize` and `central_crop`); nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from diffusers_unified.data.dataset import Dataset, split_indices
from diffusers_unified.data.pixels import fill, fit_image, image_options
from diffusers_unified.data.scaling import Scaling
from diffusers_unified.errors import ConfigError, DataError


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
    `seed`, so classes keep their shares on average) before `test_size` (a fraction
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
        im = None
        try:
            im = Image.open(file)
            im.load()
            return im
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            if im is not None:
                im.close()
            raise DataError(f"cannot read image {file} ({exc})") from exc

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
