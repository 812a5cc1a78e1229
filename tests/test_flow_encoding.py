"""The probability-flow ODE as an encoder and decoder (`samplers.ode.encode` / `decode`).

Song et al. (2021, sec. 4.3): the flow from eps up to T is a bijection
determined by the data's score, so data have unique latents, and decoding
them returns the data. Checked against the closed-form flow of a Gaussian,
by round trips on the 2-D example mixture (exact score) and by the law of
the latents of mixture samples, which must be p_T (the prior, up to the
VP SDE's alpha(T) remnant of the data).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from counting import CountingScore

from diffusers_unified import samplers
from diffusers_unified.data.gaussian import GaussianMixture, example_mixture
from diffusers_unified.processes import VESDE, VPSDE, SubVPSDE
from diffusers_unified.samplers.ode import decode, encode

MEAN, VAR = np.array([0.4, -0.3]), np.array([0.25, 0.06])
MIXTURE = example_mixture()


def exact_flow(process, x, t_from, t_to):
    """The probability-flow ODE's solution for N(MEAN, diag(VAR)) data, from t_from to t_to."""
    a0, s0 = (float(v) for v in process.alpha_sigma(t_from))
    a1, s1 = (float(v) for v in process.alpha_sigma(t_to))
    v0, v1 = a0**2 * VAR + s0**2, a1**2 * VAR + s1**2
    return a1 * MEAN + np.sqrt(v1 / v0) * (x - a0 * MEAN)


def rms(a):
    return float(np.sqrt(np.mean(np.square(a))))


@pytest.mark.parametrize("process", [VPSDE(), SubVPSDE(), VESDE()], ids=lambda p: type(p).__name__)
def test_encode_is_the_exact_flow_of_a_gaussian(process):
    """Latents of Gaussian data against the closed-form flow from t_min to T, in float64.

    Errors relative to the prior's std (1 or 50), measured: Dopri5 at rtol =
    atol = 1e-9 at most 1.0e-8, RK4 with 200 steps at most 4.7e-7 (its global
    error, ~h^4); asserted below 1e-7 and 2e-6.
    """
    with jax.enable_x64(True):
        gaussian = GaussianMixture.gaussian(MEAN, np.diag(VAR))
        x = np.asarray(gaussian.sample(jax.random.PRNGKey(0), 512)[0])
        want = exact_flow(process, x, process.t_min, process.T)
        prior_std = process.prior_std
        for method, options, bound in (
            ("dopri5", {"rtol": 1e-9, "atol": 1e-9}, 1e-7),
            ("rk4", {"num_steps": 200}, 2e-6),
        ):
            out = encode(None, gaussian.score_fn(process), process, x, method=method, **options)
            err = np.abs(np.asarray(out.latents) - want).max() / prior_std
            assert err < bound, (method, err)


@pytest.mark.slow
@pytest.mark.parametrize("process", [VPSDE(), VESDE()], ids=lambda p: type(p).__name__)
def test_decode_inverts_encode_within_the_solver_tolerance(process):
    """decode(encode(x)) = x on the 2-D mixture (exact score), to the adaptive solver's tolerance.

    Dopri5's controller keeps each step's error estimate below rtol |x| +
    atol in RMS over the batch (the state it integrates); the round trip
    accumulates that over both solves, amplified where the flow stretches
    (between the components). In float64, 1,000 points, the RMS round-trip
    error / tol, measured: 18 (VP) and 9.4 (VE) at tol 1e-5; 3.5 and 3.9 at
    tol 1e-8. So: below 50 tol, and at least 500x smaller at 1e-8 than at
    1e-5 (the error converges with the tolerance; measured 5,100x and
    2,400x). Fixed-step RK4: RMS error below 1e-6 at 100 steps (measured
    3.0e-7, 1.4e-7) and falling >= 12x when the steps double (measured 32x,
    36x: fourth order or better). About 25 s each (four float64 solves).
    """
    with jax.enable_x64(True):
        mixture = example_mixture()
        score = mixture.score_fn(process)
        x = np.asarray(mixture.sample(jax.random.PRNGKey(0), 1000)[0])

        def round_trip(**options):
            latents = encode(None, score, process, x, **options).latents
            return rms(np.asarray(decode(None, score, process, latents, **options).samples) - x)

        errors = {tol: round_trip(rtol=tol, atol=tol) for tol in (1e-5, 1e-8)}
        for tol, err in errors.items():
            assert err < 50 * tol, (tol, err / tol)
        assert errors[1e-5] > 500 * errors[1e-8], errors
        rk4 = [round_trip(method="rk4", num_steps=n) for n in (50, 100)]
        assert rk4[1] < 1e-6 and rk4[0] > 12 * rk4[1], rk4


