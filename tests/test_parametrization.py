"""The parametrization module: exact round trips and one score for every kind of prediction."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusers_unified.data.gaussian import GaussianMixture
from diffusers_unified.parametrization import (
    PARAMETRIZATIONS,
    convert,
    from_x0_eps,
    make_score_fn,
    to_score,
    to_x0_eps,
)
from diffusers_unified.processes import DDPM, NCSN, VESDE, VPSDE, SubVPSDE

PROCESSES = [VPSDE(), SubVPSDE(), VESDE(), DDPM(), NCSN()]
TIMES = jnp.asarray([0.002, 0.05, 0.3, 0.7, 1.0])


def _state(process):
    key_x0, key_eps = jax.random.split(jax.random.PRNGKey(0))
    x0 = jax.random.normal(key_x0, (TIMES.size, 3))
    eps = jax.random.normal(key_eps, (TIMES.size, 3))
    alpha, sigma = process.alpha_sigma(TIMES)
    return x0, eps, alpha[:, None] * x0 + sigma[:, None] * eps, alpha, sigma


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("source,target", itertools.permutations(PARAMETRIZATIONS, 2))
def test_round_trips_are_exact(process, source, target):
    x0, eps, x, alpha, sigma = _state(process)
    out = from_x0_eps(x0, eps, alpha, sigma, source)
    back = convert(convert(out, x, alpha, sigma, source, target), x, alpha, sigma, target, source)
    # float32 arithmetic on O(1) values, divided by sigma >= 0.01 at worst.
    np.testing.assert_allclose(back, out, rtol=2e-4, atol=2e-4)
    x0_back, eps_back = to_x0_eps(out, x, alpha, sigma, source)
    np.testing.assert_allclose(x0_back, x0, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(eps_back, eps, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(
        to_score(out, x, alpha, sigma, source), -eps / sigma[:, None], rtol=2e-3, atol=2e-2
    )


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_make_score_fn_recovers_the_exact_score(process, parametrization):
    """A network predicting the exact x0/eps/score/v of a Gaussian gives back its score."""
    mixture = GaussianMixture.gaussian([0.3, -0.2, 0.5], np.diag([0.5, 0.2, 1.0]))
    exact = mixture.score_fn(process)

    def apply_fn(params, x, noise_cond, y=None, *, train=False, rng=None):
        t = noise_cond / 999.0
        alpha, sigma = process.alpha_sigma(t)
        eps = -sigma[:, None] * exact(x, t)
        x0 = (x - sigma[:, None] * eps) / alpha[:, None]
        return from_x0_eps(x0, eps, alpha, sigma, parametrization)

    score_fn = make_score_fn(process, apply_fn, params={}, parametrization=parametrization)
    # From t = 0.01: an x0 or v prediction gives the score as (x - alpha x0) / sigma^2,
    # which in float32 loses |x| * 1e-7 / sigma^2, i.e. everything once sigma nears
    # 1e-4 (sub-VP at t = 0.002). Samplers stop at t_min and denoise from there.
    times = jnp.asarray([0.01, 0.05, 0.3, 0.7, 1.0])
    x = jax.random.normal(jax.random.PRNGKey(1), (times.size, 3))
    np.testing.assert_allclose(score_fn(x, times), exact(x, times), rtol=2e-3, atol=2e-3)


def test_unknown_parametrization_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid: eps, x0, score, v"):
        make_score_fn(VPSDE(), lambda *a, **k: None, {}, "noise")
