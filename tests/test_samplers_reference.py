"""Samplers against the reference codes' updates, written out here in float64 NumPy.

DDPM's `p_sample` (both variances, with and without clipping), DDIM's
`generalized_steps` at 0 < eta < 1, the score SDE code's ancestral and
Langevin steps, NCSN's `anneal_Langevin_dynamics` with its step_lr, the
defaults that follow them, and the `noise` argument's contract. Data:
N(MEAN, diag(VAR)), whose perturbed score is exact.

Tolerances: a single step in float32 agrees with its float64 transcription
to about 1e-6 relative (the inputs are O(1); the largest coefficient,
1 / sqrt(1 - beta), is about 1), so one-step checks use rtol 1e-5; whole
trajectories accumulate float32 round-off over their steps and say so where
they are checked.
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusers_unified import samplers
from diffusers_unified.data.gaussian import GaussianMixture
from diffusers_unified.processes import DDPM, NCSN, VESDE, VPSDE
from diffusers_unified.samplers.pc import NCSN_STEP_SIZE, sampler_noise

MEAN, VAR = np.array([0.4, -0.3]), np.array([0.25, 0.06])
GAUSSIAN = GaussianMixture.gaussian(MEAN, np.diag(VAR))


def ddpm_tables(process):
    """betas, alphabar and alphabar_prev of a DDPM process in float64, as the DDPM code has them."""
    betas = np.linspace(process.beta_start, process.beta_end, process.N)
    alphabar = np.cumprod(1.0 - betas)
    return betas, alphabar, np.append(1.0, alphabar[:-1])


def exact_eps(x, alphabar_i):
    """The exact eps-prediction of Gaussian data at a DDPM level: -sqrt(1 - ab) score."""
    var = alphabar_i * VAR + 1.0 - alphabar_i
    return np.sqrt(1.0 - alphabar_i) * (x - np.sqrt(alphabar_i) * MEAN) / var


def p_sample(x, i, z, variance, clip):
    """The DDPM code's p_sample at 0-based level i > 0 (model_mean_type "eps"), float64."""
    betas, ab, ab_prev = ddpm_tables(DDPM())
    x0 = (x - np.sqrt(1.0 - ab[i]) * exact_eps(x, ab[i])) / np.sqrt(ab[i])
    if clip:
        x0 = np.clip(x0, -1.0, 1.0)
    coef_x0 = np.sqrt(ab_prev[i]) * betas[i] / (1.0 - ab[i])
    coef_xt = np.sqrt(1.0 - betas[i]) * (1.0 - ab_prev[i]) / (1.0 - ab[i])
    posterior_var = betas[i] * (1.0 - ab_prev[i]) / (1.0 - ab[i])
    var = {"fixedlarge": betas[i], "fixedsmall": posterior_var}[variance]
    return coef_x0 * x0 + coef_xt * x + np.sqrt(var) * z


def draws(key, n, shape=(64, 2)):
    return np.asarray(jax.random.normal(key, (n, *shape)), np.float64)


# -- one step of each predictor ---------------------------------------------------------


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize(
    "variance,reference", [(None, "fixedlarge"), ("large", "fixedlarge"), ("small", "fixedsmall")]
)
def test_ancestral_step_is_the_ddpm_codes_p_sample(variance, reference, clip):
    """The default (None) on DDPM is the DDPM code's CIFAR-10 `fixedlarge`; clip_x0 is its clip."""
    process = DDPM()
    i = 30  # little noise: x0_hat of x ~ 2 N(0, 1) lies outside [-1, 1] half the time
    x = 2.0 * draws(jax.random.PRNGKey(0), 1)[0]
    z = draws(jax.random.PRNGKey(1), 1)[0]
    predictor = samplers.Ancestral(variance, clip_x0=clip)
    got = predictor(
        None,
        GAUSSIAN.score_fn(process),
        process,
        jnp.asarray(x, jnp.float32),
        process.time(i),
        process.time(i - 1),
        noise=jnp.asarray(z, jnp.float32),
    )
    expected = p_sample(x, i, z, reference, clip)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    if clip:  # the clip must have bitten, or the test would not tell
        unclipped = p_sample(x, i, z, reference, False)
        assert np.max(np.abs(unclipped - expected)) > 0.1


