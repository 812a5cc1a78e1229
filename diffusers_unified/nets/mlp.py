"""A noise-conditioned MLP for vector data (toy 2-D sets, Gaussian mixtures).

The output layer is `NarrowDense`, written here rather than taken from Flax
because of one measured fact about XLA:CPU: a product of a wide activation
(4096 x 256) with a kernel of a few columns (256 x 2) runs as a dot at about
7 GFLOP/s, 0.6 ms of the benchmark MLP's 5.6 ms forward. As a multiply-and-sum
it fuses into the activation that makes its input, and the forward takes
4.9 ms (`experiments/sampler_overhead.py`). Its parameters, their
initialisation and its values are `nn.Dense`'s.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from diffusers_unified.nets.embeddings import check_noise_cond, embed_noise_cond, get_act
from diffusers_unified.typing import Array

# When the output layer is a multiply-and-sum: at most NARROW_MAX_FEATURES columns, and an
# input of at least NARROW_MIN_ELEMENTS elements (below it, the input stays in cache and the
# dot is the faster of the two; measured on XLA:CPU, see `NarrowDense`).
NARROW_MAX_FEATURES = 8
NARROW_MIN_ELEMENTS = 1 << 16


def _multiply_and_sum(h: Array, kernel: Array) -> Array:
    return jnp.sum(h[..., :, None] * kernel, axis=-2)


@jax.custom_jvp
def narrow_matmul(h: Array, kernel: Array) -> Array:
    """`h @ kernel` for a kernel of few columns, as a multiply-and-sum over h's last axis.

    Its derivatives are those of `h @ kernel`, and its tangent is written as
    dots, dh @ kernel + h @ dkernel, which reverse mode transposes into the
    usual dots: with the tangent a multiply-and-sum too, the gradient of the
    benchmark MLP's loss took 1.3x as long (43.7 against 33.5 ms, measured),
    and a jvp was no faster. Zero tangents (no gradient for the kernel, as in a
    likelihood's jvp in x) are skipped.
    """
    return _multiply_and_sum(h, kernel)


def _narrow_matmul_jvp(primals, tangents):
    h, kernel = primals
    dh, dkernel = tangents
    out = _multiply_and_sum(h, kernel)
    tangent = jnp.zeros_like(out)
    if type(dh) is not SymbolicZero:
        tangent = tangent + dh @ kernel
    if type(dkernel) is not SymbolicZero:
        tangent = tangent + h @ dkernel
    return out, tangent


narrow_matmul.defjvp(_narrow_matmul_jvp, symbolic_zeros=True)


class NarrowDense(nn.Dense):
    """`nn.Dense` (the same parameters, initialisation and values, to float rounding) that
    computes its product with `narrow_matmul` when that is the faster way on XLA:CPU.

    That is when the layer has at most `NARROW_MAX_FEATURES` output features
    (and more than one) and its input has at least `NARROW_MIN_ELEMENTS`
    elements. Measured on the 2-core CPU of `experiments/`, with the SiLU that
    makes the input, for 2 features: a (4096, 256) input 0.6 ms faster per
    call as a multiply-and-sum (5.6 -> 4.9 ms for the benchmark MLP's
    forward); from 65,536 elements on ((256, 256), (512, 128), (1024, 64))
    faster by 10-25 %, and a (512, 64) one, 32,768 elements, 12 microseconds
    (17 %) slower. One output feature is already a fast matrix-vector product,
    and as a sum it was 2.5x slower.
    """

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        kernel = self.param(
            "kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        narrow = 1 < self.features <= NARROW_MAX_FEATURES and inputs.size >= NARROW_MIN_ELEMENTS
        if narrow:
            out = narrow_matmul(inputs, kernel)
        else:
            out = jax.lax.dot_general(
                inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision
            )
        return out if bias is None else out + bias


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
        return NarrowDense(d, name="out")(h)
