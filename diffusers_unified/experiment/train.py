"""`--mode=train`: the training loop, with resumable checkpoints and loud failures.

Every update s uses the batch `data.batch_indices(seed, s)` and the key
fold_in(key, s), both pure functions of (seed, s), and the checkpoint holds
the step, parameters, EMA parameters, optimiser state and key: a run killed
at any point and restarted with the same command ends bit for bit where an
uninterrupted run ends (on the same platform and device count).

The reliability tests' fault hooks (kill or NaN at a step, a slow step, a
dump of the final state) are called through `diffusers_unified.faults`.

Several processes (config section `distributed`, joined by the launcher with
`jax.distributed.initialize`) train one data-parallel model: the mesh spans
every process's devices, every process computes the same (seed, step) batch
indices, each process gathers its own rows of the global batch on the host
(the data set never goes to a device) and places them on its devices, and
the state is replicated. Process 0 alone owns the work directory (config, log, metrics,
checkpoints, snapshots); the others learn from it, through a collective,
whether a read or write that only it performs succeeded, and the state it
resumed from, so every process stops together with the same exit code.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusers_unified import data, faults
from diffusers_unified.errors import CheckpointError, NonFiniteError, Preempted
from diffusers_unified.experiment import config as config_lib
from diffusers_unified.experiment import devices, progress, writers
from diffusers_unified.experiment.run import Run, build_run, host_copy
from diffusers_unified.experiment.sample import snapshot
from diffusers_unified.experiment.updates import (
    HeldOutLoss,
    batcher,
    make_train_chunk,
    place_batches,
)
from diffusers_unified.experiment.workdir import Workdir
from diffusers_unified.training.checkpoints import CheckpointManager, estimate_checkpoint_bytes
from diffusers_unified.training.state import TrainState
from diffusers_unified.training.step import make_train_step

logger = logging.getLogger("diffusers_unified")


class _SigtermFlag:
    """Turns SIGTERM into a flag the loop checks after each update (pre-emption notice)."""

    def __init__(self):
        self.raised = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        if not self.raised:
            logger.warning("SIGTERM received; saving a checkpoint after the current update")
        self.raised = True  # a second SIGTERM during the save changes nothing

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def train(
    config,
    workdir: str,
    *,
    resume: str = "auto",
    allow_config_change: bool = False,
    on_corrupt: str = "raise",
    validate_all: bool = False,
    debug_nans: bool = False,
    strict_disk: bool = False,
    force_unlock: bool = False,
) -> TrainState:
    """Trains from scratch, or resumes from the newest committed checkpoint in `workdir`.

    resume: "auto" (resume if there is a checkpoint, else start) or "required"
    (no checkpoint is an error, exit 5). Process 0 holds the work directory's
    lock (<workdir>/.lock) for the whole run; `force_unlock` takes it from a
    process that holds it (see `workdir.WorkdirLock`).
    """
    wd = Workdir(workdir)
    run = build_run(config)
    loop = functools.partial(_loop, validate_all=validate_all, debug_nans=debug_nans)
    if not devices.is_primary():
        # Process 0 owns the work directory; this one starts from the state it resolved
        # (only the shapes are needed here: nothing to compile).
        devices.share_outcome(None)
        shapes = jax.eval_shape(run.init_state)
        state = devices.from_primary(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))
        return loop(run, None, None, state, writers.Writer([], "train"))
    lock = None
    try:
        _preflight(run, wd, resume, strict_disk)
        lock = wd.lock(force=force_unlock)
        ckpt, state = _prepare(run, wd, resume, allow_config_change, on_corrupt)
        start = int(state.step)
        log = writers.open_writer(config, wd, "train", resume_step=start or None)
    except Exception as e:
        devices.share_outcome(e)
        if lock is not None:
            lock.release()
        raise
    devices.share_outcome(None)
    try:
        return loop(run, wd, ckpt, devices.from_primary(state), log)
    finally:
        log.close()
        lock.release()


def _preflight(run: Run, wd: Workdir, resume: str, strict_disk: bool) -> None:
    """Checks that need no lock and write nothing: a required checkpoint, the free space."""
    # Read-only: a live run may be saving there (its lock is not ours yet).
    if (
        resume == "required"
        and CheckpointManager(wd.checkpoints, read_only=True).latest_step() is None
    ):
        raise CheckpointError(
            f"no committed checkpoint found in {wd.checkpoints}; refusing to start from "
            "scratch because --resume=required"
        )
    _check_disk(wd, jax.eval_shape(run.init_state), run.config.training.keep, strict_disk)


def _prepare(run: Run, wd: Workdir, resume, allow_config_change, on_corrupt):
    """Process 0, holding the lock: opens the work directory; returns (checkpoints, state)."""
    config = run.config
    ckpt = CheckpointManager(wd.checkpoints, keep=config.training.keep)
    latest = ckpt.latest_step()
    if latest is None and resume == "required":  # (the checkpoint went while we waited)
        raise CheckpointError(
            f"no committed checkpoint found in {wd.checkpoints}; refusing to start from "
            "scratch because --resume=required"
        )
    saved = wd.saved_config()
    changes = []
    if latest is not None and saved is not None:
        changes = config_lib.check_resume_compatible(saved, config, allow_config_change)
    wd.start_logging("train", latest)
    state = run.init_state()
    if latest is None:
        logger.warning("No checkpoint found; starting from step 0")
        wd.save_config(config)
        wd.truncate_metrics(0)
    else:
        if changes:
            logger.info("config changes allowed on resume:\n%s", "\n".join(changes))
        state, _ = ckpt.restore(latest, target=state, on_corrupt=on_corrupt)
        if allow_config_change:  # only once the checkpoint fits the new config
            wd.save_config(config)
        latest = int(state.step)
        dropped = wd.truncate_metrics(latest)
        logger.info("Resuming from step %d (dropped %d metric lines past it)", latest, dropped)
    return ckpt, state


def _check_disk(wd: Workdir, state, keep: int, strict: bool) -> None:
    """Pre-flight (RELIABILITY.md, B6): do keep + 1 checkpoints fit on the disk?

    A checkpoint holds the parameters, their EMA and the optimiser's slots
    (Adam: 2) and a few scalars: `estimate_checkpoint_bytes` sums the state's
    arrays (`state` may hold shapes only). keep + 1, because a new checkpoint
    is committed before the oldest is pruned. Warns, or fails with exit 5
    when `strict` (--strict_disk), naming both byte counts.
    """
    import shutil

    per = estimate_checkpoint_bytes(state)
    need = per * (keep + 1)
    where = wd.path
    while not os.path.exists(where):  # a new work directory: the disk it will be on
        where = os.path.dirname(where)
    free = shutil.disk_usage(where).free
    if free < need:
        message = (
            f"not enough free disk space for checkpoints: {keep} + 1 checkpoints of {per} "
            f"bytes need {need} bytes in {wd.checkpoints}, but only {free} bytes are available"
        )
        if strict:
            raise CheckpointError(message)
        logger.warning("%s (--strict_disk makes this an error)", message)


def _loop(
    run: Run,
    wd: Workdir,
    ckpt: CheckpointManager,
    state: TrainState,
    log: writers.Writer,
    *,
    validate_all,
    debug_nans,
) -> TrainState:
    """Runs updates in compiled chunks of training.n_jitted_steps (one `lax.scan` each)."""
    config, t = run.config, run.config.training
    k = t.n_jitted_steps
    batches = batcher(run)
    expected, source = run.expected_data_shape()
    nan_steps = faults.nan_steps()
    conditional = run.uses_labels
    traces = [0]
    train_chunk = make_train_chunk(run, traces)
    state = jax.device_put(state, run.replicated)
    # (process 0 resumed from its newest checkpoint, if any: the others' start step)
    last_saved = ckpt.latest_step() if ckpt is not None else (int(state.step) or None)
    sigterm = _SigtermFlag()
    bar = progress.bar(t.n_iters, "train", "step", int(state.step), primary=devices.is_primary())
    held_out = HeldOutLoss(run) if t.eval_freq else None
    window, window_skipped, window_start, updates = [], 0, time.perf_counter(), 0
    accuracy = []
    validate = config.data.validate_batches
    try:
        while int(state.step) < t.n_iters:
            first = int(state.step)
            steps = range(first, first + k)
            local = batches.local(steps)
            for i, step in enumerate(steps):
                if validate_all or validate == 0 or updates + step - first < validate:
                    data.validate_batch(
                        {
                            "x": np.asarray(run.dataset.scaling.to_model(local["x"][i])),
                            "y": None if local["y"] is None else local["y"][i],
                        },
                        expected,
                        run.dataset.centered if run.dataset.kind == "image" else None,
                        batch_index=step,
                        name=run.dataset.name,
                        shape_source=source,
                        num_classes=run.dataset.num_classes if conditional else None,
                        num_classes_flag=(
                            "training.task" if run.is_classifier else "model.class_conditional"
                        ),
                    )
            scales = np.array([np.nan if s + 1 in nan_steps else 1.0 for s in steps], np.float32)
            # A host copy: the chunk donates (and so deletes) the state's device buffers.
            previous = jax.device_get(state) if debug_nans else None
            state, metrics = train_chunk(state, place_batches(run, local), scales)
            metrics = {name: np.asarray(v) for name, v in jax.device_get(metrics).items()}
            _check_finite(run, state, metrics, first, last_saved, previous, debug_nans)
            skipped = metrics["skipped"].astype(bool)  # skip_nonfinite: not applied
            window.extend(metrics["loss"][~skipped].tolist())
            if "correct" in metrics:
                accuracy.extend(metrics["correct"][~skipped].tolist())
            window_skipped += int(skipped.sum())
            updates += k
            bar.update(k)
            faults.after_updates(first, first + k)
            done = int(state.step)
            eval_loss = None
            if held_out is not None and done // t.eval_freq > first // t.eval_freq:
                started = time.perf_counter()
                eval_loss = held_out(state, done // t.eval_freq - 1)
                window_start += time.perf_counter() - started  # steps/s counts updates only
            if done % t.log_freq == 0 or done == t.n_iters:
                elapsed = time.perf_counter() - window_start
                n_updates = len(window) + window_skipped
                record = {
                    "step": done,
                    # the mean over the applied updates (None if every one was skipped)
                    "loss": float(np.mean(window)) if window else None,
                    "grad_norm": float(metrics["grad_norm"][-1]),
                    "learning_rate": run.learning_rate(done),
                    "steps_per_sec": n_updates / elapsed,
                    "examples_per_sec": n_updates * t.batch_size / elapsed,
                }
                if window_skipped:
                    record["skipped_updates"] = window_skipped
                if accuracy:  # a classifier's training accuracy on its noisy batches
                    record["accuracy"] = float(np.mean(accuracy))
                if eval_loss is not None:
                    record["eval_loss"], eval_loss = eval_loss, None
                if wd is not None:
                    wd.append_metrics(record)
                log.scalars(done, record)
                loss = "n/a" if record["loss"] is None else f"{record['loss']:.5f}"
                bar.set_postfix(loss=loss, steps_per_s=f"{record['steps_per_sec']:.1f}")
                logger.info(
                    "step %d: loss %s, grad norm %.3f, %.1f steps/s%s%s",
                    done,
                    loss,
                    record["grad_norm"],
                    record["steps_per_sec"],
                    f", {window_skipped} update(s) skipped" if window_skipped else "",
                    f", held-out loss {record['eval_loss']:.5f}" if "eval_loss" in record else "",
                )
                window, window_skipped, window_start = [], 0, time.perf_counter()
                accuracy = []
            if eval_loss is not None:  # not on a log step: a line of its own
                if wd is not None:
                    wd.append_metrics({"step": done, "eval_loss": eval_loss})
                log.scalars(done, {"eval_loss": eval_loss})
                logger.info("step %d: held-out loss %.5f", done, eval_loss)
            if done % t.checkpoint_freq == 0 or done == t.n_iters:
                _save(ckpt, state, done)
                last_saved = done
            due = t.snapshot_freq and (done % t.snapshot_freq == 0 or done == t.n_iters)
            if due and wd is not None and not run.is_classifier:  # a classifier draws nothing
                log.image_file(done, "samples", snapshot(run, wd, state, done))
            if devices.any_process(sigterm.raised):  # every process stops after the same update
                if last_saved != done:
                    _save(ckpt, state, done)
                if ckpt is not None:
                    ckpt.wait_until_finished()
                logger.warning("Pre-empted at step %d; checkpoint saved", done)
                raise Preempted(f"Pre-empted at step {done}; checkpoint saved")
    finally:
        if not sigterm.raised:  # pre-empted: a later notice must not cut the exit (75) short
            sigterm.restore()
        bar.close()
        if ckpt is not None:
            ckpt.close()
    logger.info(
        "training finished at step %d; the train step compiled %d time(s)",
        int(state.step),
        traces[0],
    )
    _dump_state(state)
    return state


def _save(ckpt: CheckpointManager | None, state: TrainState, step: int) -> None:
    """Process 0 writes (the manager is single-writer); the others wait for its outcome."""
    if ckpt is None:
        devices.share_outcome(None)
        return
    try:
        host = jax.tree.map(host_copy, state)
        ckpt.save(step, host, metadata={"step": step})
    except Exception as e:
        devices.share_outcome(e)
        raise
    devices.share_outcome(None)


def _dump_state(state: TrainState) -> None:
    """Test hook (faults.DUMP_FINAL_STATE): this process's copy of the state, as an .npz file."""
    directory = faults.dump_directory()
    if not directory:
        return
    flat = jax.tree_util.tree_flatten_with_path(jax.tree.map(host_copy, state))[0]
    arrays = {jax.tree_util.keystr(p, simple=True, separator="/"): a for p, a in flat}
    os.makedirs(directory, exist_ok=True)
    np.savez(os.path.join(directory, f"final_state.{jax.process_index()}.npz"), **arrays)


