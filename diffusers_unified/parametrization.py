"""The shared network interface: what a network predicts, and the score it implies.

With x_t = alpha x_0 + sigma eps, a network may predict

    eps    the noise (DDPM),
    x0     the clean data,
    score  grad log p_t(x_t) = -eps / sigma (NCSN, score SDEs),
    v      alpha eps - sigma x0 (Salimans and Ho 2022),

and any one gives the others: (x_t, v) is a rotation-and-scale of (x0, eps),
so x0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2) and eps = (sigma x_t +
alpha v) / (alpha^2 + sigma^2), which for VP processes (alpha^2 + sigma^2 = 1)
are the familiar forms. This module is the only place where a network output
is converted; everything else asks for a score function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import struct

from diffusers_unified.processes import Process, batch_broadcast
from diffusers_unified.typing import ApplyFn, Array, Params

PARAMETRIZATIONS = ("eps", "x0", "score", "v")


def check_parametrization(name: str) -> str:
    if name not in PARAMETRIZATIONS:
        raise ValueError(f"unknown parametrization {name!r}; valid: {', '.join(PARAMETRIZATIONS)}")
    return name


def to_x0_eps(out: Array, x: Array, alpha: Array, sigma: Array, parametrization: str):
    """(x0, eps) implied by a prediction `out` of kind `parametrization` at x_t = x."""
    a, s = batch_broadcast(alpha, x), batch_broadcast(sigma, x)
    if parametrization == "eps":
        return (x - s * out) / a, out
    if parametrization == "x0":
        return out, (x - a * out) / s
    if parametrization == "score":
        eps = -s * out
        return (x - s * eps) / a, eps
    if parametrization == "v":
        norm = a**2 + s**2
        return (a * x - s * out) / norm, (s * x + a * out) / norm
    check_parametrization(parametrization)


def from_x0_eps(x0: Array, eps: Array, alpha: Array, sigma: Array, parametrization: str):
    """The prediction of kind `parametrization` that corresponds to (x0, eps)."""
    a, s = batch_broadcast(alpha, x0), batch_broadcast(sigma, x0)
    if parametrization == "eps":
        return eps
    if parametrization == "x0":
        return x0
    if parametrization == "score":
        return -eps / s
    if parametrization == "v":
        return a * eps - s * x0
    check_parametrization(parametrization)


def convert(out: Array, x: Array, alpha: Array, sigma: Array, source: str, target: str) -> Array:
    """Converts a prediction of kind `source` into one of kind `target`."""
    if source == target:
        check_parametrization(source)
        return out
    x0, eps = to_x0_eps(out, x, alpha, sigma, source)
    return from_x0_eps(x0, eps, alpha, sigma, target)


def to_score(out: Array, x: Array, alpha: Array, sigma: Array, parametrization: str) -> Array:
    """grad log p_t(x) implied by a prediction `out`: -eps / sigma."""
    if parametrization == "score":
        return out
    _, eps = to_x0_eps(out, x, alpha, sigma, parametrization)
    return -eps / batch_broadcast(sigma, x)


class ModelScore(struct.PyTreeNode):
    """A score function backed by a network: `ModelScore(...)(x, t) -> score`.

    It is a pytree whose leaves are the parameters (and labels, if any), so a
    jitted sampler called with new parameters of the same shapes does not
    re-trace. Built by `make_score_fn`.
    """

    params: Params
    y: Any = None
    process: Process = struct.field(pytree_node=False, default=None)
    apply_fn: Callable = struct.field(pytree_node=False, default=None)
    parametrization: str = struct.field(pytree_node=False, default="eps")

    def __call__(self, x: Array, t: Array) -> Array:
        alpha, sigma = self.process.alpha_sigma(t)
        out = self.apply_fn(self.params, x, self.process.noise_cond(t), self.y)
        return to_score(out, x, alpha, sigma, self.parametrization)


def make_score_fn(
    process: Process,
    apply_fn: ApplyFn,
    params: Params,
    parametrization: str = "eps",
    y: Array | None = None,
) -> ModelScore:
    """The score function of a network that predicts `parametrization` under `process`.

    `apply_fn(params, x, noise_cond, y)` is the network (see `ApplyFn`); it is
    conditioned on `process.noise_cond(t)` and never sees the process itself.
    `apply_fn` must be hashable and stable across calls (a module-level
    function or `nets.NetApply`), since it is part of jit's cache key.
    """
    check_parametrization(parametrization)
    return ModelScore(
        params=params, y=y, process=process, apply_fn=apply_fn, parametrization=parametrization
    )
