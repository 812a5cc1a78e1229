"""NCSNv2's RefineNet score network (Song and Ermon 2020), for NHWC images.

A transcription of `models/ncsnv2.py`, `layers.py` and `normalization.py` of
https://github.com/ermongroup/ncsnv2 (PyTorch, the paper's code) and of their
JAX port in the score SDE code (`models/ncsnv2.py`, https://github.com/yang-song/score_sde).
A ResNet encoder of dilated residual blocks with InstanceNorm++ and ELU feeds
a RefineNet decoder (Lin et al. 2017) of RefineBlocks (residual conv units,
multi-resolution fusion, chained residual pooling); the output is divided by
sigma. Unlike NCSN (v1), NCSNv2 is not conditioned on the noise level other
than by that division.

The two reference codes differ in three places; each is a field, defaulting
to the paper's PyTorch code (`refinenet_kwargs(..., score_sde_port=True)` gives the JAX port's
settings, which score SDE checkpoints need):

- `refine_mult`: the widths of the RefineBlocks of the 32/64 px network: the
  PyTorch code uses ngf (1, 1, 2, 2) from fine to coarse (29.7M parameters at
  ngf 128), the JAX port (1, 2, 2, 2) (34.0M). The deeper 128 and 256 px
  networks agree;
- `align_corners`: the multi-resolution fusion's bilinear upsampling is
  PyTorch's `align_corners=True`; the JAX port uses `jax.image.resize`
  (half-pixel centres);
- `unbiased_mean_var`: InstanceNorm++ normalises the per-channel means by
  their standard deviation over channels, computed with torch.var's N - 1
  in PyTorch and with N in the JAX port.

Initialisers are PyTorch's defaults, as in both references (the JAX port's
mean-pool convs, which keep flax's default, excepted): kernel and bias
U(-1/sqrt(fan_in), 1/sqrt(fan_in)); InstanceNorm++'s gamma and alpha
N(1, 0.02^2), beta 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusers_unified.errors import ConfigError
from diffusers_unified.nets.embeddings import check_noise_cond, get_act
from diffusers_unified.nets.layerspp import Dtype, activation_dtype
from diffusers_unified.typing import Array

INTERPOLATIONS = ("bilinear", "nearest_neighbor")

# Encoder widths, dilations and RefineBlock widths (multiples of ngf, fine to
# coarse) of the paper's three networks: NCSNv2 (up to 64 px; the reference
# picks it below 96 px), NCSNv2Deeper (96-128 px) and NCSNv2Deepest (129-256 px).
ARCHITECTURES = {
    "ncsnv2": dict(ch_mult=(1, 2, 2, 2), dilations=(1, 1, 2, 4), refine_mult=(1, 1, 2, 2)),
    "ncsnv2_deeper": dict(
        ch_mult=(1, 2, 2, 4, 4), dilations=(1, 1, 1, 2, 4), refine_mult=(1, 1, 2, 2, 4)
    ),
    "ncsnv2_deepest": dict(
        ch_mult=(1, 2, 2, 2, 4, 4), dilations=(1, 1, 1, 1, 2, 4), refine_mult=(1, 1, 2, 2, 2, 4)
    ),
}


def refinenet_kwargs(architecture: str = "ncsnv2", *, score_sde_port: bool = False) -> dict:
    """`RefineNet` kwargs of one of `ARCHITECTURES`, as the PyTorch code or the JAX port builds it.

    The score SDE code's JAX port (`score_sde_port=True`, what its checkpoints
    need) resizes with half-pixel centres, normalises InstanceNorm++'s channel
    means with the biased variance, and widens its 32/64 px network's
    RefineBlocks to ngf (1, 2, 2, 2).
    """
    if architecture not in ARCHITECTURES:
        raise ConfigError(
            f"unknown RefineNet architecture {architecture!r}; valid: {', '.join(ARCHITECTURES)}"
        )
    kwargs = dict(ARCHITECTURES[architecture])
    if score_sde_port:
        kwargs.update(align_corners=False, unbiased_mean_var=False)
        if architecture == "ncsnv2":
            kwargs["refine_mult"] = (1, 2, 2, 2)
    return kwargs


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


class RefineNet(nn.Module):
    """NCSNv2: images (batch, H, W, C) -> the score estimate, an array of the same shape.

    The encoder has one stage per entry of `ch_mult` (ngf ch_mult[i] channels,
    two `ResidualBlock`s, the first of which downsamples in every stage but
    the first; stages with `dilations[i]` > 1 dilate instead of
    downsampling). The decoder refines from the coarsest stage up, one
    `RefineBlock` of ngf refine_mult[i] channels per stage taking that
    stage's features and the coarser RefineBlock's output; then
    InstanceNorm++, act and a 3x3 conv to C channels. `ARCHITECTURES` holds
    the paper's three depths; the defaults are its 32/64 px NCSNv2 with
    ngf 128 (`configs/cifar10.yml`: 29,694,083 parameters).

    With `scale_by_sigma` (the paper's choice) the output is divided by
    `noise_cond`, which must then be sigma (`noise_cond_kind == "sigma"`):
    the network is otherwise not conditioned on the noise level. Without
    it, noise_cond is unused. `centered`: the input is used as it is when
    True (data in [-1, 1]), else mapped from [0, 1] by 2 x - 1 first, as the
    references do for data in [0, 1]. `dtype` is the type of the
    activations (float32, bfloat16 or float16); parameters, normalisation
    statistics and the output are float32. H and W must be divisible by 2 for
    every downsampling stage. `y` and `train` are accepted for the shared
    network interface (no labels, no dropout).
    """

    ngf: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    dilations: tuple[int, ...] = (1, 1, 2, 4)
    refine_mult: tuple[int, ...] = (1, 1, 2, 2)
    interpolation: str = "bilinear"
    align_corners: bool = True
    unbiased_mean_var: bool = True
    scale_by_sigma: bool = True
    centered: bool = True
    act: str = "elu"
    dtype: str = "float32"

    def __post_init__(self):
        if not len(self.ch_mult) == len(self.dilations) == len(self.refine_mult) >= 2:
            raise ConfigError(
                "RefineNet needs ch_mult, dilations and refine_mult of one length (>= 2), got "
                f"{self.ch_mult}, {self.dilations}, {self.refine_mult}"
            )
        if self.dilations[0] != 1:
            raise ConfigError(f"RefineNet: the first stage cannot be dilated, got {self.dilations}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"RefineNet interpolation={self.interpolation!r} is not valid; "
                f"expected one of {INTERPOLATIONS}"
            )
        activation_dtype(self.dtype)
        get_act(self.act)
        super().__post_init__()

    @property
    def noise_cond_kind(self) -> str:
        """'sigma' when the output is divided by noise_cond, else 'time' (noise_cond unused)."""
        return "sigma" if self.scale_by_sigma else "time"

    @nn.compact
    def __call__(
        self, x: Array, noise_cond: Array, y: Array | None = None, train: bool = False
    ) -> Array:
        self._check_inputs(x, noise_cond, y)
        act = get_act(self.act)
        dtype = activation_dtype(self.dtype)
        h = x if self.centered else 2 * x - 1.0
        h = ncsn_conv(self.ngf, x.shape[-1], dtype=dtype, name="conv_in")(h.astype(dtype))

        layers = []
        for i, (mult, dilation) in enumerate(zip(self.ch_mult, self.dilations, strict=True)):
            for j in range(2):
                h = ResidualBlock(
                    self.ngf * mult,
                    act,
                    down=i > 0 and j == 0,
                    dilation=dilation,
                    unbiased_mean_var=self.unbiased_mean_var,
                    dtype=dtype,
                    name=f"stage{i}_block{j}",
                )(h)
            layers.append(h)

        ref = None
        for i in reversed(range(len(layers))):
            ref = RefineBlock(
                layers[i].shape[1:3],
                self.ngf * self.refine_mult[i],
                act,
                start=ref is None,
                end=i == 0,
                interpolation=self.interpolation,
                align_corners=self.align_corners,
                dtype=dtype,
                name=f"refine{i}",
            )([layers[i]] if ref is None else [layers[i], ref])

        h = act(InstanceNorm2dPlus(self.unbiased_mean_var, dtype, name="norm_out")(ref))
        h = ncsn_conv(x.shape[-1], h.shape[-1], dtype=dtype, name="conv_out")(h)
        h = h.astype(jnp.float32)
        if self.scale_by_sigma:
            sigma = jnp.asarray(noise_cond, jnp.float32)
            h = h / (sigma[:, None, None, None] if sigma.ndim == 1 else sigma)
        return h

    def _check_inputs(self, x: Array, noise_cond: Array, y: Array | None) -> None:
        if x.ndim != 4:
            raise ValueError(f"RefineNet takes NHWC images, got an input of shape {x.shape}")
        factor = 2 ** sum(1 for d in self.dilations[1:] if d == 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ConfigError(
                f"RefineNet: image size {x.shape[1]}x{x.shape[2]} is not divisible by {factor}, "
                f"the downsampling factor of dilations={self.dilations}"
            )
        check_noise_cond(noise_cond)
        if y is not None:
            raise ValueError("RefineNet takes no labels y (NCSNv2 is unconditional)")
