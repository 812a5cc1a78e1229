"""Training objectives, each built as a pure `loss_fn(params, key, batch) -> (loss, aux)`.

`batch` is `{"x": data (batch, ...), "y": optional labels}`. `aux` holds
`per_example` (the loss of each example, whose spread gives the Monte-Carlo
error of the batch mean) and `t` (the times drawn). Every loss reads the
network through the parametrization module, so any loss trains a network of
any parametrization.

All losses are denoising score matching at heart: with x_t = alpha x_0 +
sigma eps and the network's implied noise eps_hat = -sigma score,

    sigma^2 || score + eps / sigma ||^2 = || eps - eps_hat ||^2,

so DDPM's eps-MSE, NCSN's sigma^2-weighted DSM and the score SDE's DSM differ
in how they draw t, weight it and reduce over dimensions. The reductions are
the score SDE code's `reduce_op`: "mean" averages the squared error over
dimensions, "sum" is half its sum (the 1/2 of NCSN's objective, and of the
score-matching term of the likelihood bound of Song et al. 2021b).

`classifier_loss` trains the noise-conditional classifier of the score SDE
paper's class-conditional sampling (sec. 5, app. I.1) on the same noisy x_t.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp

from diffusers_unified.errors import DataError
from diffusers_unified.parametrization import check_parametrization, to_score
from diffusers_unified.processes import Process, batch_broadcast
from diffusers_unified.typing import ApplyFn, Array, LossFn, Params, PRNGKey

# "sum" is 1/2 x the sum over dimensions, as in the score SDE code (see _reduce).
REDUCTIONS = ("mean", "sum")
WEIGHTINGS = ("sigma2", "likelihood")
PROBES = ("gaussian", "rademacher")


def _reduce(per_dim: Array, reduce: str) -> Array:
    """Per example: the mean over dimensions ("mean"), or half the sum ("sum").

    The score SDE code's `reduce_op` (`jnp.mean`, or `0.5 * jnp.sum` when
    `reduce_mean` is false), shared by its DDPM, SMLD and SDE losses; the NCSN
    code's loss is likewise 1/2 of the summed squared error.
    """
    flat = per_dim.reshape(per_dim.shape[0], -1)
    return jnp.mean(flat, axis=-1) if reduce == "mean" else 0.5 * jnp.sum(flat, axis=-1)


def _sum_over_dims(a: Array) -> Array:
    return jnp.sum(a.reshape(a.shape[0], -1), axis=-1)


def _check(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


def _score_fn(apply_fn: ApplyFn, process: Process, parametrization: str, params, y, rng):
    """The network's score at (x, t) in training mode (dropout on, fed by rng)."""

    def score(x: Array, t: Array) -> Array:
        alpha, sigma = process.alpha_sigma(t)
        out = apply_fn(params, x, process.noise_cond(t), y, train=True, rng=rng)
        return to_score(out, x, alpha, sigma, parametrization)

    return score


def _denoising_loss(
    process: Process,
    apply_fn: ApplyFn,
    parametrization: str,
    draw_times,
    weight,
    reduce: str,
) -> LossFn:
    """sum or mean over dims of weight(t) sigma(t)^2 || score(x_t, t) + eps / sigma(t) ||^2."""
    check_parametrization(parametrization)
    _check("reduction", reduce, REDUCTIONS)

    def loss_fn(params, key, batch):
        x0 = batch["x"]
        key_t, key_eps, key_net = jax.random.split(key, 3)
        t = draw_times(key_t, x0.shape[0])
        eps = jax.random.normal(key_eps, x0.shape)
        alpha, sigma = process.alpha_sigma(t)
        x_t = batch_broadcast(alpha, x0) * x0 + batch_broadcast(sigma, x0) * eps
        score = _score_fn(apply_fn, process, parametrization, params, batch.get("y"), key_net)
        residual = batch_broadcast(sigma, x0) * score(x_t, t) + eps  # = eps - eps_hat
        per_example = weight(t) * _reduce(residual**2, reduce)
        return jnp.mean(per_example), {"per_example": per_example, "t": t}

    return loss_fn


