"""The layers of NCSNv2's RefineNet (Song and Ermon 2020): `models/layers.py` and
`normalization.py` of https://github.com/ermongroup/ncsnv2 (PyTorch) and of the
score SDE code's JAX port; `refinenet.py` assembles them and says where the two
references differ (the `align_corners` and `unbiased_mean_var` switches here).

Initialisers are PyTorch's defaults, as in both references (the JAX port's
mean-pool convs, which keep flax's default, excepted): kernel and bias
U(-1/sqrt(fan_in), 1/sqrt(fan_in)); InstanceNorm++'s gamma and alpha
N(1, 0.02^2), beta 0. Each module creates its sublayers in the reference's
order, which `convert/score_sde.py` relies on to name them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusers_unified.nets.layerspp import Dtype
from diffusers_unified.typing import Array


def ncsn_conv(
    features: int,
    in_features: int,
    kernel_size: int = 3,
    dilation: int = 1,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Conv:
    """A conv with PyTorch's default init and "same" padding (padding = dilation for 3x3)."""
    limit = 1.0 / math.sqrt(in_features * kernel_size**2)

    def bias_init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        padding="SAME",
        kernel_dilation=(dilation, dilation),
        use_bias=use_bias,
        kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
        bias_init=bias_init,
        dtype=dtype,
        name=name,
    )


def _normal_around_one(key, shape, dtype=jnp.float32):
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class InstanceNorm2dPlus(nn.Module):
    """InstanceNorm++ (Song and Ermon 2019): instance norm that keeps the channel means' spread.

    With mu_c, s_c^2 the mean and variance of channel c over the image, and
    m, v the mean and variance of (mu_c) over channels, and eps = 1e-5,

        out = gamma_c ((x - mu_c) / sqrt(s_c^2 + eps) + alpha_c (mu_c - m) / sqrt(v + eps))
              + beta_c.

    Statistics in float32.
    """

    unbiased_mean_var: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        alpha = self.param("alpha", _normal_around_one, (c,))
        gamma = self.param("gamma", _normal_around_one, (c,))
        beta = self.param("beta", nn.initializers.zeros, (c,))
        xf = x.astype(jnp.float32)
        means = jnp.mean(xf, axis=(1, 2))
        m = jnp.mean(means, axis=-1, keepdims=True)
        v = jnp.var(means, axis=-1, keepdims=True, ddof=1 if self.unbiased_mean_var else 0)
        means_plus = (means - m) / jnp.sqrt(v + 1e-5)
        h = (xf - means[:, None, None, :]) / jnp.sqrt(
            jnp.var(xf, axis=(1, 2), keepdims=True) + 1e-5
        )
        h = h + means_plus[:, None, None, :] * alpha
        return (h * gamma + beta).astype(self.dtype)


