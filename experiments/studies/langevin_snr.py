"""The Langevin corrector's signal-to-noise ratio and steps per level, on one VE SDE network.

The quickstart's MLP trains once as a VE SDE (10,000 updates on the 2-D
Gaussian mixture); it then samples with the reverse-diffusion predictor
(1000 levels) followed at every level by 1, 2 or 5 Langevin corrector steps
(Song et al. 2021, Alg. 4 and 5) at snr from 0.01 to 0.32, and with no
corrector at all, scored by the sliced Wasserstein distance to held-out data
over the noise floor. The score SDE paper's setting for VE image models is
snr = 0.16, one step; the quickstart found it 6-10x the floor on this 2-D
data, where the predictor alone is near 1x: this study maps where the
corrector helps and where its bias at a finite step size takes over.

Every row samples 2,000 points with the same key: from key to key one
ratio moves by about 25 % (1.0 is as close as held-out data; measured on the
quickstart's networks, 0.6-1.1 over three keys for one sampler), so only
differences well above that say something about the samplers.

    diffusers-unified-ablate --study=experiments/studies/langevin_snr.py \\
        --workdir=studies/langevin_snr

Results: experiments/results/langevin_snr/ (plot.png: SW / floor against snr).
"""

from configs import formulations
from configs.quickstart import get_config as quickstart_config
from diffusers_unified.experiment.study import Study

SNRS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32)
STEPS_EACH = (1, 2, 5)


def get_config():
    config = formulations.vesde(quickstart_config())
    config.training.n_iters = 10_000
    config.training.checkpoint_freq = 10_000
    return config


def samplers() -> dict[str, dict]:
    out = {"no corrector/0": {"sampling.corrector": "none"}}
    for steps in STEPS_EACH:
        for snr in SNRS:
            out[f"{steps} step(s)/snr={snr}"] = {
                "sampling.corrector": "langevin",
                "sampling.snr": snr,
                "sampling.n_steps_each": steps,
            }
    return out


def get_study():
    return Study(
        name="langevin_snr",
        description=__doc__,
        base=get_config,
        variants=[("VE SDE", {})],
        samplers=samplers(),
        plot=("snr", "sw_over_floor"),
    )