def _check_finite(run, state, metrics, first, last_saved, previous, debug_nans):
    """Stops at the first non-finite loss or gradient norm (or counts skipped updates).

    `metrics` holds one entry per update of the chunk that began at `first`.
    """
    finite = np.isfinite(metrics["loss"]) & np.isfinite(metrics["grad_norm"])
    if finite.all():
        return
    i = int(np.argmin(finite))
    step = first + i + 1
    name = "loss" if not np.isfinite(metrics["loss"][i]) else "grad_norm"
    value = metrics[name][i]
    limit = run.config.optim.skip_nonfinite
    if limit > 0:
        skips = int(state.nonfinite_skips)
        logger.warning(
            "skipped %d non-finite update(s) in steps %d-%d (first at step %d: %s=%s); "
            "%d in a row now (limit %d)",
            int((~finite).sum()),
            first + 1,
            first + len(finite),
            step,
            name,
            value,
            skips,
            limit,
        )
        if skips < limit:
            return
        reason = f"{skips} consecutive non-finite updates (optim.skip_nonfinite={limit})"
    else:
        reason = f"non-finite {name}={value}"
    message = (
        f"{reason} at step {step}; no checkpoint was written at or after it. The last good "
        f"checkpoint is step {last_saved}."
    )
    if debug_nans and previous is not None:
        message += "\n" + _debug_nans(run, previous, step)
    else:
        message += " Rerun with --debug_nans to locate the operation that produced it."
    raise NonFiniteError(message)


