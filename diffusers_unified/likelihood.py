"""Likelihoods: the probability-flow ODE's exact log-likelihood and DDPM's variational bound.

Probability-flow ODE (Song et al. 2021, appendix D.2). Along dx/dt = f~(x, t)
= f(t) x - 1/2 g(t)^2 score(x, t), the instantaneous change of variables gives
d log p_t(x_t) / dt = -div f~(x_t, t), so

    log p_eps(x) = log p_T(x_T) + int_eps^T div f~(x_t, t) dt,

with x_T the ODE's solution from x_eps = x and p_T taken to be the prior (the
model's density is the prior pushed through the flow; where the data's true
p_T differs from the prior, the two differ by log p_T(x_T) - prior(x_T),
which `latent` lets a caller compute). [x, int div] is solved jointly,
as one ODE for the whole batch, inside jit: adaptively with diffrax (Dopri5,
the reference code's scipy RK45 at rtol = atol = 1e-5) or with fixed steps.
The divergence is exact (the Jacobian's trace, one forward-mode product per
dimension: fine for small dimension) or the Hutchinson-Skilling estimate
E_v[v^T J v] with Rademacher (default, as the reference code) or Gaussian
probes drawn once per solve (as in FFJORD and the reference code), averaged
over `num_probes`. Rademacher probes have the lower variance at the same
cost: 2 sum_{i != j} M_ij^2 against Gaussian probes' 2 sum_ij M_ij^2, for
the symmetric part M of the integrated Jacobian. This follows the score SDE
code's `likelihood.get_likelihood_fn` (eps = 1e-5 for every SDE, RK45 at
rtol = atol = 1e-5, Rademacher probes, one per example); the departures are
diffrax's Dopri5 in place of scipy's RK45 (the same Dormand-Prince pair, its
own step-size controller) inside jit, and the option of several probes.

Bits per dimension: for data stored as 2^bits levels and dequantised
uniformly, -log p / (D ln 2) of the model's inputs plus the offset
`bits - log2(a)`, where the model sees a (v + u) / 2^bits + b for levels v
(a = 2 for data scaled to [-1, 1]); that is 7 for centred 8-bit images, the
score SDE code's "+7", and `Scaling.bpd_offset` of the data layer. The offset
comes from the change of variables to [0, 1]-units and the bin volume
2^-bits; the result bounds the discrete data's bits/dim from above (Jensen).

DDPM bound (Ho et al. 2020, eq. 5): L_T + sum_{t>1} L_{t-1} + L_0, each
term a KL between Gaussians, except the decoder L_0, which is a discretised
Gaussian over the bins of quantised data (eq. 13) or a continuous Gaussian
for continuous data; every term is reported, in bits/dim. It follows the
DDPM code's `calc_bpd_loop` (`diffusion_utils_2.py`), including its
variances: see `ddpm_bound`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusers_unified.processes import DDPM, Process
from diffusers_unified.samplers.ode import (
    ADAPTIVE,
    FIXED_STEP,
    adaptive_solver,
    flow_drift,
    flow_points,
    materialized,
    node_times,
    ode_drift,
    solve_grid,
)
from diffusers_unified.typing import Array, PRNGKey, ScoreFn

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("gaussian", "rademacher")


class LikelihoodOutput(NamedTuple):
    log_likelihood: Array  # (batch,) log p_eps(x), nats
    bpd: Array  # (batch,) bits/dim, with the offset applied
    prior_logp: Array  # (batch,) log p_T(x_T) under the prior
    delta: Array  # (batch,) int_eps^T div f~ dt
    latent: Array  # x_T, the ODE's image of x (the flow as an encoder)
    nfe: Array  # evaluations of the augmented vector field (each one divergence)


def _divergence_fn(drift, divergence: str, probes: Array | None):
    """(x, t) -> (drift, divergence per example), for a drift(x, t); t may be any pytree."""
    if divergence == "exact":

        def f(x, t):
            flat_shape = (x.shape[0], -1)
            dim = math.prod(x.shape[1:])

            def component(i):
                e = jnp.zeros((1, dim)).at[0, i].set(1.0)
                e = jnp.broadcast_to(e, (x.shape[0], dim)).reshape(x.shape)
                value, jvp = jax.jvp(lambda y: drift(y, t), (x,), (e,))
                return value, jvp.reshape(flat_shape)[:, i]

            values, diag = jax.lax.map(component, jnp.arange(dim))
            return values[0], jnp.sum(diag, axis=0)

        return f

    def f(x, t):
        def one(v):
            value, jvp = jax.jvp(lambda y: drift(y, t), (x,), (v,))
            return value, jnp.sum((v * jvp).reshape(x.shape[0], -1), axis=-1)

        if probes.shape[0] == 1:  # the usual single probe, without a loop around it
            return one(probes[0])
        values, estimates = jax.lax.map(one, probes)
        return values[0], jnp.mean(estimates, axis=0)

    return f


def _probes(key, shape, num_probes: int, probe: str) -> Array:
    full = (num_probes, *shape)
    if probe == "gaussian":
        return jax.random.normal(key, full)
    return jax.random.rademacher(key, full).astype(jnp.float32)


def ode_log_likelihood(
    key: PRNGKey,
    score_fn: ScoreFn,
    process: Process,
    x: Array,
    *,
    divergence: str = "hutchinson",
    probe: str = "rademacher",
    num_probes: int = 1,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    num_steps: int = 1000,
    t_min: float = 1e-5,
    bpd_offset: float = 0.0,
    max_steps: int = 10_000,
) -> LikelihoodOutput:
    """log p(x) of the model `score_fn` under `process`, per example, by the probability-flow ODE.

    Integrates from `t_min` to T; the result is the density of x_{t_min}. The
    default t_min = 1e-5 is the score SDE code's likelihood `eps`, which it
    uses for every SDE (its samplers stop at 1e-3 on VP and sub-VP, the
    `process.t_min` here; pass `t_min=process.t_min` for that). `method`:
    "dopri5" or "tsit5" (adaptive, rtol/atol) or "euler", "heun", "rk4"
    (num_steps uniform steps). `divergence`: "exact" or "hutchinson"
    (`num_probes` probes of kind `probe`, Rademacher by default as in the
    reference, fixed for the solve, averaged). Jit it with the options static,
    e.g. through `jax.jit(functools.partial(ode_log_likelihood, ...))`.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; valid: {', '.join(DIVERGENCES)}")
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; valid: {', '.join(PROBES)}")
    if method not in (*ADAPTIVE, *FIXED_STEP):
        raise ValueError(
            f"unknown ODE method {method!r}; valid: {', '.join((*FIXED_STEP, *ADAPTIVE))}"
        )
    if not 0.0 <= t_min < process.T:
        raise ValueError(f"t_min must be in [0, T = {process.T}), got t_min={t_min}")
    t0 = t_min
    probes = None
    if divergence == "hutchinson":
        probes = _probes(key, x.shape, num_probes, probe)

    def augmented(field):
        """The vector field of [x, int div] (the second component does not feed back)."""
        return lambda state, t: field(state[0], t)

    state0 = (x, jnp.zeros(x.shape[0], x.dtype))
    if method in ADAPTIVE:
        f = augmented(_divergence_fn(ode_drift(process, score_fn), divergence, probes))
        import diffrax  # imported here: about 0.9 s, and a train run never needs it

        solution = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, state, args: f(state, t)),
            adaptive_solver(method, x),
            t0=t0,
            t1=process.T,
            dt0=None,
            y0=materialized(state0),
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            saveat=diffrax.SaveAt(t1=True),
            max_steps=max_steps,
        )
        (x_end, delta) = jax.tree.map(lambda a: a[-1], solution.ys)
        nfe = 1 + 6 * solution.stats["num_steps"]
    else:
        # f(t) and g(t)^2 at every node of every step, once, before the loop.
        ts = np.linspace(t0, process.T, num_steps + 1)
        points = flow_points(process, node_times(ts, method))
        f = augmented(_divergence_fn(flow_drift(score_fn), divergence, probes))
        dts = jnp.asarray(np.diff(ts), x.dtype)
        x_end, delta = solve_grid(f, state0, dts, points, method)
        nfe = jnp.asarray(num_steps * FIXED_STEP[method][1], jnp.int32)
    prior = process.prior_logp(x_end)
    logp = prior + delta
    dim = math.prod(x.shape[1:])
    bpd = -logp / (dim * math.log(2.0)) + bpd_offset
    return LikelihoodOutput(logp, bpd, prior, delta, x_end, nfe)


