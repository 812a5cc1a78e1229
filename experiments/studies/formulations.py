"""The five formulations at an equal training budget: sample quality and likelihood.

DDPM, NCSN, the VP, sub-VP and VE SDEs each train the quickstart's MLP on
the 2-D Gaussian mixture of `example_mixture()` for the same 10,000 updates
of batch 256, then sample with their papers' samplers ("native") and with
the probability-flow ODE, and are scored by the sliced Wasserstein distance
to held-out data (next to the held-out data's own noise floor) and by the
held-out negative log-likelihood through the probability-flow ODE (exact
divergence, Dopri5 at 1e-5), next to the true density's NLL of the same
examples (the data set's density is known). The variants are those of the
quickstart (see experiments/studies/quickstart.py for why NCSN uses 100
levels and an EMA rate of 0.999, and the VE SDE its predictor alone on 2-D data).

One sample ratio moves by about 25 % from key to key at 2,000 samples; the
held-out NLL of the same 2,000 examples for every model (ode_nll_nats minus
data_nll_nats, the true density's) compares the trained networks more sharply.

    diffusers-unified-ablate --study=experiments/studies/formulations.py \\
        --workdir=studies/formulations --jobs=2

Results: experiments/results/formulations/.
"""

from configs.quickstart import get_config as quickstart_config
from diffusers_unified.experiment.study import Study
from experiments.studies import quickstart


def get_config():
    config = quickstart_config()
    config.training.n_iters = 10_000
    config.training.checkpoint_freq = 10_000
    config.eval.divergence = "exact"  # 2-D: the Jacobian's trace costs two products
    config.eval.num_likelihood = 2_000
    config.eval.likelihood_batch = 1_000
    return config


def get_study():
    return Study(
        name="formulations",
        description=__doc__,
        base=get_config,
        variants=quickstart.get_study().variants,
        samplers={"native": {}, "ODE": {"sampling.method": "ode"}},
        likelihood="ode",
    )
