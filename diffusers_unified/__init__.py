"""DDPM, NCSN and score SDEs as interchangeable formulations over one score-network interface.

The public surface:

- `processes`: the VP, sub-VP and VE SDEs, and DDPM and NCSN as their discrete members;
- `samplers`: every sampler, `(key, score_fn, process, shape, *, options) -> SamplerOutput`;
- `parametrization`: what a network predicts (eps, x0, score, v) and the score it implies;
- `losses`: the training objectives, `loss_fn(params, key, batch) -> (loss, aux)`;
- `likelihood`: the probability-flow ODE log-likelihood and DDPM's variational bound;
- `nets`: the Flax networks, `apply(params, x, noise_cond, y=None, train=False)`;
- `metrics`: sample-quality metrics on arrays;
- `data`: data sets, exact Gaussian mixtures, deterministic batching;
- `load(workdir)`: a trained work directory as a model with `.sample`, `.log_likelihood`
  and `.score_fn` (`experiment.api`).

The launcher (`diffusers-unified`, `diffusers_unified.experiment`) builds all of
these from ml_collections configs; docs/architecture.md shows the layers.
"""

import importlib

__version__ = "0.1.0"

# Imported on first access (PEP 562): the launcher checks a config before JAX is
# imported, and every one of these imports JAX.
_PUBLIC = (
    "data",
    "likelihood",
    "losses",
    "metrics",
    "nets",
    "parametrization",
    "processes",
    "samplers",
)

__all__ = ["__version__", "load", *_PUBLIC]


def load(workdir: str, checkpoint: str | int = "latest"):
    """The model trained in `workdir` (its newest committed checkpoint, or step `checkpoint`):
    `.config`, `.process`, `.score_fn(params="ema")`, `.sample(key, n, sampler="ode",
    **options)` and `.log_likelihood(key, x, **options)`. See `experiment.api.Model`."""
    # Imported on first use (JAX, the launcher's modules); the library layers below never
    # import the experiment layer, the package's front door only hands this call to it.
    return importlib.import_module(f"{__name__}.experiment.api").load(workdir, checkpoint)


def __getattr__(name: str):
    if name in _PUBLIC:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
