"""Each loss of the exact predictor equals its closed form on Gaussian data.

Data x_0 ~ N(m, s0^2); at time t, p_t = N(alpha m, V) with V = alpha^2 s0^2 +
sigma^2, whose score is -(x - alpha m) / V. For that exact score, with
eps_hat = -sigma score:

    E (eps - eps_hat)^2 = 1 - sigma^2 / V                  (DDPM, NCSN, DSM)
    E g^2 (s + eps / sigma)^2 = g^2 / sigma^2 (1 - sigma^2 / V)   (likelihood weighting)
    E sigma^2 (s' v^2 + s^2 / 2) = -sigma^2 / (2 V)         (sliced score matching)

per dimension, reduced over dimensions by their mean or by half their sum
(`reduce="sum"`, the score SDE code's reduction), and adding a constant c to
eps_hat adds c^2 to the eps-MSE (the cross term has mean zero). Losses are
averaged over a batch of 2^17 examples and compared within 4 Monte-Carlo
standard errors of the batch mean (estimated from the per-example losses);
the time integrals of the closed forms use 20,000-point trapezoids on
geometrically spaced times, whose error is far below that.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusers_unified import losses
from diffusers_unified.data.gaussian import example_mixture
from diffusers_unified.parametrization import PARAMETRIZATIONS, from_x0_eps
from diffusers_unified.processes import DDPM, NCSN, NOISE_COND_SCALE, VESDE, VPSDE, SubVPSDE

M, S0 = 0.7, 0.5
BATCH = 2**17


def exact_net(process, parametrization):
    """A 'network' predicting the exact quantity for N(m, s0^2) data; params shift eps_hat."""

    def apply_fn(params, x, noise_cond, y=None, *, train=False, rng=None):
        t = noise_cond / NOISE_COND_SCALE * process.T
        alpha, sigma = (a[:, None] for a in process.alpha_sigma(t))
        var = alpha**2 * S0**2 + sigma**2
        eps = sigma * (x - alpha * M) / var + params["shift"]
        x0 = (x - sigma * eps) / alpha
        return from_x0_eps(x0, eps, alpha[:, 0], sigma[:, 0], parametrization)

    return apply_fn


def closed_form(process, times, per_t):
    alpha, sigma = (np.asarray(a, np.float64) for a in process.alpha_sigma(jnp.asarray(times)))
    _, g2 = (np.asarray(a, np.float64) for a in process.coefficients(jnp.asarray(times)))
    return per_t(alpha, sigma, alpha**2 * S0**2 + sigma**2, g2)


def grid_mean(process, per_t):
    return float(np.mean(closed_form(process, process.sampling_grid(), per_t)))


def uniform_mean(process, per_t, t_min=1e-5):
    # Geometric points: the likelihood weighting g^2 / sigma^2 ~ 1 / t near t_min (VP), where
    # an evenly spaced trapezoid overestimates the integral by 0.55 x 2 (measured).
    ts = np.geomspace(t_min, process.T, 20_001)
    return float(np.trapezoid(closed_form(process, ts, per_t), ts) / (process.T - t_min))


def per_example(loss_fn, shift=0.0, dim=1):
    batch = {"x": M + S0 * jax.random.normal(jax.random.PRNGKey(1), (BATCH, dim))}
    _, aux = jax.jit(loss_fn)({"shift": jnp.float32(shift)}, jax.random.PRNGKey(2), batch)
    return np.asarray(aux["per_example"], np.float64)


def mean_and_se(values):
    return float(np.mean(values)), float(np.std(values) / np.sqrt(values.size))


def run(loss_fn, shift=0.0, dim=1):
    return mean_and_se(per_example(loss_fn, shift, dim))


def eps_mse(alpha, sigma, var, g2):
    return 1 - sigma**2 / var


PROCESSES = [VPSDE(), SubVPSDE(), VESDE(sigma_max=5.0), DDPM(), NCSN(sigma_max=2.0)]


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: type(p).__name__)
def test_ddpm_loss_closed_form_and_shift(process, parametrization):
    loss_fn = losses.ddpm_loss(process, exact_net(process, parametrization), parametrization)
    expected = grid_mean(process, eps_mse)
    loss, se = run(loss_fn)
    assert abs(loss - expected) < 4 * se, (loss, expected, se)
    # Common random numbers: the same draws with eps_hat shifted by 0.1 raise
    # the loss by exactly 0.1^2 in expectation.
    increase, se_increase = mean_and_se(per_example(loss_fn, 0.1) - per_example(loss_fn))
    assert increase > 0
    assert abs(increase - 0.01) < 4 * se_increase, (increase, se_increase)


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: type(p).__name__)
def test_ncsn_loss_is_half_the_sum_of_squared_eps_error(process):
    loss_fn = losses.ncsn_loss(process, exact_net(process, "score"), "score")
    expected = 0.5 * grid_mean(process, eps_mse)
    loss, se = run(loss_fn)
    assert abs(loss - expected) < 4 * se
    assert run(loss_fn, shift=0.1)[0] > loss


def likelihood_weighted(alpha, sigma, var, g2):
    return g2 / sigma**2 * (1 - sigma**2 / var)


@pytest.mark.parametrize(
    "weighting,importance_sampling",
    [("sigma2", False), ("likelihood", False), ("likelihood", True)],
    ids=["sigma2", "likelihood", "likelihood-importance"],
)
@pytest.mark.parametrize("process", PROCESSES[:3], ids=lambda p: type(p).__name__)
def test_continuous_dsm_closed_form(process, weighting, importance_sampling):
    loss_fn = losses.dsm_loss(
        process,
        exact_net(process, "eps"),
        "eps",
        weighting=weighting,
        importance_sampling=importance_sampling,
    )
    # reduce="sum" (the default) is half the sum over dimensions, as in the score SDE code.
    per_t = eps_mse if weighting == "sigma2" else likelihood_weighted
    expected = 0.5 * uniform_mean(process, per_t)
    loss, se = run(loss_fn)
    assert abs(loss - expected) < 4 * se, (loss, expected, se)
    assert run(loss_fn, shift=0.1)[0] > loss


@pytest.mark.parametrize(
    "make,per_t",
    [
        (lambda p, r: losses.dsm_loss(p, exact_net(p, "eps"), "eps", reduce=r), "uniform"),
        (lambda p, r: losses.ddpm_loss(p, exact_net(p, "eps"), "eps", reduce=r), "grid"),
        (lambda p, r: losses.ncsn_loss(p, exact_net(p, "score"), "score", reduce=r), "grid"),
    ],
    ids=["dsm", "ddpm", "ncsn"],
)
def test_reductions_are_the_score_sde_codes(make, per_t):
    """ "sum" is 0.5 x the sum over dimensions and "mean" the mean (score SDE `reduce_op`).

    On 3-D data whose dimensions are independent copies of the 1-D case, the
    per-dimension expectation e gives 1.5 e for "sum" (the plain sum, 3 e, is
    what dsm_loss computed before it matched the reference) and e for "mean".
    """
    process = VPSDE()
    mean_fn = uniform_mean if per_t == "uniform" else grid_mean
    expected = mean_fn(process, eps_mse)
    for reduce, factor in (("sum", 1.5), ("mean", 1.0)):
        loss, se = run(make(process, reduce), dim=3)
        assert abs(loss - factor * expected) < 4 * se, (reduce, loss, factor * expected, se)


# -- likelihood weighting with importance sampling of t (Song et al. 2021b) ------------------


def log_sigma_hat2_vp(t, b0=0.1, b1=20.0):
    """log(sigma^2 / alpha^2) of the VP SDE, in float64: score_flow's cumulative weight + const."""
    return np.log(np.expm1(b0 * t + 0.5 * (b1 - b0) * t**2))


