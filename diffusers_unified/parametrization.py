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

It is also where conditional scores are assembled, so every sampler gets them
for free: classifier-free guidance (Ho and Salimans 2021) combines a
conditional and an unconditional score (`guided_score_fn`, `ModelScore(...,
guidance=w)`), and classifier guidance (Song et al. 2021, sec. 5) adds the
gradient of a noise-conditional classifier's log-probability to a score
(`classifier_guided_score_fn`, with `make_logits_fn` for a network).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from diffusers_unified.processes import Process, batch_broadcast
from diffusers_unified.typing import ApplyFn, Array, Params, ScoreFn

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


def guide(conditional: Array, unconditional: Array, guidance) -> Array:
    """Classifier-free guidance: (1 + w) conditional - w unconditional, with w = `guidance`.

    This is Ho and Salimans (2021, eq. 6) with their w: w = 0 is the plain
    conditional model, w > 0 sharpens it. In scores it reads

        grad log p_t(x | y) + w grad log p_t(y | x),

    the conditional reverse SDE of Song et al. (2021, sec. 5) with the
    classifier's log-probability scaled by 1 + w (classifier guidance, with
    the classifier implied by the two scores). The combination is linear, so
    it is the same whether applied to scores, eps or (for a fixed x_t) x0
    predictions. diffusers' `guidance_scale` s is 1 + w: its eps_uncond +
    s (eps_cond - eps_uncond) is this formula.
    """
    return (1.0 + guidance) * conditional - guidance * unconditional


class GuidedScore(struct.PyTreeNode):
    """`score(x, t) = (1 + w) conditional(x, t) - w unconditional(x, t)` (see `guide`).

    Any two score functions, e.g. the exact class-conditional and marginal
    scores of a labelled Gaussian mixture; for a network, `ModelScore` with
    `guidance` does the same with the null label. One guided evaluation costs
    two score evaluations; samplers count it as one NFE.
    """

    conditional: Any
    unconditional: Any
    guidance: Any = 0.0

    def __call__(self, x: Array, t: Array) -> Array:
        return guide(self.conditional(x, t), self.unconditional(x, t), self.guidance)


def _pytree(score_fn: ScoreFn):
    # A plain function becomes a leafless pytree, so the combination can go through jit.
    if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(score_fn)):
        return jax.tree_util.Partial(score_fn)
    return score_fn


def guided_score_fn(conditional: ScoreFn, unconditional: ScoreFn, guidance) -> GuidedScore:
    """Classifier-free guidance of two score functions with weight w = `guidance` (see `guide`).

    The weight is a traced leaf: samplers compiled once serve every w.
    """
    return GuidedScore(_pytree(conditional), _pytree(unconditional), guidance)


class ModelScore(struct.PyTreeNode):
    """A score function backed by a network: `ModelScore(...)(x, t) -> score`.

    It is a pytree whose leaves are the parameters (and labels and guidance
    weight, if any), so a jitted sampler called with new parameters of the
    same shapes does not re-trace. With labels `y` and a `guidance` weight w,
    it is the classifier-free guided score (1 + w) s(x, t, y) - w s(x, t,
    null) (see `guide`), the null label being what the network uses for
    y=None (row `num_classes` of its label embedding, the label that label
    dropout trains). Built by `make_score_fn`.
    """

    params: Params
    y: Any = None
    guidance: Any = None
    process: Process = struct.field(pytree_node=False, default=None)
    apply_fn: Callable = struct.field(pytree_node=False, default=None)
    parametrization: str = struct.field(pytree_node=False, default="eps")

    def _score(self, x: Array, t: Array, y) -> Array:
        alpha, sigma = self.process.alpha_sigma(t)
        out = self.apply_fn(self.params, x, self.process.noise_cond(t), y)
        return to_score(out, x, alpha, sigma, self.parametrization)

    def __call__(self, x: Array, t: Array) -> Array:
        score = self._score(x, t, self.y)
        if self.guidance is None or self.y is None:
            return score
        return guide(score, self._score(x, t, None), self.guidance)