class ConvMeanPool(nn.Module):
    """A conv, then the mean over 2x2 blocks."""

    features: int
    kernel_size: int = 3
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = ncsn_conv(self.features, x.shape[-1], self.kernel_size, dtype=self.dtype, name="conv")(
            x
        )
        b, height, width, c = h.shape
        return jnp.mean(h.reshape(b, height // 2, 2, width // 2, 2, c), axis=(2, 4))


class ResidualBlock(nn.Module):
    """NCSNv2's pre-activation residual block: conv(act(norm(conv(act(norm(x)))))) + shortcut(x).

    With `down`, the block halves the resolution (its second conv and a 1x1
    shortcut conv followed by 2x2 mean pooling) unless dilation > 1, where
    it keeps the resolution and the dilation widens the receptive field
    instead (so both references). The shortcut is the identity when nothing
    changes, else a conv (1x1, or 3x3 dilated).
    """

    out_ch: int
    act: Callable[[Array], Array]
    down: bool = False
    dilation: int = 1
    unbiased_mean_var: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_ch = x.shape[-1]

        def conv(name: str, features: int, size: int = 3) -> nn.Conv:
            return ncsn_conv(features, in_ch, size, self.dilation, dtype=self.dtype, name=name)

        def norm(name: str) -> InstanceNorm2dPlus:
            return InstanceNorm2dPlus(self.unbiased_mean_var, self.dtype, name=name)

        # Sublayers in the reference's order (the converter relies on it): a
        # non-resampling block makes its shortcut first.
        shortcut = x
        if not self.down and in_ch != self.out_ch:
            shortcut = conv("shortcut", self.out_ch, 3 if self.dilation > 1 else 1)(x)
        h = self.act(norm("norm_0")(x))
        mid_ch = in_ch if self.down else self.out_ch
        h = conv("conv_0", mid_ch)(h)
        h = self.act(norm("norm_1")(h))
        if not self.down:
            h = ncsn_conv(self.out_ch, mid_ch, 3, self.dilation, dtype=self.dtype, name="conv_1")(h)
        elif self.dilation > 1:
            h = ncsn_conv(self.out_ch, mid_ch, 3, self.dilation, dtype=self.dtype, name="conv_1")(h)
            shortcut = conv("shortcut", self.out_ch)(x)
        else:
            h = ConvMeanPool(self.out_ch, dtype=self.dtype, name="conv_1")(h)
            shortcut = ConvMeanPool(self.out_ch, 1, dtype=self.dtype, name="shortcut")(x)
        return h + shortcut


class RCUBlock(nn.Module):
    """Residual conv units: n_blocks times x <- x + conv(act(... conv(act(x)))), n_stages convs."""

    features: int
    n_blocks: int
    n_stages: int
    act: Callable[[Array], Array]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for i in range(self.n_blocks):
            residual = x
            for j in range(self.n_stages):
                x = ncsn_conv(
                    self.features,
                    x.shape[-1],
                    use_bias=False,
                    dtype=self.dtype,
                    name=f"conv{i}_{j}",
                )(self.act(x))
            x = x + residual
        return x


class CRPBlock(nn.Module):
    """Chained residual pooling: x = act(x); path <- conv(maxpool_5x5(path)); x <- x + path."""

    features: int
    n_stages: int
    act: Callable[[Array], Array]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = self.act(x)
        path = x
        for i in range(self.n_stages):
            path = nn.max_pool(path, (5, 5), strides=(1, 1), padding="SAME")
            path = ncsn_conv(
                self.features, path.shape[-1], use_bias=False, dtype=self.dtype, name=f"conv{i}"
            )(path)
            x = path + x
        return x


def _interp_matrix(n_in: int, n_out: int, align_corners: bool) -> np.ndarray:
    """(n_out, n_in) weights of 1-D linear interpolation (edge values held beyond the ends)."""
    if align_corners:
        pos = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    else:
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    m = np.zeros((n_out, n_in), np.float32)
    np.add.at(m, (np.arange(n_out), lo), 1 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m


class MSFBlock(nn.Module):
    """Multi-resolution fusion: sum_i resize(conv_i(x_i)) at the output resolution."""

    shape: tuple[int, int]
    features: int
    interpolation: str = "bilinear"
    align_corners: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, xs: list[Array]) -> Array:
        out = 0.0
        for i, x in enumerate(xs):
            h = ncsn_conv(self.features, x.shape[-1], dtype=self.dtype, name=f"conv{i}")(x)
            out = out + self._resize(h)
        return out

    def _resize(self, h: Array) -> Array:
        if h.shape[1:3] == tuple(self.shape):
            return h
        if self.interpolation == "nearest_neighbor" or not self.align_corners:
            method = "nearest" if self.interpolation == "nearest_neighbor" else "bilinear"
            return jax.image.resize(h, (h.shape[0], *self.shape, h.shape[-1]), method)
        rows = jnp.asarray(_interp_matrix(h.shape[1], self.shape[0], True), h.dtype)
        cols = jnp.asarray(_interp_matrix(h.shape[2], self.shape[1], True), h.dtype)
        return jnp.einsum("ph,qw,bhwc->bpqc", rows, cols, h)


class RefineBlock(nn.Module):
    """RefineNet's block: RCUs on each input, fusion (MSF) unless `start`, CRP, output RCU(s)."""

    shape: tuple[int, int]
    features: int
    act: Callable[[Array], Array]
    start: bool = False
    end: bool = False
    interpolation: str = "bilinear"
    align_corners: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, xs: list[Array]) -> Array:
        hs = [
            RCUBlock(x.shape[-1], 2, 2, self.act, self.dtype, name=f"adapt{i}")(x)
            for i, x in enumerate(xs)
        ]
        if self.start:
            h = hs[0]
        else:
            msf = MSFBlock(
                self.shape,
                self.features,
                self.interpolation,
                self.align_corners,
                self.dtype,
                name="msf",
            )
            h = msf(hs)
        h = CRPBlock(self.features, 2, self.act, self.dtype, name="crp")(h)
        return RCUBlock(self.features, 3 if self.end else 1, 2, self.act, self.dtype, name="out")(h)
