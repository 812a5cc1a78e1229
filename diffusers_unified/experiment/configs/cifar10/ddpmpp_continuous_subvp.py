"""DDPM++ cont. (sub-VP) on CIFAR-10: 61,804,419 parameters.

The score SDE paper's DDPM++ cont. (sub-VP) (Song et al. 2021, Table 3), as
its reference code's configs/subvp/cifar10_ddpmpp_continuous.py builds it:
the VP network on the sub-VP SDE; parameter count from that code's own
network under `jax.eval_shape`.
"""

from diffusers_unified.experiment.configs import formulations
from diffusers_unified.experiment.configs.default import get_config as default_config


def get_config():
    return formulations.ddpmpp(formulations.subvpsde(formulations.cifar10(default_config())))