def make_score_fn(
    process: Process,
    apply_fn: ApplyFn,
    params: Params,
    parametrization: str = "eps",
    y: Array | None = None,
    guidance: float | None = None,
) -> ModelScore:
    """The score function of a network that predicts `parametrization` under `process`.

    `apply_fn(params, x, noise_cond, y)` is the network (see `ApplyFn`); it is
    conditioned on `process.noise_cond(t)` and never sees the process itself.
    `apply_fn` must be hashable and stable across calls (a module-level
    function or `nets.NetApply`), since it is part of jit's cache key. With
    labels `y` and `guidance` w (None: no guidance, one network evaluation per
    score), the score is classifier-free guided (see `guide`; two network
    evaluations per score).
    """
    check_parametrization(parametrization)
    if guidance is not None and y is None:
        raise ValueError("classifier-free guidance needs labels y to guide towards")
    return ModelScore(
        params=params,
        y=y,
        guidance=guidance,
        process=process,
        apply_fn=apply_fn,
        parametrization=parametrization,
    )


# -- classifier guidance ------------------------------------------------------------------


class ClassifierGuidedScore(struct.PyTreeNode):
    """`score(x, t) + scale grad_x log p_t(y | x)`, with log p_t(y | x) = log_softmax(logits)_y.

    See `classifier_guided_score_fn`. `logits_fn(x, t) -> (batch, K)`, labels
    `y` (batch,) or one label for the whole batch; `y` and `scale` are traced
    leaves, so new labels or a new scale reuse a compiled sampler.
    """

    score_fn: Any
    logits_fn: Any
    y: Any
    scale: Any = 1.0

    def __call__(self, x: Array, t: Array) -> Array:
        y = jnp.broadcast_to(jnp.asarray(self.y, jnp.int32), x.shape[:1])

        def log_prob(x):
            log_p = jax.nn.log_softmax(self.logits_fn(x, t), axis=-1)
            # Examples are independent, so the gradient of the sum is each one's gradient.
            return jnp.sum(jnp.take_along_axis(log_p, y[:, None], axis=-1))

        return self.score_fn(x, t) + self.scale * jax.grad(log_prob)(x)


def classifier_guided_score_fn(
    score_fn: ScoreFn, classifier_logits_fn, y, scale=1.0
) -> ClassifierGuidedScore:
    """The class-conditional score grad log p_t(x | y) = score + grad_x log p_t(y | x).

    Song et al. (2021, sec. 5 and app. I.1; the reference code's
    `controllable_generation.get_pc_conditional_sampler`): by Bayes' rule the
    conditional score is the unconditional one plus the gradient of a
    noise-conditional classifier's log-probability of the label, so any
    sampler given this score function samples p(x | y). `classifier_logits_fn(x,
    t)` returns logits (or log-probabilities) of shape (batch, K), e.g.
    `make_logits_fn(process, classifier_apply, params)` or the exact posterior
    of a labelled Gaussian mixture (`GaussianMixture.logits_fn`). `scale`
    multiplies the classifier term: 1 is the reference (exact Bayes); other
    values are the classifier scale of Dhariwal and Nichol (2021), which
    samples p(x) p(y | x)^scale. Each evaluation costs one score evaluation
    and one forward and backward pass of the classifier; samplers count it as
    one NFE.
    """
    return ClassifierGuidedScore(_pytree(score_fn), _pytree(classifier_logits_fn), y, scale)


class ModelLogits(struct.PyTreeNode):
    """`logits(x, t)` of a noise-conditional classifier network; a pytree of its parameters."""

    params: Params
    process: Process = struct.field(pytree_node=False, default=None)
    apply_fn: Callable = struct.field(pytree_node=False, default=None)

    def __call__(self, x: Array, t: Array) -> Array:
        return self.apply_fn(self.params, x, self.process.noise_cond(t))


def make_logits_fn(process: Process, classifier_apply, params: Params) -> ModelLogits:
    """(x, t) -> logits of a classifier `classifier_apply(params, x, noise_cond)` (see
    `nets.classifier.ClassifierApply`), conditioned on `process.noise_cond(t)` as the
    score networks are. `classifier_apply` must be hashable and stable across calls."""
    return ModelLogits(params=params, process=process, apply_fn=classifier_apply)
