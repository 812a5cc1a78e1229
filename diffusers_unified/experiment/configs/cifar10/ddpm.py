"""DDPM on CIFAR-10 (Ho et al. 2020): 35,746,307 parameters.

Ho et al.'s CIFAR-10 model (their paper: 35.7 M parameters) as their code
builds it: nf 128, channel multipliers (1, 2, 2, 2), two residual blocks per
resolution, self-attention at 16x16 after every block (also on the way up,
`model.up_attention = "per_block"`), dropout 0.1; the same network as
diffusers' UNet2DModel of google/ddpm-cifar10-32 (whose parameter count is
this one). 1,000 linear betas from 1e-4 to 0.02, the eps-MSE loss, EMA
0.9999, 800,000 updates of batch 128 at lr 2e-4 (5,000 warm-up steps,
clipping at 1) with random flips; ancestral sampling with the predicted
x_0 clipped to [-1, 1], as the DDPM code samples.
"""

from diffusers_unified.experiment.configs import formulations
from diffusers_unified.experiment.configs.default import get_config as default_config


def get_config():
    config = formulations.ddpm(formulations.cifar10(default_config()))
    m = config.model
    m.name, m.nf, m.ch_mult, m.num_res_blocks = "unet", 128, (1, 2, 2, 2), 2
    m.attn_resolutions, m.up_attention, m.dropout = (16,), "per_block", 0.1
    m.embedding, m.skip_rescale, m.ema_rate = "sinusoidal", False, 0.9999
    config.data.centered = True
    config.training.n_iters = 800_000
    config.sampling.clip_x0 = True
    return config
