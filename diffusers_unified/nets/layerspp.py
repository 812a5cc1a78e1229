"""The layers of NCSN++ / DDPM++ (Song et al. 2021), as `models/layerspp.py` of the score SDE code.

Initialisers, padding, normalisation and the order of operations follow the
JAX reference exactly, so that a converted score SDE checkpoint gives the
reference's outputs (`convert/score_sde.py` maps the parameter names; it
relies on each module here creating its sublayers in the reference's order):

- `default_init(s)`: DDPM's variance scaling (fan_avg, uniform) at scale s,
  where the reference's scale 0 means 1e-10, i.e. near zero, not zero;
- GroupNorm with min(C // 4, 32) groups and eps 1e-6 everywhere;
- 3x3 convolutions with "SAME" padding (stride 2 on an even size pads one
  row and column at the end, as flax and the reference do), zero biases;
- `NIN` (1x1 convolutions as Dense layers) at the reference's init scale 0.1.

Every module takes `dtype`, the type of its activations; parameters stay
float32 (flax's `param_dtype`), GroupNorm statistics and the attention softmax
are computed in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusers_unified.errors import ConfigError
from diffusers_unified.nets import resample
from diffusers_unified.nets.embeddings import FOURIER_WEIGHTS, ddpm_init
from diffusers_unified.nets.unet import dropout
from diffusers_unified.typing import Array

Dtype = Any

# Activation types a network may compute in (issue 11: mixed precision).
DTYPES = ("float32", "bfloat16", "float16")


def activation_dtype(name: str) -> jnp.dtype:
    """The jnp dtype called `name`, one of `DTYPES`; raises ConfigError otherwise."""
    if str(name) not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return jnp.dtype(str(name))


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
    """DDPM's initialiser as the score SDE code uses it: scale 0 becomes 1e-10 (not exact zeros)."""
    return ddpm_init(scale if scale != 0.0 else 1e-10)


