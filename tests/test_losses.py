"""Each loss of the exact predictor equals its closed form on 1-D Gaussian data.

Data x_0 ~ N(m, s0^2); at time t, p_t = N(alpha m, V) with V = alpha^2 s0^2 +
sigma^2, whose score is -(x - alpha m) / V. For that exact score, with
eps_hat = -sigma score:

    E (eps - eps_hat)^2 = 1 - sigma^2 / V                  (DDPM, NCSN x 1/2, DSM)
    E g^2 (s + eps / sigma)^2 = g^2 / sigma^2 (1 - sigma^2 / V)   (likelihood weighting)
    E sigma^2 (s' v^2 + s^2 / 2) = -sigma^2 / (2 V)         (sliced score matching)

and adding a constant c to eps_hat adds c^2 to the eps-MSE (the cross term
has mean zero). Losses are averaged over a batch of 2^17 examples and
compared within 4 Monte-Carlo standard errors of the batch mean (estimated
from the per-example losses); the time integrals of the closed forms use
20,000-point trapezoids, whose error is far below that.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusers_unified import losses
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
    ts = np.linspace(t_min, process.T, 20_001)
    return float(np.trapezoid(closed_form(process, ts, per_t), ts) / (process.T - t_min))


def per_example(loss_fn, shift=0.0):
    batch = {"x": M + S0 * jax.random.normal(jax.random.PRNGKey(1), (BATCH, 1))}
    _, aux = jax.jit(loss_fn)({"shift": jnp.float32(shift)}, jax.random.PRNGKey(2), batch)
    return np.asarray(aux["per_example"], np.float64)


def mean_and_se(values):
    return float(np.mean(values)), float(np.std(values) / np.sqrt(values.size))


def run(loss_fn, shift=0.0):
    return mean_and_se(per_example(loss_fn, shift))


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


@pytest.mark.parametrize("weighting", losses.WEIGHTINGS)
@pytest.mark.parametrize("process", PROCESSES[:3], ids=lambda p: type(p).__name__)
def test_continuous_dsm_closed_form(process, weighting):
    loss_fn = losses.dsm_loss(process, exact_net(process, "eps"), "eps", weighting=weighting)
    if weighting == "sigma2":
        expected = uniform_mean(process, eps_mse)
    else:
        expected = uniform_mean(process, lambda a, s, v, g2: g2 / s**2 * (1 - s**2 / v))
    loss, se = run(loss_fn)
    assert abs(loss - expected) < 4 * se, (loss, expected, se)
    assert run(loss_fn, shift=0.1)[0] > loss


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
