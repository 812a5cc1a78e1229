"""DDPM++ cont. (VP) on CIFAR-10: 61,804,419 parameters.

The score SDE paper's DDPM++ cont. (VP) (Song et al. 2021, Table 3), as its
reference code's configs/vp/cifar10_ddpmpp_continuous.py builds it; the
parameter count is that code's own network, counted with `jax.eval_shape`
(`tests/test_ncsnpp.py` builds both). Sampled with Euler-Maruyama on 1,000
steps, as the reference config.
"""

from diffusers_unified.experiment.configs import formulations
from diffusers_unified.experiment.configs.default import get_config as default_config


def get_config():
    return formulations.ddpmpp(formulations.vpsde(formulations.cifar10(default_config())))
