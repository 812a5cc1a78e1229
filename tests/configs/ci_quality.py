"""A short but real training run on the 2-D Gaussian mixture, for the sample-quality tests.

`--config=tests/configs/ci_quality.py:<formulation>` (ddpm or ncsn; any
formulation of configs/formulations.py works). 2,000 updates of a 128x128
MLP at batch 128 in chunks of 500 compiled updates: a few seconds on one CPU
core. NCSN gets 100 noise levels instead of the paper's 10, as in the
quickstart: with 10 the network never sees the levels between them, which
the continuous-time samplers visit.
"""

from diffusers_unified.experiment.configs import formulations
from diffusers_unified.experiment.configs.default import get_config as default_config


def get_config(formulation: str = "ddpm"):
    config = getattr(formulations, formulation or "ddpm")(formulations.toy2d(default_config()))
    config.data.dataset = "gmm"
    config.data.num_train = 4_000
    config.data.num_test = 2_000
    config.model.hidden = (128, 128)
    config.model.emb_dim = 32
    config.model.ema_rate = 0.99
    config.training.batch_size = 128
    config.training.n_iters = 2_000
    config.training.n_jitted_steps = 500
    config.training.log_freq = 500
    config.training.checkpoint_freq = 2_000
    config.training.keep = 1
    config.optim.lr = 2e-3
    if config.process.name == "ncsn":
        config.process.num_scales = 100
    config.sampling.n_steps_each = 1
    config.sampling.num_samples = 1_000  # the quality tests measure --mode=sample's output
    config.sampling.batch_size = 250
    config.eval.num_samples = 250
    config.eval.likelihood = "none"  # the sample metric only (test_eval.py covers likelihoods)
    return config
