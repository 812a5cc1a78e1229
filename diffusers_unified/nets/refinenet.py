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
to the paper's PyTorch code (`refinenet_kwargs(..., score_sde_port=True)`
gives the JAX port's settings, which score SDE checkpoints need):

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

The layers are in `refinenet_layers.py`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from diffusers_unified.errors import ConfigError
from diffusers_unified.nets.embeddings import check_image_inputs, get_act
from diffusers_unified.nets.layerspp import activation_dtype
from diffusers_unified.nets.refinenet_layers import (
    InstanceNorm2dPlus,
    RefineBlock,
    ResidualBlock,
    ncsn_conv,
)
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
        factor = 2 ** sum(1 for d in self.dilations[1:] if d == 1)
        check_image_inputs("RefineNet", x, noise_cond, factor, f"dilations={self.dilations}")
        if y is not None:
            raise ValueError("RefineNet takes no labels y (NCSNv2 is unconditional)")
