"""Samplers: `(key, score_fn, process, shape, *, options) -> SamplerOutput(samples, nfe)`.

Each is compiled once per shape and option setting; its whole loop is one
`lax.scan` (or a diffrax solve) inside that compilation.
"""

from diffusers_unified.samplers.common import SamplerOutput, resolve_grid, tweedie_denoise
from diffusers_unified.samplers.conditioning import (
    Inpainting,
    Projection,
    colorization,
    inpainting,
)
from diffusers_unified.samplers.fast import dpm_solver, edm_heun, edm_stochastic
from diffusers_unified.samplers.ode import Encoding, decode, encode, probability_flow
from diffusers_unified.samplers.pc import (
    DDIM,
    Ancestral,
    AnnealedLangevin,
    EulerMaruyama,
    Langevin,
    NoCorrector,
    NoPredictor,
    ReverseDiffusion,
    ancestral,
    annealed_langevin,
    ddim,
    predictor_corrector,
    sampler_noise,
)

__all__ = [
    "DDIM",
    "Encoding",
    "Ancestral",
    "AnnealedLangevin",
    "EulerMaruyama",
    "Inpainting",
    "Langevin",
    "NoCorrector",
    "NoPredictor",
    "Projection",
    "ReverseDiffusion",
    "SamplerOutput",
    "ancestral",
    "annealed_langevin",
    "colorization",
    "ddim",
    "decode",
    "dpm_solver",
    "edm_heun",
    "edm_stochastic",
    "encode",
    "inpainting",
    "predictor_corrector",
    "probability_flow",
    "resolve_grid",
    "sampler_noise",
    "tweedie_denoise",
]