def group_norm(channels: int, dtype: Dtype, name: str | None = None) -> nn.GroupNorm:
    """The reference's GroupNorm: min(C // 4, 32) groups, eps 1e-6 (C must be divisible by them)."""
    return nn.GroupNorm(num_groups=min(channels // 4, 32), epsilon=1e-6, dtype=dtype, name=name)


def conv3x3(
    features: int, dtype: Dtype, init_scale: float = 1.0, stride: int = 1, name: str | None = None
) -> nn.Conv:
    return nn.Conv(
        features,
        (3, 3),
        strides=(stride, stride),
        padding="SAME",
        kernel_init=default_init(init_scale),
        dtype=dtype,
        name=name,
    )


def conv1x1(features: int, dtype: Dtype, name: str | None = None) -> nn.Conv:
    return nn.Conv(features, (1, 1), kernel_init=default_init(), dtype=dtype, name=name)


def skip_sum(a: Array, b: Array, skip_rescale: bool) -> Array:
    """a + b, divided by sqrt(2) with skip_rescale (keeps the variance of a sum of two branches)."""
    return (a + b) / math.sqrt(2.0) if skip_rescale else a + b


class NIN(nn.Dense):
    """DDPM's "network in network": a 1x1 convolution written as a Dense layer over channels.

    A subclass only so that the converter can tell it from the noise
    embedding's Dense layers (the reference names them apart).
    """


class FourierFeatures(nn.Module):
    """Gaussian Fourier features of log sigma (Tancik et al. 2020), NCSN++'s noise embedding.

        emb(s) = [sin(2 pi W s), cos(2 pi W s)],   s = log sigma,   W ~ N(0, scale^2 I_n),

    of width 2n. W is fixed after initialisation (a `stop_gradient`), stored
    under `FOURIER_WEIGHTS` like the package's `GaussianFourierProjection`
    (which embeds t rather than log sigma). Computed in float32.
    """

    embedding_size: int
    scale: float = 16.0

    @nn.compact
    def __call__(self, log_sigma: Array) -> Array:
        w = self.param(FOURIER_WEIGHTS, nn.initializers.normal(self.scale), (self.embedding_size,))
        w = jax.lax.stop_gradient(w)
        # The reference's order of products, so that the float32 rounding is the same.
        proj = jnp.asarray(log_sigma, jnp.float32)[..., None] * w * 2 * jnp.pi
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


class Combine(nn.Module):
    """Merges a pyramid image x into features y: conv1x1(x) concatenated to y ("cat") or added."""

    method: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, y: Array) -> Array:
        h = conv1x1(y.shape[-1], self.dtype, name="conv")(x)
        return jnp.concatenate([h, y], axis=-1) if self.method == "cat" else h + y


class AttnBlock(nn.Module):
    """Single-head self-attention over the H W positions (DDPM's, as `AttnBlockpp`).

    q, k, v = NIN(norm(x)),   w = softmax_j(q_i . k_j / sqrt(C)),
    out = x + NIN_out(sum_j w_ij v_j)   (divided by sqrt(2) with skip_rescale),

    with NIN_out initialised at `init_scale`.
    """

    skip_rescale: bool
    init_scale: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, height, width, c = x.shape
        h = group_norm(c, self.dtype, name="norm")(x).reshape(b, height * width, c)

        def nin(name: str, scale: float = 0.1) -> NIN:
            return NIN(c, kernel_init=default_init(scale), dtype=self.dtype, name=name)

        q, k, v = nin("q")(h), nin("k")(h), nin("v")(h)
        logits = jnp.einsum("bic,bjc->bij", q, k).astype(jnp.float32) * c**-0.5
        w = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        h = nin("out", self.init_scale)(jnp.einsum("bij,bjc->bic", w, v)).reshape(x.shape)
        return skip_sum(x, h, self.skip_rescale)


class FIRConv(nn.Module):
    """A 3x3 convolution fused with FIR up- or downsampling by 2 (StyleGAN2's `Conv2d`)."""

    features: int
    up: bool = False
    down: bool = False
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        w = self.param("kernel", default_init(), (3, 3, x.shape[-1], self.features))
        if self.up:
            x = resample.upsample_conv_2d(x, w, self.fir_kernel)
        else:
            x = resample.conv_downsample_2d(x, w, self.fir_kernel)
        return x + self.param("bias", nn.initializers.zeros, (self.features,)).astype(x.dtype)


class Upsample(nn.Module):
    """Doubles H and W: nearest neighbour or FIR, then a 3x3 conv to `out_ch` if with_conv."""

    out_ch: int | None = None
    with_conv: bool = False
    fir: bool = False
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        out_ch = self.out_ch or x.shape[-1]
        if not self.fir:
            h = resample.naive_upsample_2d(x)
            return conv3x3(out_ch, self.dtype, name="conv")(h) if self.with_conv else h
        if not self.with_conv:
            return resample.upsample_2d(x, self.fir_kernel)
        return FIRConv(out_ch, up=True, fir_kernel=self.fir_kernel, dtype=self.dtype, name="conv")(
            x
        )


class Downsample(nn.Module):
    """Halves H and W: 2x2 mean or FIR, or a stride-2 3x3 conv to `out_ch` if with_conv."""

    out_ch: int | None = None
    with_conv: bool = False
    fir: bool = False
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        out_ch = self.out_ch or x.shape[-1]
        if not self.fir:
            if self.with_conv:
                return conv3x3(out_ch, self.dtype, stride=2, name="conv")(x)
            return resample.naive_downsample_2d(x)
        if not self.with_conv:
            return resample.downsample_2d(x, self.fir_kernel)
        return FIRConv(
            out_ch, down=True, fir_kernel=self.fir_kernel, dtype=self.dtype, name="conv"
        )(x)


def _temb_bias(block: nn.Module, h: Array, temb: Array | None, act: Callable) -> Array:
    """Adds Dense(act(temb)) to every pixel: the noise level as a per-channel shift."""
    if temb is None:
        return h
    proj = nn.Dense(h.shape[-1], kernel_init=default_init(), dtype=block.dtype, name="temb_proj")
    shift = proj(act(temb))
    # (batch, c) -> (batch, 1, 1, c); a temb shared by the batch, (c,), broadcasts as it is.
    return h + (shift[:, None, None, :] if shift.ndim == 2 else shift)


def _dropout(h: Array, rate: float, train: bool, block: nn.Module) -> Array:
    return dropout(h, rate, block.make_rng("dropout")) if train and rate > 0.0 else h


class ResnetBlockDDPM(nn.Module):
    """DDPM's residual block as DDPM++ uses it (`ResnetBlockDDPMpp`).

        h = conv_0(act(norm_0(x))) + Dense(act(temb)),
        h = conv_1(dropout(act(norm_1(h)))),          conv_1 at init_scale,
        out = skip(x) + h   (divided by sqrt(2) with skip_rescale),

    with skip a NIN when the channel count changes.
    """

    act: Callable[[Array], Array]
    out_ch: int | None = None
    dropout: float = 0.1
    skip_rescale: bool = False
    init_scale: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, temb: Array | None = None, train: bool = False) -> Array:
        out_ch = self.out_ch or x.shape[-1]
        h = self.act(group_norm(x.shape[-1], self.dtype, name="norm_0")(x))
        h = conv3x3(out_ch, self.dtype, name="conv_0")(h)
        h = _temb_bias(self, h, temb, self.act)
        h = self.act(group_norm(out_ch, self.dtype, name="norm_1")(h))
        h = _dropout(h, self.dropout, train, self)
        h = conv3x3(out_ch, self.dtype, self.init_scale, name="conv_1")(h)
        if x.shape[-1] != out_ch:
            x = NIN(out_ch, kernel_init=default_init(0.1), dtype=self.dtype, name="skip")(x)
        return skip_sum(x, h, self.skip_rescale)


