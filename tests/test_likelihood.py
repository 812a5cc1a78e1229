"""Likelihoods against closed forms: the probability-flow ODE and DDPM's variational bound.

Gaussian data N(m, C), C = U diag(lam) U^T, have a linear probability-flow
ODE under every process: with V_k(t) = alpha(t)^2 lam_k + sigma(t)^2 it maps
x at time s to alpha(t) m + U diag(sqrt(V(t) / V(s))) U^T (x - alpha(s) m),
and the integral of its divergence from s to t is the log-determinant
sum_k 1/2 log(V_k(t) / V_k(s)). So the model's log-likelihood (the prior
pushed through the flow), its latent, and the Hutchinson estimate's mean and
variance are all known in closed form (`flow`).

The data's true density at t_min differs from the model's by the prior
mismatch at T; `errors_per_dim` compares delta + log p_T(latent) (the true
marginal at the ODE's own latent) with the data's log p_{t_min}(x), which
isolates the solver and the divergence and works for mixtures too.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from diffusers_unified.data.gaussian import GaussianMixture, example_mixture
from diffusers_unified.likelihood import (
    ddpm_bound,
    discretized_gaussian_log_likelihood,
    ode_log_likelihood,
)
from diffusers_unified.processes import DDPM, VESDE, VPSDE, SubVPSDE

MEAN, COV = np.array([0.3, -0.2]), np.array([[0.25, 0.1], [0.1, 0.5]])
GAUSSIAN = GaussianMixture.gaussian(MEAN, COV)
PROCESSES = [VPSDE(), SubVPSDE(), VESDE(), DDPM()]
EPS = 1e-5  # the score SDE code's likelihood start time


def flow(process, x, mean, cov, s, t):
    """Closed forms of the probability-flow ODE from s to t for N(mean, cov) data, float64.

    Returns (x_t, M) with M = U diag(1/2 log(V(t) / V(s))) U^T, the time
    integral of the flow's Jacobian: its trace is the exact delta, and
    v^T M v is the Hutchinson estimate of probe v.
    """
    lam, u = np.linalg.eigh(np.asarray(cov, np.float64))
    a_s, s_s = (float(v) for v in process.alpha_sigma(jnp.float32(s)))
    a_t, s_t = (float(v) for v in process.alpha_sigma(jnp.float32(t)))
    v_s, v_t = a_s**2 * lam + s_s**2, a_t**2 * lam + s_t**2
    x = np.asarray(x, np.float64)
    x_t = a_t * mean + (x - a_s * mean) @ u @ np.diag(np.sqrt(v_t / v_s)) @ u.T
    return x_t, u @ np.diag(0.5 * np.log(v_t / v_s)) @ u.T


def model_log_likelihood(process, x, mean, cov, t_min):
    """log p_model(x): the prior's log density at the flow's image plus the log-determinant."""
    z, m = flow(process, x, mean, cov, t_min, process.T)
    var = process.prior_std**2
    prior = np.sum(-0.5 * np.log(2 * np.pi * var) - z**2 / (2 * var), axis=1)
    return prior + np.trace(m), z


def likelihood(score_fn, process, x, **options):
    """ode_log_likelihood, jitted (diffrax's solve is slow to run eagerly), key fixed."""
    f = functools.partial(ode_log_likelihood, score_fn=score_fn, process=process, **options)
    return jax.jit(f)(jax.random.PRNGKey(1), x=x)


def errors_per_dim(mixture, process, x, t_min=EPS, **options):
    f = functools.partial(ode_log_likelihood, score_fn=mixture.score_fn(process), process=process)
    out = jax.jit(functools.partial(f, t_min=t_min, **options))(jax.random.PRNGKey(1), x=x)
    a_eps, s_eps = process.alpha_sigma(t_min)
    a_T, s_T = process.alpha_sigma(process.T)
    corrected = out.delta + mixture.log_prob(out.latent, a_T, s_T)
    exact = mixture.log_prob(x, a_eps, s_eps)
    return np.asarray(corrected - exact) / x.shape[1], out


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: type(p).__name__)
def test_ode_likelihood_is_exact_on_a_gaussian(process):
    x, _ = GAUSSIAN.sample(jax.random.PRNGKey(0), 256)
    err, out = errors_per_dim(GAUSSIAN, process, x, divergence="exact", bpd_offset=7.0)
    # Dopri5 at rtol = atol = 1e-5 (the reference code's setting): measured
    # worst errors 2e-5 .. 2e-4 nats/dim; the issue asks for 1e-3.
    assert np.max(np.abs(err)) < 1e-3, np.max(np.abs(err))
    assert int(out.nfe) > 0
    # The model's own likelihood, the prior pushed through the flow, and the
    # flow's latent, against their closed forms (same solver: its relative
    # tolerance 1e-5 gives latents within 3e-5 relative, measured, on VE's
    # scale of 50). Element by element: the step size controller bounds the
    # RMS over the state of err_i / (atol + rtol |y_i|), so a single element
    # may exceed that scale by more than the RMS does; measured, the worst
    # element (a latent of 0.84 among latents of up to 137, VE) reaches 9.9x
    # (diffrax's Dopri5) and 10.5x (the same tableau unrolled) of 1e-5 + 1e-5 |z|.
    expected, z = model_log_likelihood(process, x, MEAN, COV, EPS)
    assert np.max(np.abs(out.latent - z)) < 1e-4 * np.max(np.abs(z))
    np.testing.assert_allclose(out.latent, z, rtol=2e-4, atol=2e-4)
    assert np.max(np.abs(np.asarray(out.log_likelihood) - expected)) / 2 < 1e-3
    # bits/dim of the same, with the offset of centred 8-bit data.
    np.testing.assert_allclose(out.bpd, -expected / (2 * np.log(2)) + 7.0, rtol=0, atol=1e-3)


