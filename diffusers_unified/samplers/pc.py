"""Predictor-corrector sampling (Song et al. 2021) and the samplers built from it.

A predictor moves x from time t to the next grid time s < t; a corrector runs
MCMC at a fixed t. DDPM ancestral sampling is "ancestral predictor, no
corrector", DDIM is "DDIM predictor, no corrector", and annealed Langevin
dynamics (NCSN) is "no predictor, annealed Langevin corrector".

The predictors (`samplers.predictors`) and correctors
(`samplers.correctors`) are re-exported here. The reference codes: the score
SDE code (`sampling.py`: its predictors, correctors and `get_pc_sampler`),
the DDPM code (`diffusion_utils_2.py`: `p_sample_loop`), the DDIM code
(`functions/denoising.py`: `generalized_steps`) and the NCSN code
(`runners/anneal_runner.py`: `anneal_Langevin_dynamics`). Each function says
where it departs from them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusers_unified.processes import Process
from diffusers_unified.samplers.common import (
    SamplerOutput,
    as_arrays,
    grid_values,
    jitted_sampler,
    nfe_count,
    resolve_grid,
    scan_with_noise,
    tweedie_denoise,
)
from diffusers_unified.samplers.correctors import (
    MAX_ANNEALED_SNR,
    AnnealedLangevin,
    Langevin,
    NoCorrector,
    langevin_noise,
)
from diffusers_unified.samplers.predictors import (
    DDIM,
    VARIANCES,
    Ancestral,
    EulerMaruyama,
    NoPredictor,
    ReverseDiffusion,
    clip_x0,
)
from diffusers_unified.typing import Array, PRNGKey, ScoreFn

__all__ = [
    "DDIM",
    "MAX_ANNEALED_SNR",
    "NCSN_STEP_SIZE",
    "VARIANCES",
    "Ancestral",
    "AnnealedLangevin",
    "EulerMaruyama",
    "Langevin",
    "NoCorrector",
    "NoPredictor",
    "ReverseDiffusion",
    "ancestral",
    "annealed_langevin",
    "ddim",
    "predictor_corrector",
    "sampler_noise",
]

# -- samplers -----------------------------------------------------------------


def _step_keys(key_loop: PRNGKey, i) -> Array:
    """The (corrector, predictor) keys of the step from grid point i to i + 1."""
    return jax.random.split(jax.random.fold_in(key_loop, i))


def sampler_noise(key: PRNGKey, shape: tuple[int, ...], num_points: int) -> Array:
    """The standard-normal draws `predictor_corrector` makes for `key` when `noise` is None.

    Returns shape `(num_points + 1, *shape)`: entry 0 is the prior's draw,
    entry i >= 1 the predictor's draw for the step from grid point i - 1 to i
    (the last entry belongs to the final step to clean data and is unused).
    These are the numbers the sampler draws (in blocks of steps, each step's
    from its own key), so for a predictor-only sampler `noise=
    sampler_noise(key, shape, len(grid))` reproduces `noise=None`; a corrector
    draws its own noise from `key` either way.
    """
    key_prior, key_loop = jax.random.split(key)
    prior = jax.random.normal(key_prior, shape)
    steps = jax.vmap(lambda i: jax.random.normal(_step_keys(key_loop, i)[1], shape))
    return jnp.concatenate([prior[None], steps(jnp.arange(num_points))])


def _plan(part, process: Process, values) -> tuple[bool, object]:
    """Whether a predictor or corrector plans (see `samplers.predictors`), and its plan.

    A planning part's coefficients on the grid come as arrays of the default
    float type; one written elsewhere, with only `__call__`, is called step
    by step.
    """
    plans = callable(getattr(part, "plan", None)) and callable(getattr(part, "step", None))
    return plans, (as_arrays(part.plan(process, values)) if plans else None)


@jitted_sampler
def predictor_corrector(
    key: PRNGKey,
    score_fn: ScoreFn,
    process: Process,
    shape: tuple[int, ...],
    *,
    predictor=ReverseDiffusion(),  # noqa: B008 (frozen dataclasses: immutable defaults)
    corrector=Langevin(),  # noqa: B008
    num_steps: int | None = None,
    grid=None,
    denoise: bool = True,
    noise=None,
    project=None,
) -> SamplerOutput:
    """The predictor-corrector sampler (Song et al. 2021, Alg. 1; the score SDE code's
    `get_pc_sampler`).

    Starts from the prior at T; at each grid time t_i runs the corrector, then
    the predictor to t_{i+1}; at the last grid time (t_min) runs the corrector,
    then, if `denoise`, the final Tweedie denoising step to clean data (one
    more score evaluation). The grid is `process.sampling_grid(num_steps)`
    (num_steps = process.N by default) unless `grid` is given. Defaults are
    the paper's for VE: reverse diffusion + Langevin (snr 0.16, one step).
    NFE = (n - 1) predictor.nfe + n corrector.nfe + denoise for n grid points.

    Where it departs from the reference: the reference also runs the
    predictor at the last grid time (a step below t_min, dt = -1/N) and, with
    `denoise`, returns that step's mean. Here the last move is the Tweedie
    step E[x_0 | x_t] at t_min, which is what the reference's last
    reverse-diffusion step computes on VE processes (the level below the
    first is clean data), NCSNv2's denoising, and the last step of DDPM's
    and DDIM's samplers; `denoise=False` stops at t_min instead. A predictor
    with `clip_x0` set also clips the denoised output to [-1, 1].

    `noise` (optional, shape `(len(grid) + 1, *shape)`) fixes the sampler's
    standard-normal draws: x_T = process.prior_std * noise[0], and noise[i]
    is the predictor's draw for the step from grid[i - 1] to grid[i] (unused
    where the step adds none; the last entry belongs to the step to clean
    data, which adds none). Without it the sampler draws `sampler_noise(key,
    shape, len(grid))`. Correctors draw their noise from `key`.
    `project` (inpainting, colorization: `samplers.conditioning`) is applied
    to the prior draw, after every predictor step and every corrector step,
    and to the denoised output.

    The loop does only what a step needs: the predictor's and corrector's
    coefficients come from the grid once, before it (`plan`; see
    `samplers.predictors`), and the noise is drawn in blocks of steps
    (`common.scan_with_noise`; all steps at once unless that is more than
    `common.NOISE_BLOCK_BYTES`), each step's draws from that step's own key,
    so the numbers are those of a step-by-step draw.
    """
    ts = resolve_grid(process, num_steps, grid)
    n = len(ts)
    values = grid_values(process, ts)
    key_prior, key_loop = jax.random.split(key)
    if noise is None:
        x = process.prior_sampling(key_prior, shape)
        step_noise = None
    else:
        if noise.shape != (n + 1, *shape):
            raise ValueError(
                f"noise must have shape (len(grid) + 1, *shape) = {(n + 1, *shape)}: the prior's "
                f"draw, then one per step; got {tuple(noise.shape)}"
            )
        x = process.prior_std * noise[0]
        step_noise = noise[1:n]
    times = as_arrays(values.t)
    predictor_plans, predictor_plan = _plan(predictor, process, values)
    corrector_plans, corrector_plan = _plan(corrector, process, values)
    # Correctors without a `project` argument (user-written ones) still work unconditioned.
    with_project = {} if project is None else {"project": project}
    if project is not None:
        x = project(jax.random.fold_in(key_prior, 1), x, times[0])

    def run_corrector(key_c, x, t, c, z):
        if corrector_plans:
            return corrector.step(c, score_fn, x, t, z, key_c, project)
        return corrector(key_c, score_fn, process, x, t, **with_project)

    def run_predictor(key_p, x, t, s, c, z):
        if predictor_plans:
            return predictor.step(c, score_fn, x, t, z)
        return predictor(key_p, score_fn, process, x, t, s, **({} if z is None else {"noise": z}))

    def step(x, inputs):
        (i, t, s, c_pred, c_corr, given), (z_pred, z_corr) = inputs
        key_i = jax.random.fold_in(key_loop, i)
        key_c, key_p = jax.random.split(key_i)  # as `_step_keys`, which sampler_noise uses
        x = run_corrector(key_c, x, t, c_corr, z_corr)
        x = run_predictor(key_p, x, t, s, c_pred, z_pred if given is None else given)
        if project is not None:
            x = project(jax.random.fold_in(key_i, 1), x, s)
        return x, None

    # What each step draws: the predictor's noise (unless given, or it adds none) and the
    # corrector's, if it plans (one that does not draws its own from its key).
    predictor_draws = noise is None and getattr(predictor, "adds_noise", True)
    corrector_draws = corrector.noise_steps if corrector_plans else 0

    def draw(i):
        key_c, key_p = _step_keys(key_loop, i)
        z_pred = jax.random.normal(key_p, shape) if predictor_draws else None
        z_corr = langevin_noise(key_c, shape, corrector_draws) if corrector_draws else None
        return z_pred, z_corr

    if n > 1:
        c_corr = jax.tree.map(lambda a: a[:-1], corrector_plan)
        xs = (jnp.arange(n - 1), times[:-1], times[1:], predictor_plan, c_corr, step_noise)
        itemsize = jnp.dtype(jnp.result_type(float)).itemsize
        per_step = (predictor_draws + corrector_draws) * math.prod(shape) * itemsize
        x = scan_with_noise(step, x, xs, draw, n - 1, per_step)
    key_last = jax.random.fold_in(key_loop, n - 1)
    c_last = jax.tree.map(lambda a: a[-1], corrector_plan)
    z_last = langevin_noise(key_last, shape, corrector_draws) if corrector_draws else None
    x = run_corrector(key_last, x, times[-1], c_last, z_last)
    if denoise:
        x = tweedie_denoise(score_fn, process, x, times[-1])
        if getattr(predictor, "clip_x0", False):
            x = clip_x0(x)
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
    variance: str | None = None,
    clip_x0: bool = False,
    noise=None,
    project=None,
) -> SamplerOutput:
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2): ancestral predictor, no corrector.

    On DDPM's own grid (num_steps = N = 1000 by default) this is Algorithm 2
    and the DDPM code's `p_sample_loop` step for step, its last step (to x_0,
    without noise) being the final Tweedie step; NFE = num_steps. On the VP
    and VE SDEs it is the score SDE code's ancestral sampler (its
    `AncestralSamplingPredictor` with no corrector). `variance`: "small"
    (beta-tilde), "large" (beta), or None for the reference's choice for the
    process (see `Ancestral`: "large" for DDPM and the VP SDE). `clip_x0`:
    clip the predicted x_0 to [-1, 1] at every step and at the end, as the
    DDPM code does by default (off here). `noise` fixes the draws (see
    `predictor_corrector`; noise[0] is the prior's, noise[i] the step's into
    grid[i]). `project`: see `predictor_corrector`.
    """
    return predictor_corrector(
        key,
        score_fn,
        process,
        shape,
        predictor=Ancestral(variance, clip_x0),
        corrector=NoCorrector(),
        num_steps=num_steps,
        grid=grid,
        denoise=True,
        noise=noise,
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
    clip_x0: bool = False,
    noise=None,
    project=None,
) -> SamplerOutput:
    """DDIM (Song, Meng and Ermon 2021) with stochasticity eta in [0, 1].

    Runs on `num_steps` evenly spaced levels of the process's grid, first and
    last included (100 by default; DDIM reports 10 ... 1000), or on any
    decreasing `grid` of times; the last step lands on x0_hat, as DDIM's
    does. The DDIM code's "uniform" skip instead uses levels 0, k, 2k, ...
    (never the last level, N - 1): on DDPM, `grid=process.times[::k][::-1]`
    follows it. NFE = number of grid points. `clip_x0` clips x0_hat to
    [-1, 1] (diffusers' `clip_sample`; see `DDIM`). `noise` fixes the draws
    (see `predictor_corrector`; only used when eta > 0). `project`: see
    `predictor_corrector`.
    """
    return predictor_corrector(
        key,
        score_fn,
        process,
        shape,
        predictor=DDIM(eta, clip_x0),
        corrector=NoCorrector(),
        num_steps=num_steps,
        grid=grid,
        denoise=True,
        noise=noise,
        project=project,
    )


