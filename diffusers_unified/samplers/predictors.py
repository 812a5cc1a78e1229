"""Predictors: moves of x from time t to an earlier grid time s, for `predictor_corrector`.

Each is a frozen dataclass (a static argument of `jax.jit`) called as
`predictor(key, score_fn, process, x, t, s, noise=None) -> x` with scalar
times, and declares `nfe`, its score evaluations per call. One that adds
noise draws it from `key`, or takes the standard-normal draw `noise` (shaped
like x) when given.

Reference codes: the score SDE code's `sampling.py` (`EulerMaruyamaPredictor`,
`ReverseDiffusionPredictor`, `AncestralSamplingPredictor`), the DDPM code's
`diffusion_utils_2.py` (`p_sample`) and the DDIM code's
`functions/denoising.py` (`generalized_steps`). One departure is shared: a
step from t to s uses the exact Gaussian kernel of the process between those
two times (`processes.transition`); on DDPM's and NCSN's own grids these are
the reference's discrete betas and sigmas, on the SDEs' grids they differ
from the score SDE code's `discrete_betas[i] = beta(t_i) / N` by O(1/N^2).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from diffusers_unified.processes import batch_broadcast, reverse_sde, transition
from diffusers_unified.typing import Array, PRNGKey


def _normal(key: PRNGKey, x: Array, noise: Array | None) -> Array:
    """A step's standard-normal draw: the given `noise`, else one drawn from `key`."""
    return jax.random.normal(key, x.shape) if noise is None else noise


@dataclasses.dataclass(frozen=True)
class NoPredictor:
    """Leaves x unchanged (annealed Langevin dynamics moves between levels this way)."""

    nfe: ClassVar[int] = 0

    def __call__(self, key, score_fn, process, x, t, s, noise=None):
        return x


@dataclasses.dataclass(frozen=True)
class EulerMaruyama:
    """One Euler-Maruyama step of the reverse SDE from t to s (Song et al. 2021, eq. 6).

    The score SDE code's `EulerMaruyamaPredictor`, except that the step is
    dt = s - t, the grid's spacing, where the reference takes -1/N on a grid
    spaced (T - eps)/(N - 1) (the same for the VP SDE's defaults, 0.1 % apart
    for the VE SDE's). With `probability_flow`, one Euler step of the
    probability-flow ODE (eq. 13) instead, as the score SDE code's predictors
    allow: with a corrector, an ODE predictor whose marginals Langevin steps
    correct.
    """

    probability_flow: bool = False
    nfe: ClassVar[int] = 1

    def __call__(self, key, score_fn, process, x, t, s, noise=None):
        drift, diffusion = reverse_sde(process, score_fn, self.probability_flow)(x, t)
        dt = s - t
        z = _normal(key, x, noise)
        return x + drift * dt + batch_broadcast(diffusion, x) * jnp.sqrt(-dt) * z


@dataclasses.dataclass(frozen=True)
class ReverseDiffusion:
    """The reverse-diffusion predictor (Song et al. 2021, eq. 46; `ReverseDiffusionPredictor`).

    With the forward step x_t = x_s + f + G z (f = (a - 1) x, G^2 = var, see
    `processes.transition`), it steps x_s = x_t - f + G^2 score + G z. The
    reference takes (f, G) from `sde.discretize` at t's level; here they are
    the exact kernel from s to t (the same on a discrete process's grid).
    """

    nfe: ClassVar[int] = 1

    def __call__(self, key, score_fn, process, x, t, s, noise=None):
        a, var = transition(*process.alpha_sigma(s), *process.alpha_sigma(t))
        z = _normal(key, x, noise)
        x_mean = (2.0 - a) * x + var * score_fn(x, t)
        return x_mean + jnp.sqrt(var) * z


VARIANCES = ("small", "large")