def test_ancestral_default_on_ve_is_the_score_sde_codes_vesde_update():
    """NCSN with 1000 levels (the score SDE code's SMLD models): posterior-variance noise."""
    process = NCSN(sigma_max=50.0, N=1000)
    sigmas = np.exp(np.linspace(np.log(0.01), np.log(50.0), 1000))
    i = 400
    x = 3.0 * draws(jax.random.PRNGKey(0), 1)[0]
    z = draws(jax.random.PRNGKey(1), 1)[0]
    score_fn = GAUSSIAN.score_fn(process)
    t = process.time(i)
    score = np.asarray(score_fn(jnp.asarray(x, jnp.float32), t), np.float64)
    sigma, adjacent = sigmas[i], sigmas[i - 1]
    std = np.sqrt(adjacent**2 * (sigma**2 - adjacent**2) / sigma**2)
    expected = x + (sigma**2 - adjacent**2) * score + std * z
    got = samplers.Ancestral()(
        None,
        score_fn,
        process,
        jnp.asarray(x, jnp.float32),
        t,
        process.time(i - 1),
        noise=jnp.asarray(z, jnp.float32),
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_reference_variances_per_process():
    assert DDPM().ancestral_variance == "large"  # run_cifar.py: model_var_type="fixedlarge"
    assert VPSDE().ancestral_variance == "large"  # AncestralSamplingPredictor: sqrt(beta) noise
    assert VESDE().ancestral_variance == NCSN().ancestral_variance == "small"


@pytest.mark.parametrize("eta", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_step_at_intermediate_eta_is_generalized_steps(eta, clip):
    """DDIM's code, a_next = alphabar_s: x_s = sqrt(a_next) x0_hat + c1 z + c2 eps_hat.

    c1 = eta sqrt((1 - a_t / a_next)(1 - a_next) / (1 - a_t)) and
    c2 = sqrt(1 - a_next - c1^2). With clip_x0, x0_hat is clipped and the
    network's eps kept (diffusers' DDIMScheduler with clip_sample=True,
    use_clipped_model_output=False).
    """
    process = DDPM()
    _, ab, _ = ddpm_tables(process)
    i, j = 40, 20  # a step over several levels, as DDIM takes
    x = 2.0 * draws(jax.random.PRNGKey(0), 1)[0]
    z = draws(jax.random.PRNGKey(1), 1)[0]
    e = exact_eps(x, ab[i])
    x0 = (x - np.sqrt(1 - ab[i]) * e) / np.sqrt(ab[i])
    if clip:
        x0 = np.clip(x0, -1.0, 1.0)
    c1 = eta * np.sqrt((1 - ab[i] / ab[j]) * (1 - ab[j]) / (1 - ab[i]))
    c2 = np.sqrt(1 - ab[j] - c1**2)
    expected = np.sqrt(ab[j]) * x0 + c1 * z + c2 * e
    got = samplers.DDIM(eta, clip_x0=clip)(
        None,
        GAUSSIAN.score_fn(process),
        process,
        jnp.asarray(x, jnp.float32),
        process.time(i),
        process.time(j),
        noise=jnp.asarray(z, jnp.float32),
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# -- whole samplers with given noise ------------------------------------------------------


def test_ancestral_with_given_noise_is_hos_algorithm_2():
    """All 1000 steps of Alg. 2 (sigma_t^2 = beta_t, the default) in float64, same draws.

    noise[0] is x_T; noise[k] is the draw of Ho's step t = 1001 - k (k = 1 .. 999);
    the step t = 1 adds none, so noise[1000] is unused. The float32 sampler
    follows to 2e-5 (measured 3e-6: the chain contracts, round-off does not pile up).
    """
    process = DDPM()
    betas, ab, _ = ddpm_tables(process)
    noise = draws(jax.random.PRNGKey(5), 1001)
    x = noise[0]
    for t in range(1000, 0, -1):  # Ho's 1-based t; level t - 1
        i = t - 1
        z = noise[1001 - t] if t > 1 else 0.0
        mean = (x - betas[i] / np.sqrt(1 - ab[i]) * exact_eps(x, ab[i])) / np.sqrt(1 - betas[i])
        x = mean + np.sqrt(betas[i]) * z
    out = samplers.ancestral(
        jax.random.PRNGKey(0),
        GAUSSIAN.score_fn(process),
        process,
        (64, 2),
        noise=jnp.asarray(noise, jnp.float32),
    )
    np.testing.assert_allclose(out.samples, x, rtol=0, atol=2e-5)
    assert int(out.nfe) == 1000


def test_ddim_with_given_noise_is_generalized_steps_on_the_codes_grid():
    """The DDIM code's uniform skip (levels 0, 50, ..., 950) at eta = 0.5, float64, same draws."""
    process = DDPM()
    _, ab, _ = ddpm_tables(process)
    seq = list(range(0, 1000, 50))
    grid = process.times[seq][::-1]
    noise = draws(jax.random.PRNGKey(6), len(grid) + 1)
    x = noise[0]
    for k, (i, j) in enumerate(zip(reversed(seq), reversed([-1, *seq[:-1]]), strict=True)):
        a_t, a_next = ab[i], (ab[j] if j >= 0 else 1.0)
        e = exact_eps(x, a_t)
        x0 = (x - np.sqrt(1 - a_t) * e) / np.sqrt(a_t)
        c1 = 0.5 * np.sqrt((1 - a_t / a_next) * (1 - a_next) / (1 - a_t))
        x = np.sqrt(a_next) * x0 + c1 * noise[k + 1] + np.sqrt(1 - a_next - c1**2) * e
    out = samplers.ddim(
        jax.random.PRNGKey(0),
        GAUSSIAN.score_fn(process),
        process,
        (64, 2),
        grid=grid,
        eta=0.5,
        noise=jnp.asarray(noise, jnp.float32),
    )
    # 20 float32 steps: measured 2e-7; 1e-5 leaves room for other backends.
    np.testing.assert_allclose(out.samples, x, rtol=0, atol=1e-5)


SAMPLERS_WITH_NOISE = {
    "ancestral": (samplers.ancestral, {"num_steps": 30}),
    "ancestral-clip": (samplers.ancestral, {"num_steps": 30, "clip_x0": True}),
    "ddim": (samplers.ddim, {"num_steps": 30, "eta": 0.5}),
    "pc-em": (
        samplers.predictor_corrector,
        {
            "num_steps": 30,
            "predictor": samplers.EulerMaruyama(),
            "corrector": samplers.NoCorrector(),
        },
    ),
    "pc-rd": (
        samplers.predictor_corrector,
        {"num_steps": 30, "corrector": samplers.NoCorrector()},
    ),
}


@dataclasses.dataclass(frozen=True)
class LastDraw:
    """A predictor whose output is its step's standard-normal draw."""

    nfe: ClassVar[int] = 0

    def __call__(self, key, score_fn, process, x, t, s, noise=None):
        return jax.random.normal(key, x.shape) if noise is None else noise


@pytest.mark.parametrize("num_points", [1, 2, 7])
def test_sampler_noise_is_what_the_sampler_draws_bit_for_bit(num_points):
    """Entry 0 is the prior's draw (num_points = 1: no step); entry n - 1 the last step's."""
    process, key = VPSDE(), jax.random.PRNGKey(3)  # prior_std 1: x_T is the draw itself
    out = samplers.predictor_corrector(
        key,
        GAUSSIAN.score_fn(process),
        process,
        (64, 2),
        predictor=LastDraw(),
        corrector=samplers.NoCorrector(),
        num_steps=num_points,
        denoise=False,
    )
    block = sampler_noise(key, (64, 2), num_points)
    assert block.shape == (num_points + 1, 64, 2)
    np.testing.assert_array_equal(out.samples, block[num_points - 1])


@pytest.mark.parametrize("name", SAMPLERS_WITH_NOISE)
def test_noise_none_samples_with_the_draws_of_sampler_noise(name):
    """Given `sampler_noise(key, ...)`, a sampler reproduces its samples for `key`.

    The draws are equal bit for bit (test above); the two programs differ
    (drawn inside the loop or passed in), which XLA fuses differently, so the
    samples agree to float32 round-off over 30 steps (measured 5e-7).
    """
    fn, options = SAMPLERS_WITH_NOISE[name]
    process, key = VPSDE(), jax.random.PRNGKey(3)
    score_fn = GAUSSIAN.score_fn(process)
    drawn = fn(key, score_fn, process, (64, 2), **options).samples
    given = fn(
        jax.random.PRNGKey(99),
        score_fn,
        process,
        (64, 2),
        noise=sampler_noise(key, (64, 2), 30),
        **options,
    )
    np.testing.assert_allclose(drawn, given.samples, rtol=0, atol=1e-5)
    other = fn(jax.random.PRNGKey(99), score_fn, process, (64, 2), **options).samples
    assert np.max(np.abs(other - drawn)) > 0.1  # the key matters when no noise is given


def test_clip_x0_keeps_ancestral_samples_in_range():
    """Data centred at 1.5 put x0_hat beyond 1: clip_x0 keeps every sample in [-1, 1]."""
    process = DDPM()
    data = GaussianMixture.gaussian([1.5, -1.5], np.diag(VAR))
    key = jax.random.PRNGKey(0)
    run = lambda clip: (
        samplers.ancestral(
            key, data.score_fn(process), process, (256, 2), num_steps=50, clip_x0=clip
        ).samples
    )
    assert np.max(np.abs(run(False))) > 1.5
    assert np.max(np.abs(run(True))) <= 1.0


def test_bad_noise_says_which_shape_it_needs():
    process = VPSDE()
    with pytest.raises(ValueError, match=r"noise must have shape .* = \(11, 4, 2\)"):
        samplers.ancestral(
            jax.random.PRNGKey(0),
            GAUSSIAN.score_fn(process),
            process,
            (4, 2),
            num_steps=10,
            noise=jnp.zeros((10, 4, 2)),
        )


# -- correctors -------------------------------------------------------------------------


@pytest.mark.parametrize("process", [VESDE(), DDPM()], ids=lambda p: type(p).__name__)
def test_langevin_corrector_step_is_the_score_sde_codes(process):
    """One step of `LangevinCorrector.update_fn`: h = (snr ||z|| / ||grad||)^2 2 alpha.

    Norms per example, averaged over the batch; alpha = 1 on VE, and on DDPM
    the score SDE code's `sde.alphas[timestep]` = 1 - beta_i.
    """
    snr, i = 0.16, 600
    x = draws(jax.random.PRNGKey(0), 1)[0]
    key = jax.random.PRNGKey(1)
    t = process.time(i) if isinstance(process, DDPM) else 0.6
    alpha = 1.0 - ddpm_tables(process)[0][i] if isinstance(process, DDPM) else 1.0
    score_fn = GAUSSIAN.score_fn(process)
    got = samplers.Langevin(snr, n_steps=1)(key, score_fn, process, jnp.asarray(x, jnp.float32), t)
    grad = np.asarray(score_fn(jnp.asarray(x, jnp.float32), t), np.float64)
    z = np.asarray(jax.random.normal(jax.random.fold_in(key, 0), x.shape), np.float64)
    norm = lambda v: np.mean(np.linalg.norm(v, axis=-1))
    h = (snr * norm(z) / norm(grad)) ** 2 * 2 * alpha
    np.testing.assert_allclose(got, x + h * grad + np.sqrt(2 * h) * z, rtol=1e-5, atol=1e-6)


def test_annealed_langevin_default_is_the_ncsn_codes_step_lr():
    """NCSN's code samples with step_lr = 2e-5: h_i = step_lr (sigma_i / sigma_L)^2.

    A constant score c moves x by c sum_i h_i over the levels, whatever the
    noise: two runs with the same key, c = 1 and c = 0, differ by sum_i h_i.
    Float32 values of size ~1 resolve that sum (about 1e-3 here) to 1e-4.
    """
    process = NCSN()
    step_lr = 2e-5
    grid = process.times[[2, 0]]  # two levels, the last being sigma_L
    sigma = np.asarray(process.sigmas)[[2, 0]]
    expected = step_lr * np.sum((sigma / sigma[-1]) ** 2)

    def run(c):
        score = lambda x, t: jnp.full_like(x, c)
        out = samplers.annealed_langevin(
            jax.random.PRNGKey(0),
            score,
            process,
            (16, 2),
            grid=grid,
            n_steps_each=1,
            denoise=False,
        )
        return np.asarray(out.samples, np.float64)

    moved = run(1.0) - run(0.0)
    np.testing.assert_allclose(moved, expected, rtol=1e-3)
    assert NCSN_STEP_SIZE == 2 * step_lr  # Alg. 1's epsilon is twice the code's step_lr


def test_annealed_langevin_rejects_a_step_that_overshoots():
    """The issue's case: eps = 5e-4 with sigma_L = 0.01 (ratio 5) gave NaN samples unannounced."""
    process = NCSN()
    key, score = jax.random.PRNGKey(0), GAUSSIAN.score_fn(process)
    message = r"step_size=0.0005 must be in \(0, 2 sigma_L\^2 = 0.0002\)"
    with pytest.raises(ValueError, match=message):
        samplers.annealed_langevin(key, score, process, (4, 2), step_size=5e-4)
    with pytest.raises(ValueError, match="step_size=0.0002 must be in"):
        samplers.annealed_langevin(key, score, process, (4, 2), step_size=2e-4)
    out = samplers.annealed_langevin(key, score, process, (4, 2), step_size=1.9e-4, n_steps_each=5)
    assert np.isfinite(out.samples).all()
    with pytest.raises(ValueError, match="snr must be in"):
        samplers.AnnealedLangevin(snr=0.75)
