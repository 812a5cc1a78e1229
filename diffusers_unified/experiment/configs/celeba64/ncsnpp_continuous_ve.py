"""NCSN++ cont. (VE) on 64x64 CelebA-class images: 62,758,915 parameters.

The resolution is a setting, not a constant: the CIFAR-10 NCSN++ cont.
network (self-attention at 16x16) on 64x64x3 images from an image folder
(data.path: e.g. CelebA's aligned faces, centre-cropped to 140x140 and
resized, as the score SDE code's pipeline), with the score SDE code's CelebA settings
(configs/default_celeba_configs.py, configs/ve/celeba_ncsnpp.py): sigma_max
90, snr 0.17, EMA 0.999. Its reference config is the discrete NCSN++ with
positional embeddings; this is its continuous (Fourier) form. Parameter
count as CIFAR-10's (the weights do not depend on the image size).
"""

from diffusers_unified.experiment.configs import formulations
from diffusers_unified.experiment.configs.default import get_config as default_config


def get_config():
    config = formulations.vesde(formulations.cifar10(default_config()))
    config = formulations.ncsnpp(config)
    d = config.data
    d.dataset, d.path, d.image_size, d.num_channels = "image_folder", "data/celeba", 64, 3
    d.num_test = 1_000
    d.crop_size, d.resample = 140, "bilinear"  # the score SDE code's CelebA pipeline
    config.process.sigma_min, config.process.sigma_max = 0.01, 90.0
    config.sampling.snr = 0.17
    return config
