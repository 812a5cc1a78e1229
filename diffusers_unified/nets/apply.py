"""`NetApply`: a Flax module as the package's `ApplyFn`, stable under `jax.jit`."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusers_unified.typing import Array, Params, PRNGKey


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class NetApply:
    """`NetApply(module)(params, x, noise_cond, y=None, *, train=False, rng=None) -> out`.

    Wraps `module.apply({'params': params}, x, noise_cond, y, train=train,
    rngs={'dropout': rng})` in the signature of `typing.ApplyFn`, for
    `parametrization.make_score_fn` and the losses. It is a frozen dataclass
    registered as a static (leafless) pytree, and Flax modules with equal
    fields are equal and hash equal, so two `NetApply`s of equal modules are
    the same jit cache key: building a new score function from a rebuilt
    network does not re-trace a sampler. Module fields must therefore be
    hashable (tuples, not lists); this is checked at construction.
    """

    module: nn.Module

    def __post_init__(self):
        require_hashable(self)

    def __call__(
        self,
        params: Params,
        x: Array,
        noise_cond: Array,
        y: Array | None = None,
        *,
        train: bool = False,
        rng: PRNGKey | None = None,
    ) -> Array:
        rngs = {"dropout": rng} if rng is not None else {}
        return self.module.apply({"params": params}, x, noise_cond, y, train=train, rngs=rngs)

    def init(self, key: PRNGKey, x_shape: tuple[int, ...], y: Array | None = None) -> Params:
        """Parameters for inputs of shape `x_shape` (a batch of zeros, a `(batch,)` noise level).

        Compiled as one program: run op by op, a U-Net's initialisation
        compiles one random-number kernel per parameter shape, which takes
        longer on CPU than compiling the whole of it once.
        """
        return _init(self, key, tuple(x_shape), y)


def require_hashable(wrapper) -> None:
    """A module wrapper is part of jit's cache key: its module must hash (tuples, not lists)."""
    try:
        hash(wrapper.module)
    except TypeError as err:
        raise TypeError(
            f"{type(wrapper).__name__} needs a hashable module (use tuples, not lists, for its "
            f"fields): {err}"
        ) from err


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(net: NetApply, key: PRNGKey, x_shape: tuple[int, ...], y: Array | None) -> Params:
    x = jnp.zeros(x_shape, jnp.float32)
    noise_cond = jnp.zeros(x_shape[:1], jnp.float32)
    return net.module.init(key, x, noise_cond, y, train=False)["params"]


def count_params(params: Params) -> int:
    """The number of scalars in a parameter pytree."""
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))
