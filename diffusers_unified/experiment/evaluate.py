"""`--mode=eval`: sample metrics and held-out likelihoods of one checkpoint, resumable.

The result is eval/step_<k>.json. The work is done in parts, each written
atomically once finished: sample shards (as `--mode=sample` writes them) and
likelihood batches, under eval/step_<k>_parts/<tag>/, where the tag hashes
every setting the part depends on. A rerun after a kill loads the finished
parts and computes only the rest, so it ends with exactly the numbers of an
uninterrupted run (the tests kill it with `faults.KILL_AFTER_EVAL_PARTS`).

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
from diffusers_unified.experiment import kinds
from diffusers_unified.experiment.figures import save_npz
from diffusers_unified.experiment.run import Run, build_run, restore
from diffusers_unified.experiment.sample import SAMPLE_STREAM, draw, sample_metrics
from diffusers_unified.experiment.workdir import Workdir, atomic_write

logger = logging.getLogger("diffusers_unified")

LIKELIHOOD_STREAM = 3_000_017  # keeps dequantisation and probe keys apart from sampling keys


def evaluate(config, workdir: str, checkpoint: str = "latest", on_corrupt: str = "raise") -> dict:
    wd = Workdir(workdir)
    run = build_run(config)
    step, state = restore(run, wd, checkpoint, on_corrupt)
    wd.start_logging("eval", None)
    parts = os.path.join(wd.eval, f"step_{step}_parts")
    os.makedirs(parts, exist_ok=True)
    seed_key = jax.random.PRNGKey(config.seed)

    key = jax.random.fold_in(seed_key, SAMPLE_STREAM + 1 + step)
    x, _, nfe = draw(run, state.ema_params, config.eval.num_samples, key, parts)
    result = {
        "step": step,
        "sampler": run.describe_sampler(),
        "nfe": nfe,
        **sample_metrics(run, x, config.seed),
        **distribution_metrics(run, x, config.seed),
    }
    key = jax.random.fold_in(seed_key, LIKELIHOOD_STREAM + step)
    for kind in likelihood_kinds(config, run):
        result.update(held_out_likelihood(run, state.ema_params, kind, key, parts))
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


def _likelihood_fn(run: Run, kind: str):
    """A jitted (key, score_fn, x) -> {name: per-example array} for `kind`."""
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
            bpd_offset=scaling.bpd_offset,
        )

        def ode(key, score_fn, x):
            out = fn(key, score_fn, run.process, x)
            nfe = jnp.broadcast_to(out.nfe, out.bpd.shape)
            return {"nll": -out.log_likelihood, "bpd": out.bpd, "nfe": nfe}

        return jax.jit(ode)
    # DDPM's bound: the discretised decoder on centred quantised data, else a Gaussian one.
    discretized = scaling.bits is not None and scaling.centered
    fn = functools.partial(
        likelihood.ddpm_bound,
        variance=run.config.sampling.variance,
        decoder="discretized" if discretized else "gaussian",
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

    return jax.jit(bound)


def _likelihood_tag(config, kind: str) -> str:
    keep = {
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


def held_out_likelihood(run: Run, params, kind: str, key, parts_dir: str) -> dict:
    """Mean likelihood figures of the first eval.num_likelihood held-out examples.

    Batches of eval.likelihood_batch (the last one padded by repetition, so
    one compilation serves all) are computed once and kept on disk.
    """
    e, scaling = run.config.eval, run.dataset.scaling
    stored, labels = run.dataset.split("test")
    n = min(e.num_likelihood, len(stored))
    batch = min(e.likelihood_batch, n)
    out_dir = os.path.join(parts_dir, f"likelihood_{kind}_{_likelihood_tag(run.config, kind)}")
    os.makedirs(out_dir, exist_ok=True)
    fn = _likelihood_fn(run, kind)
    results, reused = [], 0
    for i, start in enumerate(range(0, n, batch)):
        path = os.path.join(out_dir, f"batch_{i:05d}.npz")
        if os.path.exists(path):
            with np.load(path) as part:
                results.append({k: part[k] for k in part.files})
            reused += 1
            continue
        index = np.arange(start, start + batch) % n  # pads the last batch by repetition
        k_deq, k_fn = jax.random.split(jax.random.fold_in(key, i))
        x = scaling.to_model(stored[index], key=k_deq if scaling.bits is not None else None)
        y = None if labels is None or not run.config.model.class_conditional else labels[index]
        values = jax.device_get(fn(k_fn, run.score_fn(params, y), x))
        keep = min(batch, n - start)
        part = {name: np.asarray(v)[:keep] for name, v in values.items()}
        save_npz(path, **part)
        results.append(part)
        faults.after_part_written(faults.KILL_AFTER_EVAL_PARTS)
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
