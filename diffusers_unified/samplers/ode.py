"""The probability-flow ODE (Song et al. 2021, sec. 4.3 and appendix D.3): sampling, encoding.

dx/dt = f(t) x - 1/2 g(t)^2 score(x, t), integrated from the prior at T down
to t_min (`probability_flow`, `decode`) or from data up to T (`encode`): with
fixed steps (Euler, Heun, RK4) in one `lax.scan`, or adaptively with diffrax
(Dopri5, the score SDE code's RK45; or Tsit5; for vector data with their
stages unrolled, see `adaptive_solver`) inside jit. On a fixed grid,
f(t) and g(t)^2 at every node of every step are computed once, before the
loop (`solve_flow`).
"""

from __future__ import annotations

import functools
import inspect
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusers_unified.processes import Process, reverse_sde
from diffusers_unified.samplers.common import (
    SamplerOutput,
    as_arrays,
    as_pytree,
    grid_values,
    jitted_sampler,
    nfe_count,
    resolve_grid,
    tweedie_denoise,
)
from diffusers_unified.typing import Array, PRNGKey, ScoreFn


def _axpy(y, c, k):
    """y + c k, leaf by leaf (states may be pytrees: the likelihood's (x, log-density))."""
    return jax.tree.map(lambda a, b: a + c * b, y, k)


def _combine(y, c, ks, weights):
    """y + c sum_j weights_j ks_j, leaf by leaf."""

    def leaf(a, *b):
        return a + c * sum(w * v for w, v in zip(weights, b, strict=True))

    return jax.tree.map(leaf, y, *ks)


# Each fixed-step method evaluates f at the nodes t + c dt of a step (its
# Butcher tableau's c, deduplicated); f(x, k) is f at node k.
def _euler(f, x, dt):
    return _axpy(x, dt, f(x, 0))


def _heun(f, x, dt):
    k1 = f(x, 0)
    k2 = f(_axpy(x, dt, k1), 1)
    return _combine(x, 0.5 * dt, (k1, k2), (1.0, 1.0))


def _rk4(f, x, dt):
    k1 = f(x, 0)
    k2 = f(_axpy(x, 0.5 * dt, k1), 1)
    k3 = f(_axpy(x, 0.5 * dt, k2), 1)
    k4 = f(_axpy(x, dt, k3), 2)
    return _combine(x, dt / 6.0, (k1, k2, k3, k4), (1.0, 2.0, 2.0, 1.0))


# name -> (step function, score evaluations per step); the order is 1, 2, 4.
FIXED_STEP = {"euler": (_euler, 1), "heun": (_heun, 2), "rk4": (_rk4, 4)}
# name -> the nodes c of a step, as fractions of it.
NODES = {"euler": (0.0,), "heun": (0.0, 1.0), "rk4": (0.0, 0.5, 1.0)}
ADAPTIVE = ("dopri5", "tsit5")


def adaptive_solver(method: str, x: Array):
    """The diffrax solver for `method` ("dopri5" or "tsit5") on states shaped like `x`.

    For vector data (`x` of shape (batch, dim)) the method's tableau with its
    stages unrolled (`samplers.unrolled`: the same method, a cheaper step;
    the networks of such data are a few dense layers, whose evaluation is
    short beside diffrax's per-stage bookkeeping). For images and other
    data of more axes diffrax's own Dopri5 or Tsit5: their networks dwarf
    that bookkeeping, and unrolling would compile the network once per stage
    (six more copies of a U-Net in the program). The two differ only in
    float rounding. diffrax is imported on first use: it is slow to import,
    and the launcher's other paths never need it.
    """
    if x.ndim > 2:
        import diffrax

        return {"dopri5": diffrax.Dopri5, "tsit5": diffrax.Tsit5}[method]()
    from diffusers_unified.samplers.unrolled import SOLVERS

    return SOLVERS[method]()


METHODS = (*FIXED_STEP, *ADAPTIVE)


def ode_drift(process: Process, score_fn: ScoreFn):
    """(x, t) -> dx/dt of the probability-flow ODE."""
    rev = reverse_sde(process, score_fn, probability_flow=True)
    return lambda x, t: rev(x, t)[0]


def node_times(ts, method: str):
    """The times at which `method` evaluates f in each step of the grid `ts`: shape (n - 1, k).

    Node 0 is the step's start and a node at c = 1 its end, exactly; the
    others are t + c (s - t). NumPy in, NumPy out (float64); arrays in,
    arrays out.
    """
    xp = np if isinstance(ts, np.ndarray) else jnp
    t, s = ts[:-1, None], ts[1:, None]
    nodes = xp.asarray(NODES[method])
    return xp.where(nodes == 1.0, s, xp.where(nodes == 0.0, t, t + nodes * (s - t)))


class FlowPoint(NamedTuple):
    """The probability-flow drift's coefficients at a time: dx/dt = f x - g2 / 2 score(x, t)."""

    t: Array
    f: Array
    g2: Array


