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
in how they draw t, weight it and reduce over dimensions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusers_unified.parametrization import check_parametrization, to_score
from diffusers_unified.processes import Process, batch_broadcast
from diffusers_unified.typing import ApplyFn, Array, LossFn

REDUCTIONS = ("mean", "sum")
WEIGHTINGS = ("sigma2", "likelihood")
PROBES = ("gaussian", "rademacher")


def _reduce(per_dim: Array, reduce: str) -> Array:
    flat = per_dim.reshape(per_dim.shape[0], -1)
    return jnp.mean(flat, axis=-1) if reduce == "mean" else jnp.sum(flat, axis=-1)


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
    level i uniform over the N levels and the squared norm summed over
    dimensions, as in the paper.
    """
    return _denoising_loss(
        process,
        apply_fn,
        parametrization,
        _grid_times(process),
        lambda t: jnp.full_like(t, 0.5),
        reduce,
    )


def dsm_loss(
    process: Process,
    apply_fn: ApplyFn,
    parametrization: str = "score",
    weighting: str = "sigma2",
    reduce: str = "sum",
    t_min: float = 1e-5,
) -> LossFn:
    """Continuous-time denoising score matching (Song et al. 2021, eq. 7).

    E_{t ~ U(t_min, T)} lambda(t) || s_theta(x_t, t) + eps / sigma(t) ||^2 with
    lambda = sigma^2 (`weighting="sigma2"`, the paper's default) or lambda =
    g(t)^2 (`"likelihood"`, which makes the loss an upper bound on the negative
    log-likelihood up to a constant; Song et al. 2021b). t_min = 1e-5 and the
    sum over dimensions are the reference code's defaults.
    """
    _check("weighting", weighting, WEIGHTINGS)
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
            return s, _reduce(v * hv, "sum")

        s, traces = jax.vmap(trace_term)(vs)
        per_example = sigma**2 * (jnp.mean(traces, axis=0) + 0.5 * _reduce(s[0] ** 2, "sum"))
        return jnp.mean(per_example), {"per_example": per_example, "t": t}

    return loss_fn
