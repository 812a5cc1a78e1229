"""The quickstart's base config: a small MLP on a 2-D Gaussian mixture, 6,000 quick updates.

experiments/studies/quickstart.py trains it as each of the five formulations.
The data are `example_mixture()` (four anisotropic components), whose
held-out set gives the noise floor the samples are compared with.
"""

from diffusers_unified.experiment.configs import formulations
from diffusers_unified.experiment.configs.default import get_config as default_config


def get_config():
    config = formulations.toy2d(default_config())
    config.data.dataset = "gmm"
    config.data.num_test = 4_000
    config.model.hidden = (128, 128, 128)
    config.model.ema_rate = 0.99
    config.training.batch_size = 256
    config.training.n_iters = 6_000
    config.training.n_jitted_steps = 50
    config.training.log_freq = 1_000
    config.training.checkpoint_freq = 6_000
    config.training.keep = 1
    config.optim.lr = 2e-3
    config.eval.num_samples = 2_000
    config.sampling.batch_size = 1_000  # two shards: the second one times sampling alone
    return config
