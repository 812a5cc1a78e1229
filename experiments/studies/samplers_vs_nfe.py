"""One trained VP SDE network under every sampler: accuracy against the number of evaluations.

The quickstart's MLP trains once as a VP SDE (10,000 updates on the 2-D
Gaussian mixture); each sampler then draws 2,000 samples at several step
counts, scored by the sliced Wasserstein distance to held-out data over the
held-out data's own noise floor (1 = indistinguishable from data at this
sample size). Samplers: Euler-Maruyama and reverse diffusion
(predictor-only PC), DDIM (eta = 0), the probability-flow ODE with Euler,
Heun and RK4 at fixed steps and Dopri5 at several tolerances, and the fast
samplers DPM-Solver++(2M) and EDM's Heun on Karras sigmas (EDM's ODE, and the
variance-preserving scaling of `samplers.edm_heun`). NFE counts every
network evaluation, the final denoising step included. The same comparison
with the exact score, free of training error, is experiments/sampler_accuracy.py.

Every row samples 2,000 points with the same key: from key to key one
ratio moves by about 25 % (1.0 is as close as held-out data; measured on the
quickstart's networks, 0.6-1.1 over three keys for one sampler), so only
differences well above that say something about the samplers.

    diffusers-unified-ablate --study=experiments/studies/samplers_vs_nfe.py \\
        --workdir=studies/samplers_vs_nfe

Results: experiments/results/samplers_vs_nfe/ (plot.png: SW / floor against NFE).
"""

from configs import formulations
from configs.quickstart import get_config as quickstart_config
from diffusers_unified.experiment.study import Study

SDE_STEPS = (10, 20, 50, 100, 200, 500, 1000)
ODE_STEPS = (5, 10, 20, 50, 100)
FAST_STEPS = (5, 10, 15, 20, 50)
TOLERANCES = (1e-2, 1e-3, 1e-4, 1e-5)


def get_config():
    config = formulations.vpsde(quickstart_config())
    config.training.n_iters = 10_000
    config.training.checkpoint_freq = 10_000
    return config


def samplers() -> dict[str, dict]:
    out = {}
    for predictor, label in (("euler_maruyama", "EM"), ("reverse_diffusion", "RD")):
        for n in SDE_STEPS:
            out[f"{label}/{n}"] = {
                "sampling.method": "pc",
                "sampling.predictor": predictor,
                "sampling.corrector": "none",
                "sampling.num_steps": n,
            }
    for n in SDE_STEPS[:5]:
        out[f"DDIM/{n}"] = {"sampling.method": "ddim", "sampling.num_steps": n}
    for method in ("euler", "heun", "rk4"):
        for n in ODE_STEPS:
            out[f"ODE-{method}/{n}"] = {
                "sampling.method": "ode",
                "sampling.ode_method": method,
                "sampling.num_steps": n,
            }
    for tol in TOLERANCES:
        out[f"ODE-dopri5/{tol:g}"] = {
            "sampling.method": "ode",
            "sampling.ode_method": "dopri5",
            "sampling.rtol": tol,
            "sampling.atol": tol,
        }
    fast = {
        "DPM-Solver++(2M)": {"sampling.method": "dpm_solver"},
        "EDM-Heun": {"sampling.method": "edm_heun"},
        "EDM-Heun, VP scaling": {"sampling.method": "edm_heun", "sampling.edm_scaling": "vp"},
    }
    for label, options in fast.items():
        for n in FAST_STEPS:
            out[f"{label}/{n}"] = {**options, "sampling.num_steps": n}
    return out


def get_study():
    return Study(
        name="samplers_vs_nfe",
        description=__doc__,
        base=get_config,
        variants=[("VP SDE", {})],
        samplers=samplers(),
        plot=("nfe", "sw_over_floor"),
    )