def test_default_start_is_the_reference_eps():
    """The default t_min is 1e-5 on every process, not the VP sampler's 1e-3.

    Narrow data (std 0.01) make the two start times' densities differ by
    up to 0.9 nats/dim on the VP SDE (sigma(1e-3)^2 = 1e-4 doubles the
    variance), far beyond the solver's 1e-3.
    """
    process, cov = VPSDE(), np.diag([1e-4, 1e-4])
    narrow = GaussianMixture.gaussian(MEAN, cov)
    x, _ = narrow.sample(jax.random.PRNGKey(0), 128)
    score_fn = narrow.score_fn(process)
    run = lambda **kw: np.asarray(
        likelihood(score_fn, process, x, divergence="exact", **kw).log_likelihood
    )
    at_eps, _ = model_log_likelihood(process, x, MEAN, cov, EPS)
    at_sampling_eps, _ = model_log_likelihood(process, x, MEAN, cov, process.t_min)
    assert np.max(np.abs(at_eps - at_sampling_eps)) / 2 > 0.3
    assert np.max(np.abs(run() - at_eps)) / 2 < 1e-3
    assert np.max(np.abs(run(t_min=process.t_min) - at_sampling_eps)) / 2 < 1e-3


def test_default_probes_are_rademacher():
    """With a diagonal Jacobian, v^T J v = tr J for every Rademacher v: the default is exact.

    Gaussian probes err by about sqrt(2 sum_k M_kk^2) per example here
    (measured: up to 4.6 nats/dim, against 2e-4 for Rademacher probes), so
    the default must be Rademacher to pass.
    """
    process, cov = VPSDE(), np.diag([0.25, 0.06])
    diagonal = GaussianMixture.gaussian(MEAN, cov)
    x, _ = diagonal.sample(jax.random.PRNGKey(0), 256)
    expected, _ = model_log_likelihood(process, x, MEAN, cov, EPS)
    score_fn = diagonal.score_fn(process)
    default = likelihood(score_fn, process, x)
    assert np.max(np.abs(np.asarray(default.log_likelihood) - expected)) / 2 < 1e-3
    gaussian = likelihood(score_fn, process, x, probe="gaussian")
    assert np.max(np.abs(np.asarray(gaussian.log_likelihood) - expected)) / 2 > 0.1


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
@pytest.mark.parametrize("process", [VPSDE(), VESDE()], ids=lambda p: type(p).__name__)
def test_hutchinson_estimate_is_unbiased(process, probe):
    x, _ = GAUSSIAN.sample(jax.random.PRNGKey(0), 512)
    err, _ = errors_per_dim(GAUSSIAN, process, x, divergence="hutchinson", probe=probe)
    # One probe per example and solve: unbiased, so the batch mean of the
    # errors lies within 3 standard errors (of that mean) of zero.
    se = err.std() / np.sqrt(err.size)
    assert abs(err.mean()) < 3 * se, (err.mean(), se)
    assert se > 0


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_hutchinson_mean_and_variance_over_several_probes(probe):
    """K = 3 probes per example: delta = mean_k v_k^T M v_k, with M in closed form.

    Its mean is tr M; its variance is 2 ||M||_F^2 / K for Gaussian probes
    and 2 sum_{i != j} M_ij^2 / K for Rademacher ones. Checked over 8192
    examples (one probe set each): the sample mean within 4 standard errors,
    the sample variance within 4 standard errors of a variance (from the
    sample's fourth moment: measured 2.4 % relative for Gaussian probes and
    1.3 % for Rademacher ones, so 4 SE is under 10 %, while summing the
    probes instead of averaging them would be off by 3x in the mean and 9x
    in the variance).
    """
    process, k, n = VPSDE(), 3, 8192
    x, _ = GAUSSIAN.sample(jax.random.PRNGKey(0), n)
    out = likelihood(GAUSSIAN.score_fn(process), process, x, probe=probe, num_probes=k)
    delta = np.asarray(out.delta, np.float64)
    _, m = flow(process, x, MEAN, COV, EPS, process.T)
    off_diagonal = np.sum(m**2) - np.sum(np.diag(m) ** 2)
    variance = 2 * (np.sum(m**2) if probe == "gaussian" else off_diagonal) / k
    assert abs(delta.mean() - np.trace(m)) < 4 * np.sqrt(variance / n), (delta.mean(), np.trace(m))
    centred = delta - delta.mean()
    se_var = np.sqrt((np.mean(centred**4) - centred.var() ** 2) / n)
    assert abs(delta.var() - variance) < 4 * se_var, (delta.var(), variance, se_var)