def log_sigma_hat2_subvp(t, b0=0.1, b1=20.0):
    big_b = b0 * t + 0.5 * (b1 - b0) * t**2
    return 2.0 * np.log(np.expm1(big_b)) - big_b


@pytest.mark.parametrize(
    "process,log_sigma_hat2",
    [(VPSDE(), log_sigma_hat2_vp), (SubVPSDE(), log_sigma_hat2_subvp)],
    ids=["VPSDE", "SubVPSDE"],
)
def test_importance_times_follow_score_flows_density(process, log_sigma_hat2):
    """t has the CDF F(t) = (W(t) - W(eps)) / (W(T) - W(eps)), W = log(sigma^2 / alpha^2).

    W is score_flow's `likelihood_importance_cum_weight` up to a constant (its
    VP and sub-VP formulas, rewritten in float64). The quantile of u must
    satisfy F(t) = u: within 2e-6, the float32 resolution of the log-SNR
    (|lambda| <= 12, relative 1.2e-7, divided by Z / 2 >= 12). Drawn times
    must make F(t) uniform: mean 1/2 and variance 1/12 within 4 standard
    errors (2^16 draws). Z against the closed form to float32 precision.
    """
    t_min = 1e-5
    importance = losses.likelihood_importance_times(process, t_min)
    w_min, w_max = log_sigma_hat2(t_min), log_sigma_hat2(1.0)
    cdf = lambda t: (log_sigma_hat2(np.asarray(t, np.float64)) - w_min) / (w_max - w_min)
    u = np.linspace(0.0, 1.0, 1001, dtype=np.float32)
    t = jax.jit(importance.quantile)(u)
    np.testing.assert_allclose(cdf(t), u, atol=2e-6)
    n = 2**16
    f = cdf(jax.jit(importance.draw, static_argnums=1)(jax.random.PRNGKey(3), n))
    assert f.min() >= 0.0 and f.max() <= 1.0
    assert abs(np.mean(f) - 0.5) < 4 * np.sqrt(1 / 12 / n)
    assert abs(np.var(f) - 1 / 12) < 4 * np.sqrt(1 / 180 / n)  # Var of (U - 1/2)^2 is 1/180
    np.testing.assert_allclose(importance.z, w_max - w_min, rtol=1e-5)