def clip_x0(x0: Array) -> Array:
    """DDPM's `clip_denoised` and diffusers' `clip_sample`: x_0 estimates clipped to [-1, 1]."""
    return jnp.clip(x0, -1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Ancestral:
    """Ancestral sampling from p(x_s | x_t) (Ho et al. 2020, Alg. 2, in score form).

    Mean (x_t + var score) / a, which is DDPM's 1/sqrt(alpha_t) (x_t - beta_t /
    sqrt(1 - alphabar_t) eps) (the DDPM code's `p_sample`), and on VE
    processes the score SDE code's SMLD step x + (sigma_t^2 - sigma_s^2)
    score. Variance `"small"` is the posterior variance var sigma_s^2 /
    sigma_t^2 (DDPM's beta-tilde, `fixedsmall`), `"large"` is var (DDPM's
    beta_t, `fixedlarge`). `None`, the default, is the reference's choice for
    the process, `process.ancestral_variance`: "large" on DDPM (the DDPM
    code's CIFAR-10 runs use `fixedlarge`) and on the VP SDE (the score SDE
    code's `AncestralSamplingPredictor` adds sqrt(beta) noise), "small" on
    the VE SDE and NCSN (its VE update adds the posterior variance). Ho et
    al. report the two alike in sample quality.

    `clip_x0` clips the predicted x_0 = (x_t + sigma_t^2 score) / alpha_t to
    [-1, 1] and takes the mean of q(x_s | x_t, x_0) at it, as the DDPM code's
    `p_sample(clip_denoised=True)` (its default) and diffusers' `clip_sample`
    do; off by default here, since data need not lie in [-1, 1].
    """

    variance: str | None = None
    clip_x0: bool = False
    nfe: ClassVar[int] = 1

    def __post_init__(self):
        if self.variance is not None and self.variance not in VARIANCES:
            raise ValueError(
                f"unknown ancestral variance {self.variance!r}; valid: {', '.join(VARIANCES)}, "
                "or None for the reference's choice for the process"
            )

    def __call__(self, key, score_fn, process, x, t, s, noise=None):
        alpha_s, sigma_s = process.alpha_sigma(s)
        alpha_t, sigma_t = process.alpha_sigma(t)
        a, var = transition(alpha_s, sigma_s, alpha_t, sigma_t)
        if self.clip_x0:
            x0 = clip_x0((x + sigma_t**2 * score_fn(x, t)) / alpha_t)
            mean = (alpha_s * var * x0 + a * sigma_s**2 * x) / sigma_t**2
        else:
            mean = (x + var * score_fn(x, t)) / a
        variance = process.ancestral_variance if self.variance is None else self.variance
        std = jnp.sqrt(var * sigma_s**2 / sigma_t**2 if variance == "small" else var)
        return mean + std * _normal(key, x, noise)


@dataclasses.dataclass(frozen=True)
class DDIM:
    """One DDIM step (Song, Meng and Ermon 2021, eq. 12) from t to s.

    x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z with
    c = eta sqrt(sigma_s^2 / sigma_t^2 (sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2)):
    eta = 0 is deterministic, eta = 1 is ancestral sampling with the small
    variance. This is the DDIM code's `generalized_steps` update. `clip_x0`
    clips x0_hat to [-1, 1] and keeps the network's eps_hat, as diffusers'
    `DDIMScheduler(clip_sample=True)` does by default; the DDIM code does not
    clip.
    """

    eta: float = 0.0
    clip_x0: bool = False
    nfe: ClassVar[int] = 1

    def __post_init__(self):
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"DDIM eta must be in [0, 1], got eta={self.eta}")

    def __call__(self, key, score_fn, process, x, t, s, noise=None):
        alpha_s, sigma_s = process.alpha_sigma(s)
        alpha_t, sigma_t = process.alpha_sigma(t)
        eps = -sigma_t * score_fn(x, t)
        x0 = (x - sigma_t * eps) / alpha_t
        if self.clip_x0:
            x0 = clip_x0(x0)
        _, var = transition(alpha_s, sigma_s, alpha_t, sigma_t)
        c = self.eta * jnp.sqrt(var * sigma_s**2 / sigma_t**2)
        x_s = alpha_s * x0 + jnp.sqrt(jnp.maximum(sigma_s**2 - c**2, 0.0)) * eps
        if self.eta == 0.0:
            return x_s
        return x_s + c * _normal(key, x, noise)