# NCSN's step_lr = 2e-5 of `anneal_Langevin_dynamics` (x + step_lr a score +
# sqrt(2 step_lr a) z with a = sigma_i^2 / sigma_L^2) is epsilon = 4e-5 in
# the paper's Alg. 1 (x + eps_i / 2 score + sqrt(eps_i) z).
NCSN_STEP_SIZE = 4e-5


def annealed_langevin(
    key: PRNGKey,
    score_fn: ScoreFn,
    process: Process,
    shape: tuple[int, ...],
    *,
    step_size: float = NCSN_STEP_SIZE,
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
    step x + sigma_L^2 score (Song and Ermon 2020; NCSN's code returns the
    last Langevin iterate, `denoise=False`). Defaults: T = 100 over the
    process's N levels, as in the NCSN paper, and step_size (its epsilon)
    4e-5, the value behind the paper's results: the NCSN code's
    `anneal_Langevin_dynamics` writes the update as x + h score +
    sqrt(2 h) z with h = step_lr sigma_i^2 / sigma_L^2 and samples with
    step_lr = 2e-5, which is epsilon = 2 step_lr = 4e-5; the paper's text
    quotes the code's 2e-5 as epsilon (half that step). step_size must be
    below 2 sigma_L^2: the step at level i is h_i = step_size sigma_i^2 /
    (2 sigma_L^2) in the code's form, and across data concentrated below the
    noise levels (images) log p has curvature 1 / sigma_i^2, so h_i times it
    is step_size / (2 sigma_L^2) at every level. From 1 on (step_size = 2
    sigma_L^2) each step overshoots the mode and the chain's variance is at
    least twice the target's; from 2 on it diverges (measured on data of
    std 0.001 with NCSN's levels: finite at 3.9 sigma_L^2 with 5x the target
    std, NaN at 4.1). A larger value is rejected with a ValueError.

    Alg. 1's step rule is stated for noise levels of x + sigma z, so this
    sampler is defined for variance-exploding processes only (NCSN, VESDE).
    NCSNv2's CIFAR-10 choice, eps = 6.2e-6 in its x + eps_i score + sqrt(2 eps_i)
    z, is step_size 1.24e-5 here, with T = 5, sigma_max = 50 and L = 232 on the
    process (`noise_scales` converts). Departure: the start is the prior
    N(0, sigma_max^2 I) (the score SDE code's), where the NCSN code starts from
    uniform noise on [0, 1]. `project` after every Langevin step is the
    inpainting algorithm of Song and Ermon (2019), with a fresh noisy copy of
    the known data per step rather than one per level.
    """
    ts = resolve_grid(process, num_steps, grid)
    values = grid_values(process, ts)
    alphas, sigmas = values.alpha, values.sigma
    if not np.allclose(alphas, 1.0):
        raise ValueError(
            f"annealed_langevin is defined for variance-exploding processes (alpha(t) = 1: "
            f"NCSN, VESDE), not {type(process).__name__}; for it, use predictor_corrector "
            f"with corrector=AnnealedLangevin(...)"
        )
    sigma_last = float(sigmas[-1])
    if not 0.0 < step_size < 2.0 * sigma_last**2:
        raise ValueError(
            f"annealed_langevin step_size={step_size} must be in (0, 2 sigma_L^2 = "
            f"{2.0 * sigma_last**2:.3g}) for the smallest noise level sigma_L = {sigma_last:.4g} "
            f"(step_size / sigma_L^2 = {step_size / sigma_last**2:.3g}): on data concentrated "
            "below the noise levels (images) larger steps overshoot the mode at every level, "
            "and from 4 sigma_L^2 on the samples diverge to NaN"
        )
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