def with_label_dropout(loss_fn: LossFn, rate: float, null_label: int) -> LossFn:
    """Classifier-free guidance training (Ho and Salimans 2021, Alg. 1): label dropout.

    Each example's label is replaced by `null_label` (a network's
    `num_classes`, the row of its label embedding that stands for "no label")
    with probability `rate`, so one network learns the conditional score and,
    under the null label, the unconditional one; sampling combines them (see
    `parametrization.guide`). The paper uses rate 0.1 or 0.2. Batches without
    labels pass through unchanged. The update's key is split into one key for
    the dropout and one for `loss_fn`; `aux["label_dropped"]` marks the
    dropped examples.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"label dropout rate must be in [0, 1], got {rate}")
    if rate == 0.0:
        return loss_fn

    def dropout_loss_fn(params, key, batch):
        y = batch.get("y")
        if y is None:
            return loss_fn(params, key, batch)
        key_drop, key_loss = jax.random.split(key)
        drop = jax.random.bernoulli(key_drop, rate, y.shape)
        batch = {**batch, "y": jnp.where(drop, jnp.asarray(null_label, y.dtype), y)}
        loss, aux = loss_fn(params, key_loss, batch)
        return loss, {**aux, "label_dropped": drop}

    return dropout_loss_fn


def _grid_times(process: Process):
    times = jnp.asarray(process.sampling_grid(), jnp.float32)
    return lambda key, n: times[jax.random.randint(key, (n,), 0, times.shape[0])]


def _uniform_times(process: Process, t_min: float):
    return lambda key, n: jax.random.uniform(key, (n,), minval=t_min, maxval=process.T)


def ddpm_loss(
    process: Process, apply_fn: ApplyFn, parametrization: str = "eps", reduce: str = "mean"
) -> LossFn:
    """DDPM's L_simple (Ho et al. 2020, eq. 14): E_{i, eps} || eps - eps_theta(x_i, i) ||^2.

    The level i is uniform over the process's N levels (`sampling_grid()`;
    for a continuous process, its N-point grid), and the squared error is
    averaged over dimensions (`reduce="mean"`, as the DDPM code does).
    """
    return _denoising_loss(
        process, apply_fn, parametrization, _grid_times(process), jnp.ones_like, reduce
    )


def ncsn_loss(
    process: Process, apply_fn: ApplyFn, parametrization: str = "score", reduce: str = "sum"
) -> LossFn:
    """NCSN's denoising score matching (Song and Ermon 2019, eq. 6) with lambda(sigma) = sigma^2.

    1/2 sigma_i^2 || s_theta(x~, sigma_i) + (x~ - x) / sigma_i^2 ||^2 with the
    level i uniform over the N levels: with `reduce="sum"` (the default) the
    1/2 and the sum over dimensions are the paper's and the NCSN code's; with
    "mean" it is the score SDE code's SMLD loss with `reduce_mean` (the mean
    over dimensions, no 1/2).
    """
    return _denoising_loss(
        process, apply_fn, parametrization, _grid_times(process), jnp.ones_like, reduce
    )


def dsm_loss(
    process: Process,
    apply_fn: ApplyFn,
    parametrization: str = "score",
    weighting: str = "sigma2",
    reduce: str = "sum",
    t_min: float = 1e-5,
    importance_sampling: bool = False,
    importance_constant: bool = True,
) -> LossFn:
    """Continuous-time denoising score matching (Song et al. 2021, eq. 7).

    E_{t ~ U(t_min, T)} lambda(t) || s_theta(x_t, t) + eps / sigma(t) ||^2 with
    lambda = sigma^2 (`weighting="sigma2"`, the paper's default) or lambda =
    g(t)^2 (`"likelihood"`, the likelihood weighting of Song, Durkan, Murray
    and Ermon 2021: with `reduce="sum"` the loss is then the denoising form
    of the score-matching term 1/2 int g^2 E||s_theta - grad log p_t||^2 dt
    of their bound on the negative log-likelihood, divided by T - t_min, and
    equal to it up to a constant that does not depend on the network).
    t_min = 1e-5 and the 1/2-sum over dimensions are the score SDE code's
    defaults (`get_sde_loss_fn`).

    `importance_sampling` (likelihood weighting only) draws t from the density
    p(t) proportional to g(t)^2 / sigma(t)^2 on [t_min, T] and weights each
    example by lambda(t) / (sigma^2 p(t)) = Z, the variance reduction of
    Song et al. 2021b (sec. 5; score_flow's `importance_weighting`). Since
    d sigma^2 / dt = 2 f sigma^2 + g^2, g^2 / sigma^2 = -2 d lambda_snr / dt
    with the log-SNR lambda_snr = log(alpha / sigma), so for every process the
    cumulative weight is 2 (lambda_snr(t_min) - lambda_snr(t)) and Z =
    2 (lambda_snr(t_min) - lambda_snr(T)). score_flow writes this out for the
    VP and sub-VP SDEs and inverts it by 100 bisection steps; here the same
    bisection runs on the process's log-SNR, so it serves every process (for
    VE, g^2 / sigma^2 is constant and t stays uniform). With
    `importance_constant` (the default) each example's loss is multiplied by
    Z / (T - t_min), so that its expectation equals the uniform-t estimator's
    and only the variance changes; score_flow leaves the constant out (its
    loss is this one divided by Z / (T - t_min): 23.9 for the VP SDE), which
    `importance_constant=False` reproduces.
    """
    _check("weighting", weighting, WEIGHTINGS)
    if importance_sampling and weighting != "likelihood":
        raise ValueError(
            "importance_sampling draws t in proportion to the likelihood weighting "
            f"g^2 / sigma^2; it needs weighting='likelihood', got weighting={weighting!r}"
        )
    if not 0.0 < t_min < process.T:
        raise ValueError(f"t_min must lie in (0, T={process.T}), got {t_min}")
    if importance_sampling:
        importance = likelihood_importance_times(process, t_min)
        draw_times = importance.draw
        scale = importance.z / (process.T - t_min) if importance_constant else 1.0
        return _denoising_loss(
            process,
            apply_fn,
            parametrization,
            draw_times,
            lambda t: jnp.full_like(t, scale),
            reduce,
        )
    if weighting == "sigma2":
        weight = jnp.ones_like
    else:

        def weight(t):
            _, g2 = process.coefficients(t)
            _, sigma = process.alpha_sigma(t)
            return g2 / sigma**2

    return _denoising_loss(
        process, apply_fn, parametrization, _uniform_times(process, t_min), weight, reduce
    )


def _log_snr(process: Process, t: Array) -> Array:
    alpha, sigma = process.alpha_sigma(t)
    return jnp.log(alpha) - jnp.log(sigma)


BISECTION_STEPS = 100  # as score_flow's sample_importance_weighted_time_for_likelihood


class LikelihoodImportance(NamedTuple):
    """Times with density g^2 / (sigma^2 Z) on [t_min, T]; see `likelihood_importance_times`."""

    quantile: Callable[[Array], Array]  # u in [0, 1] -> the time t with CDF(t) = u
    z: float  # int_{t_min}^T g^2 / sigma^2 dt

    def draw(self, key: PRNGKey, n: int) -> Array:
        return self.quantile(jax.random.uniform(key, (n,)))


def likelihood_importance_times(process: Process, t_min: float = 1e-5) -> LikelihoodImportance:
    """Importance sampling of t for the likelihood weighting (Song et al. 2021b, sec. 5).

    Z = int_{t_min}^T g^2 / sigma^2 dt = 2 (lambda(t_min) - lambda(T)), with
    lambda the log-SNR (see `dsm_loss`). The quantile of u is the time t with
    lambda(t) = lambda(t_min) - u Z / 2, found by bisection, as in score_flow's
    sampler (which bisects the same cumulative weight written out for the VP
    and sub-VP SDEs).
    """
    with jax.ensure_compile_time_eval():
        lam_min, lam_max = (float(_log_snr(process, jnp.float32(t))) for t in (t_min, process.T))

    def quantile(u):
        target = lam_min - u * (lam_min - lam_max)

        def bisect(bounds, _):
            lo, hi = bounds
            mid = 0.5 * (lo + hi)
            below = _log_snr(process, mid) >= target  # lambda decreases: mid <= the root
            return (jnp.where(below, mid, lo), jnp.where(below, hi, mid)), None

        lo, hi = jnp.full(u.shape, t_min, u.dtype), jnp.full(u.shape, process.T, u.dtype)
        (lo, hi), _ = jax.lax.scan(bisect, (lo, hi), None, length=BISECTION_STEPS)
        return 0.5 * (lo + hi)

    return LikelihoodImportance(quantile, 2.0 * (lam_min - lam_max))


def sliced_score_matching_loss(
    process: Process,
    apply_fn: ApplyFn,
    parametrization: str = "score",
    num_projections: int = 1,
    probe: str = "gaussian",
    t_min: float = 1e-5,
) -> LossFn:
    """Sliced score matching (Song, Garg, Shi and Ermon 2019), variance-reduced form (SSM-VR).

    For x_t drawn from the perturbed data, E_v [v^T grad_x s(x_t) v] + 1/2
    ||s(x_t)||^2, with v Gaussian (or Rademacher) and the Hessian-vector term
    from one forward-mode product per projection; weighted by sigma(t)^2 and
    averaged over t ~ U(t_min, T). Unlike denoising score matching it needs no
    noise target: it matches the score of p_t itself, which it reaches at its
    minimum, E_{p_t}[-1/2 ||grad log p_t||^2] per t.
    """
    check_parametrization(parametrization)
    _check("probe", probe, PROBES)
    if num_projections < 1:
        raise ValueError(f"num_projections must be >= 1, got {num_projections}")
    draw_times = _uniform_times(process, t_min)

    def loss_fn(params, key, batch):
        x0 = batch["x"]
        key_t, key_eps, key_v, key_net = jax.random.split(key, 4)
        t = draw_times(key_t, x0.shape[0])
        alpha, sigma = process.alpha_sigma(t)
        x_t = batch_broadcast(alpha, x0) * x0 + batch_broadcast(sigma, x0) * jax.random.normal(
            key_eps, x0.shape
        )
        score = _score_fn(apply_fn, process, parametrization, params, batch.get("y"), key_net)
        shape = (num_projections, *x0.shape)
        if probe == "gaussian":
            vs = jax.random.normal(key_v, shape)
        else:
            vs = jax.random.rademacher(key_v, shape).astype(x0.dtype)

        def trace_term(v):
            s, hv = jax.jvp(lambda x: score(x, t), (x_t,), (v,))
            return s, _sum_over_dims(v * hv)

        s, traces = jax.vmap(trace_term)(vs)
        per_example = sigma**2 * (jnp.mean(traces, axis=0) + 0.5 * _sum_over_dims(s[0] ** 2))
        return jnp.mean(per_example), {"per_example": per_example, "t": t}

    return loss_fn


class ClassifierFn(Protocol):
    """A noise-conditional classifier: `(params, x, noise_cond, *, train, rng) -> logits`.

    The logits are shaped (batch, K); `nets.classifier.ClassifierApply(module)`
    wraps the classifiers of `nets.classifier` in this signature.
    """

    def __call__(
        self,
        params: Params,
        x: Array,
        noise_cond: Array,
        *,
        train: bool = False,
        rng: PRNGKey | None = None,
    ) -> Array: ...


def classifier_loss(
    process: Process, classifier_apply: ClassifierFn, t_min: float = 1e-5
) -> LossFn:
    """Cross-entropy of a noise-conditional classifier p_t(y | x_t) on noisy data.

    E_{t ~ U(t_min, T), x_t ~ p(x_t | x_0)} [-log softmax(logits(x_t, t))_y]:
    the classifier of the score SDE paper's class-conditional sampling
    (Song et al. 2021, sec. 5 and app. I.1, whose gradient
    grad_x log p_t(y | x) is added to the score; see
    `parametrization.classifier_guided_score_fn`). The paper trains a
    noise-conditional Wide ResNet on the VE SDE's perturbed CIFAR-10; the
    reference code publishes only its use (`controllable_generation.py`), so
    the time distribution here is the score losses' U(t_min, T), which covers
    every time a sampler asks about. The classifier is conditioned on
    `process.noise_cond(t)`, as the score networks are (the reference's
    classifier takes the VE noise scale sigma(t) and embeds log sigma, an
    affine function of t for the VE SDE). The batch must carry labels `y`;
    `aux` holds `per_example`, `t` and `correct` (argmax == y).
    """
    if not 0.0 < t_min < process.T:
        raise ValueError(f"t_min must lie in (0, T={process.T}), got {t_min}")
    draw_times = _uniform_times(process, t_min)

    def loss_fn(params, key, batch):
        x0, y = batch["x"], batch.get("y")
        if y is None:
            raise DataError(
                "classifier_loss needs labels: the batch has no 'y' (a labelled data set "
                "gives batches {'x': data, 'y': int labels})"
            )
        key_t, key_eps, key_net = jax.random.split(key, 3)
        t = draw_times(key_t, x0.shape[0])
        alpha, sigma = process.alpha_sigma(t)
        x_t = batch_broadcast(alpha, x0) * x0 + batch_broadcast(sigma, x0) * jax.random.normal(
            key_eps, x0.shape
        )
        logits = classifier_apply(params, x_t, process.noise_cond(t), train=True, rng=key_net)
        log_p = jax.nn.log_softmax(logits, axis=-1)
        per_example = -jnp.take_along_axis(log_p, y[:, None].astype(jnp.int32), axis=-1)[:, 0]
        correct = jnp.argmax(logits, axis=-1) == y
        return jnp.mean(per_example), {"per_example": per_example, "t": t, "correct": correct}

    return loss_fn
