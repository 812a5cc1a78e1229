"""Correctors: Langevin MCMC at a fixed time t, for `predictor_corrector`.

Each is a frozen dataclass called as `corrector(key, score_fn, process, x, t,
project=None) -> x` with a scalar time, and declares `nfe`. Given a
projection (`samplers.conditioning`) a corrector applies it after each of its
MCMC steps. Reference code: the score SDE code's `sampling.py`
(`LangevinCorrector`, `AnnealedLangevinDynamics`).

As predictors do (`samplers.predictors`), the correctors here also split
into `plan(process, grid)`, whatever depends on the grid alone (one entry per
grid point, computed before the sampler's loop), and `step(c, score_fn, x,
t, noise, key, project)`, which takes its `noise_steps` standard-normal draws
as `noise` (shape `(noise_steps, *x.shape)`; the sampler draws them in
blocks). Step j's draw is `normal(fold_in(key, j))` either way. A corrector
written elsewhere needs only `__call__` and `nfe`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from diffusers_unified.samplers.common import GridValues
from diffusers_unified.typing import Array, PRNGKey


@dataclasses.dataclass(frozen=True)
class NoCorrector:
    """Leaves x unchanged (a predictor-only sampler: DDPM ancestral, DDIM, the reverse SDE)."""

    nfe: ClassVar[int] = 0
    noise_steps: ClassVar[int] = 0

    def plan(self, process, grid: GridValues) -> None:
        return None

    def step(self, c, score_fn, x, t, noise, key=None, project=None):
        return x

    def __call__(self, key, score_fn, process, x, t, project=None):
        return x


def langevin_noise(key: PRNGKey, shape: tuple[int, ...], n_steps: int) -> Array:
    """The draws of a corrector's `n_steps` steps from `key`: normal(fold_in(key, j)), stacked."""
    return jax.vmap(lambda j: jax.random.normal(jax.random.fold_in(key, j), shape))(
        jnp.arange(n_steps)
    )


def _langevin(score_fn, x, t, noise, step_size_fn, key=None, project=None):
    """len(noise) steps of x <- x + h grad + sqrt(2 h) z, with h = step_size_fn(grad, z).

    With a projection, step j is followed by `project(fold_in(fold_in(key, j),
    1), x, t)`, as in the inpainting algorithm of Song and Ermon (2019).
    """

    def body(x, inputs):
        j, z = inputs
        grad = score_fn(x, t)
        h = step_size_fn(grad, z)
        x = x + h * grad + jnp.sqrt(2.0 * h) * z
        if project is not None:
            x = project(jax.random.fold_in(jax.random.fold_in(key, j), 1), x, t)
        return x, None

    if noise.shape[0] == 1:  # the usual single step, without a loop around it
        return body(x, (0, noise[0]))[0]
    return jax.lax.scan(body, x, (jnp.arange(noise.shape[0]), noise))[0]


def _alpha_factor(step_a):
    # The score SDE code scales corrector steps by alpha_i = 1 - beta_i for VP
    # processes (1 for VE): the squared mean scale of one default forward step.
    return step_a**2


class _LangevinBase:
    """`__call__`, `plan` and `step` from `coefficient(alpha factor, sigma)` and `_step_size`."""

    n_steps: int

    @property
    def nfe(self) -> int:
        return self.n_steps

    @property
    def noise_steps(self) -> int:
        return self.n_steps

    def coefficient(self, alpha_factor, sigma):
        raise NotImplementedError

    def _step_size(self, c, grad, z):
        raise NotImplementedError

    def plan(self, process, grid: GridValues):
        """The coefficient at every grid point (float64, one entry per point)."""
        return self.coefficient(_alpha_factor(grid.step_a), grid.sigma)

    def step(self, c, score_fn, x, t, noise, key=None, project=None):
        step_size = lambda grad, z: self._step_size(c, grad, z)
        return _langevin(score_fn, x, t, noise, step_size, key, project)

    def __call__(self, key, score_fn, process, x, t, project=None):
        c = self.coefficient(
            _alpha_factor(process.step_transition(t)[0]), process.alpha_sigma(t)[1]
        )
        noise = langevin_noise(key, x.shape, self.n_steps)
        return self.step(c, score_fn, x, t, noise, key, project)


@dataclasses.dataclass(frozen=True)
class Langevin(_LangevinBase):
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

    def coefficient(self, alpha_factor, sigma):
        return 2.0 * alpha_factor * self.snr**2

    def _step_size(self, c, grad, z):
        norm = lambda v: jnp.mean(jnp.linalg.norm(v.reshape(v.shape[0], -1), axis=-1))
        return c * (norm(z) / norm(grad)) ** 2


# At snr >= 1/sqrt(2) the annealed step h = 2 (snr sigma)^2 reaches sigma^2,
# the inverse curvature of log p_t across data concentrated below the noise
# level (images): every step overshoots the mode, the chain's variance is at
# least twice the target's, and from snr = 1 on it grows without bound.
MAX_ANNEALED_SNR = 1.0 / math.sqrt(2.0)


@dataclasses.dataclass(frozen=True)
class AnnealedLangevin(_LangevinBase):
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

    def coefficient(self, alpha_factor, sigma):
        return 2.0 * alpha_factor * (self.snr * sigma) ** 2

    def _step_size(self, c, grad, z):
        return c