def flow_points(process: Process, times) -> FlowPoint:
    """`FlowPoint`s at the times `times` (any shape): computed once, before a solver's loop."""
    values = grid_values(process, times)
    return as_arrays(FlowPoint(values.t, values.f, values.g2))


def flow_drift(score_fn: ScoreFn):
    """(x, p) -> dx/dt of the probability-flow ODE at the `FlowPoint` p (one time)."""
    return lambda x, p: p.f * x - 0.5 * p.g2 * score_fn(x, p.t)


def solve_grid(field, x, dts: Array, points, method: str, project=None, key=None, ends=None):
    """Integrates dx/dt = field(x, p) over the steps dts with a fixed-step method, in one scan.

    `points` holds, for every step and node (leading axes (steps, nodes), see
    `node_times`), what `field` needs to evaluate there (a pytree, e.g.
    `FlowPoint`s, or the node times themselves). With `project`, each step is
    followed by `project(fold_in(key, i), x, ends[i])`, ends being the steps'
    end times.
    """
    step_fn, _ = FIXED_STEP[method]

    def step(x, inputs):
        i, dt, p, s = inputs
        at_node = lambda y, k: field(y, jax.tree.map(lambda a: a[k], p))
        x = step_fn(at_node, x, dt)
        return (x if project is None else project(jax.random.fold_in(key, i), x, s)), None

    xs = (jnp.arange(dts.shape[0]), dts, points, ends)
    return jax.lax.scan(step, x, xs)[0]


def solve_fixed(f, x, ts: Array, method: str, project=None, key=None) -> Array:
    """Integrates dx/dt = f(x, t) over the grid `ts` with a fixed-step method, in one scan.

    With `project`, each step to s is followed by `project(fold_in(key, i), x, s)`.
    The node times are computed once, before the loop (`node_times`).
    """
    ts = jnp.asarray(ts)
    ends = None if project is None else ts[1:]
    return solve_grid(f, x, ts[1:] - ts[:-1], node_times(ts, method), method, project, key, ends)


def solve_flow(process: Process, score_fn: ScoreFn, x, ts, method: str, project=None, key=None):
    """The probability-flow ODE over the grid `ts` (NumPy, float64) with a fixed-step method.

    Everything that depends on the grid (node times, f(t) and g(t)^2 there,
    the steps) is computed once, before the loop, which evaluates only the
    score and the drift's linear combination.
    """
    dts = as_arrays(np.diff(ts))
    points = flow_points(process, node_times(np.asarray(ts, np.float64), method))
    ends = as_arrays(ts[1:])
    return solve_grid(flow_drift(score_fn), x, dts, points, method, project, key, ends)


