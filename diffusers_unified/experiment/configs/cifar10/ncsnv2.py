"""NCSNv2 on CIFAR-10 (Song and Ermon 2020): 29,694,083 parameters.

The NCSNv2 code's configs/cifar10.yml: RefineNet with ngf 128 (the PyTorch
network, counted with this package's port, which matches it output for
output), 232 geometric noise levels from 50 down to 0.01, the output
divided by sigma (the network predicts the score), EMA 0.999, Adam at 1e-4
without warm-up or clipping, 300,000 updates of batch 128, random flips,
data in [0, 1]; annealed Langevin dynamics with 5 steps per level and
step_lr 6.2e-6 (epsilon 1.24e-5), then the final denoising step.
"""

from diffusers_unified.experiment.configs import formulations
from diffusers_unified.experiment.configs.default import get_config as default_config


def get_config():
    config = formulations.ncsn(formulations.cifar10(default_config()))
    config.process.sigma_min, config.process.sigma_max, config.process.num_scales = 0.01, 50.0, 232
    m = config.model
    m.name, m.nf, m.refinenet = "refinenet", 128, "ncsnv2"
    m.scale_by_sigma, m.parametrization, m.ema_rate = True, "score", 0.999
    config.data.centered = False
    config.training.n_iters = 300_000
    config.training.snapshot_freq = 5_000
    config.training.checkpoint_freq = 5_000
    config.optim.lr, config.optim.warmup, config.optim.grad_clip = 1e-4, 0, 0.0
    # NCSNv2's step_lr 6.2e-6 in x + h score + sqrt(2 h) z is epsilon = 1.24e-5 here.
    config.sampling.n_steps_each, config.sampling.step_size = 5, 1.24e-5
    config.sampling.denoise = True
    return config
