"""Variance-preserving processes: the VP and sub-VP SDEs, and DDPM as the discrete VP."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from diffusers_unified import schedules
from diffusers_unified.processes.base import DiscreteProcess, Process, process_dataclass
from diffusers_unified.typing import Array


class _LinearBeta:
    """beta(t) = beta_min + t (beta_max - beta_min), as in Song et al. (2021), eq. 32."""

    beta_min: float
    beta_max: float

    def _check_betas(self) -> None:
        if not 0.0 <= self.beta_min < self.beta_max:
            raise ValueError(
                f"{type(self).__name__} needs 0 <= beta_min < beta_max, got "
                f"beta_min={self.beta_min}, beta_max={self.beta_max}"
            )

    def beta(self, t: Array) -> Array:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t: Array) -> Array:
        """log alpha(t) = -1/2 int_0^t beta(s) ds."""
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min


@process_dataclass
class VPSDE(_LinearBeta, Process):
    """The VP SDE dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw (Song et al. 2021, eq. 11).

    alpha(t) = exp(-1/2 int_0^t beta), sigma(t) = sqrt(1 - alpha(t)^2); prior
    N(0, I). Its N-step discretization at t_i = i / (N - 1) has the betas
    beta(t_i) / N, which for the defaults (0.1, 20, N = 1000) are exactly
    DDPM's linear betas 1e-4 ... 0.02.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    N: int = 1000
    t_min: float = 1e-3
    conditioning: str = "time"
    ancestral_variance = "large"  # the score SDE code's VP ancestral predictor: sqrt(beta) noise

    def __post_init__(self):
        self._check_betas()
        self._check_conditioning()

    @property
    def prior_std(self) -> float:
        return 1.0

    def alpha_sigma(self, t):
        t = jnp.asarray(t)
        log_alpha = self.log_alpha(t)
        return jnp.exp(log_alpha), jnp.sqrt(-jnp.expm1(2.0 * log_alpha))

    def coefficients(self, t):
        beta = self.beta(jnp.asarray(t))
        return -0.5 * beta, beta


@process_dataclass
class SubVPSDE(_LinearBeta, Process):
    """The sub-VP SDE (Song et al. 2021, eq. 17).

    dx = -1/2 beta(t) x dt + sqrt(beta(t) (1 - exp(-2 int_0^t beta))) dw, with
    the same alpha(t) as the VP SDE and sigma(t) = 1 - alpha(t)^2 (no square
    root): its variance is below the VP SDE's at every t. Prior N(0, I).
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    N: int = 1000
    t_min: float = 1e-3
    conditioning: str = "time"
    # The score SDE code has no sub-VP ancestral predictor; this is its VP one's.
    ancestral_variance = "large"

    def __post_init__(self):
        self._check_betas()
        self._check_conditioning()

    @property
    def prior_std(self) -> float:
        return 1.0

    def alpha_sigma(self, t):
        t = jnp.asarray(t)
        log_alpha = self.log_alpha(t)
        return jnp.exp(log_alpha), -jnp.expm1(2.0 * log_alpha)

    def coefficients(self, t):
        t = jnp.asarray(t)
        beta = self.beta(t)
        return -0.5 * beta, beta * -jnp.expm1(4.0 * self.log_alpha(t))


@process_dataclass
class DDPM(DiscreteProcess):
    """DDPM (Ho et al. 2020): the Markov chain x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z.

    alphabar_i = prod_{j <= i} (1 - beta_j); level i (0-based: Ho's t = i + 1)
    has alpha_i = sqrt(alphabar_i), sigma_i = sqrt(1 - alphabar_i) and sits at
    time t_i = i / (N - 1), so that the linear schedule is the VP SDE's
    discretization (see VPSDE). `schedule` is "linear" (beta_start, beta_end)
    or "cosine" (Nichol and Dhariwal 2021). Between levels log alphabar is
    interpolated by a monotone cubic: a VP-type SDE whose beta(t) is
    continuous. The reverse variance (fixed-small or fixed-large) is an option
    of the ancestral sampler; its default is the DDPM code's CIFAR-10 choice,
    fixed-large.
    """

    N: int = 1000
    schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    cosine_s: float = 0.008
    conditioning: str = "time"
    ancestral_variance = "large"  # the DDPM code's CIFAR-10 runs: model_var_type="fixedlarge"

    SCHEDULES = ("linear", "cosine")

    def __post_init__(self):
        self._check_conditioning()
        if self.schedule not in self.SCHEDULES:
            raise ValueError(
                f"unknown DDPM schedule {self.schedule!r}; valid: {', '.join(self.SCHEDULES)}"
            )
        self.betas()  # validates the schedule's parameters
        if self.N < 2:
            raise ValueError(f"DDPM needs N >= 2 levels, got N={self.N}")

    @property
    def prior_std(self) -> float:
        return 1.0

    def betas(self) -> np.ndarray:
        if self.schedule == "linear":
            return schedules.linear_betas(self.N, self.beta_start, self.beta_end)
        return schedules.cosine_betas(self.N, self.cosine_s)

    def log_alphabar(self) -> np.ndarray:
        return np.cumsum(np.log1p(-self.betas()))

    def levels(self):
        alphabar = np.exp(self.log_alphabar())
        return np.sqrt(alphabar), np.sqrt(1.0 - alphabar)

    def _log_alphabar_and_slope(self, t):
        """log alphabar(t) and its derivative, by monotone cubic interpolation of the levels.

        Exact at every level; in between C^1, so that beta(t) = -d log
        alphabar / dt is continuous and adaptive ODE solvers see a smooth
        vector field (a piecewise-linear interpolant makes beta jump at every
        level, which defeats their error estimates).
        """
        knots, values = self.times, self.log_alphabar()
        slopes = schedules.pchip_slopes(knots, values)
        h = self.T / (self.N - 1)
        t = jnp.clip(jnp.asarray(t), 0.0, self.T)
        i = jnp.clip(jnp.floor(t / h).astype(jnp.int32), 0, self.N - 2)
        s = t / h - i
        f32 = lambda a: jnp.asarray(a, jnp.float32)
        y0, y1 = f32(values)[i], f32(values)[i + 1]
        d0, d1 = f32(slopes)[i] * h, f32(slopes)[i + 1] * h
        value = (
            (2 * s**3 - 3 * s**2 + 1) * y0
            + (s**3 - 2 * s**2 + s) * d0
            + (-2 * s**3 + 3 * s**2) * y1
            + (s**3 - s**2) * d1
        )
        slope = (
            (6 * s**2 - 6 * s) * y0
            + (3 * s**2 - 4 * s + 1) * d0
            + (-6 * s**2 + 6 * s) * y1
            + (3 * s**2 - 2 * s) * d1
        ) / h
        return value, slope

    def alpha_sigma(self, t):
        log_ab, _ = self._log_alphabar_and_slope(t)
        return jnp.exp(0.5 * log_ab), jnp.sqrt(-jnp.expm1(log_ab))

    def coefficients(self, t):
        _, slope = self._log_alphabar_and_slope(t)
        beta = -slope
        return -0.5 * beta, beta