def test_importance_times_are_uniform_for_the_ve_sde():
    """g^2 / sigma^2 = 2 log(sigma_max / sigma_min) is constant: t ~ U(t_min, T), Z = that x T."""
    importance = losses.likelihood_importance_times(VESDE(), 1e-5)
    u = np.linspace(0.0, 1.0, 1001, dtype=np.float32)
    np.testing.assert_allclose(jax.jit(importance.quantile)(u), 1e-5 + u * (1 - 1e-5), atol=2e-6)
    np.testing.assert_allclose(importance.z, 2 * np.log(5000.0) * (1.0 - 1e-5), rtol=1e-5)


def mixture_net(mixture, process):
    """A 'network' returning the exact score of a Gaussian mixture perturbed by `process`."""

    def apply_fn(params, x, noise_cond, y=None, *, train=False, rng=None):
        alpha, sigma = process.alpha_sigma(noise_cond / NOISE_COND_SCALE * process.T)
        return mixture.score(x, alpha, sigma)

    return apply_fn


@pytest.mark.parametrize("process", [VPSDE(), SubVPSDE()], ids=lambda p: type(p).__name__)
def test_importance_sampling_keeps_the_mean_and_cuts_the_variance(process):
    """On the 2-D example mixture with its exact score, both estimators of the
    likelihood-weighted loss have one mean; importance sampling of t has far less variance.

    Means agree within 4 combined standard errors. The uniform-t estimator
    is heavy-tailed (its weight g^2 / sigma^2 ~ 1 / t near t_min = 1e-5), so
    its standard error is itself noisy; 2^17 examples keep it near 6 % of the
    mean (measured: VP 11.7 +- 0.67 uniform, 12.75 +- 0.055 importance-sampled).
    Measured per-example variance ratios: 150 (VP) and 190 (sub-VP); asserted
    > 50. Without the constant (score_flow's loss) the mean
    is divided by Z / (T - t_min) exactly, example by example.
    """
    mixture = example_mixture()
    net = mixture_net(mixture, process)
    batch = {"x": mixture.sample(jax.random.PRNGKey(1), BATCH)[0]}

    def values(**options):
        loss_fn = losses.dsm_loss(process, net, "score", weighting="likelihood", **options)
        _, aux = jax.jit(loss_fn)({}, jax.random.PRNGKey(2), batch)
        return np.asarray(aux["per_example"], np.float64)

    uniform, weighted = values(), values(importance_sampling=True)
    (m_u, se_u), (m_w, se_w) = mean_and_se(uniform), mean_and_se(weighted)
    assert abs(m_u - m_w) < 4 * np.hypot(se_u, se_w), (m_u, se_u, m_w, se_w)
    assert np.var(uniform) > 50 * np.var(weighted), (np.var(uniform), np.var(weighted))
    z = losses.likelihood_importance_times(process, 1e-5).z
    bare = values(importance_sampling=True, importance_constant=False)
    np.testing.assert_allclose(bare * z / (1.0 - 1e-5), weighted, rtol=1e-5)


@pytest.mark.parametrize("probe", losses.PROBES)
@pytest.mark.parametrize("process", PROCESSES[:3], ids=lambda p: type(p).__name__)
def test_sliced_score_matching_closed_form(process, probe):
    loss_fn = losses.sliced_score_matching_loss(
        process, exact_net(process, "score"), "score", probe=probe
    )
    expected = uniform_mean(process, lambda a, s, v, g2: -(s**2) / (2 * v))
    loss, se = run(loss_fn)
    assert abs(loss - expected) < 4 * se, (loss, expected, se)
    # SSM's minimiser is the true score: any shift of it raises the loss.
    assert run(loss_fn, shift=0.2)[0] > loss


def test_bad_options_name_the_valid_ones():
    net = exact_net(VPSDE(), "eps")
    with pytest.raises(ValueError, match="valid: eps, x0, score, v"):
        losses.ddpm_loss(VPSDE(), net, "noise")
    with pytest.raises(ValueError, match="valid: sigma2, likelihood"):
        losses.dsm_loss(VPSDE(), net, weighting="uniform")
    with pytest.raises(ValueError, match="valid: mean, sum"):
        losses.ncsn_loss(VPSDE(), net, reduce="max")
    with pytest.raises(ValueError, match="needs weighting='likelihood'"):
        losses.dsm_loss(VPSDE(), net, importance_sampling=True)
    with pytest.raises(ValueError, match="t_min must lie in"):
        losses.dsm_loss(VPSDE(), net, t_min=0.0)
