"""Correctors: Langevin MCMC at a fixed time t, for `predictor_corrector`.

Each is a frozen dataclass called as `corrector(key, score_fn, process, x, t,
project=None) -> x` with a scalar time, and declares `nfe`. Given a
projection (`samplers.conditioning`) a corrector applies it after each of its
MCMC steps. Reference code: the score SDE code's `sampling.py`
(`LangevinCorrector`, `AnnealedLangevinDynamics`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from diffusers_unified.processes import Process
from diffusers_unified.typing import Array


@dataclasses.dataclass(frozen=True)
class NoCorrector:
    """Leaves x unchanged (a predictor-only sampler: DDPM ancestral, DDIM, the reverse SDE)."""

    nfe: ClassVar[int] = 0

    def __call__(self, key, score_fn, process, x, t, project=None):
        return x


def _langevin(key, score_fn, x, t, n_steps, step_size_fn, project=None):
    """n_steps of x <- x + h grad + sqrt(2 h) z, with h = step_size_fn(grad, z).

    With a projection, each step is followed by `project(key, x, t)`, as in
    the inpainting algorithm of Song and Ermon (2019).
    """

    def body(i, x):
        grad = score_fn(x, t)
        key_i = jax.random.fold_in(key, i)
        z = jax.random.normal(key_i, x.shape)
        h = step_size_fn(grad, z)
        x = x + h * grad + jnp.sqrt(2.0 * h) * z
        return x if project is None else project(jax.random.fold_in(key_i, 1), x, t)

    return jax.lax.fori_loop(0, n_steps, body, x)


def _alpha_factor(process: Process, t: Array) -> Array:
    # The score SDE code scales corrector steps by alpha_i = 1 - beta_i for VP
    # processes (1 for VE): the squared mean scale of one default forward step.
    a, _ = process.step_transition(t)
    return a**2


@dataclasses.dataclass(frozen=True)
class Langevin:
    """Langevin MCMC with a signal-to-noise ratio (Song et al. 2021, Alg. 4; `LangevinCorrector`).

    Each of `n_steps` steps is x <- x + h score + sqrt(2 h) z with
    h = 2 alpha_i (snr ||z|| / ||score||)^2, the norms per example and
    averaged over the batch as in the reference code (so the step size is
    shared by the batch; the reference also averages over devices), and
    alpha_i = 1 - beta_i on VP-type processes, 1 on VE ones (see
    `_alpha_factor`). Defaults: snr 0.16, one step (the paper's CIFAR-10 VE).
    """

    snr: float = 0.16
    n_steps: int = 1

    @property
    def nfe(self) -> int:
        return self.n_steps

    def __call__(self, key, score_fn, process, x, t, project=None):
        alpha = _alpha_factor(process, t)

        def step_size(grad, z):
            norm = lambda v: jnp.mean(jnp.linalg.norm(v.reshape(v.shape[0], -1), axis=-1))
            return 2.0 * alpha * (self.snr * norm(z) / norm(grad)) ** 2

        return _langevin(key, score_fn, x, t, self.n_steps, step_size, project)


# At snr >= 1/sqrt(2) the annealed step h = 2 (snr sigma)^2 reaches sigma^2,
# the inverse curvature of log p_t across data concentrated below the noise
# level (images): every step overshoots the mode, the chain's variance is at
# least twice the target's, and from snr = 1 on it grows without bound.
MAX_ANNEALED_SNR = 1.0 / math.sqrt(2.0)


@dataclasses.dataclass(frozen=True)
class AnnealedLangevin:
    """Langevin MCMC with the step size set by the noise level: h = 2 alpha_i (snr sigma(t))^2.

    This is the score SDE code's "ald" corrector (`AnnealedLangevinDynamics`),
    step for step. Annealed Langevin dynamics of NCSN (Song and Ermon 2019,
    Alg. 1), whose update is x + eps_i / 2 score + sqrt(eps_i) z with
    eps_i = eps sigma_i^2 / sigma_L^2, is this corrector with
    snr = sqrt(eps) / (2 sigma_L) on a VE process (see `annealed_langevin`).
    snr must be below 1/sqrt(2) (see MAX_ANNEALED_SNR).
    """

    snr: float = 0.16
    n_steps: int = 1

    def __post_init__(self):
        if not 0.0 < self.snr < MAX_ANNEALED_SNR:
            raise ValueError(
                f"AnnealedLangevin snr must be in (0, 1/sqrt(2) = {MAX_ANNEALED_SNR:.4f}), got "
                f"snr={self.snr}: its step 2 (snr sigma)^2 would overshoot the mode at every "
                "noise level (and diverge from snr = 1 on)"
            )

    @property
    def nfe(self) -> int:
        return self.n_steps

    def __call__(self, key, score_fn, process, x, t, project=None):
        _, sigma = process.alpha_sigma(t)
        h = 2.0 * _alpha_factor(process, t) * (self.snr * sigma) ** 2
        return _langevin(key, score_fn, x, t, self.n_steps, lambda grad, z: h, project)
