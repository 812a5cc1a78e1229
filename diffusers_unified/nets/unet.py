"""The DDPM U-Net for NHWC images (Ho et al. 2020), with the DDPM++/NCSN++ options of Song et al.

A transcription of the architecture of the DDPM code (`diffusion_tf/models/
unet.py`) and of `models/ddpm.py` of the score SDE reference code: a wide
ResNet U-Net with GroupNorm, residual blocks conditioned on the noise level,
self-attention at chosen resolutions, and skip connections from every block
of the downsampling path to the upsampling path. Two options come from
DDPM++/NCSN++ (`models/ncsnpp.py`): Gaussian Fourier features of the noise
level and rescaling of residual sums by 1/sqrt(2). Labels, if any, are
embedded and added to the noise embedding.

With `up_attention="per_block"` the module is also diffusers' `UNet2DModel`
built from `DownBlock2D` / `AttnDownBlock2D` / `UpBlock2D` / `AttnUpBlock2D`
as its DDPM checkpoints (`google/ddpm-cifar10-32`, ...) configure it;
`convert.diffusers` maps such a checkpoint onto it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusers_unified.nets.embeddings import NoiseEmbedding, check_image_inputs, ddpm_init, get_act
from diffusers_unified.typing import Array

# Where the upsampling path applies self-attention (see `UNet`), and the activation dtypes.
UP_ATTENTION = ("per_level", "per_block")
DTYPES = ("float32", "bfloat16", "float16")


def _groups(channels: int, num_groups: int) -> int:
    """GroupNorm groups: the largest divisor of `channels` at most min(num_groups, channels // 4).

    That is DDPM's 32 for its widths (128 channels and up). Keeping at least
    4 channels per group in narrow networks follows the score SDE code's
    NCSN++ (min(channels // 4, 32)) and matters: with one channel per group,
    GroupNorm is instance normalisation, which removes exactly the
    per-channel shift by which a residual block adds the noise embedding,
    and the network would ignore noise_cond.
    """
    most = max(1, min(num_groups, channels // 4))
    return max(g for g in range(1, most + 1) if channels % g == 0)


def group_norm(channels: int, num_groups: int, eps: float = 1e-6, dtype=None) -> nn.GroupNorm:
    # Flax computes the statistics in float32 whatever `dtype` is.
    return nn.GroupNorm(num_groups=_groups(channels, num_groups), epsilon=eps, dtype=dtype)


def conv3x3(features: int, init_scale: float = 1.0, stride: int = 1, dtype=None) -> nn.Conv:
    # SAME padding with stride 2 on an even size pads (0, 1): DDPM's downsampling conv, and
    # diffusers' Downsample2D with padding=0, which pads (0, 1, 0, 1) before a VALID conv.
    return nn.Conv(
        features,
        (3, 3),
        strides=(stride, stride),
        padding="SAME",
        kernel_init=ddpm_init(init_scale),
        dtype=dtype,
    )


def nin(features: int, init_scale: float = 1.0, dtype=None) -> nn.Dense:
    """DDPM's "network in network": a 1x1 convolution, i.e. a Dense layer over channels."""
    return nn.Dense(features, kernel_init=ddpm_init(init_scale), dtype=dtype)


def dropout(h: Array, rate: float, key: Array) -> Array:
    """Inverted dropout: each entry is kept with probability 1 - rate and scaled by 1 / (1 - rate).

    `nn.Dropout`'s semantics, except that the mask is drawn flat and then
    reshaped: XLA compiles a rank-1 random kernel several times faster than a
    rank-4 one on CPU, and a U-Net holds one per residual block.
    """
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (h.size,)).reshape(h.shape)
    return jnp.where(mask, h / keep, jnp.zeros_like(h))


def _per_example(v: Array) -> Array:
    """A conditioning vector (batch, c) -> (batch, 1, 1, c); a shared (c,) broadcasts as it is."""
    return v[:, None, None, :] if v.ndim == 2 else v


class ResnetBlock(nn.Module):
    """DDPM's residual block: two 3x3 convolutions, with the noise embedding added between.

        h = conv(act(norm(x))) + Dense(act(temb)),
        h = conv_0(dropout(act(norm(h)))),
        out = shortcut(x) + h      (divided by sqrt(2) with skip_rescale),

    where conv_0 is zero-initialised (the block starts as the identity) and
    the shortcut is a 1x1 convolution when the channel count changes.
    """

    out_ch: int
    act: Callable[[Array], Array]
    num_groups: int
    dropout: float
    skip_rescale: bool
    eps: float = 1e-6
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, temb: Array, train: bool) -> Array:
        norm = lambda c: group_norm(c, self.num_groups, self.eps, self.dtype)
        h = self.act(norm(x.shape[-1])(x))
        h = conv3x3(self.out_ch, dtype=self.dtype)(h)
        temb = nn.Dense(self.out_ch, kernel_init=ddpm_init(), dtype=self.dtype)(self.act(temb))
        h = h + _per_example(temb)
        h = self.act(norm(self.out_ch)(h))
        if train and self.dropout > 0.0:
            h = dropout(h, self.dropout, self.make_rng("dropout"))
        h = conv3x3(self.out_ch, init_scale=0.0, dtype=self.dtype)(h)
        if x.shape[-1] != self.out_ch:
            x = nin(self.out_ch, dtype=self.dtype)(x)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H W positions (Ho et al. 2020; Wang et al. 2018).

    q, k, v = 1x1 convs of norm(x),   w = softmax_j(q_i . k_j / sqrt(C)),
    out = x + nin_0(sum_j w_ij v_j)   (divided by sqrt(2) with skip_rescale).

    This is also diffusers' `Attention` with one head (`attention_head_dim`
    None), `residual_connection` and `rescale_output_factor` 1. The logits
    and the softmax are computed in float32 whatever `dtype` is, as diffusers
    does with `upcast_softmax`.
    """

    num_groups: int
    skip_rescale: bool
    eps: float = 1e-6
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, height, width, c = x.shape
        h = group_norm(c, self.num_groups, self.eps, self.dtype)(x).reshape(b, height * width, c)
        q, k, v = (nin(c, dtype=self.dtype)(h) for _ in range(3))
        logits = jnp.einsum("bic,bjc->bij", q, k, preferred_element_type=jnp.float32)
        w = jax.nn.softmax(logits * c**-0.5, axis=-1).astype(v.dtype)
        h = nin(c, init_scale=0.0, dtype=self.dtype)(jnp.einsum("bij,bjc->bic", w, v))
        h = h.reshape(x.shape)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class Downsample(nn.Module):
    """Halves H and W: a stride-2 3x3 convolution, or 2x2 average pooling."""

    with_conv: bool
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.with_conv:
            return conv3x3(x.shape[-1], stride=2, dtype=self.dtype)(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
    """Doubles H and W: nearest-neighbour upsampling, then a 3x3 convolution if with_conv."""

    with_conv: bool
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv3x3(x.shape[-1], dtype=self.dtype)(x) if self.with_conv else x


class UNet(nn.Module):
    """The DDPM U-Net: images (batch, H, W, C) -> an output of the same shape.

    Resolution level i has `ch * ch_mult[i]` channels and `num_res_blocks`
    residual blocks (followed by self-attention when the resolution is in
    `attn_resolutions`); every level but the last halves the resolution. The
    middle is ResBlock-Attn-ResBlock; the upsampling path mirrors the
    downsampling one with `num_res_blocks + 1` blocks per level, each taking
    the concatenation of its input and the matching skip activation. The
    output head is GroupNorm-act-conv (zero-initialised, so the network starts
    at 0) to C channels. H and W must be divisible by 2^(len(ch_mult) - 1).

    The defaults are DDPM's CIFAR-10 model as the score SDE code builds it
    (35.2M parameters): like its `ddpm.py`, the upsampling path applies
    self-attention once per level, after the level's blocks, where DDPM's
    own code (35.7M) applies it after every block. Options:

    - `up_attention`: "per_level" (the score SDE code's `ddpm.py`, the
      default) or "per_block": after every residual block of the upsampling
      path at a resolution in `attn_resolutions`, as Ho et al.'s
      `diffusion_tf/models/unet.py` and diffusers' `AttnUpBlock2D` do. DDPM's
      CIFAR-10 model is the defaults with "per_block" (35,746,307 parameters,
      diffusers' `google/ddpm-cifar10-32`).

    - `embedding`: "sinusoidal" (DDPM) or "fourier" (NCSN++'s Gaussian Fourier
      features, at `fourier_scale`; see `GaussianFourierProjection`) for the
      noise level, then DDPM's two-layer MLP to a 4 ch vector temb.
    - `skip_rescale` (DDPM++/NCSN++): residual sums are divided by sqrt(2),
      which keeps the variance of the residual stream from growing.
    - `num_groups`: GroupNorm groups, reduced for narrow layers to keep at
      least 4 channels per group and to divide the channel count (so tiny
      configs with ch=8 work and still see the noise level).
    - `num_classes`: a learned label embedding (num_classes + 1 rows) is
      added to temb; row `num_classes` is the null label of classifier-free
      guidance, used when y is None.
    - `norm_eps`: the GroupNorm epsilon: 1e-6 as in the DDPM code and
      diffusers' DDPM checkpoints (diffusers' own default is 1e-5).
    - `dtype`: "float32", "bfloat16" or "float16", the dtype of the
      activations (mixed precision). Parameters stay float32, and so do the
      noise embedding MLP, the GroupNorm statistics and the attention
      softmax; the output is cast to float32.

    What diffusers' `UNet2DModel` calls `Timesteps(flip_sin_to_cos=False,
    downscale_freq_shift=1)` is this module's "sinusoidal" embedding, and its
    ResnetBlock2D with `resnet_time_scale_shift="default"` is `ResnetBlock`.

    Dropout (after the second normalisation of each residual block) is
    active only when `train` is true, and then needs `rngs={'dropout': key}`.
    The input is used as it is: data are expected centred (in [-1, 1]).
    A scalar `noise_cond` gives a single temb shared by the batch.
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    embedding: str = "sinusoidal"
    fourier_scale: float = 16.0
    skip_rescale: bool = False
    num_groups: int = 32
    num_classes: int | None = None
    act: str = "silu"
    up_attention: str = "per_level"
    norm_eps: float = 1e-6
    dtype: str = "float32"

    @nn.compact
    def __call__(
        self, x: Array, noise_cond: Array, y: Array | None = None, train: bool = False
    ) -> Array:
        self._check_inputs(x, noise_cond, y)
        act = get_act(self.act)
        dtype = jnp.dtype(self.dtype)
        temb = NoiseEmbedding(self.ch, self.embedding, self.act, self.fourier_scale)(noise_cond)
        if self.num_classes is not None:
            labels = jnp.asarray(self.num_classes) if y is None else y
            embed = nn.Embed(
                self.num_classes + 1, temb.shape[-1], embedding_init=nn.initializers.normal(1.0)
            )
            temb = temb + embed(labels)

        def res_block(out_ch: int) -> ResnetBlock:
            return ResnetBlock(
                out_ch, act, self.num_groups, self.dropout, self.skip_rescale, self.norm_eps, dtype
            )

        def attn_block() -> AttnBlock:
            return AttnBlock(self.num_groups, self.skip_rescale, self.norm_eps, dtype)

        # Downsampling path; every activation is kept for a skip connection.
        hs = [conv3x3(self.ch, dtype=dtype)(x)]
        for level, mult in enumerate(self.ch_mult):
            for _ in range(self.num_res_blocks):
                h = res_block(self.ch * mult)(hs[-1], temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = attn_block()(h)
                hs.append(h)
            if level != len(self.ch_mult) - 1:
                hs.append(Downsample(self.resamp_with_conv, dtype)(hs[-1]))

        h = hs[-1]
        h = res_block(h.shape[-1])(h, temb, train)
        h = attn_block()(h)
        h = res_block(h.shape[-1])(h, temb, train)

        # Upsampling path: one more block per level than on the way down, so
        # that each consumes one skip (the extra one is the level's input).
        per_block = self.up_attention == "per_block"
        for level, mult in reversed(list(enumerate(self.ch_mult))):
            for _ in range(self.num_res_blocks + 1):
                h = res_block(self.ch * mult)(jnp.concatenate([h, hs.pop()], axis=-1), temb, train)
                if per_block and h.shape[1] in self.attn_resolutions:
                    h = attn_block()(h)
            if not per_block and h.shape[1] in self.attn_resolutions:
                h = attn_block()(h)
            if level != 0:
                h = Upsample(self.resamp_with_conv, dtype)(h)

        h = act(group_norm(h.shape[-1], self.num_groups, self.norm_eps, dtype)(h))
        return conv3x3(x.shape[-1], init_scale=0.0, dtype=dtype)(h).astype(jnp.float32)

    def _check_inputs(self, x: Array, noise_cond: Array, y: Array | None) -> None:
        factor, source = 2 ** (len(self.ch_mult) - 1), f"ch_mult={self.ch_mult}"
        check_image_inputs("UNet", x, noise_cond, factor, source)
        if y is not None and self.num_classes is None:
            raise ValueError("labels y were given to a UNet with num_classes=None")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.up_attention not in UP_ATTENTION:
            raise ValueError(
                f"unknown up_attention {self.up_attention!r}; valid: {', '.join(UP_ATTENTION)}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; valid: {', '.join(DTYPES)}")
        if not self.norm_eps > 0.0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
