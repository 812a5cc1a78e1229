"""Inception feature extraction speed on this machine, and what a 50,000-sample FID costs.

Runs `metrics.inception.InceptionFeatures` -- the path `--mode=eval` would take:
8-bit quantisation, bilinear resize 32 -> 299, the FID Inception-v3 -- on
CIFAR-sized images (32 x 32 x 3 in [-1, 1]) at batch 200, under one jit.
The weights are randomly initialised (`InceptionV3().init`): the network is
dense, so its speed does not depend on the weight values, and no weights
file is needed to measure it. One warm-up batch (which also compiles) is
timed separately; then `--batches` further batches are timed one by one and
the best is kept, since the machine is shared (the median is reported too,
and the load average before and after the run).

FLOPs per image come from XLA's cost analysis of the compiled batch
(multiply-adds count 2). The 50,000-sample time is 50,000 / (images/s) for
one set: the generated samples; the reference set's statistics are computed
once and stored (`metrics.inception.save_statistics`).

The script checks its own figures (finite, positive rates and times; finite
features of the right shape) and exits with status 1 otherwise. Writes
results/fid_throughput.{csv,md}; the last output line is a JSON object with
`inception_images_per_s`.

    python experiments/fid_throughput.py [--batch 200] [--batches 3]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics as stats
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from diffusers_unified.data import Scaling  # noqa: E402
from diffusers_unified.metrics.inception import InceptionFeatures  # noqa: E402
from diffusers_unified.nets.inception import InceptionV3  # noqa: E402

from common import final_json, write_table  # noqa: E402

FID_SAMPLES = 50_000
IMAGE_SHAPE = (32, 32, 3)


def flops_per_image(features: InceptionFeatures, batch: np.ndarray) -> float:
    cost = features._run.lower(features.variables, batch).cost_analysis()  # no second compile
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"]) / len(batch)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--batches", type=int, default=3, help="timed batches after the warm-up")
    args = parser.parse_args()

    model = InceptionV3()
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 299, 299, 3), jnp.float32))
    features = InceptionFeatures(
        variables, Scaling(centered=True, bits=8).to_unit, batch_size=args.batch
    )
    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    batch = rng.uniform(-1, 1, (args.batch, *IMAGE_SHAPE)).astype(np.float32)

    start = time.perf_counter()
    pool, logits = features(batch)
    first_s = time.perf_counter() - start
    times = []
    for i in range(args.batches):
        batch = rng.uniform(-1, 1, batch.shape).astype(np.float32)
        start = time.perf_counter()
        pool, logits = features(batch)
        times.append(time.perf_counter() - start)
        print(f"batch {i + 1}/{args.batches}: {times[-1]:.2f} s", flush=True)
    gflop = flops_per_image(features, batch) / 1e9

    best, median = min(times), stats.median(times)
    rate = args.batch / best
    figures = {
        "first_batch_s": first_s,
        "best_batch_s": best,
        "median_batch_s": median,
        "images_per_s": rate,
        "gflop_per_image": gflop,
        "fid_50k_minutes": FID_SAMPLES / rate / 60,
    }
    bad = [k for k, v in figures.items() if not (math.isfinite(v) and v > 0)]
    if pool.shape != (args.batch, 2048) or logits.shape != (args.batch, 1008):
        bad.append(f"output shapes {pool.shape}, {logits.shape}")
    if not (np.all(np.isfinite(pool)) and np.all(np.isfinite(logits))):
        bad.append("non-finite features")
    if bad:
        print(f"error: implausible figures: {bad} in {figures}", file=sys.stderr)
        return 1

    rows = [
        [
            args.batch,
            "32x32x3 -> 299",
            round(first_s, 1),
            round(best, 2),
            round(median, 2),
            round(rate, 2),
            round(gflop, 2),
            round(gflop * rate, 1),
            round(figures["fid_50k_minutes"], 1),
        ]
    ]
    note = (
        f"InceptionFeatures (quantise, resize, FID Inception-v3) on random images, randomly "
        f"initialised weights (speed does not depend on them). First batch = compile + run; "
        f"best and median of {args.batches} timed batches after it. GFLOP/image from XLA's "
        f"cost analysis. 50k time = {FID_SAMPLES:,} / images/s, for the generated set only. "
        f"1-minute load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after "
        f"the run on {os.cpu_count()} cores: above the core count, the rate is a lower bound."
    )
    write_table(
        "fid_throughput",
        ["batch", "input", "first batch s", "best batch s", "median batch s", "images/s",
         "GFLOP/image", "GFLOP/s", "50k FID minutes"],
        rows,
        note=note,
    )  # fmt: skip
    final_json({"inception_images_per_s": rate, **figures, "batch": args.batch})
    return 0


if __name__ == "__main__":
    sys.exit(main())
