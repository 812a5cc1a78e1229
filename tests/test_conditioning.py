"""Conditional generation against closed forms: guidance (classifier-free and by a
classifier), inpainting, colorization.

Guidance is checked on labelled Gaussian mixtures (class k = component k),
whose conditional score (the component's), unconditional score (the
mixture's) and class posterior p_t(k | x) (the responsibilities) are exact.
Inpainting and colorization are checked on Gaussians, whose conditional laws
are Gaussian with the Schur-complement moments.

What the projection of the score SDE paper (app. I) does and does not
achieve, measured on a 2-D Gaussian with correlation 0.8 (the one below),
unknown x_0 given x_1 = 1, exact conditional mean 1.671 and variance 0.360,
200,000 ... 20,000 samples:

* plain replacement, any sampler without a corrector, is strongly biased,
  because at large noise the joint score shrinks the unknown coordinate
  towards its unconditional mean and nothing undoes that later: the
  probability-flow ODE ends at mean 0.742 and variance 0.684 (VP SDE, Euler,
  and exactly so: `replacement_ode_law` below propagates the scheme's
  Gaussian law step by step; DDIM with eta = 0 likewise: 0.741, 0.662),
  reverse diffusion and ancestral sampling at mean 0.97 and variance 0.57
  (VP and VE alike);
* Langevin correctors (snr 0.16, one step per level, 1000 levels) remove
  the bias on the VE SDE, to within Monte-Carlo error in the mean (-0.2 SE
  at n = 20,000) and +3 % in the variance (the finite-step bias of Langevin
  MCMC, as in test_samplers_exact.py); on the VP SDE they leave mean 1.556
  (-0.12) and +7.5 % variance. The same holds with the ODE's Euler step as
  the predictor (`EulerMaruyama(probability_flow=True)`): on the VE SDE the
  correctors couple it to the reverse-diffusion run (same means to 4
  digits); on the VP SDE mean 1.543.

So the acceptance check "inpainting matches the analytic conditional" is
met by the predictor-corrector sampler with Langevin correctors (VE SDE),
with either the SDE or the ODE predictor; the pure ODE sampler is tested to
do exactly what its (biased) method prescribes, and its bias is pinned.
experiments/conditional_demo.py reproduces every figure quoted here.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from counting import CountingScore

from diffusers_unified import losses, samplers
from diffusers_unified.data.gaussian import GaussianMixture, example_mixture
from diffusers_unified.parametrization import (
    classifier_guided_score_fn,
    guide,
    guided_score_fn,
    make_logits_fn,
    make_score_fn,
)
from diffusers_unified.processes import NOISE_COND_SCALE, VESDE, VPSDE, SubVPSDE
from diffusers_unified.samplers.conditioning import (
    Inpainting,
    colorization,
    decoupling_matrix,
    inpainting,
)

# -- classifier-free guidance ------------------------------------------------------------

# Three isotropic components (std 0.6) on a circle of radius 1: they overlap, so
# even exact conditional samples of class k fall in component k's region only
# 81 ... 92 % of the time, and the 95 % criterion needs guidance to be met.
ANGLES = np.deg2rad([90.0, 210.0, 330.0])
MEANS, WEIGHTS, STD = np.stack([np.cos(ANGLES), np.sin(ANGLES)], 1), np.array([0.5, 0.3, 0.2]), 0.6
LABELLED = GaussianMixture.create(WEIGHTS, MEANS, stds=[STD] * 3)
K = LABELLED.num_components


def _classify(x):
    """Most probable component (in NumPy: equal isotropic covariances, so no JAX compile)."""
    sq = np.sum((np.asarray(x, np.float64)[:, None, :] - MEANS) ** 2, axis=-1)
    return np.argmax(np.log(WEIGHTS) - sq / (2 * STD**2), axis=-1)


def _accuracy(samples, labels):
    """Per class, the fraction of its samples whose most probable component is the class."""
    got, labels = _classify(samples), np.asarray(labels)
    return np.array([np.mean(got[labels == k] == k) for k in range(K)])


def _exact_accuracy(n=400_000):
    rng = np.random.default_rng(7)
    labels = rng.choice(K, size=n, p=WEIGHTS)
    return _accuracy(MEANS[labels] + STD * rng.normal(size=(n, 2)), labels)


CFG_SAMPLERS = {
    "pc-euler-maruyama": (
        samplers.predictor_corrector,
        {
            "predictor": samplers.EulerMaruyama(),
            "corrector": samplers.NoCorrector(),
            "num_steps": 200,
        },
    ),
    "ode-rk4": (samplers.probability_flow, {"method": "rk4", "num_steps": 25}),
}


@pytest.mark.parametrize("name", CFG_SAMPLERS)
def test_guidance_puts_95_percent_of_class_k_in_component_k(name):
    fn, options = CFG_SAMPLERS[name]
    process, n = VPSDE(), 3_000  # 1,000 samples per class
    labels = jnp.arange(n) % K
    conditional = LABELLED.score_fn(process, y=labels)
    unconditional = LABELLED.score_fn(process)
    exact = _exact_accuracy()
    assert exact.max() < 0.95, "unguided samples should miss the 95 % mark"
    for w, check in ((0.0, "exact"), (2.0, "guided")):
        score = guided_score_fn(conditional, unconditional, w)
        out = fn(jax.random.PRNGKey(1), score, process, (n, 2), **options)
        acc = _accuracy(out.samples, labels)
        if check == "exact":
            # w = 0 samples the conditional law itself: binomial SE of 1,000 draws,
            # 4 SE, plus 0.01 for the samplers' discretisation (measured below 0.005).
            se = np.sqrt(exact * (1 - exact) / (n // K))
            np.testing.assert_array_less(np.abs(acc - exact), 4 * se + 0.01)
        else:
            # Measured: 1.000 for every class with both samplers (0.997 at w = 1).
            assert acc.min() >= 0.95, f"w={w}: per-class accuracy {acc}"


def test_guidance_convention_and_model_score():
    cond = lambda x, t: 2.0 * x
    uncond = lambda x, t: x
    x, t = jnp.ones((4, 2)), jnp.float32(0.5)
    for w in (0.0, 1.5):
        # (1 + w) cond - w uncond; diffusers' guidance_scale s = 1 + w gives the same.
        s = 1.0 + w
        np.testing.assert_allclose(guided_score_fn(cond, uncond, w)(x, t), (2 + w) * x)
        np.testing.assert_allclose(guide(2.0 * x, x, w), x + s * (2.0 * x - x))

    process = VPSDE()

    def apply_fn(params, x, noise_cond, y=None, *, train=False, rng=None):
        # "eps" prediction: the label (or 10 for the null label, what y=None means).
        label = jnp.full((x.shape[0],), 10.0) if y is None else y.astype(jnp.float32)
        return params["scale"] * jnp.broadcast_to(label[:, None], x.shape)

    params, y = {"scale": jnp.float32(1.0)}, jnp.array([0, 1, 2, 3])
    _, sigma = process.alpha_sigma(t)
    plain = make_score_fn(process, apply_fn, params, "eps", y)(x, t)
    np.testing.assert_allclose(plain, -np.asarray(y)[:, None] / sigma * np.ones((4, 2)), rtol=1e-6)
    guided = make_score_fn(process, apply_fn, params, "eps", y, guidance=2.0)(x, t)
    null = -10.0 / sigma
    np.testing.assert_allclose(guided, 3.0 * plain - 2.0 * null, rtol=1e-5)
    with pytest.raises(ValueError, match="needs labels"):
        make_score_fn(process, apply_fn, params, "eps", None, guidance=2.0)


# -- classifier guidance (Song et al. 2021, sec. 5) -------------------------------------------


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
@pytest.mark.parametrize("dim", [2, 16])
@pytest.mark.parametrize("process", [VPSDE(), SubVPSDE(), VESDE()], ids=lambda p: type(p).__name__)
def test_marginal_score_plus_classifier_gradient_is_the_component_score(process, dim, x64):
    """Bayes: grad log p_t(x) + grad log p_t(y | x) = grad log p_t(x | y), exactly.

    At noisy points x_t of every component at times 1e-3 ... 1, labels
    drawn with them. Float64: agreement to 1e-10 relative to the score's
    scale (measured 1e-15). Float32: the gradient of the log-softmax
    differences carries ~1e-7 of the scores involved, which reach ~100 at
    t = 1e-3 (VP: sigma 0.014): measured 2e-6 absolute in 2-D; asserted
    within 2e-5 (1 + |score|) elementwise.
    """
    with jax.enable_x64(x64):
        mixture = example_mixture(dim)

        @jax.jit
        def scores(mixture):
            t = jnp.tile(jnp.asarray([1e-3, 1e-2, 0.1, 0.3, 0.6, 1.0]), 100)
            x0, y = mixture.sample(jax.random.PRNGKey(0), t.size)
            alpha, sigma = process.alpha_sigma(t)
            noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape, x0.dtype)
            x = alpha[:, None] * x0 + sigma[:, None] * noise
            marginal = mixture.score_fn(process)
            guided = classifier_guided_score_fn(marginal, mixture.logits_fn(process), y)
            return guided(x, t), mixture.score_fn(process, y=y)(x, t), marginal(x, t)

        got, want, marginal = (np.asarray(a) for a in scores(mixture))
    bound = 1e-10 if x64 else 2e-5
    np.testing.assert_array_less(np.abs(got - want), bound * (1 + np.abs(want)))
    # The classifier term is not small: without it the scores differ by O(1) and more.
    assert np.abs(marginal - want).max() > 1.0


CLASSIFIER_SAMPLERS = {
    # The reference's get_pc_conditional_sampler: reverse diffusion + Langevin (VE SDE).
    "pc-ve": (VESDE(), samplers.predictor_corrector, {"num_steps": 500}),
    "dpm-solver-vp": (VPSDE(), samplers.dpm_solver, {"num_steps": 20}),
}


@pytest.mark.parametrize("name", CLASSIFIER_SAMPLERS)
def test_classifier_guided_sampling_gives_each_class_its_component(name):
    """Samples of the exact classifier-guided score, labels 0 ... 3 in turn, 2,000 per class.

    Each class's sample mean and covariance against its component's: every
    entry within 4.5 standard errors (the mean's sqrt(S_ii / n); a covariance
    entry's sqrt((S_ii S_jj + S_ij^2) / n)), 20 entries in all. Measured
    worst: 1.2 (mean) and 1.9 (covariance) SE for the PC sampler, 2.1 and
    2.4 for DPM-Solver++ at 20 NFE, whose discretisation error is below the
    Monte-Carlo error here. The score function is a pytree of the labels and
    scale: new labels reuse the compiled sampler.
    """
    process, fn, options = CLASSIFIER_SAMPLERS[name]
    mixture, n = example_mixture(), 8_000
    labels = jnp.arange(n) % mixture.num_components
    counting = CountingScore(mixture.score_fn(process))
    score = classifier_guided_score_fn(counting, mixture.logits_fn(process), labels)
    x = np.asarray(fn(jax.random.PRNGKey(1), score, process, (n, 2), **options).samples, np.float64)
    covs, means = np.asarray(mixture.covs, np.float64), np.asarray(mixture.means, np.float64)
    for k in range(mixture.num_components):
        xk, cov = x[np.asarray(labels) == k], covs[k]
        se_mean = np.sqrt(np.diag(cov) / len(xk))
        np.testing.assert_array_less(np.abs(xk.mean(0) - means[k]), 4.5 * se_mean)
        se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / len(xk))
        np.testing.assert_array_less(np.abs(np.cov(xk.T) - cov), 4.5 * se_cov)
    traces = CountingScore.traces[0]
    fn(
        jax.random.PRNGKey(2),
        score.replace(y=(labels + 1) % 4, scale=2.0),
        process,
        (n, 2),
        **options,
    )
    assert CountingScore.traces[0] == traces, "new labels or scale re-traced the sampler"


def test_classifier_guidance_scale_and_a_network_classifier():
    """scale multiplies the classifier's gradient; `make_logits_fn` feeds the network
    process.noise_cond(t), as the score networks are fed."""
    process, mixture = VPSDE(), example_mixture()
    exact = mixture.logits_fn(process)

    def classifier_apply(params, x, noise_cond, *, train=False, rng=None):
        # A "network" that recovers t from its noise conditioning: the exact posterior.
        return params["w"] * exact(x, noise_cond / NOISE_COND_SCALE * process.T)

    logits = make_logits_fn(process, classifier_apply, {"w": jnp.float32(1.0)})
    x = mixture.sample(jax.random.PRNGKey(0), 64, alpha=0.8, sigma=0.6)[0]
    t, y = jnp.float32(0.3), 2

    @jax.jit
    def evaluate(logits, x):
        score = mixture.score_fn(process)
        guided = [classifier_guided_score_fn(score, logits, y, scale=c)(x, t) for c in (1.0, 3.0)]
        wanted = mixture.score_fn(process, y=jnp.full((64,), y))(x, t)
        return logits(x, t), exact(x, t), score(x, t), *guided, wanted

    net_logits, exact_logits, base, one, three, want = evaluate(logits, x)
    np.testing.assert_allclose(net_logits, exact_logits, rtol=1e-6)
    np.testing.assert_allclose(three - base, 3.0 * (one - base), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(one, want, rtol=1e-4, atol=1e-5)


# -- inpainting --------------------------------------------------------------------------

MEAN = np.array([0.3, -0.2])
COV = np.array([[1.0, 0.56], [0.56, 0.49]])  # standard deviations 1 and 0.7, correlation 0.8
Y = 1.0  # the known x_1
KNOWN = np.array([False, True])
COND_MEAN = MEAN[0] + COV[0, 1] / COV[1, 1] * (Y - MEAN[1])  # 1.6714
COND_VAR = COV[0, 0] - COV[0, 1] ** 2 / COV[1, 1]  # 0.36
GAUSSIAN = GaussianMixture.gaussian(MEAN, COV)


def _check_moments(x, mean, var, n, var_bias):
    """Mean within 4.5 SE; variance within 4.5 SE (sqrt(2/n) relative) plus `var_bias`."""
    se_mean = np.sqrt(var / n)
    assert abs(x.mean() - mean) < 4.5 * se_mean, (x.mean(), mean, se_mean)
    rel = x.var() / var - 1.0
    assert abs(rel) < 4.5 * np.sqrt(2.0 / n) + var_bias, (x.var(), var)


PC_PREDICTORS = {
    "reverse-diffusion": samplers.ReverseDiffusion(),
    "ode-euler": samplers.EulerMaruyama(probability_flow=True),
}


@pytest.mark.parametrize(
    "predictor", ["reverse-diffusion", pytest.param("ode-euler", marks=pytest.mark.slow)]
)
def test_pc_inpainting_matches_the_conditional_gaussian(predictor):
    process, n = VESDE(), 4_000
    project = inpainting(process, [0.0, Y], KNOWN)
    out = samplers.predictor_corrector(
        jax.random.PRNGKey(1),
        GAUSSIAN.score_fn(process),
        process,
        (n, 2),
        predictor=PC_PREDICTORS[predictor],
        corrector=samplers.Langevin(0.16, 1),
        num_steps=1000,
        project=project,
    )
    x = np.asarray(out.samples)
    assert np.all(x[:, 1] == Y), "the final step must put the known data back exactly"
    # n = 4,000: 4.5 SE is 0.043 in the mean (the plain-replacement bias is 0.70)
    # and 10 % in the variance, to which Langevin's finite-step bias adds +3 %
    # (measured, n = 20,000; 5 % allowed).
    _check_moments(x[:, 0], COND_MEAN, COND_VAR, n, var_bias=0.05)


def replacement_ode_law(process, num_steps):
    """Exact mean and variance of x_0 under Euler probability-flow sampling with replacement.

    Everything is linear-Gaussian: an Euler step x <- Phi x + phi with
    Phi = I + dt (f I + g^2 C^-1 / 2), C = alpha^2 COV + sigma^2 I; the
    projection sets the known coordinate to N(alpha Y, sigma^2), independent
    of the rest; the final Tweedie step is affine too. Float64 throughout.
    """
    ts = process.sampling_grid(num_steps)
    coef = lambda fn, t: [float(v) for v in fn(np.float32(t))]

    def project(m, p, t):
        alpha, sigma = coef(process.alpha_sigma, t)
        m, p = m.copy(), p.copy()
        m[KNOWN] = alpha * Y
        p[KNOWN, :] = p[:, KNOWN] = 0.0
        p[np.ix_(KNOWN, KNOWN)] = sigma**2
        return m, p

    def inv_cov(t):
        alpha, sigma = coef(process.alpha_sigma, t)
        return alpha, sigma, np.linalg.inv(alpha**2 * COV + sigma**2 * np.eye(2))

    m, p = project(np.zeros(2), process.prior_std**2 * np.eye(2), ts[0])
    for t, s in zip(ts[:-1], ts[1:], strict=True):
        alpha, _, ci = inv_cov(t)
        f, g2 = coef(process.coefficients, t)
        phi = np.eye(2) + (s - t) * (f * np.eye(2) + 0.5 * g2 * ci)
        m = phi @ m - (s - t) * 0.5 * g2 * ci @ (alpha * MEAN)
        m, p = project(m, phi @ p @ phi.T, s)
    alpha, sigma, ci = inv_cov(ts[-1])
    phi = (np.eye(2) - sigma**2 * ci) / alpha
    m = phi @ m + sigma**2 * ci @ MEAN
    p = phi @ p @ phi.T
    return m[0], p[0, 0]


def test_ode_inpainting_follows_its_replacement_law_and_is_biased():
    process, n, steps = VPSDE(), 8_000, 100
    out = samplers.probability_flow(
        jax.random.PRNGKey(0),
        GAUSSIAN.score_fn(process),
        process,
        (n, 2),
        method="euler",
        num_steps=steps,
        project=inpainting(process, [0.0, Y], KNOWN),
    )
    x = np.asarray(out.samples)
    assert np.all(x[:, 1] == Y)
    mean, var = replacement_ode_law(process, steps)
    # The sampler does what the method prescribes, within Monte-Carlo error ...
    _check_moments(x[:, 0], mean, var, n, var_bias=0.0)
    # ... and the method is biased: mean 0.742 instead of 1.671, variance 0.685
    # instead of 0.360 (the numbers quoted in the module docstring; 200 steps
    # give 0.742 and 0.684).
    np.testing.assert_allclose([mean, var], [0.742, 0.685], atol=2e-3)
    assert COND_MEAN - mean > 0.9


# -- colorization ------------------------------------------------------------------------


@pytest.mark.slow
def test_colorization_matches_the_conditional_gaussian():
    """A 1 x 2 RGB 'image' (6-D Gaussian, channels and pixels correlated) given its gray levels.

    In decoupled coordinates u = x @ M per pixel (M orthogonal, first column
    1/sqrt(3)), the known part is u_0 = sqrt(3) gray and the law of the other
    four is the Schur-complement conditional, compared entry by entry.
    """
    rng = np.random.default_rng(3)
    a = rng.normal(size=(6, 6))
    cov = a @ a.T / 6 + 0.2 * np.eye(6)
    mean = rng.normal(size=6) * 0.3
    image = GaussianMixture.gaussian(mean, cov)
    gray = np.array([[0.5, -0.3]])  # (H, W) = (1, 2)
    process, n = VESDE(), 4_000
    out = samplers.predictor_corrector(
        jax.random.PRNGKey(2),
        image.score_fn(process),
        process,
        (n, 1, 2, 3),
        num_steps=1000,
        project=colorization(process, gray),
    )
    x = np.asarray(out.samples, np.float64)
    # The gray level is put back exactly, up to the float32 rounding of x @ M @ M^T.
    np.testing.assert_allclose(x.mean(-1), np.broadcast_to(gray, (n, 1, 2)), atol=1e-5)

    q = np.kron(np.eye(2), decoupling_matrix(3))  # u_flat = q^T x_flat
    u = x.reshape(n, 6) @ q
    cov_u, mean_u = q.T @ cov @ q, q.T @ mean
    k, o = [0, 3], [1, 2, 4, 5]  # known (gray) and other coordinates of u
    gain = cov_u[np.ix_(o, k)] @ np.linalg.inv(cov_u[np.ix_(k, k)])
    cond_mean = mean_u[o] + gain @ (np.sqrt(3) * gray.ravel() - mean_u[k])
    cond_cov = cov_u[np.ix_(o, o)] - gain @ cov_u[np.ix_(k, o)]
    got_mean, got_cov = u[:, o].mean(0), np.cov(u[:, o].T)
    sd = np.sqrt(np.diag(cond_cov))
    # 4.5 SE per entry (14 compared); covariances also get Langevin's finite-step
    # bias, 5 % of sd_i sd_j (3 % measured on the 2-D case above; the largest
    # entry error in experiments/conditional_demo.py, n = 5,000, is 7 %, MC
    # error included).
    assert np.all(np.abs(got_mean - cond_mean) < 4.5 * sd / np.sqrt(n)), (got_mean, cond_mean)
    se_cov = np.sqrt((np.outer(sd, sd) ** 2 + cond_cov**2) / n)
    tol = 4.5 * se_cov + 0.05 * np.outer(sd, sd)
    assert np.all(np.abs(got_cov - cond_cov) < tol), (got_cov, cond_cov)


# -- the projection with every sampler ----------------------------------------------------

# name -> (sampler, options, its NFE without a projection)
ALL_SAMPLERS = {
    "ancestral": (samplers.ancestral, {"num_steps": 20}, 20),
    "ddim": (samplers.ddim, {"num_steps": 20, "eta": 0.5}, 20),
    "pc": (
        samplers.predictor_corrector,
        {"num_steps": 20, "corrector": samplers.Langevin(0.16, 2)},
        19 + 20 * 2 + 1,
    ),
    "ald": (samplers.annealed_langevin, {"num_steps": 5, "n_steps_each": 3}, 5 * 3 + 1),
    "ode_rk4": (samplers.probability_flow, {"method": "rk4", "num_steps": 11}, 10 * 4 + 1),
}


class CountingInpainting(Inpainting):
    """Counts its traces: a Python side effect runs only while JAX traces."""

    traces = [0]

    def __call__(self, key, x, t):
        CountingInpainting.traces[0] += 1
        return super().__call__(key, x, t)


@pytest.mark.parametrize("name", ALL_SAMPLERS)
def test_every_sampler_projects_keeps_its_nfe_and_compiles_once(name):
    fn, options, nfe = ALL_SAMPLERS[name]
    process = VESDE()
    score = GAUSSIAN.score_fn(process)
    first = inpainting(process, [0.0, Y], KNOWN)
    first = CountingInpainting(first.known, first.mask, None, process)
    out = fn(jax.random.PRNGKey(0), score, process, (64, 2), project=first, **options)
    assert int(out.nfe) == nfe
    assert np.all(np.asarray(out.samples)[:, 1] == Y)
    assert np.isfinite(out.samples).all()
    traces = CountingInpainting.traces[0]
    # New known data of the same shape: traced, so the compiled sampler is reused.
    second = first.replace(known=-first.known)
    again = fn(jax.random.PRNGKey(0), score, process, (64, 2), project=second, **options)
    assert np.all(np.asarray(again.samples)[:, 1] == -Y)
    assert CountingInpainting.traces[0] == traces, "new known data re-traced the sampler"


def test_adaptive_ode_and_bad_projections_fail_clearly():
    process = VPSDE()
    score = GAUSSIAN.score_fn(process)
    project = inpainting(process, [0.0, Y], KNOWN)
    with pytest.raises(ValueError, match="fixed-step ODE method"):
        samplers.probability_flow(jax.random.PRNGKey(0), score, process, (4, 2), project=project)
    with pytest.raises(TypeError, match="clean"):
        samplers.ddim(jax.random.PRNGKey(0), score, process, (4, 2), project=lambda k, x, t: x)


def test_decoupling_matrix_is_orthogonal_with_the_gray_level_first():
    for c in (1, 3, 4):
        m = decoupling_matrix(c)
        np.testing.assert_allclose(m.T @ m, np.eye(c), atol=1e-12)
        np.testing.assert_allclose(m[:, 0], np.full(c, 1 / np.sqrt(c)))
    # The score SDE paper's matrix (app. I), up to the sign of its last column.
    paper = np.array(
        [[0.57735, -0.816497, 0.0], [0.57735, 0.408248, 0.707107], [0.57735, 0.408248, -0.707107]]
    )
    np.testing.assert_allclose(np.abs(decoupling_matrix(3)), np.abs(paper), atol=1e-6)


# -- label dropout -----------------------------------------------------------------------


def test_label_dropout_feeds_the_null_label_at_its_rate():
    seen = {}

    def recording_loss(params, key, batch):
        seen["y"] = batch["y"]
        return jnp.float32(0.0), {}

    rate, null, n = 0.2, 10, 50_000
    y = jnp.arange(n) % 10
    loss_fn = losses.with_label_dropout(recording_loss, rate, null)
    _, aux = loss_fn(None, jax.random.PRNGKey(0), {"x": jnp.zeros((n, 2)), "y": y})
    got = np.asarray(seen["y"])
    dropped = got == null
    np.testing.assert_array_equal(dropped, np.asarray(aux["label_dropped"]))
    np.testing.assert_array_equal(got[~dropped], np.asarray(y)[~dropped])
    # Binomial: SE sqrt(0.2 * 0.8 / 50,000) = 0.0018; 4 SE.
    assert abs(dropped.mean() - rate) < 4 * np.sqrt(rate * (1 - rate) / n)
    # A different key drops different labels; rate 0 and unlabelled batches pass through.
    loss_fn(None, jax.random.PRNGKey(1), {"x": jnp.zeros((n, 2)), "y": y})
    assert not np.array_equal(np.asarray(seen["y"]) == null, dropped)
    assert losses.with_label_dropout(recording_loss, 0.0, null) is recording_loss
    loss_fn(None, jax.random.PRNGKey(0), {"x": jnp.zeros((3, 2)), "y": None})
    assert seen["y"] is None


# -- the launcher's wiring ---------------------------------------------------------------


def _tiny_conditional_config(**changes):
    from diffusers_unified.experiment.config import load_module

    config = load_module(str(Path(__file__).parent / "configs" / "ci_tiny.py")).get_config()
    config.data.dataset = "gmm"  # labelled: class k = mixture component k
    config.model.class_conditional = True
    config.training.label_dropout = 0.5
    config.sampling.guidance_weight = 1.5
    for key, value in changes.items():
        section, name = key.split("__")
        config[section][name] = value
    return config


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"model__class_conditional": False}, "label_dropout=0.5 needs model.class_conditional"),
        ({"training__label_dropout": 0.0}, "guidance_weight=1.5 needs"),
        ({"sampling__guidance_weight": -1.0}, "must be >= 0"),
        ({"sampling__class_label": -2}, "must be -1"),
        ({"training__label_dropout": 1.5}, "label_dropout=1.5 must be in"),
    ],
)
def test_config_checks_conditioning_keys(changes, message):
    from diffusers_unified.errors import ConfigError
    from diffusers_unified.experiment.config import check_values

    check_values(_tiny_conditional_config())
    with pytest.raises(ConfigError, match=message):
        check_values(_tiny_conditional_config(**changes))


def test_the_digits_conditional_config_is_valid():
    from diffusers_unified.experiment.config import (
        check_against_schema,
        check_values,
        load_module,
    )

    path = Path(__file__).parents[1] / "configs" / "ddpm" / "digits_conditional.py"
    config = load_module(str(path)).get_config()
    check_against_schema(config)
    check_values(config)
    assert config.model.class_conditional and config.training.label_dropout == 0.1


@pytest.mark.slow  # about 30 s cold on two loaded cores: data, network init, three compiles
def test_launcher_run_drops_labels_and_guides_its_samples():
    from diffusers_unified.errors import ConfigError
    from diffusers_unified.experiment.run import build_run

    run = build_run(_tiny_conditional_config(sampling__class_label=2))
    params = run.init_state().params
    num_classes = run.dataset.num_classes
    batch = {"x": jnp.zeros((4_000, 2)), "y": jnp.zeros((4_000,), jnp.int32)}
    _, aux = jax.jit(run.loss_fn)(params, jax.random.PRNGKey(0), batch)
    assert abs(float(np.mean(aux["label_dropped"])) - 0.5) < 0.04  # 5 binomial SE

    labels = run.labels(0, 6)
    np.testing.assert_array_equal(labels, np.full(6, 2))
    captured = {}
    run.sampler = lambda key, score_fn, process, shape: captured.setdefault("score", score_fn)
    run.sample(jax.random.PRNGKey(0), params, 6, labels)
    score = captured["score"]
    assert score.guidance == 1.5 and np.array_equal(score.y, labels)
    x, t = jnp.ones((6, 2)), jnp.float32(0.3)
    evaluate = jax.jit(lambda s: s(x, t))  # one compile, not op-by-op network calls
    conditional = evaluate(score.replace(guidance=None))
    unconditional = evaluate(score.replace(y=None, guidance=None))
    np.testing.assert_allclose(
        evaluate(score), 2.5 * conditional - 1.5 * unconditional, rtol=1e-4, atol=1e-5
    )

    in_turn = build_run(_tiny_conditional_config())
    np.testing.assert_array_equal(in_turn.labels(5, 4), (np.arange(5, 9) % num_classes))
    too_big = build_run(_tiny_conditional_config(sampling__class_label=num_classes))
    with pytest.raises(ConfigError, match="class_label"):
        too_big.labels(0, 4)
