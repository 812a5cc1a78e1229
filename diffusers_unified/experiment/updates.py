"""How updates run on the devices: training batches from the host, the compiled chunk.

The training loop (`train`) asks this module for this process's batch
assembler (`batcher`), for the placement of a chunk's batches on the mesh
(`place_batches`), for the compiled chunk of updates (`make_train_chunk`),
and for the held-out loss (`HeldOutLoss`). experiments/train_throughput.py
times the same chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffusers_unified import data
from diffusers_unified.errors import ConfigError
from diffusers_unified.experiment.run import Run, host_copy
from diffusers_unified.training.state import TrainState
from diffusers_unified.training.step import make_train_step


def make_train_chunk(run: Run, traces: list[int] | None = None):
    """`chunk(state, batches, loss_scales) -> (state, metrics)`: len(loss_scales) updates.

    `batches` holds the chunk's batches in stored form, {"x": (k, B, ...),
    "y": (k, B) or None}, sharded over the mesh along the batch axis (see
    `place_batches`). Update i turns batch i into model inputs on the
    devices (dequantised and randomly flipped with keys of (seed, step) when
    the config asks), constrains it to the data sharding and applies the
    train step with loss scale loss_scales[i]. The state is donated and
    comes back replicated; metrics come back stacked, one entry per update.
    `traces[0]` counts compilations. This is what training runs, and what
    experiments/train_throughput.py times.

    The updates run as one compiled `lax.scan`, so a chunk costs one dispatch
    (and XLA:CPU runs the loop body's operations one after another, which
    keeps the MLP step at ~0.7 of the matmul peak against ~0.5 for a single
    jitted step), except for convolutional networks on CPU (see
    `kinds.NetKind.convolutional`): there the chunk dispatches one compiled
    update per batch.
    """
    config = run.config
    dequantize, flip = config.data.uniform_dequantization, config.data.random_flip
    conditional = run.uses_labels
    scaling = run.dataset.scaling
    step_fn = make_train_step(
        run.loss_fn,
        run.optimizer,
        config.model.ema_rate,
        skip_nonfinite=config.optim.skip_nonfinite > 0,
        report=("correct",) if run.is_classifier else (),
    )
    traces = [0] if traces is None else traces
    shardings = (run.replicated, run.replicated)

    def update(state, stored, loss_scale):
        batch = data.to_model_batch(
            stored["x"],
            stored["y"] if conditional else None,
            scaling,
            dequantize_key=data.dequantize_key(config.seed, state.step) if dequantize else None,
            flip_key=data.flip_key(config.seed, state.step) if flip else None,
        )
        batch = jax.lax.with_sharding_constraint(batch, run.batch_sharding)
        return step_fn(state, batch, loss_scale)

    if run.net_kind.convolutional and jax.default_backend() == "cpu":

        def counted(*args):
            traces[0] += 1  # runs only while tracing: counts compilations
            return update(*args)

        one = jax.jit(counted, out_shardings=shardings, donate_argnums=0)

        def dispatched(state, batches, loss_scales):
            metrics = []
            for i, loss_scale in enumerate(loss_scales):
                batch = {k: None if v is None else v[i] for k, v in batches.items()}
                state, m = one(state, batch, loss_scale)
                metrics.append(m)
            return state, jax.tree.map(lambda *ms: jnp.stack(ms), *metrics)

        return dispatched

    def chunk(state, batches, loss_scales):
        traces[0] += 1  # runs only while tracing: counts compilations
        body = lambda state, inputs: update(state, *inputs)
        return jax.lax.scan(body, state, (batches, loss_scales))

    return jax.jit(chunk, out_shardings=shardings, donate_argnums=0)


EVAL_LOSS_STREAM = 4_000_037  # keeps the held-out loss's keys apart from the updates' keys


class HeldOutLoss:
    """The loss of the EMA parameters on a held-out batch: the score SDE code's eval_loss.

    Its k-th call uses batch k of the test split (`data.Batcher`: a pure
    function of (seed, k), each process gathering its own rows) and the key
    fold_in(seed key, EVAL_LOSS_STREAM + k), so a resumed run computes the
    same numbers. The objective is the training loss (with its noise and
    time draws), on the data as training sees it (dequantised if the config
    dequantises), never flipped.
    """

    def __init__(self, run: Run):
        config = run.config
        x, y = run.dataset.split("test")
        self.run = run
        self.batches = data.Batcher(
            x,
            y if run.uses_labels else None,
            config.seed,
            config.training.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        scaling, dequantize = run.dataset.scaling, config.data.uniform_dequantization
        base = jax.random.PRNGKey(config.seed)

        def loss(params, stored, k):
            key = jax.random.fold_in(base, EVAL_LOSS_STREAM + k)
            noise_key, dequantize_key = jax.random.split(key)
            batch = data.to_model_batch(
                stored["x"][0],
                None if stored["y"] is None else stored["y"][0],
                scaling,
                dequantize_key=dequantize_key if dequantize else None,
            )
            batch = jax.lax.with_sharding_constraint(batch, run.batch_sharding)
            return run.loss_fn(params, noise_key, batch)[0]

        self._loss = jax.jit(loss, out_shardings=run.replicated)

    def __call__(self, state: TrainState, k: int) -> float:
        stored = place_batches(self.run, self.batches.local([k]))
        return float(host_copy(self._loss(state.ema_params, stored, k)))


def batcher(run: Run) -> data.Batcher:
    """This process's assembler of training batches (host side; see `data.Batcher`)."""
    x, y = run.dataset.split("train")
    config = run.config
    if config.data.uniform_dequantization and run.dataset.bits is None:
        raise ConfigError(
            "data.uniform_dequantization=True needs quantised data (integer levels), but "
            f"dataset {run.dataset.name!r} declares no bit depth"
        )
    if config.data.random_flip and run.dataset.kind != "image":
        raise ConfigError(
            f"data.random_flip=True needs images; dataset {run.dataset.name!r} is not"
        )
    return data.Batcher(
        x,
        y if run.uses_labels else None,
        config.seed,
        config.training.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def place_batches(run: Run, local: dict) -> dict:
    """This process's rows of a chunk's batches -> global arrays sharded along the batch axis.

    Each process hands over only its own rows (`Batcher.local`); they land on
    its own devices.
    """
    sharding = NamedSharding(run.mesh, P(None, "data"))
    return {
        k: None if v is None else jax.make_array_from_process_local_data(sharding, v)
        for k, v in local.items()
    }
