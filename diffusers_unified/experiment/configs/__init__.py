"""The shipped configs: `default.py` (the schema: every key the launcher reads), the
formulations and data presets (`formulations.py`), and one file per formulation and data
set, each `formulation(preset(default))`.

The launcher takes them by name from anywhere (`--config=cifar10/ddpm`,
`--config=vpsde/toy2d.py`), as `--config=configs/...` from a checkout, or any
config file by path. A config file of your own derives from these by calling
them::

    from diffusers_unified.experiment.configs import formulations
    from diffusers_unified.experiment.configs.default import get_config as default_config

(`from configs import formulations`, the score SDE code's spelling, works too
when no other package named `configs` is on the path: see
`diffusers_unified.experiment.config_files`.)
"""
