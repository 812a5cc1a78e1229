"""Noise-conditional classifiers p_t(y | x_t) for classifier-guided sampling.

The score SDE paper (Song et al. 2021, sec. 5 and app. I.1) samples from
p(x | y) by adding grad_x log p_t(y | x_t) of a classifier trained on noisy
data to the unconditional score (`parametrization.classifier_guided_score_fn`,
trained by `losses.classifier_loss`). Its classifier is a noise-conditional
Wide ResNet (`models/wideresnet_noise_conditional.py` of the reference code):
the input standardised per image, Gaussian Fourier features of log sigma
through a two-layer MLP, and that embedding added inside every residual block,
then global average pooling and a dense layer to the logits.

Both networks here are called `(x, noise_cond, train=False) -> logits (batch,
num_classes)` and are conditioned like the score networks of this package, on
`noise_cond = 999 t` (`nets.embeddings`), shape `(batch,)` or `()`:

* `MLPClassifier`: vector data (batch, d), the `MLP`'s layout with a
  `num_classes`-wide output;
* `ResNetClassifier`: NHWC images, the reference's design at a small size,
  built from the U-Net's residual blocks (GroupNorm rather than the
  reference's batch norm, so the classifier has no mutable state and its
  gradient with respect to x is per example).

`ClassifierApply(module)` gives either the signature `losses.classifier_loss`
and `parametrization.make_logits_fn` take.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusers_unified.nets.apply import require_hashable
from diffusers_unified.nets.embeddings import (
    NoiseEmbedding,
    check_noise_cond,
    embed_noise_cond,
    get_act,
)
from diffusers_unified.nets.mlp import _part_of_lecun_normal
from diffusers_unified.nets.unet import Downsample, ResnetBlock, conv3x3, group_norm
from diffusers_unified.typing import Array, Params, PRNGKey


class MLPClassifier(nn.Module):
    """An MLP on [x, emb(noise_cond)] -> logits: (batch, d) -> (batch, num_classes).

    The layout of `nets.MLP` (first layer split into W_x x + W_e e, so a
    shared noise level is embedded once per batch), ending in a Dense layer to
    `num_classes` logits. `train` is accepted for the shared interface.
    """

    num_classes: int
    hidden: tuple[int, ...] = (128, 128)
    emb_dim: int = 64
    embedding: str = "sinusoidal"
    act: str = "silu"
    fourier_scale: float = 16.0

    @nn.compact
    def __call__(self, x: Array, noise_cond: Array, train: bool = False) -> Array:
        if x.ndim != 2:
            raise ValueError(f"MLPClassifier takes vector data of shape (batch, d), got {x.shape}")
        check_noise_cond(noise_cond)
        act = get_act(self.act)
        d, width = x.shape[-1], self.hidden[0]
        fan_in = d + self.emb_dim
        e = embed_noise_cond(noise_cond, self.emb_dim, self.embedding, self.fourier_scale)
        in_x = nn.Dense(width, kernel_init=_part_of_lecun_normal(d, fan_in), name="in_x")
        in_emb = nn.Dense(
            width,
            use_bias=False,
            kernel_init=_part_of_lecun_normal(self.emb_dim, fan_in),
            name="in_emb",
        )
        h = act(in_x(x) + in_emb(e))
        for i, width in enumerate(self.hidden[1:], start=1):
            h = act(nn.Dense(width, name=f"hidden_{i}")(h))
        return nn.Dense(self.num_classes, name="logits")(h)


class ResNetClassifier(nn.Module):
    """A noise-conditional ResNet on NHWC images -> logits (batch, num_classes).

    After the reference's Wide ResNet (see the module docstring): with
    `standardize`, each image is first mapped to (x - mean) / max(std,
    1 / sqrt(H W C)) (its own mean and std, as the reference does, which makes
    the input's scale the same at every noise level); a 3x3 convolution to
    `ch` channels; per level i, `num_res_blocks` residual blocks of
    `ch * ch_mult[i]` channels, each adding the noise embedding (the U-Net's
    `ResnetBlock`), with a stride-2 convolution between levels; then
    GroupNorm, activation, global average pooling and a Dense layer. The
    noise embedding is the U-Net's (`NoiseEmbedding`: sinusoidal or Fourier
    features, then two Dense layers to 4 ch).
    """

    num_classes: int
    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    dropout: float = 0.0
    embedding: str = "sinusoidal"
    fourier_scale: float = 16.0
    num_groups: int = 32
    standardize: bool = True
    act: str = "silu"

    @nn.compact
    def __call__(self, x: Array, noise_cond: Array, train: bool = False) -> Array:
        if x.ndim != 4:
            raise ValueError(f"ResNetClassifier takes NHWC images, got an input of shape {x.shape}")
        check_noise_cond(noise_cond)
        act = get_act(self.act)
        if self.standardize:
            size = x.shape[1] * x.shape[2] * x.shape[3]
            mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
            std = jnp.std(x, axis=(1, 2, 3), keepdims=True)
            x = (x - mean) / jnp.maximum(std, size**-0.5)
        temb = NoiseEmbedding(self.ch, self.embedding, self.act, self.fourier_scale)(noise_cond)
        h = conv3x3(self.ch)(x)
        for level, mult in enumerate(self.ch_mult):
            for _ in range(self.num_res_blocks):
                block = ResnetBlock(self.ch * mult, act, self.num_groups, self.dropout, False)
                h = block(h, temb, train)
            if level != len(self.ch_mult) - 1:
                h = Downsample(with_conv=True)(h)
        h = act(group_norm(h.shape[-1], self.num_groups)(h))
        return nn.Dense(self.num_classes, name="logits")(jnp.mean(h, axis=(1, 2)))


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ClassifierApply:
    """`ClassifierApply(module)(params, x, noise_cond, *, train=False, rng=None) -> logits`.

    The classifier counterpart of `nets.NetApply`: a frozen, static pytree (so
    equal modules give the same jit cache key) that calls
    `module.apply({'params': params}, x, noise_cond, train=train,
    rngs={'dropout': rng})`.
    """

    module: nn.Module

    def __post_init__(self):
        require_hashable(self)

    def __call__(
        self,
        params: Params,
        x: Array,
        noise_cond: Array,
        *,
        train: bool = False,
        rng: PRNGKey | None = None,
    ) -> Array:
        rngs = {"dropout": rng} if rng is not None else {}
        return self.module.apply({"params": params}, x, noise_cond, train=train, rngs=rngs)

    def init(self, key: PRNGKey, x_shape: tuple[int, ...]) -> Params:
        """Parameters for inputs of shape `x_shape` (zeros and a `(batch,)` noise level)."""
        return _init(self, key, tuple(x_shape))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(net: ClassifierApply, key: PRNGKey, x_shape: tuple[int, ...]) -> Params:
    x = jnp.zeros(x_shape, jnp.float32)
    return net.module.init(key, x, jnp.zeros(x_shape[:1], jnp.float32), train=False)["params"]
