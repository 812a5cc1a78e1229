"""What every sampler shares: its output, its jit wrapper, its grid (with the process's values
on it, computed once), its noise drawn in blocks, and the final denoising step."""

from __future__ import annotations

import functools
import inspect
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusers_unified.processes import Process, batch_broadcast
from diffusers_unified.typing import Array, ScoreFn


class SamplerOutput(NamedTuple):
    samples: Array
    nfe: Array  # number of score evaluations (an int32 scalar)


def as_pytree(score_fn: ScoreFn) -> ScoreFn:
    """Lets a plain Python callable travel through `jax.jit` as a (leafless) pytree.

    Pytree score functions (`ModelScore`, the exact scores of `data.gaussian`)
    pass unchanged, so their arrays stay traced arguments and a new set of
    parameters of the same shapes reuses the compiled sampler.
    """
    treedef = jax.tree_util.tree_structure(score_fn)
    if jax.tree_util.treedef_is_leaf(treedef) and not isinstance(score_fn, jax.Array):
        return jax.tree_util.Partial(score_fn)
    return score_fn


# Keyword-only options that are pytrees of arrays, traced rather than static:
# a projection (`samplers.conditioning`) carries the known data; `noise` the
# sampler's standard-normal draws.
TRACED_OPTIONS = ("project", "noise")


def jitted_sampler(fn):
    """Compiles a sampler `fn(key, score_fn, process, shape, *, **options)` once per setting.

    The shape and every keyword-only option are static (an explicit `grid` is
    turned into a tuple), except those in `TRACED_OPTIONS`; the key, the score
    function's arrays, a projection's arrays and given noise are traced. The undecorated
    function stays reachable as `.raw`.
    """
    options = [
        name
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    static = [name for name in options if name not in TRACED_OPTIONS]
    jitted = jax.jit(fn, static_argnames=("shape", *static))

    @functools.wraps(fn)
    def wrapper(key, score_fn, process, shape, **kwargs):
        unknown = sorted(set(kwargs) - set(options))
        if unknown:
            raise TypeError(
                f"{fn.__name__}() got unknown option(s) {', '.join(unknown)}; "
                f"valid: {', '.join(options)}"
            )
        if kwargs.get("grid") is not None:
            kwargs["grid"] = tuple(float(t) for t in np.asarray(kwargs["grid"]).ravel())
        if kwargs.get("project") is not None:
            check_projection(kwargs["project"])
        return jitted(key, as_pytree(score_fn), process, tuple(int(d) for d in shape), **kwargs)

    wrapper.raw = fn
    return wrapper


def check_projection(project) -> None:
    """A projection must be a pytree with `__call__(key, x, t)` and `clean(x)`."""
    is_leaf = jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(project))
    if is_leaf or not callable(project) or not callable(getattr(project, "clean", None)):
        raise TypeError(
            "project must be a pytree with __call__(key, x, t) -> x and clean(x) -> x "
            f"(see samplers.conditioning, e.g. inpainting(...)), got {type(project).__name__}"
        )


def resolve_grid(process: Process, num_steps: int | None, grid) -> np.ndarray:
    """The descending times at which a sampler evaluates the score.

    An explicit `grid` wins (any decreasing sequence inside [0, T], e.g. a
    sub-grid of a discrete process's `times`); otherwise
    `process.sampling_grid(num_steps)`.
    """
    if grid is None:
        return process.sampling_grid(num_steps)
    ts = np.asarray(grid, dtype=np.float64)
    if ts.ndim != 1 or ts.size < 1:
        raise ValueError(f"grid must be a non-empty 1-D sequence of times, got shape {ts.shape}")
    if np.any(np.diff(ts) >= 0) or ts[0] > process.T or ts[-1] < 0:
        raise ValueError(
            f"grid must decrease strictly inside [0, T={process.T}], got {ts[0]} ... {ts[-1]}"
        )
    return ts