def test_ode_likelihood_on_a_gaussian_mixture():
    mixture = example_mixture()
    x, _ = mixture.sample(jax.random.PRNGKey(0), 256)
    err, _ = errors_per_dim(mixture, VPSDE(), x, divergence="exact")
    assert np.max(np.abs(err)) < 5e-3, np.max(np.abs(err))


def test_fixed_step_likelihood_converges_and_bits_per_dim():
    process = VPSDE()
    x, _ = GAUSSIAN.sample(jax.random.PRNGKey(0), 64)
    coarse, _ = errors_per_dim(GAUSSIAN, process, x, divergence="exact", method="rk4", num_steps=25)
    fine, out = errors_per_dim(
        GAUSSIAN, process, x, divergence="exact", method="rk4", num_steps=200
    )
    assert np.max(np.abs(fine)) < np.max(np.abs(coarse)) and np.max(np.abs(fine)) < 1e-3
    assert int(out.nfe) == 800
    # bits/dim of the closed-form likelihood (RK4 with 200 steps: error as above).
    expected, _ = model_log_likelihood(process, x, MEAN, COV, EPS)
    np.testing.assert_allclose(out.bpd, -expected / (2 * np.log(2)), rtol=0, atol=1e-3)


def test_bad_options_name_the_valid_ones():
    f = functools.partial(
        ode_log_likelihood,
        jax.random.PRNGKey(0),
        GAUSSIAN.score_fn(VPSDE()),
        VPSDE(),
        jnp.zeros((2, 2)),
    )
    with pytest.raises(ValueError, match="valid: exact, hutchinson"):
        f(divergence="trace")
    with pytest.raises(ValueError, match="valid: gaussian, rademacher"):
        f(probe="uniform")
    with pytest.raises(ValueError, match=r"t_min must be in \[0, T = 1.0\)"):
        f(t_min=1.0)
    bound = functools.partial(ddpm_bound, jax.random.PRNGKey(0), None, DDPM(), jnp.zeros((2, 2)))
    with pytest.raises(ValueError, match="valid: posterior, beta"):
        bound(decoder_variance="small")


# -- DDPM's bound ------------------------------------------------------------------------


