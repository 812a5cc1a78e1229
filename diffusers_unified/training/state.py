"""The training state: parameters, their exponential moving average, optimiser state, key."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import struct

from diffusers_unified.typing import Array, Params, PRNGKey


class TrainState(struct.PyTreeNode):
    """Everything a resumed run needs to continue bit for bit.

    `step` counts completed updates; the key of update s is
    `fold_in(key, s)`, so no key is ever threaded through the loop. EMA
    parameters are what samplers use (Ho et al. 2020 and Song et al. 2021
    evaluate their EMA models).
    """

    step: Array
    params: Params
    ema_params: Params
    opt_state: optax.OptState
    key: PRNGKey
    nonfinite_skips: Array  # consecutive skipped updates (optim.skip_nonfinite)

    @classmethod
    def create(cls, params: Params, optimizer: optax.GradientTransformation, key: PRNGKey):
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=jax.tree.map(jnp.copy, params),
            opt_state=optimizer.init(params),
            key=key,
            nonfinite_skips=jnp.zeros((), jnp.int32),
        )
