"""Conditional generation with exact scores: classifier-free guidance, inpainting, colorization.

No network is involved. Guidance: a labelled 2-D Gaussian mixture (class k
= component k, three overlapping components), its exact class-conditional
and marginal scores combined as (1 + w) s(x | k) - w s(x) (Ho and Salimans
2021), sampled under the VP SDE by Euler-Maruyama and the probability-flow
ODE; per-class accuracy = fraction of class-k samples whose most probable
component is k. Inpainting: a 2-D Gaussian with correlation 0.8, x_1 = 1
known, every sampler family with the score SDE paper's projection (app. I);
the filled-in x_0 against its analytic conditional N(1.671, 0.360).
Colorization: a 1 x 2 RGB Gaussian "image" given its gray levels, in the
paper's decoupled coordinates. Writes a figure and a table.

    python experiments/conditional_demo.py [--out DIR] [--n 20000]
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusers_unified import samplers
from diffusers_unified.data.gaussian import GaussianMixture
from diffusers_unified.parametrization import guided_score_fn
from diffusers_unified.processes import VESDE, VPSDE
from diffusers_unified.samplers.conditioning import colorization, decoupling_matrix, inpainting

from common import RESULTS, final_json, write_table

# -- guidance -----------------------------------------------------------------------------
ANGLES = np.deg2rad([90.0, 210.0, 330.0])
MEANS = np.stack([np.cos(ANGLES), np.sin(ANGLES)], 1)
WEIGHTS, STD = np.array([0.5, 0.3, 0.2]), 0.6
LABELLED = GaussianMixture.create(WEIGHTS, MEANS, stds=[STD] * 3)
GUIDANCE = (0.0, 0.5, 1.0, 2.0, 4.0)
CFG_SAMPLERS = {
    "Euler-Maruyama (500)": (
        samplers.predictor_corrector,
        {
            "predictor": samplers.EulerMaruyama(),
            "corrector": samplers.NoCorrector(),
            "num_steps": 500,
        },
    ),
    "PF-ODE RK4 (50)": (samplers.probability_flow, {"method": "rk4", "num_steps": 50}),
}

# -- inpainting ---------------------------------------------------------------------------
MEAN, COV, Y = np.array([0.3, -0.2]), np.array([[1.0, 0.56], [0.56, 0.49]]), 1.0
KNOWN = np.array([False, True])
COND_MEAN = MEAN[0] + COV[0, 1] / COV[1, 1] * (Y - MEAN[1])
COND_VAR = COV[0, 0] - COV[0, 1] ** 2 / COV[1, 1]
LANGEVIN = samplers.Langevin(0.16, 1)
NO = samplers.NoCorrector()
PF_EULER = samplers.EulerMaruyama(probability_flow=True)
PC = samplers.predictor_corrector
INPAINT_SAMPLERS = {
    # name: (process, sampler, options)
    "VE: reverse diffusion + Langevin (1000)": (VESDE(), PC, {"num_steps": 1000}),
    "VE: ODE Euler predictor + Langevin (1000)": (
        VESDE(),
        PC,
        {"predictor": PF_EULER, "num_steps": 1000},
    ),
    "VP: reverse diffusion + Langevin (1000)": (VPSDE(), PC, {"num_steps": 1000}),
    "VE: reverse diffusion, no corrector (1000)": (
        VESDE(),
        PC,
        {"corrector": NO, "num_steps": 1000},
    ),
    "VP: ancestral (1000)": (VPSDE(), samplers.ancestral, {"num_steps": 1000}),
    "VP: DDIM eta 0 (100)": (VPSDE(), samplers.ddim, {}),
    "VP: PF-ODE Euler (200)": (
        VPSDE(),
        samplers.probability_flow,
        {"method": "euler", "num_steps": 200},
    ),
}


def classify(x):
    sq = np.sum((np.asarray(x, np.float64)[:, None, :] - MEANS) ** 2, axis=-1)
    return np.argmax(np.log(WEIGHTS) - sq / (2 * STD**2), axis=-1)


def accuracy(x, labels):
    got = classify(x)
    return [float(np.mean(got[labels == k] == k)) for k in range(len(WEIGHTS))]


def guidance_study(n):
    process = VPSDE()
    labels = np.arange(n) % len(WEIGHTS)
    conditional = LABELLED.score_fn(process, y=jnp.asarray(labels))
    unconditional = LABELLED.score_fn(process)
    rng = np.random.default_rng(0)
    exact_labels = rng.choice(len(WEIGHTS), size=400_000, p=WEIGHTS)
    exact_x = MEANS[exact_labels] + STD * rng.normal(size=(400_000, 2))
    rows = [["exact conditional samples", "-", "-", *accuracy(exact_x, exact_labels)]]
    panels, headline = [], {}
    for name, (fn, options) in CFG_SAMPLERS.items():
        for w in GUIDANCE:
            score = guided_score_fn(conditional, unconditional, w)
            out = fn(jax.random.PRNGKey(1), score, process, (n, 2), **options)
            x = np.asarray(out.samples)
            acc = accuracy(x, labels)
            rows.append([name, w, int(out.nfe), *acc])
            headline[f"cfg_min_accuracy[{name.split(' ')[0]}, w={w:g}]"] = min(acc)
            if name.startswith("Euler") and w in (0.0, 1.0, 4.0):
                panels.append((f"guided, w = {w:g} ({name})", x, labels))
            print(f"{name:22s} w={w:<4g} per-class accuracy {np.round(acc, 3)}")
    return rows, panels, headline


def inpainting_study(n):
    rows, samples, headline = [], {}, {}
    for name, (process, fn, options) in INPAINT_SAMPLERS.items():
        score = GaussianMixture.gaussian(MEAN, COV).score_fn(process)
        project = inpainting(process, [0.0, Y], KNOWN)
        start = time.perf_counter()
        out = fn(jax.random.PRNGKey(1), score, process, (n, 2), project=project, **options)
        x = np.asarray(jax.block_until_ready(out.samples))
        seconds = time.perf_counter() - start
        assert np.all(x[:, 1] == Y)
        mean, var = float(x[:, 0].mean()), float(x[:, 0].var())
        z = (mean - COND_MEAN) / np.sqrt(COND_VAR / n)
        rows.append(
            [name, int(out.nfe), mean, mean - COND_MEAN, round(z, 1), var / COND_VAR, seconds]
        )
        samples[name] = x[:, 0]
        headline[f"inpaint_mean_error[{name}]"] = round(mean - COND_MEAN, 4)
        headline[f"inpaint_var_ratio[{name}]"] = round(var / COND_VAR, 4)
        print(f"{name:44s} mean {mean:.4f} ({z:+.1f} SE)  var/exact {var / COND_VAR:.3f}")
    return rows, samples, headline


def colorization_study(n):
    rng = np.random.default_rng(3)
    a = rng.normal(size=(6, 6))
    cov = a @ a.T / 6 + 0.2 * np.eye(6)
    mean = rng.normal(size=6) * 0.3
    gray = np.array([[0.5, -0.3]])
    process = VESDE()
    out = samplers.predictor_corrector(
        jax.random.PRNGKey(2),
        GaussianMixture.gaussian(mean, cov).score_fn(process),
        process,
        (n, 1, 2, 3),
        num_steps=1000,
        project=colorization(process, gray),
    )
    x = np.asarray(out.samples, np.float64)
    q = np.kron(np.eye(2), decoupling_matrix(3))
    u, cov_u, mean_u = x.reshape(n, 6) @ q, q.T @ cov @ q, q.T @ mean
    k, o = [0, 3], [1, 2, 4, 5]
    gain = cov_u[np.ix_(o, k)] @ np.linalg.inv(cov_u[np.ix_(k, k)])
    cond_mean = mean_u[o] + gain @ (np.sqrt(3) * gray.ravel() - mean_u[k])
    cond_cov = cov_u[np.ix_(o, o)] - gain @ cov_u[np.ix_(k, o)]
    sd = np.sqrt(np.diag(cond_cov))
    mean_err = np.max(np.abs(u[:, o].mean(0) - cond_mean) / sd)
    cov_err = np.max(np.abs(np.cov(u[:, o].T) - cond_cov) / np.outer(sd, sd))
    gray_err = float(np.max(np.abs(x.mean(-1) - gray)))
    print(f"colorization: max |mean error| / sd {mean_err:.4f}, max |cov error| / (sd sd) "
          f"{cov_err:.4f}, max gray error {gray_err:.1e}")  # fmt: skip
    return {
        "colorize_max_mean_error_over_sd": round(float(mean_err), 4),
        "colorize_max_cov_error_over_sdsd": round(float(cov_err), 4),
        "colorize_max_gray_error": gray_err,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(RESULTS, "conditional_demo"))
    parser.add_argument("--n", type=int, default=20_000, help="samples per inpainting run")
    parser.add_argument("--n_cfg", type=int, default=6_000, help="samples per guidance run")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    cfg_rows, panels, headline = guidance_study(args.n_cfg)
    inpaint_rows, filled, inpaint_headline = inpainting_study(args.n)
    headline.update(inpaint_headline)
    headline.update(colorization_study(args.n // 4))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3.3 * (len(panels) + 1), 3.4))
    for ax, (title, x, labels) in zip(axes[:-1], panels, strict=True):
        for k in range(len(WEIGHTS)):
            ax.scatter(*x[labels == k][:1500].T, s=1, alpha=0.5, label=f"class {k}")
        ax.set(title=title, xlim=(-2.5, 2.5), ylim=(-2.5, 2.5), aspect="equal")
        ax.title.set_fontsize(8)
    ax = axes[-1]
    grid = np.linspace(-1.5, 4.0, 300)
    density = np.exp(-((grid - COND_MEAN) ** 2) / (2 * COND_VAR)) / np.sqrt(2 * np.pi * COND_VAR)
    ax.plot(grid, density, "k", lw=2, label="exact p(x0 | x1 = 1)")
    for name in ("VE: reverse diffusion + Langevin (1000)", "VP: PF-ODE Euler (200)"):
        ax.hist(filled[name], bins=80, density=True, histtype="step", label=name)
    ax.set_title("inpainting x0 given x1 = 1", fontsize=8)
    ax.legend(fontsize=6)
    fig.tight_layout()
    figure = os.path.join(args.out, "conditional_demo.png")
    fig.savefig(figure, dpi=110)

    write_table(
        "conditional_guidance",
        ["sampler", "w", "NFE", "accuracy class 0", "class 1", "class 2"],
        cfg_rows,
        args.out,
        note=f"VP SDE, exact scores, {args.n_cfg} samples per row (classes in turn). "
        "Guided score (1 + w) s(x | k) - w s(x); w = 0 is the plain conditional. "
        "Figure: conditional_demo.png.",
    )
    write_table(
        "conditional_inpainting",
        ["sampler", "NFE", "mean", "mean error", "error / SE", "var / exact", "seconds"],
        inpaint_rows,
        args.out,
        note=f"Exact conditional: mean {COND_MEAN:.4f}, variance {COND_VAR:.4f}; "
        f"{args.n} samples per row; seconds include compilation. Colorization "
        f"({args.n // 4} samples, VE PC 1000): "
        + ", ".join(f"{k} {v:.3g}" for k, v in headline.items() if k.startswith("colorize")),
    )
    headline["figure"] = figure
    final_json(headline)


if __name__ == "__main__":
    main()
