"""One training update as a pure function, to be jitted (and sharded) by the caller."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from diffusers_unified.training.state import TrainState
from diffusers_unified.typing import Array, Batch, LossFn


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    ema_rate: float,
    skip_nonfinite: bool = False,
    report: tuple[str, ...] = (),
) -> Callable[[TrainState, Batch, Array], tuple[TrainState, dict[str, Array]]]:
    """`step(state, batch, loss_scale) -> (state, metrics)`.

    The update's key is fold_in(state.key, state.step). `loss_scale` multiplies
    the loss (1.0 in normal runs; the fault-injection hook passes NaN). With
    `skip_nonfinite`, an update whose loss or gradient norm is not finite is
    dropped (parameters, EMA and optimiser state unchanged, the step counter
    advanced, `nonfinite_skips` counted), in the manner of
    `optax.apply_if_finite`; the caller decides when to give up. Metrics:
    loss, grad_norm and skipped (0 or 1), and the batch mean of each entry of
    the loss's aux named in `report` (e.g. a classifier's "correct").
    """

    def step(state: TrainState, batch: Batch, loss_scale: Array):
        key = jax.random.fold_in(state.key, state.step)

        def objective(params):
            loss, aux = loss_fn(params, key, batch)
            return loss * loss_scale, {name: jnp.mean(aux[name]) for name in report}

        (loss, reported), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = optax.incremental_update(params, state.ema_params, 1.0 - ema_rate)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = state.replace(
            step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state
        )
        skipped = jnp.zeros((), jnp.int32)
        if skip_nonfinite:
            keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(finite, x, y), a, b)
            skipped = (~finite).astype(jnp.int32)
            new = new.replace(
                params=keep(new.params, state.params),
                ema_params=keep(new.ema_params, state.ema_params),
                opt_state=keep(new.opt_state, state.opt_state),
                nonfinite_skips=jnp.where(finite, 0, state.nonfinite_skips + 1),
            )
        return new, {"loss": loss, "grad_norm": grad_norm, "skipped": skipped, **reported}

    return step
