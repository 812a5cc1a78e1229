"""What a sampler's loop costs beyond its network evaluations, and how close it runs to peak.

Two measurements, each made of figures timed in the same process,
interleaved (one call of each per round) and taken as the best of many
rounds (`common.interleaved_best`), so that every ratio compares figures
that saw the same machine:

1. Compute-bound: the benchmark MLP (input 2 + a 128-dim sinusoidal time
   embedding, three hidden layers of 256, SiLU, output 2) at batch 4096, for
   every sampler:

       overhead = wall time of one jitted sampling run / (NFE x time of one forward)

   where the forward is the network as samplers call it (one noise level
   shared by the batch), timed per forward inside a jitted loop of
   FORWARD_LOOP forwards. (A forward called alone, once per jitted call,
   is slower, and the table shows it too: each call allocates its
   intermediate buffers, 4 MB each, afresh and faults their pages in, which a
   loop does once; measured 6.2 ms alone against 5.6 ms in a loop. Against
   it every sampler came out at overhead 0.89-0.92, "faster than its
   network".) The fraction of this machine's float32 matmul
   peak (a 4096 x 4096 product) that the sampler reaches: network FLOPs x
   NFE / wall time / peak. The network's FLOPs are those it must do: per
   example 2 x (2 x 256 + 2 x 256^2 + 256 x 2) for the input, hidden and
   output layers, plus, once per call, the embedding's 2 x 128 x 256 (a
   shared noise level is embedded once, not per example). The note under
   the table also times, in the same rounds, the forward's two 256 x 256
   products alone and with their bias and SiLU (chained as in the forward
   loop): how much of the forward is the products and how much the rest.

2. Overhead-bound: a small MLP (2 + 32 -> 64 -> 64 -> 2) at batch 512, where
   a step is ~0.1 ms and the sampler's own per-step work shows: DDPM
   ancestral sampling over DDPM's 1000 levels against its floor, a bare
   `lax.scan` of 1000 network evaluations with x <- a x + b eps + c z and
   all the noise drawn in one call (in the same jitted function), and DDIM
   over 50 levels against a bare scan of 50 network evaluations.

Checks (the script prints them and exits 1 if one fails: such a figure means
the measurement, not the sampler, is broken): no fraction of peak above 1,
no overhead ratio below 0.95. The acceptance figures of issue 13 (overhead
within [0.95, 1.05] and at least 0.85 of peak for the fixed-step samplers;
the small-MLP samplers within 5% of their floors) are reported, not checked.
Writes results/sampler_overhead.{csv,md} and results/sampler_floor.{csv,md}
with the load average; the last line is a JSON object. Run it on an idle
machine.

    python experiments/sampler_overhead.py [--steps 100] [--rounds 10]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from diffusers_unified import samplers
from diffusers_unified.nets import MLP, NetApply
from diffusers_unified.parametrization import make_score_fn
from diffusers_unified.processes import DDPM, VESDE, VPSDE

from common import Checks, final_json, interleaved_best, load_average, matmul, write_table

BATCH, DIM = 4096, 2
NETWORK_FLOPS = 2 * BATCH * (2 * 256 + 2 * 256 * 256 + 256 * 2) + 2 * 128 * 256
HIDDEN_PRODUCT_FLOPS = 2 * BATCH * 2 * 256 * 256
PEAK_N = 4096
FORWARD_LOOP = 20
SMALL_BATCH = 512
FIXED_STEP = (
    "ancestral",
    "ddim",
    "pc euler-maruyama",
    "pc reverse diffusion + langevin",
    "annealed langevin",
    "ode euler",
    "ode heun",
    "ode rk4",
)


def compute_bound(steps: int, rounds: int, checks: Checks):
    net = NetApply(MLP())
    params = net.init(jax.random.PRNGKey(0), (1, DIM))
    vp, ve = VPSDE(), VESDE(sigma_max=5.0)
    key = jax.random.PRNGKey(1)
    x = jax.random.normal(key, (BATCH, DIM))
    peak_call, peak_flops = matmul(PEAK_N)
    forward = jax.jit(lambda p, x, c: net(p, x, c))

    @jax.jit
    def forward_loop(params, x, c):
        step = lambda i, x: x + 1e-3 * net(params, x, c)  # chained: no forward is hoisted
        return jax.lax.fori_loop(0, FORWARD_LOOP, step, x)

    # Where the forward's time goes: its two 256 x 256 products alone, and with their bias
    # and activation, on a (BATCH, 256) activation, chained as the forward loop is.
    hidden = {k: params[k] for k in ("hidden_1", "hidden_2")}
    h0 = jax.random.normal(key, (BATCH, 256))

    def hidden_loop(with_activation: bool):
        def layers(p, h):
            for layer in p.values():
                h = h @ layer["kernel"]
                if with_activation:
                    h = jax.nn.silu(h + layer["bias"])
            return h

        run = jax.jit(
            lambda p, h: jax.lax.fori_loop(0, FORWARD_LOOP, lambda i, h: h + 1e-3 * layers(p, h), h)
        )
        return lambda: run(hidden, h0)

    n = steps
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
    fns = {
        "peak": peak_call,
        "forward alone": lambda: forward(params, x, jnp.float32(500.0)),
        "forward": lambda: forward_loop(params, x, jnp.float32(500.0)),
        "hidden products": hidden_loop(False),
        "hidden layers": hidden_loop(True),
    }
    nfes = {}
    for name, (process, sampler, options) in cases.items():
        score_fn = make_score_fn(process, net, params, "eps")
        run = lambda s=score_fn, p=process, f=sampler, o=options: f(key, s, p, (BATCH, DIM), **o)
        nfes[name] = int(run().nfe)
        fns[name] = run
    # The peak and the lone forward are short: several calls per round.
    for name in ("peak", "forward alone"):
        fns[name] = _repeated(fns[name], 5)
    best = interleaved_best(fns, rounds)
    peak = peak_flops / (best["peak"] / 5)
    t_forward = best["forward"] / FORWARD_LOOP
    t_alone = best["forward alone"] / 5
    forward_fraction = NETWORK_FLOPS / t_forward / peak
    checks.check(
        forward_fraction <= 1.0,
        f"the standalone forward reaches {forward_fraction:.3f} of the matmul peak (> 1)",
    )
    products_fraction = HIDDEN_PRODUCT_FLOPS / (best["hidden products"] / FORWARD_LOOP) / peak
    checks.check(
        products_fraction <= 1.0,
        f"the hidden products alone reach {products_fraction:.3f} of the matmul peak (> 1)",
    )
    rows, figures = [], {}
    for name, nfe in nfes.items():
        seconds = best[name]
        overhead = seconds / (nfe * t_forward)
        fraction = NETWORK_FLOPS * nfe / seconds / peak
        figures[name] = {
            "nfe": nfe,
            "seconds": seconds,
            "overhead": overhead,
            "fraction_of_peak": fraction,
        }
        rows.append([name, nfe, round(seconds, 4), round(overhead, 3), round(fraction, 3)])
        checks.check(fraction <= 1.0, f"{name}: {fraction:.3f} of the matmul peak (> 1)")
        checks.check(
            overhead >= 0.95, f"{name}: overhead {overhead:.3f} < 0.95 (faster than its NFE)"
        )
        print(
            f"{name}: NFE {nfe}, {seconds:.3f} s, overhead {overhead:.3f}, {fraction:.2f} of peak",
            flush=True,
        )
    base = {
        "peak": peak,
        "t_forward": t_forward,
        "t_alone": t_alone,
        "fraction": forward_fraction,
        "t_products": best["hidden products"] / FORWARD_LOOP,
        "products_fraction": products_fraction,
        "t_layers": best["hidden layers"] / FORWARD_LOOP,
    }
    return rows, figures, base


def _repeated(fn, k):
    def run():
        for _ in range(k - 1):
            jax.block_until_ready(fn())
        return fn()

    return run


def overhead_bound(rounds: int, checks: Checks):
    """The small MLP's DDPM-1000 and DDIM-50 against bare scans of its network."""
    net = NetApply(MLP(hidden=(64, 64), emb_dim=32))
    params = net.init(jax.random.PRNGKey(0), (1, DIM))
    process = DDPM()
    score_fn = make_score_fn(process, net, params, "eps")
    shape = (SMALL_BATCH, DIM)
    key = jax.random.PRNGKey(1)
    x = jax.random.normal(key, shape)

    def bare(num, with_noise):
        # x <- a x + b eps(x, c) (+ s z): the least an eps-network sampler can do per step.
        coefs = jnp.linspace(1.0, 0.99, num)
        conds = jnp.linspace(999.0, 0.0, num)

        @jax.jit
        def run(params, x, key):
            noise = jax.random.normal(key, (num, *shape)) if with_noise else None

            def body(x, inputs):
                c, a, z = inputs
                x = a * x - 0.01 * net(params, x, c)
                return (x if z is None else x + 0.01 * z), None

            return jax.lax.scan(body, x, (conds, coefs, noise))[0]

        return lambda: run(params, x, key)

    fns = {
        "ddpm-1000 floor": bare(1000, True),
        "ddpm-1000": lambda: samplers.ancestral(key, score_fn, process, shape),
        "ddim-50 floor": bare(50, False),
        "ddim-50": lambda: samplers.ddim(key, score_fn, process, shape, num_steps=50),
    }
    best = interleaved_best(fns, 3 * rounds)
    rows, figures = [], {}
    for name in ("ddpm-1000", "ddim-50"):
        ratio = best[name] / best[f"{name} floor"]
        figures[name] = {
            "seconds": best[name],
            "floor_seconds": best[f"{name} floor"],
            "ratio_to_floor": ratio,
        }
        floor_ms = best[f"{name} floor"] * 1e3
        rows.append([name, round(best[name] * 1e3, 2), round(floor_ms, 2), round(ratio, 3)])
        checks.check(ratio >= 0.95, f"small MLP {name}: {ratio:.3f} of its floor (< 0.95)")
        print(f"small MLP {name}: {best[name] * 1e3:.2f} ms, {ratio:.3f} x its floor", flush=True)
    return rows, figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="grid points per sampler")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    args = parser.parse_args()
    checks = Checks()
    load_before = load_average()
    rows, figures, base = compute_bound(args.steps, args.rounds, checks)
    small_rows, small = overhead_bound(args.rounds, checks)
    load = max(load_before, load_average())
    peak, t_forward = base["peak"], base["t_forward"]
    fixed = [figures[name] for name in FIXED_STEP]
    note = (
        f"Batch {BATCH}; forward {t_forward * 1e3:.2f} ms in a loop of {FORWARD_LOOP} "
        f"({base['fraction']:.3f} of peak; called alone, {base['t_alone'] * 1e3:.2f} ms); "
        f"float32 matmul peak {peak / 1e9:.1f} GFLOP/s ({PEAK_N}^3). Peak, forward and "
        f"samplers interleaved in one process, best of {args.rounds} rounds; load average "
        f"{load:.2f} (1 min, highest seen at the start and the end). Where the forward's "
        f"time goes: its two 256 x 256 products alone take {base['t_products'] * 1e3:.2f} ms "
        f"({base['products_fraction']:.3f} of peak), {base['t_layers'] * 1e3:.2f} ms with "
        "their bias and SiLU; the rest is the third SiLU, the 2 -> 256 and 256 -> 2 layers "
        "and the embedding."
    )
    write_table(
        "sampler_overhead",
        ["sampler", "NFE", "seconds", "overhead ratio", "fraction of peak"],
        rows,
        note=checks.stamp(note),
    )
    write_table(
        "sampler_floor",
        ["small MLP, batch 512", "sampler ms", "floor ms", "ratio"],
        small_rows,
        note=checks.stamp(
            "Floor: a bare jitted `lax.scan` of the same network evaluations, x <- a x + b eps "
            "(+ c z, all the noise drawn in one call inside the same function). Interleaved, "
            f"best of {3 * args.rounds} rounds; load average {load:.2f}."
        ),
    )
    final_json(
        {
            "samplers": figures,
            "small_mlp": small,
            "forward_ms": t_forward * 1e3,
            "forward_alone_ms": base["t_alone"] * 1e3,
            "forward_fraction_of_peak": base["fraction"],
            "hidden_products_ms": base["t_products"] * 1e3,
            "hidden_products_fraction_of_peak": base["products_fraction"],
            "hidden_layers_ms": base["t_layers"] * 1e3,
            "matmul_peak_gflops": peak / 1e9,
            "max_fixed_step_overhead": max(f["overhead"] for f in fixed),
            "min_fixed_step_overhead": min(f["overhead"] for f in fixed),
            "min_fixed_step_fraction_of_peak": min(f["fraction_of_peak"] for f in fixed),
            "load_average": load,
            "consistent": not checks.failures,
        }
    )
    checks.finish()


if __name__ == "__main__":
    main()
