"""Few-step samplers: DPM-Solver++(2M), EDM's Heun sampler and EDM's stochastic sampler.

(Over 400 lines because the three share one piece of machinery, the sigma_hat
and log-SNR coordinates, grids and levels below; split, it would be scattered.)

Both integrate the probability-flow ODE in the coordinates in which it is
simplest. With x_t = alpha x_0 + sigma eps, the rescaled y = x / alpha obeys

    dy / d sigma_hat = (y - D(y, sigma_hat)) / sigma_hat,    sigma_hat = sigma / alpha,

with the denoiser D = E[x_0 | x_t] = (x + sigma^2 score(x, t)) / alpha
(Tweedie): the VE ODE in sigma_hat for every process (Karras et al. 2022,
sec. 2-3). So both samplers need only `process.alpha_sigma` and the score
function, and run on VP, sub-VP, VE, DDPM and NCSN processes alike. Their
grids are placed in sigma_hat, or equivalently in the log-SNR
lambda = log(alpha / sigma) = -log sigma_hat, and mapped back to times by
`times_at_log_snr`, once, when the sampler is traced.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusers_unified import schedules
from diffusers_unified.processes import Process
from diffusers_unified.samplers.common import (
    SamplerOutput,
    jitted_sampler,
    nfe_count,
    resolve_grid,
    scan_with_noise,
)
from diffusers_unified.typing import PRNGKey, ScoreFn

SPACINGS = ("logsnr", "process")
DPM_SOLVER_STEPS = 20  # grid points when num_steps is None: DPM-Solver's default 20 NFE
EDM_STEPS = 18  # EDM's N for CIFAR-10 (35 NFE)
EDM_SCALINGS = ("none", "vp")
# DPM-Solver's reference code takes the last step at first order for short runs
# (its docstring and earlier versions: fewer than 15 steps; its current code: 10).
LOWER_ORDER_FINAL_BELOW = 15


def _concrete_alpha_sigma(process: Process, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, sigma) at the times `ts`, as float64 NumPy, computed in the default float type.

    Samplers hand these times to the score function in the default float type
    (float32, or float64 under `jax.enable_x64`), so the solver coefficients
    use the very (alpha, sigma) the score function sees.
    """
    with jax.ensure_compile_time_eval():  # concrete even inside a caller's trace
        alpha, sigma = _alpha_sigma(process, jnp.asarray(ts, jnp.result_type(float)))
        return np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)


# One compiled call per process and grid size (processes are static pytrees):
# evaluated op by op, a process's alpha_sigma costs seconds of tiny compilations.
_alpha_sigma = jax.jit(lambda process, t: process.alpha_sigma(t))


