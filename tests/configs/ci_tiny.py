"""The launcher tests' tiny run: 2-D toy data, a 32x32 MLP, 20 updates of batch 8.

Small enough that a train, sample or eval run compiles and finishes in a few
seconds on one CPU core (RELIABILITY.md, "Test harness assumptions"): a
checkpoint every 5 updates, one update per compiled call, and a 10-step sampler.
60 training examples make an epoch of 7.5 batches, so the 20 updates cross two
epoch boundaries, one of them inside a batch.

`--config=tests/configs/ci_tiny.py:<formulation>` picks the formulation (ddpm,
ncsn, vpsde, subvpsde, vesde; default vpsde) with its loss and sampler
defaults from configs/formulations.py.
"""

from diffusers_unified.experiment.configs import formulations
from diffusers_unified.experiment.configs.default import get_config as default_config


def get_config(formulation: str = "vpsde"):
    config = getattr(formulations, formulation or "vpsde")(formulations.toy2d(default_config()))
    config.data.num_train = 60
    config.data.num_test = 256
    config.model.hidden = (32, 32)
    config.model.emb_dim = 16
    config.model.ema_rate = 0.9
    config.training.batch_size = 8
    config.training.n_iters = 20
    config.training.n_jitted_steps = 1
    config.training.log_freq = 5
    config.training.checkpoint_freq = 5
    config.training.snapshot_freq = 0
    config.training.keep = 5
    config.optim.warmup = 0
    config.sampling.num_steps = 10
    config.sampling.n_steps_each = 1  # NCSN's annealed Langevin: 1 step per level, not 100
    config.sampling.num_samples = 64
    config.sampling.batch_size = 32
    config.eval.num_samples = 64
    config.eval.likelihood = "none"  # the sample metric only (test_eval.py covers likelihoods)
    return config
