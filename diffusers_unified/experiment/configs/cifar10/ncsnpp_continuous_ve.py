"""NCSN++ cont. (VE) on CIFAR-10: 62,758,915 parameters.

The score SDE paper's NCSN++ cont. (VE) (Song et al. 2021, Table 3):
configs/ve/cifar10_ncsnpp_continuous.py of its reference code, sigma from
0.01 to 50, sampled by predictor-corrector (reverse diffusion + Langevin,
snr 0.16) on 1,000 levels; parameter count from that code's own network
under `jax.eval_shape`.
"""

from diffusers_unified.experiment.configs import formulations
from diffusers_unified.experiment.configs.default import get_config as default_config


def get_config():
    config = formulations.vesde(formulations.cifar10(default_config()))
    config.process.sigma_min, config.process.sigma_max = 0.01, 50.0
    return formulations.ncsnpp(config)
