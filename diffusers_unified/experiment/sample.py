"""`--mode=sample`: restore the EMA parameters, sample, and the sample metric used by eval.

Samples are written in numbered shards, each atomically, so a killed run
resumes where it stopped and a finished one is bit-identical to an
uninterrupted run; then concatenated into samples.npz with a figure. Also
the training loop's sample snapshots.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time

import jax
import numpy as np

from diffusers_unified import faults
from diffusers_unified.errors import ConfigError
from diffusers_unified.experiment import devices, progress
from diffusers_unified.experiment.devices import DeviceMap
from diffusers_unified.experiment.figures import save_npz, save_pngs, save_samples_figure
from diffusers_unified.experiment.run import Run, build_run, host_copy, restore
from diffusers_unified.experiment.workdir import Workdir
from diffusers_unified.metrics import sliced_wasserstein

logger = logging.getLogger("diffusers_unified")

SAMPLE_STREAM = 2_000_003  # keeps sampling keys apart from training keys fold_in(key, step)


def sampler_tag(config) -> str:
    """A short hash of everything that decides the samples but their number."""
    sampling = {k: v for k, v in config.sampling.items() if k != "num_samples"}
    keep = {"seed": config.seed, "process": config.process.to_dict(), "sampling": sampling}
    keep["model"] = config.model.to_dict()
    text = json.dumps(keep, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def sampler_map(run: Run) -> DeviceMap:
    """The config's sampler on one shard per device: (key data, labels), params -> output."""
    shape = (run.config.sampling.batch_size, *run.data_shape)

    def one_shard(unit, params, classifier_params):
        score_fn = run.sampling_score_fn(params, unit["y"], classifier_params)
        out = run.sampler(unit["key"], score_fn, run.process, shape)
        return {"samples": out.samples, "nfe": out.nfe}

    return DeviceMap(run.mesh, one_shard)


def draw(
    run: Run,
    params,
    n: int,
    key,
    out_dir: str | None = None,
    seconds=None,
    everywhere=False,
    desc: str = "sample",
):
    """n samples in shards of sampling.batch_size, one shard per device at a time.

    Returns (samples, labels or None, NFE per sample). Shard i uses
    fold_in(key, i), so the result depends neither on where a run stopped
    nor on the number of devices or processes. With `out_dir`, each shard
    is written atomically as it is finished (by the process that drew it)
    and shards already on disk are reused. `seconds`, a list, receives each
    call's wall time (the first includes compiling the sampler). A progress
    bar (`desc`) counts the shards. With
    several processes, the shard files (on a file system they share) are
    how process 0 sees the others' shards: it alone returns the samples,
    the others return (None, None, nfe), unless `everywhere`.
    """
    batch = run.config.sampling.batch_size
    if out_dir is not None:
        # One folder per sampler setting: shards of another sampler must never be reused.
        out_dir = os.path.join(out_dir, sampler_tag(run.config))
        os.makedirs(out_dir, exist_ok=True)
    path = lambda i: None if out_dir is None else os.path.join(out_dir, f"shard_{i:05d}.npz")
    num_shards = math.ceil(n / batch)
    mapped = sampler_map(run)
    shards: dict[int, dict] = {}
    bar = progress.bar(num_shards, desc, "shard", primary=jax.process_index() == 0)
    reused = 0
    for first in range(0, num_shards, mapped.size):
        group = range(first, min(first + mapped.size, num_shards))
        on_disk = {i for i in group if path(i) and os.path.exists(path(i))}
        reused += len(on_disk)
        if not devices.any_process(len(on_disk) < len(group)):
            bar.update(len(group))
            continue  # every process has every shard of the group: nothing to compute
        units = {
            "key": np.stack([np.asarray(jax.random.fold_in(key, i)) for i in group]),
            "y": _stack_or_none([run.labels(i * batch, batch) for i in group]),
        }
        start = time.perf_counter()
        classifier_params = None if run.classifier is None else run.classifier[1]
        drawn = mapped(units, (params, classifier_params))
        if seconds is not None:
            seconds.append(time.perf_counter() - start)
        for j, out in drawn.items():
            i = first + j
            shard = {"samples": out["samples"], "nfe": np.int64(out["nfe"])}
            if units["y"] is not None:
                shard["labels"] = np.asarray(units["y"][j])
            if path(i) and i not in on_disk:
                save_npz(path(i), **shard)
                faults.after_part_written(faults.KILL_AFTER_SAMPLE_SHARDS)
            shards[i] = shard
        bar.update(len(group))
    bar.close()
    if out_dir is not None and jax.process_index() == 0:
        logger.info("%d of %d sample shards reused from %s", reused, num_shards, out_dir)
    devices.barrier("draw")
    if jax.process_index() != 0 and not everywhere:
        return None, None, int(next(iter(shards.values()))["nfe"]) if shards else 0
    for i in range(num_shards):
        if i not in shards:  # drawn by an earlier run, or by another process
            with np.load(path(i)) as f:
                shards[i] = {k: f[k] for k in f.files}
    x = np.concatenate([shards[i]["samples"] for i in range(num_shards)])[:n]
    has_labels = "labels" in shards[0]
    y = np.concatenate([shards[i]["labels"] for i in range(num_shards)])[:n] if has_labels else None
    return x, y, int(shards[num_shards - 1]["nfe"])


def _stack_or_none(arrays):
    return None if arrays[0] is None else np.stack([np.asarray(a) for a in arrays])


def check_samples_a_score_model(config) -> None:
    """Sample and eval modes need a score model, not a classifier (training.task)."""
    if config.training.task != "score":
        raise ConfigError(
            f"training.task={config.training.task!r}: this work directory holds a classifier, "
            "which guides the samples of a score model (sampling.classifier_workdir) and has "
            "none of its own"
        )


