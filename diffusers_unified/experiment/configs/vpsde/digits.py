"""vpsde on the digits preset (see configs/formulations.py)."""

from diffusers_unified.experiment.configs import formulations
from diffusers_unified.experiment.configs.default import get_config as default_config


def get_config():
    return formulations.vpsde(formulations.digits(default_config()))
