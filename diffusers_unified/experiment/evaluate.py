"""`--mode=eval`: sample metrics and held-out likelihoods of checkpoints, resumable.

One checkpoint, or every one of a range, waiting for those a training run has
yet to write (`selection`). The result is eval/step_<k>.json per checkpoint,
its metrics also in TensorBoard (tensorboard/eval). The work is done in parts,
each written atomically once finished: sample shards (as `--mode=sample`
writes them) and likelihood batches, under eval/step_<k>_parts/<tag>/, where
the tag hashes every setting the part depends on. A rerun after a kill loads
the finished parts and computes only the rest, so it ends with exactly the
numbers of an uninterrupted run (the tests kill it with
`faults.KILL_AFTER_EVAL_PARTS`).

Likelihoods (config `eval.likelihood`): the probability-flow ODE's
log-likelihood (any process) and DDPM's variational bound (DDPM only), on
the first `eval.num_likelihood` held-out examples, in nats and bits/dim.
Quantised data (images) are dequantised with uniform noise and the bits/dim
carry the data layer's offset (`Scaling.bpd_offset`, 7 for centred 8-bit
images); continuous data report the density in model units (offset 0). For
data whose density is known (the Gaussian-mixture toy sets), the exact NLL
of the same examples is reported next to the model's.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from diffusers_unified import faults, likelihood, metrics
from diffusers_unified.errors import CheckpointError
from diffusers_unified.experiment import devices, inception_eval, kinds, progress, writers
from diffusers_unified.experiment.devices import DeviceMap
from diffusers_unified.experiment.figures import save_npz
from diffusers_unified.experiment.run import Run, build_run, restore
from diffusers_unified.experiment.sample import (
    SAMPLE_STREAM,
    check_finite_samples,
    check_samples_a_score_model,
    draw,
    sample_metrics,
)
from diffusers_unified.experiment.selection import Selection, agreed, steps_to_evaluate
from diffusers_unified.experiment.workdir import Workdir, atomic_write
from diffusers_unified.training.checkpoints import CheckpointManager

logger = logging.getLogger("diffusers_unified")

LIKELIHOOD_STREAM = 3_000_017  # keeps dequantisation and probe keys apart from sampling keys


def evaluate(
    config,
    workdir: str,
    checkpoint: str = "latest",
    on_corrupt: str = "raise",
    wait: float = 0.0,
    force_unlock: bool = False,
):
    """Evaluates the checkpoints `checkpoint` selects (`Selection.parse`); returns the figures
    of the last one evaluated (on process 0; None on the others).

    A checkpoint that is not there yet is an error (exit 5) at once, or with
    `wait` > 0 seconds, awaited (a training run may be writing it): the
    launcher polls and gives up after `wait` seconds without a new
    checkpoint. In a range, a checkpoint whose eval/step_<k>.json was
    written with the same settings is not evaluated again, so a killed
    range evaluation resumes where it stopped (and within a checkpoint,
    from its finished parts). Process 0 holds <workdir>/eval/.lock.
    """
    check_samples_a_score_model(config)
    wd = Workdir(workdir)
    run = build_run(config)
    inception_eval.check_config(config, run.dataset)
    selection = Selection.parse(checkpoint, config.training.n_iters)
    primary = jax.process_index() == 0
    steps = agreed(
        steps_to_evaluate(CheckpointManager(wd.checkpoints, read_only=True), selection, wait)
    )
    step = next(steps, None)  # a missing checkpoint fails here, before anything is written
    lock = wd.lock(force=force_unlock, where=wd.eval) if primary else None
    log = writers.open_writer(config, wd, "eval") if primary else writers.Writer([], "eval")
    result = None
    try:
        if primary:
            wd.start_logging("eval", None)
        tag = _eval_tag(config)
        while step is not None:
            done = _read_result(wd, step)
            if selection.skips_done and done is not None and done.get("eval_tag") == tag:
                logger.info("checkpoint %d already evaluated (%s); skipped", step, done["path"])
            else:
                result = _evaluate_step(run, wd, step, on_corrupt, tag, selection.single)
                if result is not None:
                    log.scalars(step, result)
            step = next(steps, None)
    finally:
        log.close()
        if lock is not None:
            lock.release()
    return result


def _eval_tag(config) -> str:
    """A short hash of every setting that decides an eval result (not logging, not training)."""
    keep = {k: config[k].to_dict() for k in ("data", "process", "model", "sampling", "eval")}
    text = json.dumps({"seed": config.seed, **keep}, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _read_result(wd: Workdir, step: int) -> dict | None:
    path = os.path.join(wd.eval, f"step_{step}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return {**json.load(f), "path": path}


def _evaluate_step(run: Run, wd: Workdir, step: int, on_corrupt: str, tag: str, single: bool):
    """Evaluates checkpoint `step`; returns the figures (on process 0; None on the others)."""
    config = run.config
    try:
        step, state = restore(run, wd, str(step), on_corrupt)
    except CheckpointError:
        if single or step in CheckpointManager(wd.checkpoints, read_only=True).all_steps():
            raise
        logger.warning("checkpoint %d was removed before it could be evaluated; skipped", step)
        return None
    primary = jax.process_index() == 0
    parts = os.path.join(wd.eval, f"step_{step}_parts")
    os.makedirs(parts, exist_ok=True)
    seed_key = jax.random.PRNGKey(config.seed)
    # Every process takes part in drawing the samples and computing the likelihoods
    # (one unit per device); process 0 then measures and writes.
    key = jax.random.fold_in(seed_key, SAMPLE_STREAM + 1 + step)
    fid = config.eval.fid
    x, _, nfe = draw(
        run,
        state.ema_params,
        config.eval.num_samples,
        key,
        parts,
        everywhere=fid,
        desc=f"eval {step}: samples",
    )
    if x is not None:
        check_finite_samples(run, x)
    inception = inception_eval.inception_metrics(run, x, parts, wd.eval) if fid else {}
    key = jax.random.fold_in(seed_key, LIKELIHOOD_STREAM + step)
    likelihoods = {}
    for kind in likelihood_kinds(config, run):
        out = held_out_likelihood(run, state.ema_params, kind, key, parts)
        likelihoods.update(out or {})
    if not primary:
        return None
    result = {
        "step": step,
        "sampler": run.describe_sampler(),
        "nfe": nfe,
        **inception,
        **sample_metrics(run, x, config.seed),
        **distribution_metrics(run, x, config.seed),
        **likelihoods,
        "eval_tag": tag,
    }
    path = os.path.join(wd.eval, f"step_{step}.json")
    atomic_write(path, json.dumps(result, indent=2, sort_keys=True) + "\n")
    logger.info("eval at step %d: %s", step, json.dumps(result, sort_keys=True))
    return result


def likelihood_kinds(config, run: Run) -> tuple[str, ...]:
    choice = config.eval.likelihood
    has_bound = kinds.PROCESSES[config.process.name].variational_bound
    if choice == "bound" and not has_bound:
        raise ValueError(f"eval.likelihood='bound': process {config.process.name!r} has none")
    return {
        "none": (),
        "ode": ("ode",),
        "bound": ("bound",),
        "all": ("ode", "bound") if has_bound else ("ode",),
    }[choice]


def distribution_metrics(run: Run, samples: np.ndarray, seed: int) -> dict:
    """MMD and energy distance to held-out data; log-density and mode coverage if it is known.

    Images (and any data over 16 dimensions) also get the Frechet distance
    and KID on a fixed random ReLU embedding (`metrics.random_features`),
    the stand-in for Inception features when nothing may be downloaded.
    """
    test = run.dataset.model_data("test")[0]
    n = min(len(samples), len(test), 2_000)  # O(n^2) kernels: 2,000 keeps them cheap
    x, y = samples[:n].reshape(n, -1), test[:n].reshape(n, -1)
    out = {
        "mmd": float(metrics.mmd(x, y)),
        "energy_distance": float(metrics.energy_distance(x, y)),
        "distribution_examples": n,
    }
    if x.shape[1] > 16:
        features = metrics.random_features(jax.random.PRNGKey(seed))
        kid, kid_std = metrics.kernel_inception_distance(x, y, features, subset_size=min(n, 1000))
        out.update(frechet_distance_rf=metrics.frechet_distance(x, y, features), kid_rf=kid)
        out["kid_rf_std"] = kid_std
    mixture = run.dataset.mixture
    if mixture is not None:
        covered, share = metrics.mode_coverage(samples, mixture)
        out.update(
            mean_log_density=float(metrics.mean_log_density(samples, mixture.log_prob)),
            data_mean_log_density=float(metrics.mean_log_density(test, mixture.log_prob)),
            mode_coverage=float(covered),
            mode_share=[round(float(s), 4) for s in share],
        )
    return out


def _discretized_bound(run: Run) -> bool:
    """DDPM's bound uses its discretised decoder on centred quantised data (else a Gaussian)."""
    scaling = run.dataset.scaling
    return scaling.bits is not None and scaling.centered


