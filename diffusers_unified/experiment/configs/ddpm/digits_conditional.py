"""Class-conditional DDPM on the digits with classifier-free guidance (Ho and Salimans 2021).

Labels are dropped to the null label with probability 0.1 in training, and
samples are guided with w = 1 (diffusers' guidance_scale 2); pick the digit
with --config.sampling.class_label=k (-1, the default: the ten in turn).
"""

from diffusers_unified.experiment.configs import formulations
from diffusers_unified.experiment.configs.default import get_config as default_config


def get_config():
    config = formulations.ddpm(formulations.digits(default_config()))
    config.model.class_conditional = True
    config.training.label_dropout = 0.1
    config.sampling.guidance_weight = 1.0
    return config
