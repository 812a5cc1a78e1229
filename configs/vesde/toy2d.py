"""vesde on the toy2d preset (see configs/formulations.py)."""

from configs import formulations
from configs.default import get_config as default_config


def get_config():
    return formulations.vesde(formulations.toy2d(default_config()))
