"""Image-scale throughput: the CIFAR-10 networks' train step and sampling rate, per dtype.

For each network (DDPM's CIFAR-10 U-Net, configs/cifar10/ddpm.py, 35.7 M
parameters; with `--networks ddpm,ddpmpp` also DDPM++ cont., 61.8 M) and each
activation dtype (float32, bfloat16; `model.dtype`):

- training images/s at batch 128: the train step the launcher runs
  (`experiment.updates.make_train_chunk`: data to model inputs, loss, Adam,
  EMA, gradient norm), best of `--repeats` steps after a warm-up;
- sampling network evaluations/s at batch 256: the score function a
  sampler calls (the EMA network and its parametrization), in batched calls
  per second and in image-evaluations per second (x 256);
- the fraction of the device's peak that the train step reaches: the step's
  FLOPs from XLA's cost analysis of the lowered update, divided by its
  time and by the peak, a large matmul in the same dtype timed in the same
  run (4096 x 4096 on an accelerator, 2048 on a CPU). Timings of the step,
  the forward and the peak are interleaved and each is the best of its
  repetitions, so a busy machine slows all alike.

The script checks its figures: a fraction of peak above 1 (or a non-finite
or non-positive rate) is an error that it prints, exiting non-zero. On a CPU
run it with a few steps (`--repeats 2`): a DDPM step at batch 128 is ~4.5
TFLOP. Writes results/image_throughput[_<tag>].{csv,md}; the last line is a
JSON object with `train_images_per_s`, `sample_nfe_per_s` and
`train_fraction_of_peak` per network and dtype.

    python experiments/image_throughput.py [--networks ddpm] [--dtypes float32,bfloat16]
        [--batch 128] [--sample_batch 256] [--repeats 5] [--tag gpu]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import final_json, load_average, machine, matmul, write_table

CONFIGS = {
    "ddpm": "configs/cifar10/ddpm.py",
    "ddpmpp": "configs/cifar10/ddpmpp_continuous_vp.py",
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(network: str, dtype: str, batch: int):
    """The network's Run (with shape-only data: throughput needs no images) and its chunk."""
    from diffusers_unified.experiment import config as config_lib
    from diffusers_unified.experiment import updates
    from diffusers_unified.experiment.run import build_run

    config = config_lib.load_module(os.path.join(ROOT, CONFIGS[network])).get_config()
    config.data.dataset, config.data.path = "none", ""
    config.model.dtype = dtype
    config.training.batch_size = batch
    config.training.n_jitted_steps = 1
    run = build_run(config)
    return run, updates


def best(fn, repeats: int) -> float:
    """The best of `repeats` timed calls of a warmed-up `fn`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def measure(network: str, dtype: str, args) -> dict:
    from diffusers_unified.training.step import make_train_step

    run, updates = build(network, dtype, args.batch)
    state = jax.device_put(run.init_state(), run.replicated)
    chunk = updates.make_train_chunk(run)
    batches = updates.batcher(run)
    placed = updates.place_batches(run, batches.local([0]))
    scales = np.ones(1, np.float32)
    holder = {"state": state}

    def step():
        holder["state"], metrics = chunk(holder["state"], placed, scales)
        return metrics

    # The update's FLOPs, from XLA's cost analysis of the same update lowered alone (the
    # HLO's count; compiling it a second time would add minutes on a CPU and not change it).
    step_fn = make_train_step(run.loss_fn, run.optimizer, run.config.model.ema_rate)
    x = jax.ShapeDtypeStruct((args.batch, *run.data_shape), jnp.float32)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    flops = jax.jit(step_fn).lower(abstract, {"x": x, "y": None}, jnp.float32(1.0)).cost_analysis()
    flops = flops[0] if isinstance(flops, list | tuple) else flops
    step_flops = float(flops.get("flops", 0.0))

    # A copy: the train step donates (deletes) the state's buffers.
    score_fn = run.score_fn(jax.tree.map(jnp.copy, state.ema_params))
    xs = jax.random.normal(jax.random.PRNGKey(2), (args.sample_batch, *run.data_shape))
    t = jnp.float32(0.5)
    forward = jax.jit(lambda s, x: s(x, t))
    # The peak in the same dtype: 2048^3 on a CPU (a 4096^3 call there takes seconds).
    peak_fn, peak_flops = matmul(2048 if jax.default_backend() == "cpu" else 4096, dtype)

    # Interleaved: each round times the step, the forward and the peak once more.
    step_s = fwd_s = peak_s = float("inf")
    jax.block_until_ready(step())
    jax.block_until_ready(forward(score_fn, xs))
    jax.block_until_ready(peak_fn())
    for _ in range(args.repeats):
        step_s = min(step_s, best(step, 1))
        fwd_s = min(fwd_s, best(lambda: forward(score_fn, xs), 1))
        peak_s = min(peak_s, best(peak_fn, 3))
    peak = peak_flops / peak_s
    out = {
        "network": network,
        "dtype": dtype,
        "train_images_per_s": args.batch / step_s,
        "train_step_s": step_s,
        "train_step_tflop": step_flops / 1e12,
        "train_fraction_of_peak": step_flops / step_s / peak,
        "peak_tflops": peak / 1e12,
        "sample_nfe_per_s": 1.0 / fwd_s,
        "sample_image_nfe_per_s": args.sample_batch / fwd_s,
    }
    errors = [k for k, v in out.items() if isinstance(v, float) and not (np.isfinite(v) and v > 0)]
    if step_flops <= 0:
        errors.append("train_step_tflop (XLA gave no FLOP count)")
    if out["train_fraction_of_peak"] > 1.0:
        errors.append(f"train_fraction_of_peak={out['train_fraction_of_peak']:.3f} > 1")
    if errors:
        print(f"error: inconsistent figures for {network}/{dtype}: {', '.join(errors)}: {out}")
        sys.exit(1)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--networks", default="ddpm")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--sample_batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tag", default="", help="suffix of the results files (e.g. gpu)")
    args = parser.parse_args()
    results = []
    for network in args.networks.split(","):
        for dtype in args.dtypes.split(","):
            results.append(measure(network, dtype, args))
            print(results[-1], flush=True)  # a CPU run takes many minutes per setting
    columns = list(results[0])
    rows = [[r[c] for c in columns] for r in results]
    load = load_average()
    note = (
        f"Batch {args.batch} for training, {args.sample_batch} for sampling, best of "
        f"{args.repeats} interleaved repetitions; {machine()}; load average {load:.1f} at "
        "the end of the run."
    )
    name = "image_throughput" + (f"_{args.tag}" if args.tag else "")
    write_table(name, columns, rows, note=note)
    final_json(
        {
            f"{r['network']}_{r['dtype']}": {
                k: r[k]
                for k in ("train_images_per_s", "sample_nfe_per_s", "train_fraction_of_peak")
            }
            for r in results
        }
    )


if __name__ == "__main__":
    main()
