"""One image to stored pixels: colour mode, centre crop, resize; and filling a uint8 array.

Shared by the image folders (`images`) and the TFDS / Hugging Face readers
(`external`). The crop and resize follow the score SDE code's
`datasets.py`: `crop_resize` (the largest centred crop of the target's
aspect ratio, then an antialiased bicubic resize) and, with `crop_size`,
`central_crop` first (its CelebA pipeline crops 140x140). The resized image
is rounded to uint8, since the training set stays on the host in its
stored 8-bit form; the reference resizes in float32 and keeps the
fraction, a difference below half a level.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from diffusers_unified.errors import ConfigError, DataError

# Names of pillow's resampling filters. All are antialiased when shrinking
# (the kernel widens with the scale factor), like tf.image.resize(antialias=True).
RESAMPLE = ("bicubic", "bilinear", "lanczos", "box", "nearest")
# Pillow modes that are not 8 bits per channel: converting them to "L" or
# "RGB" would clip, not rescale, so they are refused rather than mangled.
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def image_options(image_size, num_channels: int, crop_size: int = 0, resample: str = "bicubic"):
    """Checks the options; returns (size (H, W) or None, pillow mode "L" or "RGB")."""
    if num_channels not in (1, 3):
        raise ConfigError(f"num_channels must be 1 (grayscale) or 3 (RGB), got {num_channels}")
    size = None
    if image_size is not None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or not all(isinstance(s, int) and s >= 1 for s in size):
            raise ConfigError(f"image_size must be a positive int or (H, W), got {image_size!r}")
    if isinstance(crop_size, bool) or not isinstance(crop_size, int) or crop_size < 0:
        raise ConfigError(f"crop_size must be an int >= 0 (0 = no fixed crop), got {crop_size!r}")
    if resample not in RESAMPLE:
        raise ConfigError(f"resample={resample!r} is not one of: {', '.join(RESAMPLE)}")
    return size, ("L" if num_channels == 1 else "RGB")


def crop_box(width: int, height: int, size, crop_size: int = 0) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) box kept of a width x height image.

    With `crop_size`, the centred crop_size square (top = (height - c) // 2,
    as the score SDE code's `central_crop`); then, with a target `size`
    (H, W), the largest centred box of its aspect ratio (for a square
    target, the score SDE code's `crop_resize`: rows (h - c) // 2 to
    (h + c) // 2 with c = min(h, w)).
    """
    left, top, right, bottom = 0, 0, width, height
    if crop_size:
        left, top = (width - crop_size) // 2, (height - crop_size) // 2
        right, bottom = left + crop_size, top + crop_size
    if size is not None:
        h, w = size
        cw, ch = right - left, bottom - top
        if cw * h > ch * w:  # too wide
            new_w = round(ch * w / h)
            left += (cw - new_w) // 2
            right = left + new_w
        elif cw * h < ch * w:  # too tall
            new_h = round(cw * h / w)
            top += (ch - new_h) // 2
            bottom = top + new_h
    return left, top, right, bottom


def fit_image(im, size, mode: str, *, crop_size: int = 0, resample: str = "bicubic", where: str):
    """A pillow image -> uint8 pixels (H, W, C): `mode`, centre crop, resize to `size` (H, W).

    "RGB" drops an alpha channel (no compositing, as torchvision's
    ImageFolder); "L" is pillow's ITU-R 601-2 luma. `size` None keeps the
    (cropped) size. `where` names the image in errors.
    """
    from PIL import Image

    if im.mode in _WIDE_MODES:
        raise DataError(
            f"{where} is a {im.mode} image (more than 8 bits per channel); expected 8-bit "
            "images (L, RGB, RGBA, P): convert it to 8 bits first"
        )
    width, height = im.size
    if crop_size and (crop_size > width or crop_size > height):
        raise DataError(
            f"{where} is {width}x{height} (WxH), smaller than the crop_size={crop_size} "
            "square cut from its centre"
        )
    box = crop_box(width, height, size, crop_size)
    if box != (0, 0, width, height):
        im = im.crop(box)
    if im.mode != mode:
        im = im.convert(mode)
    if size is not None and im.size != (size[1], size[0]):
        im = im.resize((size[1], size[0]), getattr(Image.Resampling, resample.upper()))
    x = np.asarray(im, np.uint8)
    return x[..., None] if x.ndim == 2 else x


def fill(
    x: np.ndarray, load: Callable[[int], np.ndarray], *, workers=None, desc="", progress=False
) -> None:
    """x[j] = load(j) for every j, in threads (pillow releases the GIL while decoding).

    Work goes out in chunks, so a failure is raised from the earliest failing
    chunk (the same one on every run) and the rest is cancelled.
    """
    from tqdm.auto import tqdm

    n = x.shape[0]
    workers = workers or min(8, os.cpu_count() or 1)
    chunk = 64

    def run(start: int) -> int:
        stop = min(start + chunk, n)
        for j in range(start, stop):
            x[j] = load(j)
        return stop - start

    with tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
        if workers == 1 or n <= chunk:
            for start in range(0, n, chunk):
                bar.update(run(start))
            return
        pool = ThreadPoolExecutor(workers)
        try:
            for done in pool.map(run, range(0, n, chunk)):
                bar.update(done)
        finally:
            pool.shutdown(cancel_futures=True)


class Growing:
    """A uint8 (n, H, W, C) array filled one image at a time, its length unknown in advance."""

    def __init__(self, capacity: int | None = None):
        self._x, self._n, self._capacity = None, 0, capacity or 1024
        self._first = ""

    def append(self, pixels: np.ndarray, where: str) -> None:
        if self._x is None:
            self._x, self._first = np.empty((self._capacity, *pixels.shape), np.uint8), where
        elif pixels.shape != self._x.shape[1:]:
            (h, w, _), (h0, w0, _) = pixels.shape, self._x.shape[1:]
            raise DataError(
                f"{where} is {w}x{h} (WxH) but {self._first} is {w0}x{h0}; give image_size "
                "to resize"
            )
        elif self._n == self._x.shape[0]:
            grown = np.empty((2 * self._n, *self._x.shape[1:]), np.uint8)
            grown[: self._n] = self._x
            self._x = grown
        self._x[self._n] = pixels
        self._n += 1

    def __len__(self) -> int:
        return self._n

    def array(self) -> np.ndarray | None:
        """The filled part (a copy only when the buffer outgrew its first capacity)."""
        if self._x is None:
            return None
        return self._x if self._n == self._x.shape[0] else self._x[: self._n].copy()
