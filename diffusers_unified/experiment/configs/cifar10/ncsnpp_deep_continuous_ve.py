"""NCSN++ cont. (deep, VE) on CIFAR-10: 107,587,075 parameters.

The score SDE paper's deep NCSN++ cont. (VE) (Song et al. 2021, Table 3):
configs/ve/cifar10_ncsnpp_deep_continuous.py of its reference code (8
residual blocks per resolution, 950,000 updates); parameter count from that
code's own network under `jax.eval_shape`.
"""

from diffusers_unified.experiment.configs import formulations
from diffusers_unified.experiment.configs.default import get_config as default_config


def get_config():
    config = formulations.vesde(formulations.cifar10(default_config()))
    config.process.sigma_min, config.process.sigma_max = 0.01, 50.0
    return formulations.ncsnpp(config, deep=True)
