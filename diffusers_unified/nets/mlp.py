"""A noise-conditioned MLP for vector data (toy 2-D sets, Gaussian mixtures)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from diffusers_unified.nets.embeddings import check_noise_cond, embed_noise_cond, get_act
from diffusers_unified.typing import Array


def _part_of_lecun_normal(fan_in_part: int, fan_in: int) -> nn.initializers.Initializer:
    """LeCun normal for a block of rows of a `fan_in`-row kernel: variance 1 / fan_in."""
    return nn.initializers.variance_scaling(fan_in_part / fan_in, "fan_in", "truncated_normal")


class MLP(nn.Module):
    """An MLP on [x, emb(noise_cond)]: x of shape (batch, d) -> an output of shape (batch, d).

        h_1 = act(W [x; e] + b),   h_{k+1} = act(Dense(h_k)),   out = Dense_d(h_K),

    with e the `emb_dim`-wide embedding of `noise_cond` (sinusoidal as in DDPM,
    or Gaussian Fourier features as in NCSN++) and K = len(hidden). The
    default is the usual toy-data score network: input 2 + a 128-dim
    sinusoidal embedding, three hidden layers of 256, SiLU, output 2.

    The first layer is stored split, W [x; e] = W_x x + W_e e (parameters
    `in_x`, with the bias, and `in_emb`), initialised as one LeCun-normal
    kernel over the concatenation would be. The split is what makes a shared
    noise level cheap: when `noise_cond` is a scalar, e and W_e e are computed
    once, shape (hidden,), and broadcast over the batch, and only the d-wide
    product W_x x is per example.

    With `num_classes` set, a learned label embedding E[y] (an `nn.Embed` of
    num_classes + 1 rows) is added to e. Row `num_classes` is the null label
    of classifier-free guidance (Ho and Salimans 2022): it is used when `y` is
    None, and a trainer drops labels by setting them to `num_classes`. Since
    W_e (e + E[y]) = W_e e + (W_e E)[y], labels cost a gather from a
    (num_classes + 1, hidden) table rather than a per-example product with W_e.

    `train` is accepted for the shared network interface; the MLP has no
    dropout.
    """

    hidden: tuple[int, ...] = (256, 256, 256)
    emb_dim: int = 128
    embedding: str = "sinusoidal"
    act: str = "silu"
    num_classes: int | None = None
    fourier_scale: float = 16.0

    @nn.compact
    def __call__(
        self, x: Array, noise_cond: Array, y: Array | None = None, train: bool = False
    ) -> Array:
        if x.ndim != 2:
            raise ValueError(f"MLP takes vector data of shape (batch, d), got {x.shape}")
        check_noise_cond(noise_cond)
        if y is not None and self.num_classes is None:
            raise ValueError("labels y were given to an MLP with num_classes=None")
        act = get_act(self.act)
        d, width = x.shape[-1], self.hidden[0]
        fan_in = d + self.emb_dim

        in_x = nn.Dense(width, kernel_init=_part_of_lecun_normal(d, fan_in), name="in_x")
        in_emb = nn.Dense(
            width,
            use_bias=False,
            kernel_init=_part_of_lecun_normal(self.emb_dim, fan_in),
            name="in_emb",
        )
        e = embed_noise_cond(noise_cond, self.emb_dim, self.embedding, self.fourier_scale)
        cond = in_emb(e)  # (hidden,) for a scalar noise_cond, else (batch, hidden)
        if self.num_classes is not None:
            table = nn.Embed(
                self.num_classes + 1,
                self.emb_dim,
                embedding_init=nn.initializers.normal(1.0),
                name="label_embed",
            )(jnp.arange(self.num_classes + 1))
            projected = in_emb(table)
            cond = cond + (projected[self.num_classes] if y is None else projected[y])

        h = act(in_x(x) + cond)
        for i, width in enumerate(self.hidden[1:], start=1):
            h = act(nn.Dense(width, name=f"hidden_{i}")(h))
        return nn.Dense(d, name="out")(h)
