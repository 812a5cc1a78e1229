"""Probability-flow ODE sampling (Song et al. 2021, sec. 4.3 and appendix D.3).

dx/dt = f(t) x - 1/2 g(t)^2 score(x, t), integrated from the prior at T down
to t_min: with fixed steps (Euler, Heun, RK4) in one `lax.scan`, or adaptively
with diffrax (Dopri5, the score SDE code's RK45; or Tsit5) inside jit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusers_unified.processes import Process, reverse_sde
from diffusers_unified.samplers.common import (
    SamplerOutput,
    jitted_sampler,
    nfe_count,
    resolve_grid,
    tweedie_denoise,
)
from diffusers_unified.typing import Array, PRNGKey, ScoreFn


def _euler(f, x, t, s):
    return x + (s - t) * f(x, t)


def _heun(f, x, t, s):
    dt = s - t
    k1 = f(x, t)
    k2 = f(x + dt * k1, s)
    return x + 0.5 * dt * (k1 + k2)


def _rk4(f, x, t, s):
    dt = s - t
    mid = t + 0.5 * dt
    k1 = f(x, t)
    k2 = f(x + 0.5 * dt * k1, mid)
    k3 = f(x + 0.5 * dt * k2, mid)
    k4 = f(x + dt * k3, s)
    return x + dt / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


# name -> (step function, score evaluations per step); the order is 1, 2, 4.
FIXED_STEP = {"euler": (_euler, 1), "heun": (_heun, 2), "rk4": (_rk4, 4)}
ADAPTIVE = ("dopri5", "tsit5")


def adaptive_solver(method: str):
    """The diffrax solver named `method` (diffrax is imported on first use: it is slow to
    import, and the launcher's other paths never need it)."""
    import diffrax

    return {"dopri5": diffrax.Dopri5, "tsit5": diffrax.Tsit5}[method]()


METHODS = (*FIXED_STEP, *ADAPTIVE)


def ode_drift(process: Process, score_fn: ScoreFn):
    """(x, t) -> dx/dt of the probability-flow ODE."""
    rev = reverse_sde(process, score_fn, probability_flow=True)
    return lambda x, t: rev(x, t)[0]


def solve_fixed(f, x, ts: Array, method: str, project=None, key=None) -> Array:
    """Integrates dx/dt = f(x, t) over the grid `ts` with a fixed-step method, in one scan.

    With `project`, each step to s is followed by `project(fold_in(key, i), x, s)`.
    """
    step_fn, _ = FIXED_STEP[method]

    def step(x, inputs):
        i, t, s = inputs
        x = step_fn(f, x, t, s)
        return (x if project is None else project(jax.random.fold_in(key, i), x, s)), None

    x, _ = jax.lax.scan(step, x, (jnp.arange(ts.shape[0] - 1), ts[:-1], ts[1:]))
    return x


def solve_adaptive(f, x, t0, t1, method: str, rtol: float, atol: float, max_steps: int):
    """Integrates dx/dt = f(x, t) from t0 to t1 with diffrax; returns (x(t1), NFE).

    NFE counts every evaluation of f: one before the first step, whose value
    diffrax reuses to choose the initial step size and as the first stage, and
    six per attempted step (accepted or rejected) of the 7-stage
    first-same-as-last methods Dopri5 and Tsit5 (checked by a test that
    counts the evaluations).
    """
    import diffrax

    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: f(y, t)),
        adaptive_solver(method),
        t0=t0,
        t1=t1,
        dt0=None,
        y0=x,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        saveat=diffrax.SaveAt(t1=True),
        max_steps=max_steps,
    )
    nfe = 1 + 6 * solution.stats["num_steps"]
    return solution.ys[-1], nfe


@jitted_sampler
def probability_flow(
    key: PRNGKey,
    score_fn: ScoreFn,
    process: Process,
    shape: tuple[int, ...],
    *,
    method: str = "dopri5",
    num_steps: int | None = None,
    grid=None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 10_000,
    denoise: bool = True,
    project=None,
) -> SamplerOutput:
    """Samples by solving the probability-flow ODE from a prior draw (Song et al. 2021).

    `method`: "euler", "heun" or "rk4" step between the `num_steps` grid
    times (default process.N); "dopri5" (default, the reference code's scipy
    RK45 with rtol = atol = 1e-5) or "tsit5" adapt their steps to rtol/atol
    between T and t_min. Then, if `denoise`, one Tweedie step to clean data.
    NFE is counted exactly, also for the adaptive methods.

    `project` (inpainting, colorization: `samplers.conditioning`) is applied
    to the prior draw, after every fixed step and to the denoised output; it
    needs a fixed-step method. With it the path is no longer deterministic
    (each projection draws fresh noise for the known part).
    """
    if method not in METHODS:
        raise ValueError(f"unknown ODE method {method!r}; valid: {', '.join(METHODS)}")
    if project is not None and method not in FIXED_STEP:
        raise ValueError(
            f"project needs a fixed-step ODE method ({', '.join(FIXED_STEP)}): the adaptive "
            f"{method!r} solve has no steps at which to project"
        )
    f = ode_drift(process, score_fn)
    x = process.prior_sampling(key, shape)
    if method in FIXED_STEP:
        ts = resolve_grid(process, num_steps, grid)
        times = jnp.asarray(ts, jnp.float32)
        key_project = jax.random.fold_in(key, 1)
        if project is not None:
            x = project(jax.random.fold_in(key_project, len(ts)), x, times[0])
        x = solve_fixed(f, x, times, method, project, key_project)
        nfe, t_end = nfe_count((len(ts) - 1) * FIXED_STEP[method][1]), ts[-1]
    else:
        t_end = process.t_min if grid is None else resolve_grid(process, None, grid)[-1]
        x, nfe = solve_adaptive(f, x, process.T, t_end, method, rtol, atol, max_steps)
    if denoise:
        x = tweedie_denoise(score_fn, process, x, jnp.float32(t_end))
        if project is not None:
            x = project.clean(x)
    return SamplerOutput(x, nfe + denoise)
