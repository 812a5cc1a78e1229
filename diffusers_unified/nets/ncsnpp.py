"""NCSN++ and DDPM++, the image networks of the score SDE paper (Song et al. 2021).

A transcription of `models/ncsnpp.py` of the score SDE code (the JAX version,
https://github.com/yang-song/score_sde), with the layers of `layerspp.py` and
the FIR resampling of `resample.py`. One module covers every option the
paper's CIFAR-10, CelebA, CelebA-HQ, FFHQ and LSUN configs use; DDPM++ is the
same module with DDPM's residual blocks or BigGAN's without FIR, and with
positional embeddings (see `NCSNpp`).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from diffusers_unified.errors import ConfigError
from diffusers_unified.nets.embeddings import check_image_inputs, get_act, sinusoidal_embedding
from diffusers_unified.nets.layerspp import (
    AttnBlock,
    Combine,
    Downsample,
    FourierFeatures,
    ResnetBlockBigGAN,
    ResnetBlockDDPM,
    Upsample,
    activation_dtype,
    conv3x3,
    default_init,
    group_norm,
    skip_sum,
)
from diffusers_unified.typing import Array

RESBLOCK_TYPES = ("ddpm", "biggan")
PROGRESSIVE = ("none", "output_skip", "residual")
PROGRESSIVE_INPUT = ("none", "input_skip", "residual")
COMBINE = ("sum", "cat")
EMBEDDING_TYPES = ("fourier", "positional")


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"NCSNpp {name}={value!r} is not valid; expected one of {valid}")


class NCSNpp(nn.Module):
    """NCSN++ / DDPM++: images (batch, H, W, C) -> an output of the same shape.

    A U-Net of `len(ch_mult)` resolutions (level i has nf ch_mult[i]
    channels and `num_res_blocks` residual blocks, self-attention after each
    at the resolutions in `attn_resolutions`), a ResBlock-Attn-ResBlock
    middle, and an upsampling path with num_res_blocks + 1 blocks per level
    fed by skip connections, as DDPM. The score SDE paper's additions:

    - `resblock_type`: "ddpm" (DDPM's block; resampling by `Upsample` /
      `Downsample` layers) or "biggan" (BigGAN's block, which resamples inside
      its own up/down blocks);
    - `fir` / `fir_kernel`: anti-aliased FIR resampling (StyleGAN2) instead
      of nearest neighbour / mean pooling; `resamp_with_conv` adds a 3x3 conv
      to the ddpm-type resampling layers;
    - `progressive` (output side): "output_skip" sums an image-space output
      from every level, upsampled (StyleGAN2's output skips); "residual"
      carries a feature pyramid upsampled by conv and added to each level;
    - `progressive_input` (input side): "input_skip" feeds a downsampled copy
      of the input into every level through `Combine` (`progressive_combine`
      "sum" or "cat"); "residual" carries it as a conv-downsampled pyramid
      added to each level;
    - `skip_rescale`: residual sums are divided by sqrt(2);
    - `init_scale`: the scale of the last conv of every block and of the
      output layer (the reference's 0 means 1e-10);
    - `embedding_type`: "fourier" (Gaussian Fourier features of log sigma,
      at `fourier_scale`) or "positional" (DDPM's sinusoidal embedding of the
      time index); `conditional=False` drops the noise embedding entirely.

    Noise conditioning (the package's contract with the processes): with
    "fourier" embeddings or `scale_by_sigma`, `noise_cond` must be sigma
    itself (`noise_cond_kind == "sigma"`), as the reference feeds the VE
    networks; `scale_by_sigma` then divides the output by sigma, so that a
    VE network predicts the score with the right 1/sigma scale. With
    "positional" embeddings the network takes the package's noise_cond =
    999 t, as the reference's continuous VP and sub-VP networks do (its
    labels t * 999). The reference's discrete-SMLD case, positional
    embeddings with scale_by_sigma (sigma looked up from the time index in
    a table), is refused: parametrization "eps" is the same division by sigma.

    The package's additions, off by default: `num_classes` adds a learned
    label embedding to temb, as `UNet` does (row num_classes is the null
    label of classifier-free guidance, used when y is None); `dtype` is the
    type of the activations (float32, bfloat16 or float16), with float32
    parameters, float32 statistics and softmax, and a float32 output.

    `centered`: the input is used as it is when True (data in [-1, 1]); when
    False it is mapped from [0, 1] by 2 x - 1 first, as the reference does
    for `data.centered = False` (its VE configs). The default True is the
    package's convention for networks; set it from the data's scaling.

    Defaults: NCSN++ cont. of the paper's CIFAR-10 VE config
    (`configs/ve/cifar10_ncsnpp_continuous.py`, 62,758,915 parameters)
    except `centered`. Dropout is active only when `train` is true and then
    needs `rngs={'dropout': key}`. H and W must be divisible by
    2^(len(ch_mult) - 1).
    """

    nf: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    fir: bool = True
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    resblock_type: str = "biggan"
    progressive: str = "none"
    progressive_input: str = "residual"
    progressive_combine: str = "sum"
    skip_rescale: bool = True
    embedding_type: str = "fourier"
    fourier_scale: float = 16.0
    init_scale: float = 0.0
    conditional: bool = True
    scale_by_sigma: bool = True
    centered: bool = True
    act: str = "swish"
    num_classes: int | None = None
    dtype: str = "float32"

    def __post_init__(self):
        _check_choice("resblock_type", self.resblock_type, RESBLOCK_TYPES)
        _check_choice("progressive", self.progressive, PROGRESSIVE)
        _check_choice("progressive_input", self.progressive_input, PROGRESSIVE_INPUT)
        _check_choice("progressive_combine", self.progressive_combine, COMBINE)
        _check_choice("embedding_type", self.embedding_type, EMBEDDING_TYPES)
        activation_dtype(self.dtype)
        get_act(self.act)
        if self.scale_by_sigma and self.embedding_type == "positional":
            raise ConfigError(
                "NCSNpp: scale_by_sigma with positional embeddings needs sigma looked up from "
                "the time index (the reference's discrete SMLD setting); use "
                "scale_by_sigma=False with parametrization 'eps', which is the same division "
                "by sigma, or embedding_type='fourier', which takes sigma as noise_cond"
            )
        if self.num_classes is not None and not self.conditional:
            raise ConfigError(
                "NCSNpp: num_classes needs conditional=True (labels are added to temb)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"NCSNpp: dropout must be in [0, 1), got {self.dropout}")
        super().__post_init__()

    @property
    def noise_cond_kind(self) -> str:
        """'sigma' when the network needs sigma as noise_cond, else 'time' (999 t)."""
        return "sigma" if self.embedding_type == "fourier" or self.scale_by_sigma else "time"

    @nn.compact
    def __call__(
        self, x: Array, noise_cond: Array, y: Array | None = None, train: bool = False
    ) -> Array:
        self._check_inputs(x, noise_cond, y)
        act = get_act(self.act)
        dtype = activation_dtype(self.dtype)
        nf, num_levels, channels = self.nf, len(self.ch_mult), x.shape[-1]
        temb = self._noise_embedding(noise_cond, y, act, dtype)

        def res_block(name: str, out_ch: int | None = None, up=False, down=False) -> nn.Module:
            common = dict(
                act=act,
                out_ch=out_ch,
                dropout=self.dropout,
                skip_rescale=self.skip_rescale,
                init_scale=self.init_scale,
                dtype=dtype,
                name=name,
            )
            if self.resblock_type == "ddpm":
                return ResnetBlockDDPM(**common)
            return ResnetBlockBigGAN(
                up=up, down=down, fir=self.fir, fir_kernel=self.fir_kernel, **common
            )

        def attn(name: str) -> AttnBlock:
            return AttnBlock(self.skip_rescale, self.init_scale, dtype, name=name)

        def resampler(cls, name: str, with_conv: bool, out_ch: int | None = None):
            return cls(out_ch, with_conv, self.fir, self.fir_kernel, dtype, name=name)

        if not self.centered:
            x = 2 * x - 1.0
        x = x.astype(dtype)

        # Downsampling path; every activation is kept for a skip connection. The
        # sublayers are created in the reference's order (the converter relies on it).
        input_pyramid = x if self.progressive_input != "none" else None
        hs = [conv3x3(nf, dtype, name="conv_in")(x)]
        for i, mult in enumerate(self.ch_mult):
            for j in range(self.num_res_blocks):
                h = res_block(f"down{i}_block{j}", nf * mult)(hs[-1], temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = attn(f"down{i}_attn{j}")(h)
                hs.append(h)
            if i == num_levels - 1:
                continue
            if self.resblock_type == "ddpm":
                h = resampler(Downsample, f"down{i}_downsample", self.resamp_with_conv)(hs[-1])
            else:
                h = res_block(f"down{i}_downsample", down=True)(hs[-1], temb, train)
            if self.progressive_input == "input_skip":
                input_pyramid = resampler(Downsample, f"down{i}_pyramid", False)(input_pyramid)
                h = Combine(self.progressive_combine, dtype, name=f"down{i}_combine")(
                    input_pyramid, h
                )
            elif self.progressive_input == "residual":
                down = resampler(Downsample, f"down{i}_pyramid", True, h.shape[-1])
                h = input_pyramid = skip_sum(down(input_pyramid), h, self.skip_rescale)
            hs.append(h)

        h = hs[-1]
        h = res_block("mid_block0")(h, temb, train)
        h = attn("mid_attn")(h)
        h = res_block("mid_block1")(h, temb, train)

        def pyramid_head(name: str, h: Array, features: int, init_scale: float = 1.0) -> Array:
            h = act(group_norm(h.shape[-1], dtype, name=f"{name}_norm")(h))
            return conv3x3(features, dtype, init_scale, name=f"{name}_conv")(h)

        # Upsampling path: one more block per level than on the way down, so
        # that each consumes one skip (the extra one is the level's input).
        pyramid = None
        for i in reversed(range(num_levels)):
            for j in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = res_block(f"up{i}_block{j}", nf * self.ch_mult[i])(h, temb, train)
            if h.shape[1] in self.attn_resolutions:
                h = attn(f"up{i}_attn")(h)

            if self.progressive == "output_skip":
                if pyramid is not None:
                    pyramid = resampler(Upsample, f"up{i}_pyramid_up", False)(pyramid)
                    pyramid = pyramid + pyramid_head(f"up{i}_pyramid", h, channels, self.init_scale)
                else:
                    pyramid = pyramid_head(f"up{i}_pyramid", h, channels, self.init_scale)
            elif self.progressive == "residual":
                if pyramid is not None:
                    up = resampler(Upsample, f"up{i}_pyramid_up", True, h.shape[-1])
                    h = pyramid = skip_sum(up(pyramid), h, self.skip_rescale)
                else:
                    # The reference's top-level pyramid conv keeps the default init scale.
                    pyramid = pyramid_head(f"up{i}_pyramid", h, h.shape[-1])

            if i != 0:
                if self.resblock_type == "ddpm":
                    h = resampler(Upsample, f"up{i}_upsample", self.resamp_with_conv)(h)
                else:
                    h = res_block(f"up{i}_upsample", up=True)(h, temb, train)

        if self.progressive == "output_skip":
            h = pyramid
        else:
            h = act(group_norm(h.shape[-1], dtype, name="norm_out")(h))
            h = conv3x3(channels, dtype, self.init_scale, name="conv_out")(h)

        h = h.astype(jnp.float32)
        if self.scale_by_sigma:
            sigma = jnp.asarray(noise_cond, jnp.float32)
            h = h / (sigma[:, None, None, None] if sigma.ndim == 1 else sigma)
        return h

    def _noise_embedding(self, noise_cond: Array, y: Array | None, act, dtype) -> Array | None:
        """temb of width 4 nf from noise_cond (and the label, if any); None when unconditional."""
        # Embedded before the conditional test, as the reference does: its VE
        # checkpoints hold the Fourier weights even when unconditional.
        if self.embedding_type == "fourier":
            temb = FourierFeatures(self.nf, self.fourier_scale, name="fourier")(jnp.log(noise_cond))
        else:
            temb = sinusoidal_embedding(noise_cond, self.nf)
        if not self.conditional:
            return None

        def dense(name: str) -> nn.Dense:
            return nn.Dense(4 * self.nf, kernel_init=default_init(), dtype=dtype, name=name)

        temb = dense("temb_dense1")(act(dense("temb_dense0")(temb)))
        if self.num_classes is not None:
            labels = jnp.asarray(self.num_classes) if y is None else y
            embed = nn.Embed(
                self.num_classes + 1,
                4 * self.nf,
                embedding_init=nn.initializers.normal(1.0),
                name="label_embed",
            )
            temb = temb + embed(labels).astype(dtype)
        return temb

    def _check_inputs(self, x: Array, noise_cond: Array, y: Array | None) -> None:
        factor, source = 2 ** (len(self.ch_mult) - 1), f"ch_mult={self.ch_mult}"
        check_image_inputs("NCSNpp", x, noise_cond, factor, source)
        if y is not None and self.num_classes is None:
            raise ValueError("labels y were given to an NCSNpp with num_classes=None")
