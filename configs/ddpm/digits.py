"""ddpm on the digits preset (see configs/formulations.py)."""

from configs import formulations
from configs.default import get_config as default_config


def get_config():
    return formulations.ddpm(formulations.digits(default_config()))
