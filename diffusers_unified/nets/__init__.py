"""Networks: an MLP, the DDPM U-Net, NCSN++ / DDPM++, NCSNv2's RefineNet; FID's Inception-v3.

Every score network is a Flax Linen module called as `module.apply({'params':
params}, x, noise_cond, y=None, train=False)` and returns an array shaped like
x; `NetApply(module)` gives it the `ApplyFn` signature the rest of the package
uses. `noise_cond` has shape `(batch,)`, or `()` for the whole batch, and is
what the process says the network is conditioned on: 999 t by default, or
sigma(t) for a module whose `noise_cond_kind` is "sigma" (the score SDE code's
VE networks, which embed log sigma and divide their output by sigma). A
network never sees the process that produced it. `InceptionV3` is the FID
variant of Inception-v3, for the metrics.
"""

from diffusers_unified.nets.apply import NetApply, count_params
from diffusers_unified.nets.classifier import ClassifierApply, MLPClassifier, ResNetClassifier
from diffusers_unified.nets.embeddings import (
    ACTIVATIONS,
    EMBEDDINGS,
    GaussianFourierProjection,
    NoiseEmbedding,
    get_act,
    sinusoidal_embedding,
    trainable_mask,
)
from diffusers_unified.nets.inception import InceptionV3, load_inception_params
from diffusers_unified.nets.mlp import MLP
from diffusers_unified.nets.ncsnpp import NCSNpp
from diffusers_unified.nets.refinenet import ARCHITECTURES, RefineNet, refinenet_kwargs
from diffusers_unified.nets.unet import UNet

__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURES",
    "ClassifierApply",
    "EMBEDDINGS",
    "MLP",
    "MLPClassifier",
    "GaussianFourierProjection",
    "InceptionV3",
    "NCSNpp",
    "NetApply",
    "NoiseEmbedding",
    "RefineNet",
    "ResNetClassifier",
    "UNet",
    "count_params",
    "get_act",
    "load_inception_params",
    "refinenet_kwargs",
    "sinusoidal_embedding",
    "trainable_mask",
]
