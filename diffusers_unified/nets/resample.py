"""FIR up- and downsampling of NHWC images (StyleGAN2's upfirdn2d), as NCSN++ uses it.

Song et al. (2021) resample NCSN++ feature maps with the anti-aliasing FIR
filters of StyleGAN2 (Karras et al. 2020), through `models/up_or_down_sampling.py`
of the score SDE code, itself a port of StyleGAN2's `dnnlib/tflib/ops/upfirdn_2d.py`.
Everything rests on one operation,

    upfirdn2d(x, k, up, down, pad) = downsample_down(conv(pad(zero_insert_up(x)), k)),

where zero insertion places up - 1 zeros after every pixel, `pad = (p0, p1)`
adds p0 zeros before and p1 after along both axes (negative values crop),
`conv` is a true 2-D convolution ("valid": the output shrinks by k - 1) and
downsampling keeps every `down`-th pixel. A 1-D kernel (1, 3, 3, 1) means
its outer product with itself, normalised to sum 1 (times up^2 when
upsampling, so that a constant image keeps its value).

Here upfirdn2d is one depthwise `lax.conv_general_dilated` (zero insertion is
the input dilation, downsampling the window stride) rather than the reference's
reshape to single-channel images; the sums are the same up to float rounding.
The fused conv-and-resample ops pad once, exactly as the reference, so a
converted checkpoint gives the reference's output at the borders too.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jax import lax

from diffusers_unified.typing import Array

_NHWC = ("NHWC", "HWIO", "NHWC")


def setup_kernel(k: Sequence[float] | np.ndarray) -> np.ndarray:
    """A 2-D FIR kernel normalised to sum 1: the outer product k k^T for a 1-D k."""
    k = np.asarray(k, dtype=np.float32)
    if k.ndim == 1:
        k = np.outer(k, k)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"a FIR kernel must be 1-D or square 2-D, got shape {k.shape}")
    return k / np.sum(k)


def upfirdn2d(
    x: Array, k: np.ndarray, *, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)
) -> Array:
    """Zero-insert by `up`, pad by `pad`, convolve with the 2-D kernel `k`, keep every `down`-th.

    Applied to each channel of NHWC `x` separately; the output has height
    H up + p0 + p1 - k + 1 before downsampling (and likewise the width).
    """
    channels = x.shape[-1]
    # A true convolution flips the kernel; lax convolutions are correlations.
    w = jnp.asarray(k[::-1, ::-1], x.dtype)
    w = jnp.broadcast_to(w[:, :, None, None], (*k.shape, 1, channels))
    p0, p1 = pad
    return lax.conv_general_dilated(
        x,
        w,
        window_strides=(down, down),
        # Input dilation leaves no zeros after the last pixel; zero insertion does.
        padding=((p0, p1 + up - 1), (p0, p1 + up - 1)),
        lhs_dilation=(up, up),
        dimension_numbers=_NHWC,
        feature_group_count=channels,
    )


def upsample_2d(x: Array, k: Sequence[float], factor: int = 2) -> Array:
    """(B, H, W, C) -> (B, factor H, factor W, C): zero insertion, then FIR filtering."""
    kernel = setup_kernel(k) * factor**2
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: Array, k: Sequence[float], factor: int = 2) -> Array:
    """(B, H, W, C) -> (B, H / factor, W / factor, C): FIR filtering, then decimation."""
    kernel = setup_kernel(k)
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, down=factor, pad=((p + 1) // 2, p // 2))


def upsample_conv_2d(x: Array, w: Array, k: Sequence[float], factor: int = 2) -> Array:
    """Upsampling by `factor` fused with a convolution by the HWIO kernel `w` (odd size).

    A stride-`factor` transposed convolution by w, then FIR filtering, with
    the padding of both applied once (StyleGAN2's `upsample_conv_2d`).
    """
    kernel = setup_kernel(k) * factor**2
    p = kernel.shape[0] - factor - (w.shape[0] - 1)
    x = lax.conv_transpose(
        x, w.astype(x.dtype), strides=(factor, factor), padding="VALID", dimension_numbers=_NHWC
    )
    return upfirdn2d(x, kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(x: Array, w: Array, k: Sequence[float], factor: int = 2) -> Array:
    """FIR filtering fused with a stride-`factor` convolution by the HWIO kernel `w` (odd size)."""
    kernel = setup_kernel(k)
    p = kernel.shape[0] - factor + w.shape[0] - 1
    x = upfirdn2d(x, kernel, pad=((p + 1) // 2, p // 2))
    return lax.conv_general_dilated(
        x, w.astype(x.dtype), (factor, factor), "VALID", dimension_numbers=_NHWC
    )


def naive_upsample_2d(x: Array, factor: int = 2) -> Array:
    """Nearest-neighbour upsampling: every pixel repeated factor x factor times."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def naive_downsample_2d(x: Array, factor: int = 2) -> Array:
    """Mean over non-overlapping factor x factor blocks."""
    b, h, w, c = x.shape
    return jnp.mean(x.reshape(b, h // factor, factor, w // factor, factor, c), axis=(2, 4))
