"""FID, Inception Score and KID in `--mode=eval`, as the papers compute them (image data).

The FID Inception-v3 (`nets.InceptionV3`, weights from `eval.inception_weights`,
a file written once by `diffusers-unified-convert inception`) embeds the
samples and the data set's reference split (`eval.fid_split`, CIFAR-10's
training set as the score SDE code and pytorch-fid users do). Images reach
it in [0, 1], rounded to 8-bit levels as a PNG file would hold them, and
resized to 299 x 299 inside the network (`metrics.to_inception_input`).

- The reference statistics (mean and covariance of the pool3 features, in
  pytorch-fid's `.npz` layout, so either tool reads the other's) and the
  features of up to `eval.kid_reference` reference images (for KID) are
  computed once and cached in the work directory, under a name that hashes
  the data settings and the weights file; `eval.fid_stats` may name a file
  of precomputed statistics instead (pytorch-fid's or TTUR's).
- Features are computed in batches of `eval.inception_batch`, one batch per
  device at a time, and saved per group of batches, so a killed eval
  resumes without recomputing them.
- FID's matrix square root is taken in float64 (`metrics.fid_from_statistics`);
  IS over `eval.is_splits` splits of the samples' 1008-way softmax; KID with
  100 subsets of at most 1000 against the cached reference features.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import jax
import numpy as np

from diffusers_unified import metrics
from diffusers_unified.errors import ConfigError
from diffusers_unified.experiment import devices, progress
from diffusers_unified.experiment.devices import DeviceMap
from diffusers_unified.experiment.figures import save_npz
from diffusers_unified.nets.inception import InceptionV3, load_inception_params

logger = logging.getLogger("diffusers_unified")

CONVERTER = (
    "diffusers-unified-convert inception --weights=pt_inception-2015-12-05-6726825d.pth "
    "--out=inception_fid.npz"
)


def check_config(config, dataset) -> None:
    """Before any work: FID needs images and an Inception weights file that exists."""
    e = config.eval
    if not e.fid:
        return
    if dataset.kind != "image":
        raise ConfigError(
            f"eval.fid=True needs image data; dataset {dataset.name!r} is vectors (its sample "
            "metrics are the sliced Wasserstein distance, MMD and the energy distance)"
        )
    if not e.inception_weights:
        raise ConfigError(
            "eval.fid=True needs the FID Inception-v3 weights: set eval.inception_weights to a "
            "file written once by the converter from pytorch-fid's weights, e.g. "
            f"`{CONVERTER}` (nothing is downloaded; without FID, eval.fid=False keeps the "
            "random-feature metrics, labelled _rf)"
        )
    if not os.path.isfile(e.inception_weights):
        raise ConfigError(
            f"eval.inception_weights={e.inception_weights!r} does not exist; write it with "
            f"`{CONVERTER}`"
        )


class Embedder:
    """Pool3 features and logits of images in model units, one batch per device at a time."""

    def __init__(self, run):
        e = run.config.eval
        self.run, self.batch = run, e.inception_batch
        self.variables = load_inception_params(e.inception_weights)
        module = InceptionV3()
        to_unit = run.dataset.scaling.to_unit

        def embed(unit, variables):
            pool, logits = module.apply(variables, metrics.to_inception_input(unit, to_unit))
            return {"pool": pool, "logits": logits}

        self._map = DeviceMap(run.mesh, embed)

    def __call__(self, images: np.ndarray, parts_dir: str | None, desc: str) -> dict:
        """{"pool": (n, 2048), "logits": (n, 1008)} of `images` (model units, NHWC).

        With `parts_dir`, each group of batches is saved there and reused.
        """
        n, b = len(images), self.batch
        starts = list(range(0, n, b))
        group_size = self._map.size
        if parts_dir:
            os.makedirs(parts_dir, exist_ok=True)
        out: dict[str, list] = {"pool": [], "logits": []}
        groups = range(0, len(starts), group_size)
        bar = progress.bar(len(groups), desc, "group", primary=jax.process_index() == 0)
        for g in groups:
            path = parts_dir and os.path.join(parts_dir, f"features_{g // group_size:05d}.npz")
            done = bool(path) and os.path.exists(path)
            if not devices.any_process(not done):
                with np.load(path) as f:
                    out["pool"].append(f["pool"])
                    out["logits"].append(f["logits"])
                bar.update()
                continue
            batches = []
            for i in range(g, min(g + group_size, len(starts))):
                batch = images[starts[i] : starts[i] + b]
                if len(batch) < b:  # the last batch, padded: one compilation serves all
                    batch = np.concatenate([batch, np.repeat(batch[-1:], b - len(batch), 0)])
                batches.append(batch)
            results = self._map(np.stack(batches), (self.variables,), everywhere=True)
            results = [results[j] for j in range(len(batches))]
            count = min(len(batches) * b, n - starts[g])
            pool = np.concatenate([r["pool"] for r in results])[:count]
            logits = np.concatenate([r["logits"] for r in results])[:count]
            if path and jax.process_index() == 0:
                save_npz(path, pool=pool, logits=logits)
            out["pool"].append(pool)
            out["logits"].append(logits)
            bar.update()
        bar.close()
        return {k: np.concatenate(v) for k, v in out.items()}


def _reference_tag(config) -> str:
    e, weights = config.eval, config.eval.inception_weights
    keep = {
        "data": config.data.to_dict(),
        "seed": config.seed,
        "split": e.fid_split,
        "kid_reference": e.kid_reference,
        "weights": [os.path.basename(weights), os.path.getsize(weights)],
    }
    keep["data"].pop("validate_batches", None)
    text = json.dumps(keep, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def reference(run, embedder: Embedder, eval_dir: str) -> dict:
    """mu, sigma (and KID features) of the reference split, computed once per work directory."""
    e = run.config.eval
    path = os.path.join(eval_dir, f"fid_reference_{_reference_tag(run.config)}.npz")
    if os.path.exists(path):
        with np.load(path) as f:
            ref = {k: f[k] for k in f.files}
    else:
        x, _ = run.dataset.model_data(e.fid_split)
        features = embedder(x, os.path.join(eval_dir, "fid_reference_parts"), "inception (data)")
        mu, sigma = metrics.statistics(features["pool"])
        ref = {"mu": mu, "sigma": sigma, "kid_features": features["pool"][: e.kid_reference]}
        if jax.process_index() == 0:
            # pytorch-fid's layout (mu, sigma) plus the KID features: np.load(path)["mu"] works.
            save_npz(path, **ref)
            logger.info(
                "FID reference statistics of %d %s images cached in %s", len(x), e.fid_split, path
            )
    if e.fid_stats:
        ref["mu"], ref["sigma"] = metrics.load_statistics(e.fid_stats)
    return ref


def inception_metrics(run, samples: np.ndarray, parts_dir: str, eval_dir: str) -> dict:
    """FID, IS and KID of `samples` (model units); every process takes part, 0 reports."""
    e = run.config.eval
    embedder = Embedder(run)
    ref = reference(run, embedder, eval_dir)
    feats = embedder(samples, os.path.join(parts_dir, "inception_samples"), "inception (samples)")
    fid = metrics.fid_from_statistics(*metrics.statistics(feats["pool"]), ref["mu"], ref["sigma"])
    is_mean, is_std = metrics.inception_score(feats["logits"], splits=e.is_splits)
    kid, kid_std = metrics.kid(feats["pool"], ref["kid_features"], seed=run.config.seed)
    return {
        "fid": fid,
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "kid": kid,
        "kid_std": kid_std,
        "fid_examples": len(samples),
        "fid_reference": e.fid_stats or f"{e.fid_split} split",
    }