def _grid_alpha_sigma(process: Process, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    alpha, sigma = _concrete_alpha_sigma(process, ts)
    if not np.all(sigma > 0):
        raise ValueError(
            f"every grid time needs sigma(t) > 0 (a finite log-SNR); {type(process).__name__} "
            f"has sigma = 0 at t = {ts[np.argmin(sigma)]}"
        )
    return alpha, sigma


def log_snr(process: Process, ts) -> np.ndarray:
    """lambda(t) = log(alpha(t) / sigma(t)) at the times `ts` (float64 NumPy)."""
    alpha, sigma = _concrete_alpha_sigma(process, np.asarray(ts, np.float64))
    return np.log(alpha) - np.log(sigma)


def times_at_log_snr(process: Process, lambdas, table_size: int = 1 << 16) -> np.ndarray:
    """The times t in [t_min, T] with lambda(t) = `lambdas` (float64 NumPy).

    lambda(t) decreases strictly for every process of this package, so it is
    inverted by interpolating one table of lambda on `table_size` evenly
    spaced times (relative error about 1e-8; the samplers then use the exact
    (alpha, sigma) of the times found). Values outside [lambda(T),
    lambda(t_min)] map to the nearer end.
    """
    t = np.linspace(process.t_min, process.T, table_size)
    return np.interp(-np.asarray(lambdas, np.float64), -log_snr(process, t), t)


def _dpm_grid(process: Process, num_steps: int | None, grid, spacing: str) -> np.ndarray:
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    if grid is not None or spacing == "process":
        ts = resolve_grid(process, num_steps, grid)
    else:
        num_steps = DPM_SOLVER_STEPS if num_steps is None else num_steps
        if num_steps < 2:
            raise ValueError(f"dpm_solver needs num_steps >= 2, got {num_steps}")
        lam = log_snr(process, [process.T, process.t_min])
        ts = times_at_log_snr(process, np.linspace(lam[0], lam[1], num_steps))
        ts[0], ts[-1] = process.T, process.t_min
    if len(ts) < 2:
        raise ValueError(f"dpm_solver needs at least 2 grid points, got {len(ts)}")
    return ts


@jitted_sampler
def dpm_solver(
    key: PRNGKey,
    score_fn: ScoreFn,
    process: Process,
    shape: tuple[int, ...],
    *,
    num_steps: int | None = 20,
    spacing: str = "logsnr",
    grid=None,
    lower_order_final: bool = True,
    denoise: bool = True,
    project=None,
) -> SamplerOutput:
    """DPM-Solver++(2M), the multistep second-order data-prediction solver (Lu et al. 2022).

    On grid times t_0 = T > ... > t_M = t_min with log-SNRs lambda_i and the
    data prediction D_i = (x_i + sigma_i^2 score(x_i, t_i)) / alpha_i, each
    step is the exact solution of the probability-flow ODE in lambda with D
    extrapolated linearly from the last two grid points (Lu et al. 2022b,
    Alg. 2):

        x_{i+1} = sigma_{i+1} / sigma_i x_i
                  + alpha_{i+1} (1 - e^{-h}) (D_i + (D_i - D_{i-1}) h / (2 h_prev)),

    h = lambda_{i+1} - lambda_i. The first step is first order (DDIM); with
    `lower_order_final`, so is the last one when the run has fewer than 15
    steps, as in the reference code (it stabilises very short runs).

    Grid: `num_steps` points (default 20; also when None) uniform in lambda
    between T and process.t_min ("logsnr", the paper's choice for
    low-dimensional data),
    or the process's own grid ("process": uniform in time; the chosen levels
    of DDPM or NCSN), or an explicit decreasing `grid` of times. Then, if
    `denoise`, the Tweedie step x_0 = D(x_M) (the reference code's
    `denoise_to_zero`, off there by default). NFE = num_steps - 1 + denoise:
    one score evaluation per step, none after the last step.

    `project` (inpainting, colorization: `samplers.conditioning`) is applied
    to the prior draw, after every step and to the denoised output.
    """
    ts = _dpm_grid(process, num_steps, grid, spacing)
    alpha, sigma = _grid_alpha_sigma(process, ts)
    lam = np.log(alpha) - np.log(sigma)
    h = np.diff(lam)
    m = len(h)  # steps
    # Weight of (D_i - D_{i-1}): 1 / (2 r) with r = h_{i-1} / h_i; 0 for first-order steps.
    c = np.zeros(m)
    c[1:] = h[1:] / (2.0 * h[:-1])
    if lower_order_final and m < LOWER_ORDER_FINAL_BELOW:
        c[-1] = 0.0
    dtype = jnp.result_type(float)
    as_array = lambda a: jnp.asarray(a, dtype)
    xs = tuple(
        as_array(a)
        for a in (
            ts[:-1],
            alpha[:-1],
            sigma[:-1],
            sigma[1:] / sigma[:-1],
            -alpha[1:] * np.expm1(-h),
            c,
        )
    )

    def data_prediction(x, t, a, s):
        return (x + s**2 * score_fn(x, t)) / a

    key_project = jax.random.fold_in(key, 1)

    def step(carry, inputs):
        x, d_prev = carry
        i, t, a, s, ratio, phi, c, t_next = inputs
        d = data_prediction(x, t, a, s)
        x = ratio * x + phi * (d + c * (d - d_prev))
        if project is not None:
            x = project(jax.random.fold_in(key_project, i), x, t_next)
        return (x, d), None

    x = process.prior_sampling(key, shape)
    if project is not None:
        x = project(jax.random.fold_in(key_project, m), x, as_array(ts[0]))
    xs = (jnp.arange(m), *xs, as_array(ts[1:]))
    (x, _), _ = jax.lax.scan(step, (x, jnp.zeros_like(x)), xs)
    if denoise:
        x = data_prediction(x, as_array(ts[-1]), as_array(alpha[-1]), as_array(sigma[-1]))
        x = x if project is None else project.clean(x)
    return SamplerOutput(x, nfe_count(m + denoise))


def _edm_times(process: Process, num_steps, rho, sigma_min, sigma_max, grid, name: str):
    """EDM's levels as process times (see `edm_heun`): rho-spaced in sigma_hat, or `grid`."""
    if grid is not None:
        return resolve_grid(process, None, grid)
    num_steps = EDM_STEPS if num_steps is None else num_steps
    if num_steps < 2:
        raise ValueError(f"{name} needs num_steps >= 2, got {num_steps}")
    lam = log_snr(process, [process.T, process.t_min])
    lo, hi = max(sigma_min, np.exp(-lam[1])), min(sigma_max, np.exp(-lam[0]))
    if not lo < hi:
        raise ValueError(
            f"{name}: sigma_min={sigma_min}, sigma_max={sigma_max} leave no room inside "
            f"the process's sigma/alpha range [{np.exp(-lam[1]):.4g}, {np.exp(-lam[0]):.4g}]"
        )
    sigmas = schedules.karras_sigmas(num_steps, lo, hi, rho)
    ts = times_at_log_snr(process, -np.log(sigmas))
    ts[0] = process.T if hi == np.exp(-lam[0]) else ts[0]
    ts[-1] = process.t_min if lo == np.exp(-lam[1]) else ts[-1]
    return ts


def _edm_coordinates(sigma_hat: np.ndarray, vp: bool):
    """EDM's scaling s and the time variable tau at each level: (1, sigma_hat), or with the
    variance-preserving scaling (1 / sqrt(1 + sigma_hat^2), log sigma_hat)."""
    if vp:
        return 1.0 / np.sqrt(1.0 + sigma_hat**2), np.log(sigma_hat)
    return np.ones_like(sigma_hat), sigma_hat


def _edm_ode(score_fn: ScoreFn, vp: bool):
    """(slope, denoised) of the ODE in u = s y, y = x / alpha (see `edm_heun`)."""

    def score_y(y, t, a):  # grad log p of y = x / alpha
        return a * score_fn(a * y, t)

    def slope(u, t, a, s_hat, s_i):
        y = u / s_i
        if vp:
            return -(s_hat**2) * s_i * (s_i * u + score_y(y, t, a))
        return -s_hat * score_y(y, t, a)  # (y - D(y)) / sigma_hat

    def denoised(u, t, a, s_hat, s_i):  # D(y) = y + sigma_hat^2 score_y (Tweedie)
        y = u / s_i
        return y + s_hat**2 * score_y(y, t, a)

    return slope, denoised


def _edm_prior(key, process: Process, shape, sigma_hat_0: float, s_0: float):
    """The prior draw at T as u = s y, shrunk to the first level when that lies below T
    (EDM draws y ~ N(0, sigma_0^2 I) there)."""
    alpha_T, sigma_T = _concrete_alpha_sigma(process, np.array([process.T]))
    scale = sigma_hat_0 / (sigma_T[0] / alpha_T[0]) / alpha_T[0]
    return process.prior_sampling(key, shape) * jnp.asarray(scale * s_0, jnp.result_type(float))


@jitted_sampler
def edm_heun(
    key: PRNGKey,
    score_fn: ScoreFn,
    process: Process,
    shape: tuple[int, ...],
    *,
    num_steps: int | None = 18,
    rho: float = 7.0,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    scaling: str = "none",
    grid=None,
    project=None,
) -> SamplerOutput:
    """Heun's second-order method on EDM's sigma spacing (Karras et al. 2022, Alg. 1, no churn).

    The `num_steps` levels (default N = 18, EDM's CIFAR-10 setting; also when
    None) are

        sigma_i = (s_max^(1/rho) + i / (N - 1) (s_min^(1/rho) - s_max^(1/rho)))^rho,

    rho = 7 (EDM eq. 5), with s_max = min(sigma_max, sigma_hat(T)) and
    s_min = max(sigma_min, sigma_hat(t_min)): EDM's 80 and 0.002, clamped to
    the process's range as EDM's generate.py clamps them to a network's (so
    VE SDE: 50 ... 0.01, VP SDE: 80 ... 0.01), and a final sigma_N = 0; an
    explicit decreasing `grid` of times replaces them. Each step from
    sigma_i to sigma_{i+1} is Heun's (Euler, then the trapezoidal
    correction); the last, to sigma = 0, is Euler, which lands exactly on the
    Tweedie denoiser D. NFE = 2 N - 1. `edm_stochastic` is EDM's Alg. 2 on
    the same levels.

    `scaling` picks the ODE that Heun integrates (EDM's Alg. 1 takes any
    sigma(t) and scaling s(t); see the module docstring for y and sigma_hat):

    * "none": EDM's choice, s = 1 and t = sigma_hat, i.e. y in sigma_hat
      (dy / dsigma = (y - D) / sigma): EDM's deterministic sampler for VE
      processes and its rescaled ODE for VP ones;
    * "vp": the variance-preserving scaling u = y / sqrt(1 + sigma_hat^2)
      (EDM's s(t) for VP) with time log sigma_hat, in which
      du / dlog sigma = -sigma^2 s (s u + score_y(y)), s = 1 / sqrt(1 + sigma^2):
      zero for unit-variance Gaussian data, so the steps only carry what the
      data add to that. On the 2-D and 16-D example mixtures it reaches 1.5x
      the sampling noise floor at 19 NFE where "none" needs 29 to 39
      (experiments/sampler_accuracy.py).

    The prior draw at T, as y, is scaled down to std s_max when
    s_max < sigma_hat(T) (EDM draws y ~ N(0, s_max^2 I)). `project`
    (`samplers.conditioning`) acts on x = alpha y: on the first draw, after
    every Heun step and, as `project.clean`, on the output.
    """
    if scaling not in EDM_SCALINGS:
        raise ValueError(f"edm_heun: unknown scaling {scaling!r}; valid: {', '.join(EDM_SCALINGS)}")
    ts = _edm_times(process, num_steps, rho, sigma_min, sigma_max, grid, "edm_heun")
    alpha, sigma = _grid_alpha_sigma(process, ts)
    sigma_hat = sigma / alpha
    # The state u = s y and the time variable tau at every level.
    s, tau = _edm_coordinates(sigma_hat, scaling == "vp")
    slope, denoised = _edm_ode(score_fn, scaling == "vp")
    dtype = jnp.result_type(float)
    as_array = lambda a: jnp.asarray(a, dtype)
    key_project = jax.random.fold_in(key, 1)

    def projected(k, u, t, a, s_i):
        return u if project is None else project(k, a * u / s_i, t) * s_i / a

    def step(u, inputs):
        i, t, a, s_hat, s_i, tau_i, t_next, a_next, s_hat_next, s_next, tau_next = inputs
        dt = tau_next - tau_i
        d = slope(u, t, a, s_hat, s_i)
        u_euler = u + dt * d
        u = u + 0.5 * dt * (d + slope(u_euler, t_next, a_next, s_hat_next, s_next))
        return projected(jax.random.fold_in(key_project, i), u, t_next, a_next, s_next), None

    n = len(ts)
    levels = (ts, alpha, sigma_hat, s, tau)
    xs = (
        jnp.arange(n - 1),
        *(as_array(v[:-1]) for v in levels),
        *(as_array(v[1:]) for v in levels),
    )
    u = _edm_prior(key, process, shape, sigma_hat[0], s[0])
    first = [as_array(v[0]) for v in (ts, alpha, s)]
    u = projected(jax.random.fold_in(key_project, n), u, *first)
    u, _ = jax.lax.scan(step, u, xs)
    # The last step, to sigma = 0, is Euler's: it lands on D(y_{N-1}) in either scaling.
    y = denoised(u, *(as_array(v[-1]) for v in (ts, alpha, sigma_hat, s)))
    y = y if project is None else project.clean(y)
    return SamplerOutput(y, nfe_count(2 * len(ts) - 1))


# EDM's stochastic settings (Karras et al. 2022, Table 5; generate.py's README for
# ImageNet-64), in the units of data with std sigma_data = 0.5: (S_churn, S_tmin,
# S_tmax, S_noise). Scale S_tmin and S_tmax by std(data) / 0.5 for other data.
EDM_STOCHASTIC_SETTINGS = {
    "cifar10-vp": (30.0, 0.01, 1.0, 1.007),
    "cifar10-ve": (80.0, 0.05, 1.0, 1.007),
    "imagenet64-adm": (80.0, 0.05, 50.0, 1.003),
    "imagenet64-edm": (40.0, 0.05, 50.0, 1.003),
}
EDM_STOCHASTIC_STEPS = 256  # generate.py's README: ImageNet-64, 256 steps (511 NFE)


def edm_churn(sigma_hat: np.ndarray, s_churn: float, s_tmin: float, s_tmax: float):
    """EDM's gamma_i = min(S_churn / N, sqrt(2) - 1) where S_tmin <= sigma_i <= S_tmax, else 0."""
    gamma = min(s_churn / len(sigma_hat), np.sqrt(2.0) - 1.0)
    return np.where((sigma_hat >= s_tmin) & (sigma_hat <= s_tmax), gamma, 0.0)


@jitted_sampler
def edm_stochastic(
    key: PRNGKey,
    score_fn: ScoreFn,
    process: Process,
    shape: tuple[int, ...],
    *,
    num_steps: int | None = EDM_STOCHASTIC_STEPS,
    S_churn: float = 40.0,  # noqa: N803  EDM's names
    S_tmin: float = 0.05,  # noqa: N803
    S_tmax: float = 50.0,  # noqa: N803
    S_noise: float = 1.003,  # noqa: N803
    rho: float = 7.0,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    scaling: str = "none",
    grid=None,
    project=None,
) -> SamplerOutput:
    """EDM's stochastic sampler (Karras et al. 2022, Alg. 2; `edm_sampler` of NVlabs/edm).

    On `edm_heun`'s levels sigma_0 > ... > sigma_{N-1} (the same `num_steps`,
    `rho`, `sigma_min`, `sigma_max`, `grid` and `scaling`), each step first
    raises the noise level from sigma_i to sigma_i+ = (1 + gamma_i) sigma_i
    (EDM's t_hat) by adding fresh noise,

        y+ = y + sqrt(sigma_i+^2 - sigma_i^2) S_noise z,
        gamma_i = min(S_churn / N, sqrt(2) - 1) if S_tmin <= sigma_i <= S_tmax else 0,

    then takes `edm_heun`'s Heun step from sigma_i+ to sigma_{i+1} (the last,
    to sigma = 0, is Euler's: the denoiser D at sigma_{N-1}+). Here sigma is
    the process's sigma(t) / alpha(t) (the module docstring's sigma_hat, EDM's
    sigma for VP and VE alike) and y = x / alpha; with scaling "vp" the churn
    acts on u = s y as generate.py's `ablation_sampler` does, u+ =
    s(sigma_i+) / s(sigma_i) u + sqrt(sigma_i+^2 - sigma_i^2) s(sigma_i+)
    S_noise z. NFE = 2 N - 1, as for `edm_heun`, which S_churn = 0 reproduces
    exactly.

    Defaults: the settings generate.py's README recommends for stochastic
    sampling (ImageNet-64: 256 steps, S_churn 40, S_tmin 0.05, S_tmax 50,
    S_noise 1.003); EDM's Table 5 settings are in `EDM_STOCHASTIC_SETTINGS`.
    S_tmin and S_tmax are noise levels for data of std 0.5 (EDM's
    sigma_data): scale them by std(data) / 0.5 for other data. S_noise > 1
    counters a network's tendency to remove slightly too much noise; with an
    exact score it adds a little excess variance.

    One departure, forced: a churned level above sigma_hat(T) is lowered to
    sigma_hat(T), since a process (and a network trained on it) has no score
    beyond T; EDM evaluates its network there. It matters only when S_tmax
    reaches the top level: on the VE SDE, whose sigma_hat(T) = 50 equals the
    default S_tmax, the first level is not churned; on the VP SDE (sigma_hat(T)
    = 152, levels from 80) never. `project` (`samplers.conditioning`) is applied to the prior
    draw, after each churn (at sigma_i+), after each Heun step and, as
    `project.clean`, to the output.
    """
    if scaling not in EDM_SCALINGS:
        raise ValueError(
            f"edm_stochastic: unknown scaling {scaling!r}; valid: {', '.join(EDM_SCALINGS)}"
        )
    if S_churn < 0 or S_noise < 0 or S_tmin > S_tmax:
        raise ValueError(
            "edm_stochastic needs S_churn >= 0, S_noise >= 0 and S_tmin <= S_tmax, got "
            f"S_churn={S_churn}, S_noise={S_noise}, S_tmin={S_tmin}, S_tmax={S_tmax}"
        )
    vp = scaling == "vp"
    ts = _edm_times(process, num_steps, rho, sigma_min, sigma_max, grid, "edm_stochastic")
    alpha, sigma = _grid_alpha_sigma(process, ts)
    sigma_hat = sigma / alpha
    s, tau = _edm_coordinates(sigma_hat, vp)
    # The churned levels, as times (a level with gamma = 0 keeps its own time exactly).
    top = float(np.exp(-log_snr(process, [process.T])[0]))
    churned = np.minimum((1.0 + edm_churn(sigma_hat, S_churn, S_tmin, S_tmax)) * sigma_hat, top)
    ts_c = np.where(churned > sigma_hat, times_at_log_snr(process, -np.log(churned)), ts)
    ts_c = np.where(churned >= top, process.T, ts_c)
    alpha_c, sigma_c = _grid_alpha_sigma(process, ts_c)
    sigma_hat_c = sigma_c / alpha_c
    s_c, tau_c = _edm_coordinates(sigma_hat_c, vp)
    noise_std = S_noise * np.sqrt(np.maximum(sigma_hat_c**2 - sigma_hat**2, 0.0)) * s_c
    slope, denoised = _edm_ode(score_fn, vp)
    dtype = jnp.result_type(float)
    as_array = lambda a: jnp.asarray(a, dtype)
    # edm_heun's projection keys, plus one stream for the churn noise and one for the
    # projections after it, so that S_churn = 0 reproduces edm_heun's every draw.
    key_project = jax.random.fold_in(key, 1)
    key_churn, key_churn_project = jax.random.fold_in(key, 2), jax.random.fold_in(key, 3)

    def projected(k, u, t, a, s_i):
        return u if project is None else project(k, a * u / s_i, t) * s_i / a

    def churn_noise(i):
        return jax.random.normal(jax.random.fold_in(key_churn, i), shape, dtype)

    def churn(u, i, z, active, ratio, std, t_c, a_c, s_c):
        u = ratio * u + std * z
        if project is None:
            return u
        u_projected = projected(jax.random.fold_in(key_churn_project, i), u, t_c, a_c, s_c)
        return jnp.where(active, u_projected, u)  # a level without churn is not re-projected

    def step(u, inputs):
        (i, active, ratio, std, t_c, a_c, sh_c, s_c, tau_c, *nxt), z = inputs
        t_next, a_next, sh_next, s_next, tau_next = nxt
        u = churn(u, i, z, active, ratio, std, t_c, a_c, s_c)
        dt = tau_next - tau_c
        d = slope(u, t_c, a_c, sh_c, s_c)
        u_euler = u + dt * d
        u = u + 0.5 * dt * (d + slope(u_euler, t_next, a_next, sh_next, s_next))
        return projected(jax.random.fold_in(key_project, i), u, t_next, a_next, s_next), None

    n = len(ts)
    churn_inputs = (s_c / s, noise_std, ts_c, alpha_c, sigma_hat_c, s_c, tau_c)
    active = jnp.asarray(churned > sigma_hat)
    xs = (
        jnp.arange(n - 1),
        active[:-1],
        *(as_array(v[:-1]) for v in churn_inputs),
        *(as_array(v[1:]) for v in (ts, alpha, sigma_hat, s, tau)),
    )
    u = _edm_prior(key, process, shape, sigma_hat[0], s[0])
    first = [as_array(v[0]) for v in (ts, alpha, s)]
    u = projected(jax.random.fold_in(key_project, n), u, *first)
    # The churn noise is drawn in blocks of steps (see `common.scan_with_noise`).
    itemsize = jnp.dtype(dtype).itemsize
    u = scan_with_noise(step, u, xs, churn_noise, n - 1, math.prod(shape) * itemsize)
    ratio, std, t_c, a_c, sh_c, s_c, _ = (as_array(v[-1]) for v in churn_inputs)
    u = churn(u, n - 1, churn_noise(n - 1), active[-1], ratio, std, t_c, a_c, s_c)
    y = denoised(u, t_c, a_c, sh_c, s_c)
    y = y if project is None else project.clean(y)
    return SamplerOutput(y, nfe_count(2 * n - 1))
