"""vesde on the digits preset, sigma_max from the data (NCSNv2; see configs/formulations.py)."""

from diffusers_unified.experiment.configs import formulations
from diffusers_unified.experiment.configs.default import get_config as default_config


def get_config():
    return formulations.ncsnv2_noise_scales(
        formulations.vesde(formulations.digits(default_config())), levels=False
    )
