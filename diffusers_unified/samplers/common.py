"""What every sampler shares: its output, its jit wrapper, its grid and the final denoising step."""

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


def tweedie_denoise(score_fn: ScoreFn, process: Process, x: Array, t: Array) -> Array:
    """E[x_0 | x_t] = (x_t + sigma^2 score) / alpha (Tweedie's formula; one score evaluation).

    This is NCSNv2's final denoising step, and also what the last step of DDPM's
    ancestral sampling and of DDIM compute when they land on clean data.
    """
    alpha, sigma = process.alpha_sigma(t)
    return (x + batch_broadcast(sigma**2, x) * score_fn(x, t)) / batch_broadcast(alpha, x)


def nfe_count(n: int) -> Array:
    return jnp.asarray(n, jnp.int32)
