"""Noise-level embeddings, and the activations the networks share.

Every network of this package is conditioned on `noise_cond = 999 t`, with t
in [0, 1] the process's time (the package-wide NOISE_COND_SCALE): DDPM's step
index when N = 1000. `noise_cond` has shape `(batch,)`, or `()` when the whole
batch shares it (as in a sampler); the embeddings below map `(...)` to
`(..., dim)`, so a shared value is embedded once rather than once per example.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusers_unified.errors import ConfigError
from diffusers_unified.typing import Array, Params

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": nn.silu,  # the "swish" of the DDPM and score SDE code
    "swish": nn.silu,
    "relu": nn.relu,
    "gelu": nn.gelu,
    "elu": nn.elu,
    "lrelu": lambda x: nn.leaky_relu(x, negative_slope=0.2),  # NCSN's choice
}

EMBEDDINGS = ("sinusoidal", "fourier")

# The largest noise_cond, at t = 1. The noising side defines the same constant;
# it is repeated here because networks stay independent of that side (a test
# ties the two).
NOISE_COND_SCALE = 999.0

# Name of the fixed random-feature matrix of `GaussianFourierProjection`; see
# `trainable_mask`.
FOURIER_WEIGHTS = "fourier_weights"


def get_act(name: str) -> Callable[[Array], Array]:
    """The activation function called `name` (one of `ACTIVATIONS`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def check_embedding(name: str) -> str:
    if name not in EMBEDDINGS:
        raise ValueError(f"unknown noise embedding {name!r}; valid: {', '.join(EMBEDDINGS)}")
    return name


def check_noise_cond(noise_cond: Array) -> None:
    if jnp.ndim(noise_cond) > 1:
        raise ValueError(f"noise_cond has shape {jnp.shape(noise_cond)}; expected (batch,) or ()")


def check_image_inputs(
    network: str, x: Array, noise_cond: Array, factor: int, factor_source: str
) -> None:
    """The checks every image network makes of its inputs, with messages that name it.

    NHWC images whose height and width the network's downsampling `factor`
    divides (`factor_source` says which setting gives it), and a `(batch,)`
    or `()` noise level.
    """
    if x.ndim != 4:
        raise ValueError(f"{network} takes NHWC images, got an input of shape {x.shape}")
    if x.shape[1] % factor or x.shape[2] % factor:
        raise ConfigError(
            f"{network}: image size {x.shape[1]}x{x.shape[2]} is not divisible by {factor}, the "
            f"downsampling factor of {factor_source}"
        )
    check_noise_cond(noise_cond)


def sinusoidal_embedding(cond: Array, dim: int, max_positions: int = 10000) -> Array:
    """The Transformer / DDPM timestep embedding (Vaswani et al. 2017; Ho et al. 2020).

    With h = dim // 2 frequencies w_k = max_positions^(-k / (h - 1)), k = 0 .. h - 1,

        emb(c) = [sin(c w_0), ..., sin(c w_{h-1}), cos(c w_0), ..., cos(c w_{h-1})],

    zero-padded by one entry when dim is odd, exactly as `get_timestep_embedding`
    of the DDPM code. The periods run from 2 pi to 2 pi max_positions, which
    resolves every one of the 1000 DDPM steps. Maps `cond` of shape `(...)` to
    `(..., dim)`: `(batch,) -> (batch, dim)` and `() -> (dim,)`.
    """
    if dim < 4:
        raise ValueError(f"a sinusoidal embedding needs dim >= 4, got {dim}")
    half = dim // 2
    # Computed once in NumPy: constants of the compiled program, not ops per call.
    freqs = np.exp(-math.log(max_positions) / (half - 1) * np.arange(half)).astype(np.float32)
    arg = jnp.asarray(cond, jnp.float32)[..., None] * freqs
    emb = jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, 1)])
    return emb


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of the noise level (Tancik et al. 2020; NCSN++, Song et al. 2021).

        emb(c) = [sin(2 pi W c'), cos(2 pi W c')],   W ~ N(0, scale^2 I_{dim/2}),

    with c' = c / 999 = t in [0, 1] (zero-padded by one entry when dim is odd).
    NCSN++ feeds log sigma to these features. For a VE process, log sigma(t) =
    log sigma_min + t log(sigma_max / sigma_min) is affine in t, and a phase
    shift of a (sin, cos) pair is a rotation of it, which the Dense layer that
    follows absorbs exactly. So features of t at scale s are NCSN++'s features
    of log sigma at scale s / log(sigma_max / sigma_min), and one embedding of
    `noise_cond` serves every process. Note what that implies: NCSN++'s
    default (scale 16 on log sigma, VE with sigma in [0.01, 50]) corresponds to
    scale = 16 log(5000) ~ 136 here; the default 16 gives smoother features.

    W is drawn at initialisation and then fixed, as in NCSN++: it is stored in
    the parameters under the name `FOURIER_WEIGHTS` (so checkpoints carry it)
    behind a `stop_gradient`, so its gradient is exactly zero and Adam or SGD
    never move it; an optimiser with decoupled weight decay should skip it
    (`optax.masked(..., trainable_mask(params))`).
    """

    dim: int
    scale: float = 16.0

    @nn.compact
    def __call__(self, cond: Array) -> Array:
        w = self.param(FOURIER_WEIGHTS, nn.initializers.normal(self.scale), (self.dim // 2,))
        w = jax.lax.stop_gradient(w)
        # 2 pi / 999 folded into W: the rescaling to t costs nothing per example.
        arg = jnp.asarray(cond, jnp.float32)[..., None] * ((2.0 * math.pi / NOISE_COND_SCALE) * w)
        emb = jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)
        if self.dim % 2:
            emb = jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, 1)])
        return emb


def embed_noise_cond(
    cond: Array,
    dim: int,
    embedding: str = "sinusoidal",
    fourier_scale: float = 16.0,
    max_positions: int = 10000,
) -> Array:
    """`sinusoidal_embedding` or `GaussianFourierProjection` of `cond`, by name.

    Call it inside a compact module's `__call__` (the Fourier projection
    creates its parameter in that module's scope).
    """
    if check_embedding(embedding) == "sinusoidal":
        return sinusoidal_embedding(cond, dim, max_positions)
    return GaussianFourierProjection(dim, fourier_scale)(cond)


def ddpm_init(scale: float = 1.0) -> nn.initializers.Initializer:
    """The DDPM code's initialiser: variance scaling, fan_avg, uniform; zeros for scale 0.

    Entries are U(-l, l) with l^2 = 3 scale / fan_avg, fan_avg = (fan_in +
    fan_out) / 2 counted over the receptive field as for a convolution kernel
    (HWIO) or a Dense kernel. DDPM zero-initialises the last layer of every
    residual branch and the output layer, so that each block starts as the
    identity.
    """
    if scale == 0.0:
        return nn.initializers.zeros

    def init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        receptive = math.prod(shape[:-2])
        fan_avg = (shape[-2] + shape[-1]) * receptive / 2
        limit = math.sqrt(3.0 * scale / fan_avg)
        # Drawn flat, then reshaped: the same distribution, but XLA compiles a
        # rank-1 threefry in a fraction of the time of a rank-4 one, which
        # dominates the initialisation of a U-Net on CPU.
        flat = jax.random.uniform(key, (math.prod(shape),), dtype, -limit, limit)
        return flat.reshape(shape)

    return init


class NoiseEmbedding(nn.Module):
    """The conditioning vector of a DDPM-style U-Net (Ho et al. 2020).

        temb = Dense_{4 dim}(act(Dense_{4 dim}(emb(noise_cond))))

    with emb the sinusoidal embedding (DDPM) or Gaussian Fourier features
    (NCSN++) of width `dim`. Maps `(batch,) -> (batch, 4 dim)` and
    `() -> (4 dim,)`. The output is not activated: each residual block applies
    the activation before its own projection, as in the DDPM code.
    """

    dim: int
    embedding: str = "sinusoidal"
    act: str = "silu"
    fourier_scale: float = 16.0
    max_positions: int = 10000

    @nn.compact
    def __call__(self, noise_cond: Array) -> Array:
        emb = embed_noise_cond(
            noise_cond, self.dim, self.embedding, self.fourier_scale, self.max_positions
        )
        emb = nn.Dense(4 * self.dim, kernel_init=ddpm_init())(emb)
        return nn.Dense(4 * self.dim, kernel_init=ddpm_init())(get_act(self.act)(emb))


def trainable_mask(params: Params) -> Params:
    """A pytree of bools shaped like `params`: False for the fixed Fourier weights.

    For `optax.masked`, when an optimiser would otherwise change parameters
    that receive zero gradient (decoupled weight decay).
    """

    def trainable(path, _):
        return not any(getattr(k, "key", None) == FOURIER_WEIGHTS for k in path)

    return jax.tree_util.tree_map_with_path(trainable, params)
