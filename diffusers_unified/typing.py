"""Type aliases shared across the package."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax

Array = jax.Array
PRNGKey = jax.Array
Params = Any  # a pytree of arrays
Batch = dict[str, Any]  # {"x": data, "y": optional labels}


class ScoreFn(Protocol):
    """`score_fn(x, t) -> grad_x log p_t(x)`, an array shaped like `x`.

    `t` is in the process's continuous time, either of shape `(batch,)` or a
    scalar shared by the whole batch (samplers pass a scalar, which lets a
    network embed the time once per step instead of once per example).
    """

    def __call__(self, x: Array, t: Array) -> Array: ...


class ApplyFn(Protocol):
    """A network: `apply_fn(params, x, noise_cond, y=None, *, train=False, rng=None)`.

    Returns an array shaped like `x`. `noise_cond` has shape `(batch,)` or `()`;
    `rng` feeds dropout when `train` is true.
    """

    def __call__(
        self,
        params: Params,
        x: Array,
        noise_cond: Array,
        y: Array | None = None,
        *,
        train: bool = False,
        rng: PRNGKey | None = None,
    ) -> Array: ...


LossFn = Callable[[Params, PRNGKey, Batch], tuple[Array, dict[str, Array]]]
