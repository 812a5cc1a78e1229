"""Variance-exploding processes: the VE SDE and NCSN as its discrete member."""

from __future__ import annotations

import math

import jax.numpy as jnp

from diffusers_unified import schedules
from diffusers_unified.processes.base import DiscreteProcess, Process, process_dataclass


class _Geometric:
    """sigma(t) = sigma_min (sigma_max / sigma_min)^t, alpha(t) = 1."""

    sigma_min: float
    sigma_max: float

    def _check_sigmas(self) -> None:
        if not 0.0 < self.sigma_min < self.sigma_max:
            raise ValueError(
                f"{type(self).__name__} needs 0 < sigma_min < sigma_max, got "
                f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}"
            )

    @property
    def prior_std(self) -> float:
        return self.sigma_max

    def alpha_sigma(self, t):
        t = jnp.asarray(t)
        sigma = self.sigma_min * (self.sigma_max / self.sigma_min) ** (t / self.T)
        return jnp.ones_like(sigma), sigma

    def coefficients(self, t):
        _, sigma = self.alpha_sigma(t)
        g2 = sigma**2 * 2.0 * math.log(self.sigma_max / self.sigma_min) / self.T
        return jnp.zeros_like(sigma), g2


@process_dataclass
class VESDE(_Geometric, Process):
    """The VE SDE dx = sqrt(d sigma^2 / dt) dw (Song et al. 2021, eq. 9, 30).

    sigma(t) = sigma_min (sigma_max / sigma_min)^t, so g(t) = sigma(t)
    sqrt(2 log(sigma_max / sigma_min)); prior N(0, sigma_max^2 I). Its N levels
    t_i = i / (N - 1) are NCSN's geometric sigmas.
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    N: int = 1000
    t_min: float = 1e-5
    conditioning: str = "time"
    # The score SDE code's VE ancestral predictor adds the posterior variance.
    ancestral_variance = "small"

    def __post_init__(self):
        self._check_sigmas()
        self._check_conditioning()


@process_dataclass
class NCSN(_Geometric, DiscreteProcess):
    """NCSN (Song and Ermon 2019): L noise levels sigma_max > ... > sigma_min, geometric.

    The defaults are the NCSN paper's (sigma 1 -> 0.01 over L = 10). NCSNv2
    (Song and Ermon 2020) chooses sigma_max as the largest pairwise distance in
    the data (technique 1) and L by technique 2 (e.g. sigma_max = 50, L = 232
    for CIFAR-10); its step size and steps per level are options of the
    annealed Langevin sampler. Level i sits at t_i = i / (L - 1), so the levels
    are exactly the VE SDE's sigma(t_i) and its continuous extension is that
    VE SDE. The prior is N(0, sigma_max^2 I) (the score SDE code's choice; the
    NCSN code starts from uniform noise).
    """

    sigma_min: float = 0.01
    sigma_max: float = 1.0
    N: int = 10
    conditioning: str = "time"
    ancestral_variance = "small"  # as the VE SDE's

    def __post_init__(self):
        self._check_sigmas()
        self._check_conditioning()
        if self.N < 2:
            raise ValueError(f"NCSN needs N >= 2 noise levels, got N={self.N}")

    @property
    def sigmas(self):
        """The levels, ascending (level 0 is the least noisy)."""
        return schedules.geometric_sigmas(self.sigma_min, self.sigma_max, self.N)

    def levels(self):
        sigmas = self.sigmas
        return sigmas * 0.0 + 1.0, sigmas