def test_latents_of_mixture_samples_are_distributed_as_the_prior():
    """Encoded mixture samples (VP SDE, float32, default Dopri5) have p_T's law, i.e. N(0, I).

    p_T is the mixture scaled by alpha(1) = 0.0066 plus N(0, sigma(1)^2 I): its
    mean is below 0.003 and its covariance within 5e-5 of I, far inside the
    Monte-Carlo error of 20,000 latents, so the latents are compared with
    N(0, I): mean within 4 standard errors (1 / sqrt(n)), variances within 4
    x sqrt(2 / n), the covariance within 4 / sqrt(n), and the fourth moment
    E z^4 = 3 within 4 x sqrt(96 / n). The key draws x_eps from the forward
    process first, so the ODE starts from p_eps exactly.
    """
    process, n = VPSDE(), 20_000
    x = MIXTURE.sample(jax.random.PRNGKey(0), n)[0]
    out = encode(jax.random.PRNGKey(1), MIXTURE.score_fn(process), process, x)
    z = np.asarray(out.latents, np.float64)
    assert np.all(np.abs(z.mean(0)) < 4 / np.sqrt(n)), z.mean(0)
    cov = np.cov(z.T)
    assert np.all(np.abs(np.diag(cov) - 1) < 4 * np.sqrt(2 / n)), cov
    assert abs(cov[0, 1]) < 4 / np.sqrt(n), cov
    assert np.all(np.abs(np.mean(z**4, 0) - 3) < 4 * np.sqrt(96 / n)), np.mean(z**4, 0)
    # The data themselves are far from N(0, I): the check is not vacuous.
    assert np.abs(np.asarray(x).mean(0)).max() > 0.15


def test_decode_with_denoising_is_probability_flow():
    """probability_flow = decode of its own prior draw, then the Tweedie step."""
    process, key, shape = VPSDE(), jax.random.PRNGKey(3), (256, 2)
    score = MIXTURE.score_fn(process)
    sampled = samplers.probability_flow(key, score, process, shape)
    decoded = decode(None, score, process, process.prior_sampling(key, shape), denoise=True)
    np.testing.assert_allclose(decoded.samples, sampled.samples, rtol=1e-5, atol=1e-5)
    assert int(decoded.nfe) == int(sampled.nfe)


def test_encode_counts_nfe_and_does_not_retrace():
    process = VESDE()
    x = MIXTURE.sample(jax.random.PRNGKey(0), 64)[0]
    other = example_mixture().replace(means=example_mixture().means * 1.1)
    CountingScore.calls[0] = 0
    out = encode(None, CountingScore(MIXTURE.score_fn(process)), process, x, method="heun")
    jax.effects_barrier()
    assert CountingScore.calls[0] == int(out.nfe) == 2 * (process.N - 1)
    traces = CountingScore.traces[0]
    out2 = encode(None, CountingScore(other.score_fn(process)), process, x, method="heun")
    assert CountingScore.traces[0] == traces, "a second score function re-traced encode"
    assert not np.allclose(out.latents, out2.latents)


def test_bad_options_name_what_is_expected():
    process, x = VPSDE(), jnp.zeros((4, 2))
    score = MIXTURE.score_fn(process)
    with pytest.raises(ValueError, match="valid: euler, heun, rk4, dopri5, tsit5"):
        encode(None, score, process, x, method="rk45")
    with pytest.raises(ValueError, match="eps must lie in"):
        decode(None, score, process, x, eps=2.0)
    with pytest.raises(TypeError, match="unknown option"):
        encode(None, score, process, x, denoise=True)
