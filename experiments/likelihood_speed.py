"""Speed of likelihood evaluation: examples/s and NFE, adaptive against fixed steps, exact
against Hutchinson divergence, for the toy MLP and the digits U-Net.

The MLP is the quickstart's (three hidden layers of 128), trained here as a
VP SDE for `--mlp_steps` updates on the 2-D Gaussian mixture, whose density
is known, so the table also shows each setting's NLL error against the
true density of the same held-out examples. The U-Net is the digits
config's (configs/ddpm/digits.py), with the EMA parameters of a trained
digits work directory if `--unet_workdir` names one, else at its
initialisation (then NFE of the adaptive solver says little about a
trained model; the per-evaluation cost does not depend on the weights);
its likelihood is that of the DDPM's continuous extension, in bits/dim of
the 8-bit digits (uniform dequantisation, offset 7).

Every setting is one jitted `likelihood.ode_log_likelihood` call on a batch
(`--mlp_batch`, `--unet_batch`), timed after a compiling warm-up. Writes
results/likelihood_speed.{csv,md}; the last output line is a JSON object.

    python experiments/likelihood_speed.py [--unet_workdir DIR]
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time

import jax
import numpy as np

from diffusers_unified import likelihood
from diffusers_unified.data.gaussian import example_mixture
from diffusers_unified.experiment import train
from diffusers_unified.experiment.run import build_run, restore
from diffusers_unified.experiment.workdir import Workdir

from common import final_json, write_table

SETTINGS = [
    # (label, method, divergence, num_steps); every one from the default t_min = 1e-5
    ("dopri5 1e-5, exact", "dopri5", "exact", 0),
    ("dopri5 1e-5, hutchinson", "dopri5", "hutchinson", 0),
    ("rk4 x 25, exact", "rk4", "exact", 25),
    ("rk4 x 25, hutchinson", "rk4", "hutchinson", 25),
    ("euler x 100, hutchinson", "euler", "hutchinson", 100),
]
# The start time before issue 10 (the process's sampling t_min, 1e-3 for the VP SDE), for
# the MLP only: the NLL error it adds is the density of x_{1e-3} taken for that of x_0.
OLD_START = ("dopri5 1e-5, exact, from t = 1e-3 (before issue 10)", "dopri5", "exact", 0)


def measure(run, params, x, method, divergence, num_steps, bpd_offset, repeats=2, t_min=1e-5):
    fn = jax.jit(
        functools.partial(
            likelihood.ode_log_likelihood,
            divergence=divergence,
            probe="rademacher",
            method=method,
            num_steps=max(num_steps, 1),
            t_min=t_min,
            bpd_offset=bpd_offset,
        )
    )
    score_fn = run.score_fn(params)
    key = jax.random.PRNGKey(0)
    out = jax.block_until_ready(fn(key, score_fn, run.process, x))  # compiles
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(key, score_fn, run.process, x))
        best = min(best, time.perf_counter() - start)
    return x.shape[0] / best, float(np.mean(out.nfe)), np.asarray(out.log_likelihood), out


def mlp_run(steps: int, workdir: str):
    from configs import formulations
    from configs.quickstart import get_config

    config = formulations.vpsde(get_config())
    config.training.n_iters = steps
    config.training.checkpoint_freq = steps
    config.training.log_freq = steps
    train.train(config, workdir)
    run = build_run(config)
    _, state = restore(run, Workdir(workdir))
    return run, state.ema_params


def unet_run(workdir: str | None):
    from configs.ddpm.digits import get_config

    config = get_config()
    run = build_run(config)
    if workdir:
        _, state = restore(run, Workdir(workdir))
        return run, state.ema_params, "trained"
    return run, run.init_state().ema_params, "at initialisation"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mlp_steps", type=int, default=3_000)
    parser.add_argument("--mlp_batch", type=int, default=1_000)
    parser.add_argument("--unet_batch", type=int, default=32)
    parser.add_argument("--unet_workdir", default=None)
    args = parser.parse_args()

    rows, headline = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        run, params = mlp_run(args.mlp_steps, tmp)
        stored = run.dataset.split("test")[0][: args.mlp_batch]
        x = run.dataset.scaling.to_model(stored)
        exact_nll = -np.asarray(example_mixture(2).log_prob(x))
        for setting in [*SETTINGS, OLD_START]:
            label, method, divergence, steps = setting
            t_min = run.process.t_min if setting is OLD_START else 1e-5
            rate, nfe, logp, _ = measure(
                run, params, x, method, divergence, steps, bpd_offset=0.0, t_min=t_min
            )
            error = float(np.mean(-logp - exact_nll)) / 2  # nats per dimension
            rows.append(["MLP (2-D)", label, x.shape[0], rate, nfe, error])
            headline[f"mlp {label} examples/s"] = rate
            print(rows[-1], flush=True)

    run, params, state = unet_run(args.unet_workdir)
    stored = run.dataset.split("test")[0][: args.unet_batch]
    x = run.dataset.scaling.to_model(stored, key=jax.random.PRNGKey(1))
    offset = run.dataset.scaling.bpd_offset
    # Not the exact divergence with an adaptive solver: 64 Jacobian-vector products
    # per evaluation at a few hundred evaluations is minutes per batch here.
    for label, method, divergence, steps in SETTINGS[1:]:
        rate, nfe, _, out = measure(run, params, x, method, divergence, steps, offset, repeats=1)
        rows.append([f"U-Net digits ({state})", label, x.shape[0], rate, nfe, None])
        headline[f"unet {label} examples/s"] = rate
        headline[f"unet {label} bpd"] = float(np.mean(out.bpd))
        print(rows[-1], f"bpd {float(np.mean(out.bpd)):.3f}", flush=True)

    write_table(
        "likelihood_speed",
        ["network", "setting", "batch", "examples/s", "NFE", "NLL error (nats/dim)"],
        rows,
        note=(
            "NFE: evaluations of the augmented ODE's vector field (each one network "
            "call plus its divergence: exact = one Jacobian-vector product per "
            "dimension, Hutchinson = one vector-Jacobian product per probe). NLL error: "
            "model NLL minus the true density's NLL of the same held-out examples, "
            "which includes the trained model's own error. 'dopri5 1e-5': rtol = atol = "
            "1e-5. Every row integrates from t_min = 1e-5 (the score SDE code's likelihood "
            "eps, the default since issue 10) except the one marked, from the VP SDE's "
            "sampling t_min = 1e-3, the default before it."
        ),
    )
    final_json(headline)


if __name__ == "__main__":
    main()
