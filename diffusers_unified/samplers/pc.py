"""Predictor-corrector sampling (Song et al. 2021) and the samplers built from it.

A predictor moves x from time t to the next grid time s < t; a corrector runs
MCMC at a fixed t. DDPM ancestral sampling is "ancestral predictor, no
corrector", DDIM is "DDIM predictor, no corrector", and annealed Langevin
dynamics (NCSN) is "no predictor, annealed Langevin corrector".

Predictors are called as `predictor(key, score_fn, process, x, t, s) -> x`
and correctors as `corrector(key, score_fn, process, x, t, project=None) ->
x`, with scalar times; each declares `nfe`, its number of score evaluations
per call. A corrector given a projection (`samplers.conditioning`) applies it
after each of its MCMC steps. They are frozen dataclasses, so that they can
be static arguments of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from diffusers_unified.processes import Process, batch_broadcast, reverse_sde, transition
from diffusers_unified.samplers.common import (
    SamplerOutput,
    jitted_sampler,
    nfe_count,
    resolve_grid,
    tweedie_denoise,
)
from diffusers_unified.typing import Array, PRNGKey, ScoreFn

# -- predictors ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NoPredictor:
    """Leaves x unchanged (annealed Langevin dynamics moves between levels this way)."""

    nfe: ClassVar[int] = 0

    def __call__(self, key, score_fn, process, x, t, s):
        return x


@dataclasses.dataclass(frozen=True)
class EulerMaruyama:
    """One Euler-Maruyama step of the reverse SDE from t to s (Song et al. 2021, eq. 6).

    With `probability_flow`, one Euler step of the probability-flow ODE (eq. 13)
    instead, as the score SDE code's predictors allow: with a corrector, an
    ODE predictor whose marginals Langevin steps correct.
    """

    probability_flow: bool = False
    nfe: ClassVar[int] = 1

    def __call__(self, key, score_fn, process, x, t, s):
        drift, diffusion = reverse_sde(process, score_fn, self.probability_flow)(x, t)
        dt = s - t
        z = jax.random.normal(key, x.shape)
        return x + drift * dt + batch_broadcast(diffusion, x) * jnp.sqrt(-dt) * z


@dataclasses.dataclass(frozen=True)
class ReverseDiffusion:
    """The reverse-diffusion predictor (Song et al. 2021, eq. 46).

    With the forward step x_t = x_s + f + G z (f = (a - 1) x, G^2 = var, see
    `processes.transition`), it steps x_s = x_t - f + G^2 score + G z.
    """

    nfe: ClassVar[int] = 1

    def __call__(self, key, score_fn, process, x, t, s):
        a, var = transition(*process.alpha_sigma(s), *process.alpha_sigma(t))
        z = jax.random.normal(key, x.shape)
        x_mean = (2.0 - a) * x + var * score_fn(x, t)
        return x_mean + jnp.sqrt(var) * z


VARIANCES = ("small", "large")


@dataclasses.dataclass(frozen=True)
class Ancestral:
    """Ancestral sampling from p(x_s | x_t) (Ho et al. 2020, Alg. 2, in score form).

    Mean (x_t + var score) / a, which is DDPM's 1/sqrt(alpha_t) (x_t - beta_t /
    sqrt(1 - alphabar_t) eps); for VE processes it is the score SDE code's
    SMLD ancestral step. Variance `"small"` is the posterior variance
    var sigma_s^2 / sigma_t^2 (DDPM's beta-tilde), `"large"` is var (DDPM's
    beta_t).
    """

    variance: str = "small"
    nfe: ClassVar[int] = 1

    def __post_init__(self):
        if self.variance not in VARIANCES:
            raise ValueError(
                f"unknown ancestral variance {self.variance!r}; valid: {', '.join(VARIANCES)}"
            )

    def __call__(self, key, score_fn, process, x, t, s):
        alpha_s, sigma_s = process.alpha_sigma(s)
        alpha_t, sigma_t = process.alpha_sigma(t)
        a, var = transition(alpha_s, sigma_s, alpha_t, sigma_t)
        mean = (x + var * score_fn(x, t)) / a
        std = jnp.sqrt(var * sigma_s**2 / sigma_t**2 if self.variance == "small" else var)
        return mean + std * jax.random.normal(key, x.shape)


@dataclasses.dataclass(frozen=True)
class DDIM:
    """One DDIM step (Song, Meng and Ermon 2021, eq. 12) from t to s.

    x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z with
    c = eta sqrt(sigma_s^2 / sigma_t^2 (sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2)):
    eta = 0 is deterministic, eta = 1 is ancestral sampling with the small variance.
    """

    eta: float = 0.0
    nfe: ClassVar[int] = 1

    def __post_init__(self):
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"DDIM eta must be in [0, 1], got eta={self.eta}")

    def __call__(self, key, score_fn, process, x, t, s):
        alpha_s, sigma_s = process.alpha_sigma(s)
        alpha_t, sigma_t = process.alpha_sigma(t)
        eps = -sigma_t * score_fn(x, t)
        x0 = (x - sigma_t * eps) / alpha_t
        _, var = transition(alpha_s, sigma_s, alpha_t, sigma_t)
        c = self.eta * jnp.sqrt(var * sigma_s**2 / sigma_t**2)
        x_s = alpha_s * x0 + jnp.sqrt(jnp.maximum(sigma_s**2 - c**2, 0.0)) * eps
        if self.eta == 0.0:
            return x_s
        return x_s + c * jax.random.normal(key, x.shape)


# -- correctors ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NoCorrector:
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
    """Langevin MCMC with a signal-to-noise ratio (Song et al. 2021, Alg. 4).

    h = 2 alpha_i (snr ||z|| / ||score||)^2, with the norms per example and
    averaged over the batch as in the reference code (so the step size is
    shared by the batch). Defaults: snr 0.16, one step (the paper's CIFAR-10 VE).
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


@dataclasses.dataclass(frozen=True)
class AnnealedLangevin:
    """Langevin MCMC with the step size set by the noise level: h = 2 alpha_i (snr sigma(t))^2.

    This is the score SDE code's "ald" corrector. Annealed Langevin dynamics of
    NCSN (Song and Ermon 2019, Alg. 1), whose update is x + eps_i / 2 score +
    sqrt(eps_i) z with eps_i = eps sigma_i^2 / sigma_L^2, is this corrector
    with snr = sqrt(eps) / (2 sigma_L) on a VE process (see `annealed_langevin`).
    """

    snr: float = 0.16
    n_steps: int = 1

    @property
    def nfe(self) -> int:
        return self.n_steps

    def __call__(self, key, score_fn, process, x, t, project=None):
        _, sigma = process.alpha_sigma(t)
        h = 2.0 * _alpha_factor(process, t) * (self.snr * sigma) ** 2
        return _langevin(key, score_fn, x, t, self.n_steps, lambda grad, z: h, project)


# -- samplers -----------------------------------------------------------------


@jitted_sampler
def predictor_corrector(
    key: PRNGKey,
    score_fn: ScoreFn,
    process: Process,
    shape: tuple[int, ...],
    *,
    predictor=ReverseDiffusion(),
    corrector=Langevin(),
    num_steps: int | None = None,
    grid=None,
    denoise: bool = True,
    project=None,
) -> SamplerOutput:
    """The predictor-corrector sampler (Song et al. 2021, Alg. 1).

    Starts from the prior at T; at each grid time t_i runs the corrector, then
    the predictor to t_{i+1}; at the last grid time (t_min) runs the corrector,
    then, if `denoise`, the final Tweedie denoising step to clean data (one
    more score evaluation). The grid is `process.sampling_grid(num_steps)`
    (num_steps = process.N by default) unless `grid` is given. Defaults are
    the paper's for VE: reverse diffusion + Langevin (snr 0.16, one step).
    NFE = (n - 1) predictor.nfe + n corrector.nfe + denoise for n grid points.
    `project` (inpainting, colorization: `samplers.conditioning`) is applied
    to the prior draw, after every predictor step and every corrector step,
    and to the denoised output.
    """
    ts = resolve_grid(process, num_steps, grid)
    n = len(ts)
    key_prior, key_loop = jax.random.split(key)
    x = process.prior_sampling(key_prior, shape)
    times = jnp.asarray(ts, jnp.float32)
    # Correctors without a `project` argument (user-written ones) still work unconditioned.
    with_project = {} if project is None else {"project": project}
    if project is not None:
        x = project(jax.random.fold_in(key_prior, 1), x, times[0])

    def step(x, inputs):
        i, t, s = inputs
        key_i = jax.random.fold_in(key_loop, i)
        key_c, key_p = jax.random.split(key_i)
        x = corrector(key_c, score_fn, process, x, t, **with_project)
        x = predictor(key_p, score_fn, process, x, t, s)
        if project is not None:
            x = project(jax.random.fold_in(key_i, 1), x, s)
        return x, None

    x, _ = jax.lax.scan(step, x, (jnp.arange(n - 1), times[:-1], times[1:]))
    key_last = jax.random.fold_in(key_loop, n - 1)
    x = corrector(key_last, score_fn, process, x, times[-1], **with_project)
    if denoise:
        x = tweedie_denoise(score_fn, process, x, times[-1])
        if project is not None:
            x = project.clean(x)
    return SamplerOutput(x, nfe_count((n - 1) * predictor.nfe + n * corrector.nfe + denoise))


def ancestral(
    key: PRNGKey,
    score_fn: ScoreFn,
    process: Process,
    shape: tuple[int, ...],
    *,
    num_steps: int | None = None,
    grid=None,
    variance: str = "small",
    project=None,
) -> SamplerOutput:
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2): ancestral predictor, no corrector.

    On DDPM's own grid (num_steps = N = 1000 by default) this is Algorithm 2
    step for step, its last step (to x_0, without noise) being the final
    Tweedie step; NFE = num_steps. On other processes it is the ancestral
    sampler of the score SDE code. `variance` "small" is beta-tilde, "large"
    is beta. `project`: see `predictor_corrector`.
    """
    return predictor_corrector(
        key,
        score_fn,
        process,
        shape,
        predictor=Ancestral(variance),
        corrector=NoCorrector(),
        num_steps=num_steps,
        grid=grid,
        denoise=True,
        project=project,
    )


def ddim(
    key: PRNGKey,
    score_fn: ScoreFn,
    process: Process,
    shape: tuple[int, ...],
    *,
    num_steps: int | None = 100,
    grid=None,
    eta: float = 0.0,
    project=None,
) -> SamplerOutput:
    """DDIM (Song, Meng and Ermon 2021) with stochasticity eta in [0, 1].

    Runs on `num_steps` evenly spaced levels of the process's grid, first and
    last included (100 by default; DDIM reports 10 ... 1000), or on any
    decreasing `grid` of times (a sub-grid of a discrete process's `times`, for
    example); the last step lands on x0_hat, as DDIM's does. NFE = number of
    grid points. `project`: see `predictor_corrector`.
    """
    return predictor_corrector(
        key,
        score_fn,
        process,
        shape,
        predictor=DDIM(eta),
        corrector=NoCorrector(),
        num_steps=num_steps,
        grid=grid,
        denoise=True,
        project=project,
    )


def annealed_langevin(
    key: PRNGKey,
    score_fn: ScoreFn,
    process: Process,
    shape: tuple[int, ...],
    *,
    step_size: float = 2e-5,
    n_steps_each: int = 100,
    num_steps: int | None = None,
    grid=None,
    denoise: bool = True,
    project=None,
) -> SamplerOutput:
    """Annealed Langevin dynamics (Song and Ermon 2019, Alg. 1), with NCSNv2's final denoising.

    For each noise level sigma_i, from the largest, runs `n_steps_each` (T)
    steps of x <- x + alpha_i / 2 score + sqrt(alpha_i) z with
    alpha_i = step_size sigma_i^2 / sigma_L^2; then, if `denoise`, the Tweedie
    step x + sigma_L^2 score (Song and Ermon 2020). Defaults are the NCSN
    paper's: step_size (epsilon) 2e-5, T = 100, over the process's N levels.
    Alg. 1's step rule is stated for noise levels of x + sigma z, so this
    sampler is defined for variance-exploding processes only (NCSN, VESDE).
    NCSNv2's CIFAR-10 choice, eps = 6.2e-6 in its x + eps_i score + sqrt(2 eps_i)
    z, is step_size 1.24e-5 here, with T = 5, sigma_max = 50 and L = 232 on the
    process (`noise_scales` converts). The NCSN reference code writes the same update
    as x + h score + sqrt(2 h) z with h = step_lr sigma_i^2 / sigma_L^2, so its
    step_lr is step_size / 2 here. `project` after every Langevin step is
    the inpainting algorithm of Song and Ermon (2019), with a fresh noisy copy
    of the known data per step rather than one per level.
    """
    ts = resolve_grid(process, num_steps, grid)
    with jax.ensure_compile_time_eval():  # concrete even when traced inside a caller's jit
        alphas, sigmas = (np.asarray(a) for a in process.alpha_sigma(jnp.asarray(ts)))
    if not np.allclose(alphas, 1.0):
        raise ValueError(
            f"annealed_langevin is defined for variance-exploding processes (alpha(t) = 1: "
            f"NCSN, VESDE), not {type(process).__name__}; for it, use predictor_corrector "
            f"with corrector=AnnealedLangevin(...)"
        )
    sigma_last = float(sigmas[-1])
    corrector = AnnealedLangevin(
        snr=math.sqrt(step_size) / (2.0 * sigma_last), n_steps=n_steps_each
    )
    return predictor_corrector(
        key,
        score_fn,
        process,
        shape,
        predictor=NoPredictor(),
        corrector=corrector,
        grid=tuple(ts),
        denoise=denoise,
        project=project,
    )