def _likelihood_fn(run: Run, kind: str):
    """(key, score_fn, x) -> {name: per-example array} for `kind` (traceable)."""
    e, scaling = run.config.eval, run.dataset.scaling
    if kind == "ode":
        fn = functools.partial(
            likelihood.ode_log_likelihood,
            divergence=e.divergence,
            probe=e.probe,
            num_probes=e.num_probes,
            method=e.ode_method,
            rtol=e.rtol,
            atol=e.atol,
            num_steps=e.num_steps,
            t_min=e.t_min,
            bpd_offset=scaling.bpd_offset,
        )

        def ode(key, score_fn, x):
            out = fn(key, score_fn, run.process, x)
            nfe = jnp.broadcast_to(out.nfe, out.bpd.shape)
            return {"nll": -out.log_likelihood, "bpd": out.bpd, "nfe": nfe}

        return ode
    discretized = _discretized_bound(run)
    fn = functools.partial(
        likelihood.ddpm_bound,
        variance=kinds.variance(run.config.sampling),
        decoder="discretized" if discretized else "gaussian",
        clip_x0=discretized,  # the DDPM code's calc_bpd_loop(clip_denoised=True)
        bits=scaling.bits or 8,
        bpd_offset=0.0 if discretized else scaling.bpd_offset,
    )

    def bound(key, score_fn, x):
        out = fn(key, score_fn, run.process, x)
        return {
            "bpd": out.bpd,
            "prior_bpd": out.prior_bpd,
            "kl_bpd": jnp.sum(out.kl_bpd, axis=1),
            "decoder_bpd": out.decoder_bpd,
            "nfe": jnp.broadcast_to(out.nfe, out.bpd.shape),
        }

    return bound


