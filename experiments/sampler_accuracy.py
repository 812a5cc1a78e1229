"""Accuracy against cost: every sampler on exact Gaussian-mixture scores, NFE 10 ... 2000.

For the 2-D and 16-D `example_mixture`, each sampler is driven by the exact
score at a range of score-evaluation budgets; its samples (4 x 5,000) are
compared with exact samples by the sliced Wasserstein distance, averaged over
the 4 batches (one distance fluctuates by about 25 %), next to the noise floor
(the mean distance from the same exact sets to 8 independent ones). Writes
results/sampler_accuracy.{csv,md,png}; the last output line is a JSON object
whose `nfe_to_floor` maps each sampler to the smallest NFE at which it comes
within 1.5x the floor in both dimensions (null if never).

    python experiments/sampler_accuracy.py [--quick] [--samplers=dpm,edm] [--nfes=10,15,20]

`--samplers` keeps the samplers whose names contain one of the given
substrings and then writes results/sampler_accuracy_subset.* instead.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import numpy as np

from diffusers_unified import samplers
from diffusers_unified.data.gaussian import example_mixture
from diffusers_unified.metrics import sliced_wasserstein
from diffusers_unified.processes import NCSN, VESDE, VPSDE
from diffusers_unified.samplers import fast

from common import RESULTS, final_json, write_table

N, BATCHES = 5_000, 4
NFES = (10, 15, 20, 50, 100, 200, 500, 1000, 2000)
TOLERANCES = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4, 1e-5)

VP, VE = VPSDE(), VESDE()


def fixed(process, fn, per_step, extra=0, **options):
    """A sampler whose NFE is per_step * steps + extra; returns nfe -> (process, fn, options)."""

    def at(nfe):
        steps = (nfe - extra) // per_step
        return None if steps < 2 else (process, fn, {**options, "num_steps": steps})

    return at


def ode(method, order):
    # Fixed-step solvers: order evaluations per step between num_steps points, + denoise.
    def at(nfe):
        steps = (nfe - 1) // order + 1
        options = {"method": method, "num_steps": steps}
        return None if steps < 2 else (VP, samplers.probability_flow, options)

    return at


def edm_stochastic(process, setting, scaling="none"):
    """EDM's Alg. 2 with the Table 5 / README setting `setting` (samplers.fast), N = (nfe + 1) / 2.

    S_tmin and S_tmax are EDM's noise levels for data of std 0.5, scaled by
    std / 0.5 to the mixture's per-coordinate std (1.07 in 2-D, 0.50 in 16-D).
    """
    s_churn, s_tmin, s_tmax, s_noise = fast.EDM_STOCHASTIC_SETTINGS[setting]

    def at(nfe, std):
        steps = (nfe + 1) // 2
        options = {
            "num_steps": steps,
            "S_churn": s_churn,
            "S_tmin": s_tmin * std / 0.5,
            "S_tmax": s_tmax * std / 0.5,
            "S_noise": s_noise,
            "scaling": scaling,
        }
        return None if steps < 2 else (process, fast.edm_stochastic, options)

    at.needs_std = True
    return at


def ald(nfe, sigma_max):
    # NCSN's 10 levels from sigma_max (NCSNv2 technique 1: the largest pairwise
    # distance in the data) to 0.01, T steps each, + the final denoising step.
    steps_each = (nfe - 1) // 10
    if steps_each < 1:
        return None
    return NCSN(sigma_max=sigma_max), samplers.annealed_langevin, {"n_steps_each": steps_each}


SAMPLERS = {
    "ancestral (VP)": fixed(VP, samplers.ancestral, 1),
    "ddim eta=0 (VP)": fixed(VP, samplers.ddim, 1),
    "euler-maruyama (VP)": fixed(
        VP,
        samplers.predictor_corrector,
        1,
        predictor=samplers.EulerMaruyama(),
        corrector=samplers.NoCorrector(),
    ),
    "reverse diffusion + langevin (VE)": fixed(VE, samplers.predictor_corrector, 2),
    # DPM-Solver++(2M), log-SNR grid: num_steps grid points, NFE = num_steps (with denoising).
    "dpm-solver++ 2M (VP)": fixed(VP, samplers.dpm_solver, 1),
    "dpm-solver++ 2M (VE)": fixed(VE, samplers.dpm_solver, 1),
    # EDM Heun, rho = 7: N levels, NFE = 2 N - 1; EDM's ODE (y in sigma), and the
    # same levels with the variance-preserving scaling in log sigma.
    "edm heun (VP)": fixed(VP, samplers.edm_heun, 2, extra=-1),
    "edm heun (VE)": fixed(VE, samplers.edm_heun, 2, extra=-1),
    "edm heun, vp scaling (VP)": fixed(VP, samplers.edm_heun, 2, extra=-1, scaling="vp"),
    "edm heun, vp scaling (VE)": fixed(VE, samplers.edm_heun, 2, extra=-1, scaling="vp"),
    # EDM's stochastic sampler (Alg. 2), N levels, NFE = 2 N - 1, with EDM's settings
    # for ImageNet-64 (its README) and CIFAR-10 (Table 5), scaled to the data's std.
    "edm stochastic, imagenet64 (VP)": edm_stochastic(VP, "imagenet64-edm"),
    "edm stochastic, imagenet64 (VE)": edm_stochastic(VE, "imagenet64-edm"),
    "edm stochastic, cifar10-vp (VP)": edm_stochastic(VP, "cifar10-vp"),
    "edm stochastic, cifar10-ve (VE)": edm_stochastic(VE, "cifar10-ve"),
    "edm stochastic, imagenet64, vp scaling (VP)": edm_stochastic(
        VP, "imagenet64-edm", scaling="vp"
    ),
    "annealed langevin (NCSN, L=10)": ald,
    "ode euler (VP)": ode("euler", 1),
    "ode heun (VP)": ode("heun", 2),
    "ode rk4 (VP)": ode("rk4", 4),
}
ADAPTIVE = {"ode dopri5 (VP)": "dopri5", "ode tsit5 (VP)": "tsit5"}


def evaluate(mixture, process, fn, options, exact, key):
    out = fn(key, mixture.score_fn(process), process, (N * BATCHES, mixture.dim), **options)
    x = np.asarray(out.samples)
    if not np.isfinite(x).all():
        return int(out.nfe), float("inf")
    distances = [
        float(sliced_wasserstein(x[b * N : (b + 1) * N], exact[b], jax.random.PRNGKey(7)))
        for b in range(BATCHES)
    ]
    return int(out.nfe), float(np.mean(distances))


def run_dim(dim: int, nfes, tolerances, keep=lambda name: True):
    mixture = example_mixture(dim)
    exact = [mixture.sample(jax.random.PRNGKey(100 + i), N)[0] for i in range(BATCHES + 8)]
    # The floor is paired with the sets the samplers are compared to: the mean
    # distance from each of them to 8 further exact sets (as in
    # tests/test_samplers_exact.py; an unpaired floor leaves the luck of
    # exact[:BATCHES] in every ratio).
    floor = float(
        np.mean(
            [
                sliced_wasserstein(exact[b], other, jax.random.PRNGKey(7))
                for b in range(BATCHES)
                for other in exact[BATCHES:]
            ]
        )
    )
    sample = np.asarray(exact[0][:2000])
    sigma_max = float(np.max(np.linalg.norm(sample[:, None] - sample[None], axis=-1)))
    std = float(np.sqrt(np.trace(np.asarray(mixture.covariance())) / mixture.dim))
    curves = {}  # name -> [(budget, nfe, distance)]; the budget is the tolerance if adaptive
    key = jax.random.PRNGKey(dim)
    for name, at in SAMPLERS.items():
        if not keep(name):
            continue
        at = functools.partial(at, sigma_max=sigma_max) if at is ald else at
        at = functools.partial(at, std=std) if getattr(at, "needs_std", False) else at
        curves[name] = [
            (budget, *evaluate(mixture, *cfg, exact, key)) for budget in nfes if (cfg := at(budget))
        ]
    for name, method in ADAPTIVE.items():
        if not keep(name):
            continue
        options = lambda tol: {"method": method, "rtol": tol, "atol": tol}  # noqa: B023
        curves[name] = [
            (tol, *evaluate(mixture, VP, samplers.probability_flow, options(tol), exact, key))
            for tol in tolerances
        ]
    for name, curve in curves.items():
        print(f"{dim}-D {name}: " + ", ".join(f"{n}:{d / floor:.2f}" for _, n, d in curve))
    return floor, curves


def nfe_to_floor(curve, floor):
    hits = [nfe for _, nfe, d in curve if d <= 1.5 * floor]
    return min(hits) if hits else None


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 5), squeeze=False)
    for ax, (dim, (floor, curves)) in zip(axes[0], results.items(), strict=True):
        for name, curve in curves.items():
            _, nfe, d = zip(*curve, strict=True)
            ax.loglog(nfe, d, marker="o", label=name)
        ax.axhline(floor, color="k", ls="--", label="noise floor")
        ax.axhline(1.5 * floor, color="k", ls=":", label="1.5x floor")
        ax.set(xlabel="NFE", ylabel="sliced W2 to exact samples", title=f"{dim}-D mixture")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2-D only, three budgets")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--samplers", default="", help="comma-separated name substrings")
    parser.add_argument("--nfes", default="", help="comma-separated NFE budgets")
    args = parser.parse_args()
    dims = (2,) if args.quick else (2, 16)
    nfes = (20, 200, 1000) if args.quick else NFES
    if args.nfes:
        nfes = tuple(int(n) for n in args.nfes.split(","))
    wanted = [w.strip() for w in args.samplers.split(",") if w.strip()]
    keep = lambda name: not wanted or any(w in name for w in wanted)
    table = "sampler_accuracy_subset" if wanted else "sampler_accuracy"
    tols = (1e-2, 1e-5) if args.quick else TOLERANCES

    start = time.time()
    results = {dim: run_dim(dim, nfes, tols, keep) for dim in dims}
    header = ["sampler", "dim", "noise floor"] + [f"NFE~{n}" for n in nfes] + ["NFE to 1.5x floor"]
    rows, headline = [], {}
    for dim, (floor, curves) in results.items():
        for name, curve in curves.items():
            if name in ADAPTIVE:
                cells = [f"{d / floor:.2f} @ {nfe}" for _, nfe, d in curve]
                cells += [""] * (len(nfes) - len(cells))
            else:
                ratios = {budget: d / floor for budget, _, d in curve}
                cells = [round(ratios[n], 2) if n in ratios else None for n in nfes]
            hit = nfe_to_floor(curve, floor)
            rows.append([name, dim, round(floor, 4), *cells, hit])
            previous = headline.get(name, 0)
            headline[name] = None if hit is None or previous is None else max(previous, hit)
    os.makedirs(args.out, exist_ok=True)
    note = (
        "Cells: sliced W2 to exact samples / noise floor (mean of 4 x 5,000 samples), "
        "at the largest step count within the NFE budget. "
        "Adaptive solvers: ratio @ measured NFE for rtol = atol in "
        f"{', '.join(f'{t:g}' for t in tols)}."
    )
    write_table(table, header, rows, args.out, note=note)
    plot(results, os.path.join(args.out, f"{table}.png"))
    print(f"total {time.time() - start:.0f} s")
    final_json({"nfe_to_floor": headline, "dims": list(dims)})


if __name__ == "__main__":
    main()