def sample(
    config,
    workdir: str,
    checkpoint: str = "latest",
    on_corrupt: str = "raise",
    force_unlock: bool = False,
) -> str:
    """`--mode=sample`: writes <workdir>/samples/step_<k>/samples.npz and a figure.

    Process 0 holds <workdir>/samples/.lock meanwhile (one sample run at a
    time; a training run, which holds <workdir>/.lock, may go on beside it).
    """
    check_samples_a_score_model(config)
    wd = Workdir(workdir)
    run = build_run(config)
    step, state = restore(run, wd, checkpoint, on_corrupt)
    if jax.process_index() != 0:
        return _sample(run, wd, step, state)
    lock = wd.lock(force=force_unlock, where=wd.samples)
    try:
        wd.start_logging("sample", None)
        return _sample(run, wd, step, state)
    finally:
        lock.release()


def _sample(run: Run, wd: Workdir, step: int, state) -> str:
    config = run.config
    out_dir = os.path.join(wd.samples, f"step_{step}")
    os.makedirs(out_dir, exist_ok=True)
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), SAMPLE_STREAM + step)
    n = config.sampling.num_samples
    x, y, nfe = draw(run, state.ema_params, n, key, os.path.join(out_dir, "shards"))
    if x is None:  # not process 0: its shards are written
        return out_dir
    check_finite_samples(run, x)
    arrays = {"samples": x} if y is None else {"samples": x, "labels": y}
    path = os.path.join(out_dir, "samples.npz")
    save_npz(path, nfe=np.int64(nfe), **arrays)
    if config.sampling.write_png:
        if run.dataset.kind != "image":
            raise ConfigError("sampling.write_png=True needs image data")
        save_pngs(os.path.join(out_dir, "png"), run.dataset.scaling.to_uint8(x))
    figure = os.path.join(out_dir, "samples.png")
    reference = run.dataset.model_data("test")[0][: min(n, 4096)]
    save_samples_figure(
        figure,
        x,
        run.dataset.scaling,
        reference,
        title=f"step {step}, {run.describe_sampler()}",
    )
    logger.info(
        "wrote %d samples of %s (NFE %d each) to %s and %s",
        n,
        run.describe_sampler(),
        nfe,
        path,
        figure,
    )
    return path


def check_finite_samples(run: Run, x: np.ndarray) -> None:
    """Non-finite samples are an error that names the sampler's settings, never a silent NaN."""
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        s = run.config.sampling
        raise ConfigError(
            f"{int(bad.sum())} of {len(x)} samples of {run.describe_sampler()} are not finite "
            f"(NaN or inf): the sampler diverged. Check its settings: sampling.method="
            f"{s.method!r}, sampling.num_steps={s.num_steps}, sampling.step_size={s.step_size}, "
            f"sampling.snr={s.snr}, sampling.n_steps_each={s.n_steps_each}"
        )


def sample_metrics(run: Run, samples: np.ndarray, seed: int, splits: int = 8) -> dict:
    """Sliced Wasserstein distance to held-out data, next to the held-out data's own floor.

    The floor is the distance between two halves of the held-out set, and the
    samples are compared with one half at the same size (the distance grows as
    sets shrink, so only equal sizes compare). One such distance fluctuates by
    about 25 % in 2-D (the quantile functions' tails dominate it), so both are
    averaged over `splits` random halvings of the held-out set.
    """
    test = run.dataset.model_data("test")[0]
    test = test.reshape(test.shape[0], -1)
    h = min(len(samples), len(test) // 2)
    x = samples.reshape(samples.shape[0], -1)[:h]
    rng = np.random.default_rng(seed)
    sw, floor = [], []
    for i in range(splits):
        order = rng.permutation(len(test))
        a, b = test[order[:h]], test[order[h : 2 * h]]
        key = jax.random.PRNGKey(i)
        sw.append(float(sliced_wasserstein(x, b, key)))
        floor.append(float(sliced_wasserstein(a, b, key)))
    sw, floor = float(np.mean(sw)), float(np.mean(floor))
    return {
        "sliced_wasserstein": sw,
        "sw_noise_floor": floor,
        "sw_over_floor": sw / floor,
        "sw_examples": h,
    }


def snapshot(run: Run, wd: Workdir, state, step: int, n: int = 512) -> str:
    """Samples with the EMA parameters and saves a figure (and the samples) under snapshots/."""
    os.makedirs(wd.snapshots, exist_ok=True)
    n = min(n, run.config.sampling.batch_size)
    n -= n % len(run.mesh.devices.flat)
    key = jax.random.fold_in(jax.random.PRNGKey(run.config.seed), 1_000_000 + step)
    # Host copies: sampled on this process's default device alone, not across the mesh.
    # A class-conditional model draws the labels of --mode=sample (sampling.class_label).
    params = jax.tree.map(host_copy, state.ema_params)
    out = run.sample(key, params, n, y=run.labels(0, n))
    samples = np.asarray(jax.device_get(out.samples))
    path = os.path.join(wd.snapshots, f"step_{step}.png")
    reference = run.dataset.model_data("test")[0][:n]
    save_samples_figure(
        path,
        samples,
        run.dataset.scaling,
        reference,
        title=f"step {step}, {run.describe_sampler()}",
    )
    save_npz(os.path.join(wd.snapshots, f"step_{step}.npz"), samples=samples)
    logger.info("snapshot at step %d: %s (NFE %d)", step, path, int(out.nfe))
    return path
