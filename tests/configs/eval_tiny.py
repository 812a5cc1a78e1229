"""The eval tests' tiny run: DDPM on the 2-D Gaussian mixture (known density), 20 updates.

Evaluation computes both likelihoods (probability-flow ODE with the exact
divergence and 25 RK4 steps, and the bound of a 100-level DDPM) for 96
held-out examples in batches of 32, so an eval has three likelihood parts per
kind to be interrupted between.
"""

from diffusers_unified.experiment.configs import formulations
from diffusers_unified.experiment.configs.default import get_config as default_config


def get_config():
    config = formulations.ddpm(default_config())
    config.process.num_scales = 100  # a 100-level DDPM: the bound and the sampler cost 100 NFE
    config.data.dataset = "gmm"
    config.data.num_train = 256
    config.data.num_test = 256
    config.model.hidden = (32, 32)
    config.model.emb_dim = 16
    config.model.ema_rate = 0.9
    config.training.batch_size = 8
    config.training.n_iters = 20
    config.training.n_jitted_steps = 10
    config.training.log_freq = 10
    config.training.checkpoint_freq = 10
    config.optim.warmup = 0
    config.sampling.num_samples = 64
    config.sampling.batch_size = 64
    config.eval.num_samples = 64
    config.eval.likelihood = "all"
    config.eval.num_likelihood = 96
    config.eval.likelihood_batch = 32
    config.eval.divergence = "exact"
    config.eval.ode_method = "rk4"  # 25 fixed steps: an untrained network makes dopri5 crawl
    config.eval.num_steps = 25
    return config
