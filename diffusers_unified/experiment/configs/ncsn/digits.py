"""ncsn on the digits preset, with NCSNv2's noise scales from the data (configs/formulations.py)."""

from diffusers_unified.experiment.configs import formulations
from diffusers_unified.experiment.configs.default import get_config as default_config


def get_config():
    return formulations.ncsnv2_noise_scales(
        formulations.ncsn(formulations.digits(default_config()))
    )