def materialized(y):
    """y computed once, before a solve: XLA may otherwise fuse y's computation (a prior draw)
    into several of the solver's first operations, each rounding it its own way, and an
    adaptive solver's step choices then depend on how the program around it was compiled."""
    return jax.lax.optimization_barrier(y)


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
        adaptive_solver(method, x),
        t0=t0,
        t1=t1,
        dt0=None,
        y0=materialized(x),
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
    between T and t_min. Then, if `denoise`, one Tweedie step to clean data,
    E[x_0 | x_t_min] (NCSNv2's denoising). The reference code's ODE sampler
    (`get_ode_sampler`, with its configs' `noise_removal = True`) ends instead
    with one reverse-diffusion predictor step at eps: for the VE SDE that is
    the same step (its first level's G^2 is sigma_min^2); for the VP SDE it
    moves x by beta_1 = 1e-4 times the score where Tweedie moves it by
    sigma(1e-3)^2 / alpha = 1.1e-4 times it, a difference far below 8-bit
    quantisation. `denoise=False` leaves the step out. NFE is counted exactly, also for the
    adaptive methods.

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
    x = process.prior_sampling(key, shape)
    if method in FIXED_STEP:
        ts = resolve_grid(process, num_steps, grid)
        key_project = jax.random.fold_in(key, 1)
        if project is not None:
            x = project(jax.random.fold_in(key_project, len(ts)), x, as_arrays(ts[0]))
        x = solve_flow(process, score_fn, x, ts, method, project, key_project)
        nfe, t_end = nfe_count((len(ts) - 1) * FIXED_STEP[method][1]), ts[-1]
    else:
        t_end = process.t_min if grid is None else resolve_grid(process, None, grid)[-1]
        f = ode_drift(process, score_fn)
        x, nfe = solve_adaptive(f, x, process.T, t_end, method, rtol, atol, max_steps)
    if denoise:
        x = tweedie_denoise(score_fn, process, x, as_arrays(t_end))
        if project is not None:
            x = project.clean(x)
    return SamplerOutput(x, nfe + denoise)


# -- the flow as an encoder and a decoder ----------------------------------------------------


class Encoding(NamedTuple):
    latents: Array  # x(T), shaped like the data
    nfe: Array  # number of score evaluations (an int32 scalar)


def _jitted_flow(fn):
    """Compiles `fn(key, score_fn, process, x, *, **options)` once per shape and option setting.

    Like `common.jitted_sampler`, with the data `x` traced in place of a static shape.
    """
    options = [
        name
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    jitted = jax.jit(fn, static_argnames=options)

    @functools.wraps(fn)
    def wrapper(key, score_fn, process, x, **kwargs):
        unknown = sorted(set(kwargs) - set(options))
        if unknown:
            raise TypeError(
                f"{fn.__name__}() got unknown option(s) {', '.join(unknown)}; "
                f"valid: {', '.join(options)}"
            )
        if kwargs.get("method", "dopri5") not in METHODS:
            raise ValueError(
                f"unknown ODE method {kwargs['method']!r}; valid: {', '.join(METHODS)}"
            )
        if kwargs.get("grid") is not None:
            kwargs["grid"] = tuple(float(t) for t in np.asarray(kwargs["grid"]).ravel())
        return jitted(key, as_pytree(score_fn), process, x, **kwargs)

    wrapper.raw = fn
    return wrapper


def _flow_times(process: Process, num_steps, grid, eps) -> np.ndarray:
    """The descending times of a flow between T and its data end, eps (default t_min)."""
    if grid is not None:
        return resolve_grid(process, None, grid)
    ts = resolve_grid(process, num_steps, None)
    if eps is not None:
        if not 0.0 < eps < process.T:
            raise ValueError(f"eps must lie in (0, T={process.T}), got {eps}")
        ts = np.linspace(process.T, eps, len(ts))
    return ts


def _integrate(process, score_fn, x, ts, method, rtol, atol, max_steps):
    """x carried from ts[0] to ts[-1] (either direction); returns (x, NFE)."""
    if method in FIXED_STEP:
        x = solve_flow(process, score_fn, x, np.asarray(ts, np.float64), method)
        return x, nfe_count((len(ts) - 1) * FIXED_STEP[method][1])
    f = ode_drift(process, score_fn)
    return solve_adaptive(f, x, float(ts[0]), float(ts[-1]), method, rtol, atol, max_steps)


def _start_at(key, process, x, t):
    """With a key, x_t ~ p(x_t | x_0 = x) (the forward process up to t); without, x itself."""
    if key is None:
        return x
    alpha, sigma = process.alpha_sigma(jnp.float32(t))
    return alpha * x + sigma * jax.random.normal(key, x.shape, x.dtype)


@_jitted_flow
def encode(
    key: PRNGKey | None,
    score_fn: ScoreFn,
    process: Process,
    x: Array,
    *,
    method: str = "dopri5",
    num_steps: int | None = None,
    grid=None,
    eps: float | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 10_000,
) -> Encoding:
    """Data to latents: the probability-flow ODE from eps up to T (Song et al. 2021, sec. 4.3).

    The score SDE paper's "uniquely identifiable encoding": the flow is a
    bijection, so every x has one latent x(T), determined by the data
    distribution (through the score) rather than by a trained encoder, and
    latents of p_eps are distributed as p_T, the prior up to the tiny
    alpha(T) x_0 remnant of the VP SDE. The flow starts at eps (default
    process.t_min, where `decode` and the samplers stop; the reference code's
    likelihood starts at 1e-5) with `x` itself as x(eps), as the reference
    code's likelihood does; given a `key`, x(eps) is drawn from the forward
    process p(x_eps | x_0 = x) first (the two differ by sigma(eps) noise).

    `method`: "dopri5" (default; the reference's RK45 at rtol = atol = 1e-5)
    or "tsit5" adapt their steps between eps and T; "euler", "heun", "rk4"
    step over the reversed `num_steps`-point grid (default process.N; or the
    reversed `grid`, which then sets eps). NFE as for `probability_flow`.
    """
    ts = _flow_times(process, num_steps, grid, eps)[::-1]
    x = _start_at(key, process, x, ts[0])
    latents, nfe = _integrate(process, score_fn, x, ts, method, rtol, atol, max_steps)
    return Encoding(latents, nfe)


@_jitted_flow
def decode(
    key: PRNGKey | None,
    score_fn: ScoreFn,
    process: Process,
    z: Array,
    *,
    method: str = "dopri5",
    num_steps: int | None = None,
    grid=None,
    eps: float | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 10_000,
    denoise: bool = False,
) -> SamplerOutput:
    """Latents to data: the probability-flow ODE from z = x(T) down to eps; inverse of `encode`.

    `probability_flow` with given latents instead of a prior draw (Song et
    al. 2021, sec. 4.3: latent manipulation and interpolation, e.g. of two
    encodings); with the same options, decode(encode(x)) returns x up to the
    solver's error. `denoise` (off by default, so that decoding inverts
    encoding) adds the Tweedie step to clean data, as the sampler does. The
    flow is deterministic: `key` is not used and may be None (it is there for
    the samplers' signature). Options as for `encode`.
    """
    del key
    ts = _flow_times(process, num_steps, grid, eps)
    x, nfe = _integrate(process, score_fn, z, ts, method, rtol, atol, max_steps)
    if denoise:
        x = tweedie_denoise(score_fn, process, x, as_arrays(ts[-1]))
    return SamplerOutput(x, nfe + denoise)
