"""Quickstart: DDPM, NCSN, VP, sub-VP and VE on one 2-D data set, each sampled twice.

Every formulation trains the same small MLP on the same data for the same
number of updates, then samples with its paper's sampler ("native") and
with the probability-flow ODE (adaptive Dopri5); each sample set is compared
with held-out data by the sliced Wasserstein distance, next to the
distance between two halves of the held-out data (the noise floor).

Three choices differ from the papers' image settings, for 2-D data.
NCSN uses 100 noise levels with 10 Langevin steps each (NCSNv2's recipe of
many levels; with the NCSN paper's 10 levels the network never sees the
noise levels between them, and the ODE lands at 3.4x the floor), and
NCSNv2's EMA of rate 0.999 (its technique 5; with the others' 0.99,
annealed Langevin lands at 1.5-2.1x the floor over three sampling keys at any
step size from 1e-5 to 2e-5, with 0.999 at 1.0-1.3x, while the
probability-flow ODE of either network is at 1.2-1.4x; at the NCSN code's
step, 4e-5 in the paper's notation and now the default, 1.29x with the
quickstart's key). DDPM's ancestral sampler uses the DDPM code's CIFAR-10
variance, beta ("large"; 1.55x here). The VE SDE samples
with the reverse-diffusion predictor alone (the score SDE paper's "P1000"):
its Langevin corrector at snr 0.16 reaches 6-10x the floor here, an effect
studied in experiments/studies/langevin_snr.py.
"""

from configs import formulations
from configs.quickstart import get_config
from diffusers_unified.experiment.study import Study


def ncsn(config):
    formulations.ncsn(config)
    config.process.num_scales = 100
    config.sampling.n_steps_each = 10
    config.model.ema_rate = 0.999  # NCSNv2's technique 5
    return config


def vesde(config):
    formulations.vesde(config)
    config.sampling.corrector = "none"
    return config


def get_study():
    return Study(
        name="quickstart",
        description=__doc__,
        base=get_config,
        variants=[
            ("DDPM", formulations.ddpm),
            ("NCSN", ncsn),
            ("VP SDE", formulations.vpsde),
            ("sub-VP SDE", formulations.subvpsde),
            ("VE SDE", vesde),
        ],
        samplers={"native": {}, "ODE": {"sampling.method": "ode"}},
    )