class GridValues(NamedTuple):
    """A sampler's times and the process's values at them, float64 NumPy, computed once.

    Every fixed-grid sampler derives its per-step coefficients from these
    before its loop (so the loop does no interpolation, table search or
    coefficient arithmetic). The values are those of the times as the score
    function receives them (in the default float type), so the coefficients
    and the score agree on what t is.
    """

    t: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray
    f: np.ndarray  # drift coefficient f(t) of dx = f x dt + g dw
    g2: np.ndarray  # g(t)^2
    step_a: np.ndarray  # a of process.step_transition(t): the default forward step into t


# One compiled call per process and grid shape (processes are static pytrees):
# evaluated op by op, a process's methods cost seconds of tiny compilations.
@jax.jit
def _process_values(process: Process, t: Array):
    return (*process.alpha_sigma(t), *process.coefficients(t), process.step_transition(t)[0])


def grid_values(process: Process, ts) -> GridValues:
    """`GridValues` at the times `ts` (any shape), concrete even inside a caller's trace."""
    ts = np.asarray(ts, np.float64)
    with jax.ensure_compile_time_eval():
        t = jnp.asarray(ts, jnp.result_type(float))
        values = _process_values(process, t.ravel())
        as64 = lambda a: np.asarray(a, np.float64).reshape(ts.shape)
        return GridValues(as64(t), *(as64(v) for v in values))


def as_arrays(tree):
    """NumPy coefficients -> arrays of the default float type (a pytree; None stays None)."""
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.result_type(float)), tree)


# Noise drawn per block of steps rather than per step: one large draw costs a
# fraction of many small ones inside the loop (threefry on 1,000 draws of 1,024
# numbers: about 10 microseconds each inside the scan, 4.7 ms for all of them at
# once, on 2 CPU cores). A block holds at most this many bytes of noise;
# samplers whose every step's noise fits draw it all before the loop.
NOISE_BLOCK_BYTES = 64 * 2**20


def noise_block_size(num_steps: int, bytes_per_step: int) -> int:
    """The largest divisor of num_steps whose steps' noise fits in NOISE_BLOCK_BYTES (>= 1)."""
    fits = max(1, NOISE_BLOCK_BYTES // max(1, bytes_per_step))
    return max(d for d in range(1, min(num_steps, fits) + 1) if num_steps % d == 0)


def scan_with_noise(body, carry, xs, draw, num_steps: int, bytes_per_step: int):
    """`lax.scan(body, carry, (xs, noise))` with noise[i] = draw(i), drawn in blocks.

    `draw(i)` gives step i's standard-normal draws (a pytree; drawn with a key
    derived from i, so the numbers do not depend on the blocking); a block of
    steps' draws is one `vmap` of it, made just before that block's steps run,
    and the blocks are as large as `noise_block_size` allows. Returns the
    final carry.
    """
    if num_steps == 0:
        return carry
    block = noise_block_size(num_steps, bytes_per_step)
    draw_block = jax.vmap(draw)
    if block == num_steps:
        return jax.lax.scan(body, carry, (xs, draw_block(jnp.arange(num_steps))))[0]

    def outer(carry, inputs):
        k, xs_k = inputs
        noise = draw_block(k * block + jnp.arange(block))
        return jax.lax.scan(body, carry, (xs_k, noise))[0], None

    blocked = jax.tree.map(lambda a: a.reshape(num_steps // block, block, *a.shape[1:]), xs)
    return jax.lax.scan(outer, carry, (jnp.arange(num_steps // block), blocked))[0]


def tweedie_denoise(score_fn: ScoreFn, process: Process, x: Array, t: Array) -> Array:
    """E[x_0 | x_t] = (x_t + sigma^2 score) / alpha (Tweedie's formula; one score evaluation).

    This is NCSNv2's final denoising step, and also what the last step of DDPM's
    ancestral sampling and of DDIM compute when they land on clean data.
    """
    alpha, sigma = process.alpha_sigma(t)
    return (x + batch_broadcast(sigma**2, x) * score_fn(x, t)) / batch_broadcast(alpha, x)


def nfe_count(n: int) -> Array:
    return jnp.asarray(n, jnp.int32)