def _likelihood_tag(config, kind: str) -> str:
    keep = {
        "version": 2,  # 2: bin centres for the discretised bound, t_min 1e-5, Rademacher
        "kind": kind,
        "eval": config.eval.to_dict(),
        "variance": config.sampling.variance,
        "seed": config.seed,
        "process": config.process.to_dict(),
        "model": config.model.to_dict(),
        "data": config.data.to_dict(),
    }
    keep["eval"].pop("num_samples")
    text = json.dumps(keep, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def held_out_likelihood(run: Run, params, kind: str, key, parts_dir: str) -> dict | None:
    """Mean likelihood figures of the first eval.num_likelihood held-out examples.

    Batches of eval.likelihood_batch (the last one padded by repetition, so
    one compilation serves all) run one per device at a time, each with its
    own keys, so the figures do not depend on the device count; each batch
    is written to disk by the process that computed it and reused on a
    rerun. Quantised data are dequantised for the ODE likelihood; DDPM's
    discretised decoder sees the levels themselves, on its bins' centres
    (v / 127.5 - 1 for 8 bits), as the DDPM code evaluates it. Returns None
    on every process but 0.
    """
    e, scaling = run.config.eval, run.dataset.scaling
    stored, labels = run.dataset.split("test")
    conditional = labels is not None and run.config.model.class_conditional
    n = min(e.num_likelihood, len(stored))
    batch = min(e.likelihood_batch, n)
    out_dir = os.path.join(parts_dir, f"likelihood_{kind}_{_likelihood_tag(run.config, kind)}")
    os.makedirs(out_dir, exist_ok=True)
    path = lambda i: os.path.join(out_dir, f"batch_{i:05d}.npz")
    fn = _likelihood_fn(run, kind)
    dequantize = scaling.bits is not None and not (kind == "bound" and _discretized_bound(run))

    def one_batch(unit, params):
        x = scaling.to_model(unit["x"], unit["deq_key"] if dequantize else None)
        score_fn = run.score_fn(params, unit["y"] if conditional else None)
        return fn(unit["key"], score_fn, x)

    mapped = DeviceMap(run.mesh, one_batch)
    starts = list(range(0, n, batch))
    results, reused = {}, 0
    primary = jax.process_index() == 0
    bar = progress.bar(len(starts), f"likelihood ({kind})", "batch", primary=primary)
    for first in range(0, len(starts), mapped.size):
        group = range(first, min(first + mapped.size, len(starts)))
        on_disk = {i for i in group if os.path.exists(path(i))}
        reused += len(on_disk)
        if not devices.any_process(len(on_disk) < len(group)):
            bar.update(len(group))
            continue
        index = [np.arange(starts[i], starts[i] + batch) % n for i in group]  # pads by repetition
        keys = [jax.random.split(jax.random.fold_in(key, i)) for i in group]
        units = {
            "x": np.stack([stored[ix] for ix in index]),
            "y": np.stack([labels[ix] for ix in index]) if conditional else None,
            "deq_key": np.stack([np.asarray(k[0]) for k in keys]),
            "key": np.stack([np.asarray(k[1]) for k in keys]),
        }
        for j, values in mapped(units, (params,)).items():
            i = first + j
            keep = min(batch, n - starts[i])
            part = {name: np.asarray(v)[:keep] for name, v in values.items()}
            if i not in on_disk:
                save_npz(path(i), **part)
                faults.after_part_written(faults.KILL_AFTER_EVAL_PARTS)
            results[i] = part
        bar.update(len(group))
    bar.close()
    devices.barrier(f"likelihood_{kind}")
    if jax.process_index() != 0:
        return None
    for i in range(len(starts)):
        if i not in results:
            with np.load(path(i)) as part:
                results[i] = {k: part[k] for k in part.files}
    results = [results[i] for i in range(len(starts))]
    merged = {name: np.concatenate([r[name] for r in results]) for name in results[0]}
    prefix = "ode" if kind == "ode" else "bound"
    bpd = merged["bpd"]
    out = {
        f"{prefix}_bpd": float(bpd.mean()),
        f"{prefix}_bpd_stderr": float(bpd.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0,
        f"{prefix}_nfe": float(merged["nfe"].mean()),
        f"{prefix}_examples": n,
    }
    if kind == "ode":
        out["ode_nll_nats"] = float(merged["nll"].mean())
    else:
        for term in ("prior_bpd", "kl_bpd", "decoder_bpd"):
            out[f"bound_{term}"] = float(merged[term].mean())
    mixture = run.dataset.mixture
    if mixture is not None:
        exact = -np.asarray(mixture.log_prob(jnp.asarray(stored[:n], jnp.float32)))
        out["data_nll_nats"] = float(exact.mean())  # the true density's NLL of the same examples
        if kind == "ode":
            out["ode_nll_nats_minus_exact"] = float((merged["nll"] - exact).mean())
    logger.info(
        "%s likelihood on %d held-out examples (%d of %d batches reused from disk): %s",
        kind,
        n,
        reused,
        len(results),
        out,
    )
    return out