# -- DDPM's variational bound -----------------------------------------------------------


class DDPMBoundOutput(NamedTuple):
    bpd: Array  # (batch,) total bound, bits/dim
    prior_bpd: Array  # (batch,) L_T
    kl_bpd: Array  # (batch, N - 1) L_{t-1} for levels 1 .. N-1 (Ho's t = 2 .. T)
    decoder_bpd: Array  # (batch,) L_0
    nfe: Array


DECODERS = ("discretized", "gaussian")


def _gaussian_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp logvar1) || N(mean2, exp logvar2)), elementwise."""
    ratio = jnp.exp(logvar1 - logvar2)
    return 0.5 * (logvar2 - logvar1 + ratio + (mean1 - mean2) ** 2 * jnp.exp(-logvar2) - 1.0)


def _std_normal_cdf(x):
    return 0.5 * (1.0 + jax.lax.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x, mean, log_scale, bits: int = 8):
    """log P(bin of x) under N(mean, exp(log_scale)^2), for data on 2^bits levels in [-1, 1].

    The levels are the bin centres v / (2^bits - 1) * 2 - 1 (v / 127.5 - 1 for
    8 bits), the bins have width 2 / (2^bits - 1), and the first and last
    extend to -inf and +inf (Ho et al. 2020, eq. 13). The DDPM code's
    `discretized_gaussian_log_likelihood` (8 bits only) tells the edge bins by
    |x| > 0.999; here the test is half a bin from the edge, which is the same
    for 8 bits and stays right from 11 bits on, where the level next to the
    edge is itself beyond 0.999.
    """
    half_bin = 1.0 / (2**bits - 1)
    inv_std = jnp.exp(-log_scale)
    upper = _std_normal_cdf(inv_std * (x - mean + half_bin))
    lower = _std_normal_cdf(inv_std * (x - mean - half_bin))
    log_upper = jnp.log(jnp.maximum(upper, 1e-12))
    log_one_minus_lower = jnp.log(jnp.maximum(1.0 - lower, 1e-12))
    log_delta = jnp.log(jnp.maximum(upper - lower, 1e-12))
    first, last = x < -1.0 + half_bin, x > 1.0 - half_bin
    return jnp.where(first, log_upper, jnp.where(last, log_one_minus_lower, log_delta))


DECODER_VARIANCES = ("posterior", "beta")


def ddpm_bound(
    key: PRNGKey,
    score_fn: ScoreFn,
    process: DDPM,
    x0: Array,
    *,
    variance: str | None = None,
    decoder: str = "gaussian",
    decoder_variance: str = "posterior",
    clip_x0: bool = False,
    bits: int = 8,
    bpd_offset: float = 0.0,
) -> DDPMBoundOutput:
    """DDPM's variational bound on -log p(x0) (Ho et al. 2020, eq. 5), per example, in bits/dim.

    For each level i >= 1 a fresh x_i ~ q(x_i | x0) is drawn (as the DDPM
    code's `calc_bpd_loop` does) and KL(q(x_{i-1} | x_i, x0) || p(x_{i-1} | x_i))
    evaluated, the model's mean being the ancestral sampler's
    (x_i + beta_i score) / sqrt(1 - beta_i) and its variance beta-tilde_i
    ("small") or beta_i ("large"); `variance=None` is the DDPM code's CIFAR-10
    choice, "large" (`process.ancestral_variance`). L_T = KL(q(x_{N-1} | x0) ||
    N(0, I)). The decoder L_0 = -log p(x0 | x at level 0) is a Gaussian
    density (`decoder="gaussian"`, continuous data) or the discretised
    Gaussian of eq. 13 (`"discretized"`, for data on the bin centres
    v / (2^bits - 1) * 2 - 1 of 2^bits levels: pass those, not dequantised
    data, whose values are up to half a bin off the centres).

    The decoder's variance: `decoder_variance="posterior"` (default) is the
    DDPM code's for both variances, the posterior variance of the next level,
    beta-tilde_2 in Ho et al.'s numbering (its `posterior_variance[1]`: the
    small variance of level 0 is 0, which the code clips so, and its
    `fixedlarge` takes it too, "to get a better decoder log likelihood");
    this is the setting behind the paper's NLL figures (3.70 and 3.75
    bits/dim on CIFAR-10). `"beta"` is beta_1, the paper's text for the large
    variance (sigma_1^2 = beta_1). `clip_x0` clips the predicted x_0 to
    [-1, 1] before forming the model's mean, as `calc_bpd_loop`
    (clip_denoised=True) does; off by default. N score evaluations per example.
    `bpd_offset` is added to the total (e.g. to express continuous data's
    density in other units); for discretised data it is 0.
    """
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; valid: {', '.join(DECODERS)}")
    if variance is not None and variance not in ("small", "large"):
        raise ValueError(f"unknown variance {variance!r}; valid: small, large, or None")
    if decoder_variance not in DECODER_VARIANCES:
        raise ValueError(
            f"unknown decoder_variance {decoder_variance!r}; valid: {', '.join(DECODER_VARIANCES)}"
        )
    variance = process.ancestral_variance if variance is None else variance
    betas = process.betas()
    log_alphabar = process.log_alphabar()
    alphabar = np.exp(log_alphabar)
    alphabar_prev = np.concatenate([[1.0], alphabar[:-1]])
    beta_tilde = betas * (1.0 - alphabar_prev) / (1.0 - alphabar)
    model_var = beta_tilde.copy() if variance == "small" else betas.copy()
    model_var[0] = beta_tilde[1] if decoder_variance == "posterior" else betas[0]
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    sqrt_ab, sqrt_1mab = f32(np.sqrt(alphabar)), f32(np.sqrt(1.0 - alphabar))
    coef_x0 = f32(np.sqrt(alphabar_prev) * betas / (1.0 - alphabar))
    coef_xt = f32(np.sqrt(1.0 - betas) * (1.0 - alphabar_prev) / (1.0 - alphabar))
    log_beta_tilde = f32(np.log(np.maximum(beta_tilde, 1e-30)))
    log_model_var = f32(np.log(model_var))
    betas_f = f32(betas)
    times = jnp.asarray(process.times, jnp.float32)
    dim = math.prod(x0.shape[1:])
    per_bits = 1.0 / (dim * math.log(2.0))
    flat_sum = lambda a: jnp.sum(a.reshape(a.shape[0], -1), axis=-1)

    def model_mean(x, i):
        score = score_fn(x, times[i])
        if clip_x0:
            pred_x0 = jnp.clip((x + sqrt_1mab[i] ** 2 * score) / sqrt_ab[i], -1.0, 1.0)
            return coef_x0[i] * pred_x0 + coef_xt[i] * x
        return (x + betas_f[i] * score) / jnp.sqrt(1.0 - betas_f[i])

    def level_term(i):
        noise = jax.random.normal(jax.random.fold_in(key, i), x0.shape)
        x_i = sqrt_ab[i] * x0 + sqrt_1mab[i] * noise
        mean = model_mean(x_i, i)
        posterior_mean = coef_x0[i] * x0 + coef_xt[i] * x_i
        kl = _gaussian_kl(posterior_mean, log_beta_tilde[i], mean, log_model_var[i])
        if decoder == "gaussian":
            var = jnp.exp(log_model_var[i])
            nll0 = 0.5 * (log_model_var[i] + math.log(2 * math.pi) + (x0 - mean) ** 2 / var)
        else:
            nll0 = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_model_var[i], bits)
        # level 0 contributes the decoder term, every other level a KL
        return jnp.where(i == 0, flat_sum(nll0), flat_sum(kl)) * per_bits

    terms = jax.lax.map(level_term, jnp.arange(process.N))  # (N, batch)
    mean_T = sqrt_ab[-1] * x0
    prior = flat_sum(_gaussian_kl(mean_T, jnp.log(1.0 - alphabar[-1]), 0.0, 0.0)) * per_bits
    decoder_bpd, kl_bpd = terms[0], terms[1:].T
    total = prior + decoder_bpd + jnp.sum(kl_bpd, axis=-1) + bpd_offset
    return DDPMBoundOutput(total, prior, kl_bpd, decoder_bpd, jnp.asarray(process.N, jnp.int32))


def nats_to_bpd(nll: Array, dim: int, offset: float = 0.0) -> Array:
    """Bits per dimension of a negative log-likelihood in nats over `dim` dimensions."""
    return nll / (dim * math.log(2.0)) + offset


__all__ = [
    "DDPMBoundOutput",
    "LikelihoodOutput",
    "ddpm_bound",
    "discretized_gaussian_log_likelihood",
    "nats_to_bpd",
    "ode_log_likelihood",
]
