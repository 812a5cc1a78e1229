"""What a sampler's loop costs beyond its network evaluations, and how close it runs to peak.

With the benchmark MLP (input 2 + a 128-dim sinusoidal time embedding, three
hidden layers of 256, SiLU, output 2) at batch 4096, for every sampler:

    overhead = wall time of one jitted sampling run / (NFE x time of one jitted forward)

where the forward is the network as samplers call it (one noise level shared
by the batch), and the fraction of this machine's float32 matmul peak (a
4096 x 4096 product, measured in the same run) that the sampler reaches:
network FLOPs x NFE / wall time / peak. The network's FLOPs are those it
must do: per example 2 x (2 x 256 + 2 x 256^2 + 256 x 2) for the input,
hidden and output layers, plus, once per call, the embedding's 2 x 128 x 256
(a shared noise level is embedded once, not per example). Writes
results/sampler_overhead.{csv,md}; the last line is a JSON object with the
per-sampler figures, max_overhead_ratio and min_fraction_of_peak. Run it on
an otherwise idle machine: the ratios compare timings taken minutes apart.

    python experiments/sampler_overhead.py [--steps 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from diffusers_unified import samplers
from diffusers_unified.nets import MLP, NetApply
from diffusers_unified.parametrization import make_score_fn
from diffusers_unified.processes import VESDE, VPSDE

from common import final_json, timed, write_table

BATCH, DIM = 4096, 2
NETWORK_FLOPS = 2 * BATCH * (2 * 256 + 2 * 256 * 256 + 256 * 2) + 2 * 128 * 256


def matmul_peak(repeats: int) -> float:
    a = jax.random.normal(jax.random.PRNGKey(0), (4096, 4096))
    b = jax.random.normal(jax.random.PRNGKey(1), (4096, 4096))
    f = jax.jit(jnp.matmul)
    return 2 * 4096**3 / timed(f, a, b, repeats=repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="grid points per sampler")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n = args.steps

    net = NetApply(MLP())
    params = net.init(jax.random.PRNGKey(0), (1, DIM))
    vp, ve = VPSDE(), VESDE(sigma_max=5.0)
    key = jax.random.PRNGKey(1)
    x = jax.random.normal(key, (BATCH, DIM))

    peak = matmul_peak(args.repeats)
    forward = jax.jit(lambda p, x, c: net(p, x, c))
    t_forward = timed(forward, params, x, jnp.float32(500.0), repeats=10 * args.repeats)

    cases = {
        "ancestral": (vp, samplers.ancestral, {"num_steps": n}),
        "ddim": (vp, samplers.ddim, {"num_steps": n}),
        "pc euler-maruyama": (
            vp,
            samplers.predictor_corrector,
            {
                "num_steps": n,
                "predictor": samplers.EulerMaruyama(),
                "corrector": samplers.NoCorrector(),
            },
        ),
        "pc reverse diffusion + langevin": (ve, samplers.predictor_corrector, {"num_steps": n}),
        "annealed langevin": (
            ve,
            samplers.annealed_langevin,
            {"num_steps": 10, "n_steps_each": n // 10},
        ),
        "ode euler": (vp, samplers.probability_flow, {"method": "euler", "num_steps": n}),
        "ode heun": (vp, samplers.probability_flow, {"method": "heun", "num_steps": n // 2}),
        "ode rk4": (vp, samplers.probability_flow, {"method": "rk4", "num_steps": n // 4}),
        "ode dopri5": (
            vp,
            samplers.probability_flow,
            {"method": "dopri5", "rtol": 1e-3, "atol": 1e-3},
        ),
    }
    rows, figures = [], {}
    for name, (process, sampler, options) in cases.items():
        score_fn = make_score_fn(process, net, params, "eps")
        run = lambda k, s=score_fn, p=process, f=sampler, o=options: f(k, s, p, (BATCH, DIM), **o)
        nfe = int(run(key).nfe)
        start = time.perf_counter()
        seconds = timed(run, key, repeats=args.repeats)
        overhead = seconds / (nfe * t_forward)
        fraction = NETWORK_FLOPS * nfe / seconds / peak
        figures[name] = {
            "nfe": nfe,
            "seconds": seconds,
            "overhead": overhead,
            "fraction_of_peak": fraction,
        }
        rows.append([name, nfe, round(seconds, 4), round(overhead, 3), round(fraction, 3)])
        print(
            f"{name}: NFE {nfe}, {seconds:.3f} s, overhead {overhead:.3f}, "
            f"{fraction:.2f} of peak ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )

    note = (
        f"Batch {BATCH}; forward {t_forward * 1e3:.2f} ms "
        f"({NETWORK_FLOPS / t_forward / peak:.2f} of peak); float32 matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s (4096^3, same run)."
    )
    write_table(
        "sampler_overhead",
        ["sampler", "NFE", "seconds", "overhead ratio", "fraction of peak"],
        rows,
        note=note,
    )
    final_json(
        {
            "samplers": figures,
            "forward_ms": t_forward * 1e3,
            "forward_fraction_of_peak": NETWORK_FLOPS / t_forward / peak,
            "matmul_peak_gflops": peak / 1e9,
            "max_overhead_ratio": max(f["overhead"] for f in figures.values()),
            "min_fraction_of_peak": min(f["fraction_of_peak"] for f in figures.values()),
        }
    )


if __name__ == "__main__":
    main()
