"""DDPM++ cont. (deep, sub-VP) on CIFAR-10: 106,632,579 parameters.

The score SDE paper's deep DDPM++ cont. (sub-VP) (Song et al. 2021, Table
3): configs/subvp/cifar10_ddpmpp_deep_continuous.py of its reference code;
parameter count from that code's own network under `jax.eval_shape`.
"""

from diffusers_unified.experiment.configs import formulations
from diffusers_unified.experiment.configs.default import get_config as default_config


def get_config():
    config = formulations.subvpsde(formulations.cifar10(default_config()))
    return formulations.ddpmpp(config, deep=True)