@pytest.mark.slow
def test_ddpm_bound_with_the_exact_denoiser():
    """At N = 1000 the bound is at least the exact NLL and within 0.05 bits/dim of it."""
    process = DDPM()
    mixture = GaussianMixture.gaussian([0.3, -0.2], np.diag([0.25, 1.0]))
    x, _ = mixture.sample(jax.random.PRNGKey(0), 8192)
    nll_bpd = -np.asarray(mixture.log_prob(x)) / (2 * np.log(2))
    # On continuous data the best fixed decoder variance is close to the
    # posterior variance of x_0 given level 0, about beta_1, the paper's
    # sigma_1^2 ("beta"); the DDPM code's beta-tilde_2 (its default here, for
    # 8-bit data) is half that and costs about 0.16 bits/dim on these data.
    bound = jax.jit(
        functools.partial(
            ddpm_bound,
            score_fn=mixture.score_fn(process),
            process=process,
            variance="large",
            decoder_variance="beta",
        )
    )
    out = bound(jax.random.PRNGKey(2), x0=x)
    gap = np.asarray(out.bpd) - nll_bpd
    se = gap.std() / np.sqrt(gap.size)
    # E[bound] >= NLL holds exactly; the estimate draws one x_t per level, so
    # allow 3 standard errors (about 0.03 bpd here) below zero. Measured gap:
    # 0.014 bpd with the fixed-large variance (Ho et al.'s beta_t).
    assert gap.mean() > -3 * se, (gap.mean(), se)
    assert gap.mean() < 0.05, gap.mean()
    # The fixed-small variance (beta-tilde) is far looser on continuous data:
    # its first levels' KLs sum to about pi^2/24 nats/dim (measured 0.85 bpd).
    small = jax.jit(
        functools.partial(
            ddpm_bound, score_fn=mixture.score_fn(process), process=process, variance="small"
        )
    )
    small_gap = np.asarray(small(jax.random.PRNGKey(2), x0=x).bpd) - nll_bpd
    assert small_gap.mean() > gap.mean() + 0.5


def point_mass_score(process, centre):
    """The exact score of data that sit at `centre` (one point per example): a zero-width Gaussian.

    Its denoiser is exact, x0_hat = centre, so the model's mean at every
    level is the true posterior mean.
    """

    def score_fn(x, t):
        alpha, sigma = process.alpha_sigma(t)
        return -(x - alpha * centre) / sigma**2

    return score_fn


def ddpm_tables():
    betas = np.linspace(1e-4, 0.02, 1000)
    alphabar = np.cumprod(1.0 - betas)
    alphabar_prev = np.append(1.0, alphabar[:-1])
    return betas, alphabar, alphabar_prev, betas * (1 - alphabar_prev) / (1 - alphabar)


def gaussian_kl(mean_gap, var1, var2):
    return 0.5 * (np.log(var2 / var1) + var1 / var2 + mean_gap**2 / var2 - 1.0)


# 8-bit levels on bin centres v / 127.5 - 1: both edge bins, their neighbours, the middle.
LEVELS = np.array([[0, 1, 128], [255, 254, 60], [3, 200, 255]])


@pytest.mark.parametrize("decoder_variance", ["posterior", "beta"])
@pytest.mark.parametrize("variance", [None, "large", "small"])
def test_ddpm_bound_of_bin_centres_is_the_closed_form(variance, decoder_variance):
    """Data on 8-bit bin centres, with the exact denoiser: every term of the bound is known.

    L_T = KL(N(sqrt(ab_N) c, 1 - ab_N) || N(0, 1)); each KL term compares
    variances only (equal means); the decoder's mass is that of the bin
    [c - h, c + h] under N(c, s^2), h = 1/255: 2 Phi(h/s) - 1, or Phi(h/s)
    for the edge bins, which reach to infinity. The decoder variance s^2 is
    the DDPM code's beta-tilde_2 (its posterior_variance[1], for both
    variances) or beta_1. variance=None is the DDPM code's fixedlarge.
    Float32 sums of 999 terms: agreement measured to 4e-6 bits/dim; 1e-4
    allowed.
    """
    process = DDPM()
    x0 = jnp.asarray(LEVELS / 127.5 - 1.0, jnp.float32)
    out = ddpm_bound(
        jax.random.PRNGKey(0),
        point_mass_score(process, x0),
        process,
        x0,
        variance=variance,
        decoder="discretized",
        decoder_variance=decoder_variance,
    )
    betas, ab, _, beta_tilde = ddpm_tables()
    per_bits = 1.0 / (LEVELS.shape[1] * np.log(2.0))
    c = LEVELS / 127.5 - 1.0
    prior = np.sum(gaussian_kl(np.sqrt(ab[-1]) * c, 1 - ab[-1], 1.0), axis=1) * per_bits
    model_var = beta_tilde if variance == "small" else betas
    kl = gaussian_kl(0.0, beta_tilde[1:], model_var[1:]) * LEVELS.shape[1] * per_bits
    s = np.sqrt(beta_tilde[1] if decoder_variance == "posterior" else betas[0])
    edge = (LEVELS == 0) | (LEVELS == 255)
    mass = np.where(edge, norm.cdf(1 / 255 / s), 2 * norm.cdf(1 / 255 / s) - 1)
    decoder = -np.sum(np.log(mass), axis=1) * per_bits
    np.testing.assert_allclose(out.prior_bpd, prior, rtol=0, atol=1e-4)
    np.testing.assert_allclose(out.kl_bpd, np.broadcast_to(kl, out.kl_bpd.shape), atol=1e-4)
    np.testing.assert_allclose(out.decoder_bpd, decoder, rtol=0, atol=1e-4)
    np.testing.assert_allclose(out.bpd, prior + kl.sum() + decoder, rtol=0, atol=1e-4)


