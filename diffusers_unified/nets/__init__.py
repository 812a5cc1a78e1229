"""Networks: an MLP for low-dimensional data, the DDPM U-Net for images, noise embeddings.

Every network is a Flax Linen module called as `module.apply({'params': params},
x, noise_cond, y=None, train=False)` and returns an array shaped like x;
`NetApply(module)` gives it the `ApplyFn` signature the rest of the package
uses. `noise_cond` is 999 t (shape `(batch,)`, or `()` for the whole batch),
and a network never sees the process that produced it.
"""

from diffusers_unified.nets.apply import NetApply, count_params
from diffusers_unified.nets.embeddings import (
    ACTIVATIONS,
    EMBEDDINGS,
    GaussianFourierProjection,
    NoiseEmbedding,
    get_act,
    sinusoidal_embedding,
    trainable_mask,
)
from diffusers_unified.nets.mlp import MLP
from diffusers_unified.nets.unet import UNet

__all__ = [
    "ACTIVATIONS",
    "EMBEDDINGS",
    "MLP",
    "GaussianFourierProjection",
    "NetApply",
    "NoiseEmbedding",
    "UNet",
    "count_params",
    "get_act",
    "sinusoidal_embedding",
    "trainable_mask",
]
