"""A tiny image run: an 8x8 RGB `.npz` data set (path given with --config.data.path), a
one-block U-Net with 8 channels, 4 updates; DDPM with 20 levels and its ancestral sampler.

For the tests of image-only features (FID / IS / KID, PNG files): small enough that the
Inception network, at 299x299 per image, embeds its few dozen images in seconds.
"""

from diffusers_unified.experiment.configs import formulations
from diffusers_unified.experiment.configs.default import get_config as default_config


def get_config():
    config = formulations.ddpm(default_config())
    config.process.num_scales = 20
    config.data.dataset = "npz"
    config.data.path = "set-me.npz"
    config.data.num_test = 8
    config.data.image_size = 8
    config.data.num_channels = 3
    config.data.centered = True
    config.model.name = "unet"
    config.model.nf = 8
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = ()
    config.model.dropout = 0.0
    config.model.ema_rate = 0.9
    config.training.batch_size = 8
    config.training.n_iters = 4
    config.training.n_jitted_steps = 1
    config.training.log_freq = 2
    config.training.checkpoint_freq = 4
    config.optim.warmup = 0
    config.sampling.num_samples = 16
    config.sampling.batch_size = 8
    config.eval.num_samples = 16
    config.eval.likelihood = "none"
    config.eval.inception_batch = 8
    config.eval.kid_reference = 24
    return config