def test_ddpm_bound_with_clipping_is_the_closed_form():
    """clip_x0 (the DDPM code's calc_bpd_loop): data beyond [-1, 1] get x0_hat = clip(c).

    Level i's model mean then misses the posterior mean by coef_x0_i (c - clip c),
    which adds (coef_x0_i (c - clip c))^2 / (2 model_var_i) to its KL, and the
    Gaussian decoder's mean is clip(c). Tolerance as above, and 1e-5
    relative: missing by 0.5 with a decoder std of 0.0074 costs over 1000
    bits/dim, which float32 holds to about 1e-6 relative.
    """
    process = DDPM()
    c = np.array([[1.5, -1.25, 0.3]])
    x0 = jnp.asarray(c, jnp.float32)
    out = ddpm_bound(
        jax.random.PRNGKey(0),
        point_mass_score(process, x0),
        process,
        x0,
        variance="large",
        clip_x0=True,
    )
    betas, ab, ab_prev, beta_tilde = ddpm_tables()
    per_bits = 1.0 / (3 * np.log(2.0))
    miss = c - np.clip(c, -1, 1)
    coef_x0 = np.sqrt(ab_prev) * betas / (1 - ab)
    kl = gaussian_kl(coef_x0[1:, None] * miss, beta_tilde[1:, None], betas[1:, None])
    s2 = beta_tilde[1]
    decoder = np.sum(0.5 * (np.log(2 * np.pi * s2) + miss**2 / s2)) * per_bits
    np.testing.assert_allclose(out.kl_bpd[0], kl.sum(axis=1) * per_bits, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out.decoder_bpd, [decoder], rtol=1e-5, atol=1e-4)
    unclipped = ddpm_bound(
        jax.random.PRNGKey(0), point_mass_score(process, x0), process, x0, variance="large"
    )
    assert float(out.bpd[0]) > float(unclipped.bpd[0]) + 1.0  # the clip must matter here


# -- the discretised decoder -----------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 11, 12])
def test_discretized_decoder_is_a_distribution_over_bins(bits):
    """Summed over all 2^bits levels, the bin masses are 1.

    Float32 CDF differences lose about 1e-7 per bin, so the sum is good to
    about 1e-4 at 4096 levels (measured 1.2e-5). With the DDPM code's edge
    test |x| > 0.999 the level next to each edge counts as an edge bin from
    11 bits on, and the sum exceeds 1 by that bin's whole tail (1.50 for the
    last case at 11 bits).
    """
    levels = jnp.asarray(np.arange(2**bits) / (2**bits - 1) * 2 - 1, jnp.float32)
    for mean, log_scale in [(0.1, -2.0), (-0.95, -4.0), (0.99, -1.0), (-0.9995, -6.0)]:
        logp = discretized_gaussian_log_likelihood(levels, mean, log_scale, bits=bits)
        np.testing.assert_allclose(jnp.sum(jnp.exp(logp)), 1.0, rtol=1e-4)


def test_discretized_decoder_edge_and_next_level_at_11_bits():
    """Level 0 owns (-inf, -1 + h]; level 1 (at -0.99902, beyond -0.999) only its own bin."""
    bits, mean, scale = 11, -0.999, 1e-3
    h = 1.0 / (2**bits - 1)
    x = np.array([-1.0, -1.0 + 2 * h, -1.0 + 4 * h])
    logp = discretized_gaussian_log_likelihood(
        jnp.asarray(x, jnp.float32), mean, np.log(scale), bits=bits
    )
    cdf = lambda v: norm.cdf((v - mean) / scale)
    expected = np.log([cdf(x[0] + h), cdf(x[1] + h) - cdf(x[1] - h), cdf(x[2] + h) - cdf(x[2] - h)])
    # Bins of 1e-3 / scale = one standard deviation: float32 CDFs to 1e-6 relative.
    np.testing.assert_allclose(logp, expected, rtol=1e-4)