def _debug_nans(run: Run, state: TrainState, bad_step: int) -> str:
    """Replays the chunk up to the failing update op by op, under jax_debug_nans."""
    config, d = run.config, run.config.data
    step_fn = make_train_step(run.loss_fn, run.optimizer, config.model.ema_rate)
    x, y = run.dataset.split("train")
    y = y if run.uses_labels else None
    whole = data.Batcher(x, y, config.seed, config.training.batch_size)  # every row, here
    nan_steps = faults.nan_steps()
    state = jax.device_get(state)
    try:
        for step in range(int(state.step), bad_step):
            stored = whole.local([step])
            batch = data.to_model_batch(
                stored["x"][0],
                None if y is None else stored["y"][0],
                run.dataset.scaling,
                dequantize_key=data.dequantize_key(config.seed, step)
                if d.uniform_dequantization
                else None,
                flip_key=data.flip_key(config.seed, step) if d.random_flip else None,
            )
            scale = jnp.float32(np.nan if step + 1 in nan_steps else 1.0)
            with jax.debug_nans(step + 1 == bad_step), jax.disable_jit(step + 1 == bad_step):
                state, _ = step_fn(state, batch, scale)
    except FloatingPointError as e:
        return f"--debug_nans: {str(e).splitlines()[0]}"
    return "--debug_nans: the update did not reproduce the non-finite value op by op."