class ResnetBlockBigGAN(nn.Module):
    """BigGAN's residual block (Brock et al. 2019) as NCSN++ uses it (`ResnetBlockBigGANpp`).

    Like `ResnetBlockDDPM`, but it can resample: with `up` or `down`, both the
    branch (after its first normalisation) and the skip path are up- or
    downsampled (FIR when `fir`, else nearest neighbour / 2x2 mean), and the
    skip path then gets a 1x1 conv.
    """

    act: Callable[[Array], Array]
    up: bool = False
    down: bool = False
    out_ch: int | None = None
    dropout: float = 0.1
    fir: bool = False
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    skip_rescale: bool = True
    init_scale: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, temb: Array | None = None, train: bool = False) -> Array:
        in_ch = x.shape[-1]
        out_ch = self.out_ch or in_ch
        h = self.act(group_norm(in_ch, self.dtype, name="norm_0")(x))
        if self.up:
            h, x = self._resample(h, up=True), self._resample(x, up=True)
        elif self.down:
            h, x = self._resample(h, up=False), self._resample(x, up=False)
        h = conv3x3(out_ch, self.dtype, name="conv_0")(h)
        h = _temb_bias(self, h, temb, self.act)
        h = self.act(group_norm(out_ch, self.dtype, name="norm_1")(h))
        h = _dropout(h, self.dropout, train, self)
        h = conv3x3(out_ch, self.dtype, self.init_scale, name="conv_1")(h)
        if in_ch != out_ch or self.up or self.down:
            x = conv1x1(out_ch, self.dtype, name="skip")(x)
        return skip_sum(x, h, self.skip_rescale)

    def _resample(self, x: Array, up: bool) -> Array:
        if self.fir:
            fn = resample.upsample_2d if up else resample.downsample_2d
            return fn(x, self.fir_kernel)
        return resample.naive_upsample_2d(x) if up else resample.naive_downsample_2d(x)
