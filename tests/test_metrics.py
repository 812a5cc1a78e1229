"""Sample metrics against closed forms on Gaussians and against NumPy/SciPy references."""

import jax
import numpy as np
import pytest
import scipy.linalg
from scipy.spatial.distance import cdist
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from diffusers_unified import metrics
from diffusers_unified.data.gaussian import example_mixture


def gaussian(seed, n, mean, std, dim):
    rng = np.random.default_rng(seed)
    return (mean + std * rng.standard_normal((n, dim))).astype(np.float32)


def rbf_mean(s2_total, h, dim, mean_gap2=0.0):
    """E exp(-|A - B|^2 / 2h^2) for A - B ~ N(gap, s2_total I_dim)."""
    c = h**2 + s2_total
    return (h**2 / c) ** (dim / 2) * np.exp(-mean_gap2 / (2 * c))


def test_mmd_is_unbiased_for_the_closed_form_on_gaussians():
    # X ~ N(0, I), Y ~ N(m, s^2 I) in 2-D: each kernel mean is a Gaussian integral (rbf_mean).
    dim, s, m, bandwidths = 2, 1.5, np.array([0.5, 0.0]), (0.3, 1.0, 3.0)
    exact = sum(
        rbf_mean(2.0, h, dim) + rbf_mean(2 * s**2, h, dim) - 2 * rbf_mean(1 + s**2, h, dim, 0.25)
        for h in bandwidths
    )
    values = [
        float(
            metrics.mmd(
                gaussian(i, 400, 0.0, 1.0, dim), gaussian(100 + i, 400, m, s, dim), bandwidths
            )
        )
        for i in range(30)
    ]
    # The estimate is unbiased: the mean of 30 independent ones lies within 4
    # of their standard errors of the closed form (a false alarm ~1e-4).
    se = np.std(values, ddof=1) / np.sqrt(len(values))
    assert abs(np.mean(values) - exact) < 4 * se, (np.mean(values), exact, se)
    assert se < 0.1 * exact  # the check resolves the value, not just its sign


def test_mmd_matches_its_numpy_definition():
    x, y = gaussian(0, 300, 0.0, 1.0, 3), gaussian(1, 200, 0.3, 1.2, 3)
    h2 = np.array([0.1, 1.0]) ** 2
    k = lambda a, b: np.exp(-cdist(a, b, "sqeuclidean")[..., None] / (2 * h2)).sum(-1)
    off = lambda kk: (kk.sum() - np.trace(kk)) / (len(kk) * (len(kk) - 1))
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    reference = off(k(x64, x64)) + off(k(y64, y64)) - 2 * k(x64, y64).mean()
    # float32 kernels: each mean (~0.2) is good to ~1e-6 relative, and they
    # cancel to 0.019, so the result is good to ~1e-5 (measured 2e-6); 1e-4
    # leaves a factor 10 for other summation orders.
    np.testing.assert_allclose(float(metrics.mmd(x, y, (0.1, 1.0))), reference, rtol=1e-4)


def test_energy_distance_matches_its_numpy_definition():
    x, y = gaussian(2, 300, 0.0, 1.0, 4), gaussian(3, 250, 0.5, 1.0, 4)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    reference = 2 * cdist(x64, y64).mean() - cdist(x64, x64).mean() - cdist(y64, y64).mean()
    # float32 distances via |a|^2 + |b|^2 - 2ab: about 1e-6 absolute each, and
    # the 1e-12 guard in the sqrt puts 1e-6 on each zero diagonal distance, so
    # the three means (~2.8) agree with float64 to ~1e-6 (measured 6e-7); 2e-5 is 30x that.
    np.testing.assert_allclose(float(metrics.energy_distance(x, y)), reference, atol=2e-5)
    # With itself the three means are the same float32 computation: 0 up to their rounding.
    assert float(metrics.energy_distance(x, x)) == pytest.approx(0.0, abs=2e-5)


def test_sliced_wasserstein_closed_forms():
    key = jax.random.PRNGKey(0)
    # 1-D: the only directions are +-1, so SW is W2 between the empirical
    # distributions; for N(0, 1) against N(m, s^2), W2^2 = m^2 + (1 - s)^2.
    n, m, s = 200_000, 0.7, 1.5
    x, y = gaussian(4, n, 0.0, 1.0, 1), gaussian(5, n, m, s, 1)
    exact = np.sqrt(m**2 + (1 - s) ** 2)
    # Empirical W2 at n = 2e5 is within ~1e-2 of the population value (the
    # tails' order statistics fluctuate most).
    # (In 1-D every projection is +-1: four of them say all there is.)
    sw = float(metrics.sliced_wasserstein(x, y, key, num_projections=4))
    assert sw == pytest.approx(exact, abs=0.01)
    # A set against itself shifted by c: each projection's W2 is |theta.c|, so
    # SW^2 is the mean of (theta.c)^2 over the drawn directions, exactly.
    x = gaussian(6, 1000, 0.0, 1.0, 3)
    c = np.array([1.0, -2.0, 0.5], np.float32)
    theta = jax.random.normal(key, (3, 256))
    theta = np.asarray(theta / np.linalg.norm(theta, axis=0))
    expected = np.sqrt(np.mean((c @ theta) ** 2))
    got = float(metrics.sliced_wasserstein(x, x + c, key))
    # Same directions, float64 sums: only the float32 rounding of x + c and of
    # theta's normalisation differ (~1e-7; measured 0).
    assert got == pytest.approx(expected, rel=1e-6)
    # ... whose expectation over the sphere is |c|^2 / d. In 3-D, cos^2 of a
    # random direction has mean 1/3 and sd 0.30, so 256 directions give SW^2
    # to 5.6 % and SW to 2.8 % (measured -2 %); 15 % is over 5 sd.
    assert got == pytest.approx(np.linalg.norm(c) / np.sqrt(3), rel=0.15)


def test_sliced_wasserstein_compares_sets_of_different_sizes_by_quantiles():
    key = jax.random.PRNGKey(1)
    x = gaussian(7, 500, 0.0, 1.0, 2)
    # Each point repeated twice has the same empirical distribution; comparing
    # 1,000 quantiles of the 500-point set interpolates halfway between its
    # neighbouring order statistics, ~0.003 apart in the bulk, more in the
    # tails (measured 0.008). A shift of the set by 0.05 would read 0.05.
    assert float(metrics.sliced_wasserstein(x, np.repeat(x, 2, axis=0), key)) < 0.02


def test_frechet_distance_matches_scipy_sqrtm_and_the_gaussian_closed_form():
    rng = np.random.default_rng(8)
    a = rng.standard_normal((5, 5))
    cov = a @ a.T / 5 + 0.5 * np.eye(5)
    x = rng.multivariate_normal(np.zeros(5), np.eye(5), 20_000)
    y = rng.multivariate_normal(np.full(5, 0.3), cov, 20_000)

    def reference(p, q):
        mp, mq, sp, sq = p.mean(0), q.mean(0), np.cov(p.T), np.cov(q.T)
        root = scipy.linalg.sqrtm(sp @ sq).real
        return np.sum((mp - mq) ** 2) + np.trace(sp + sq - 2 * root)

    got = metrics.frechet_distance(x, y)
    # Float64 both ways (eigenvalues vs sqrtm's Schur form) of a well-conditioned
    # 5 x 5 problem: ~1e-13 apart; 1e-6 is loose but any formula error is O(1).
    assert got == pytest.approx(reference(x, y), rel=1e-6)
    # The population value: |mu|^2 + Tr(I + C - 2 C^(1/2)). Over 20 seeds the
    # estimate from 2e4 points has a 1.8 % sd and +0.5 % bias: 5 % is ~2.5 sd
    # (and this seed is fixed).
    exact = 5 * 0.09 + np.trace(np.eye(5) + cov - 2 * scipy.linalg.sqrtm(cov).real)
    assert got == pytest.approx(exact, rel=0.05)


def test_kid_matches_a_numpy_reference_on_whole_sets():
    x, y = gaussian(9, 300, 0.0, 1.0, 6), gaussian(10, 300, 0.2, 1.1, 6)
    # One subset of the whole set is a permutation of it, which the statistic ignores.
    mean, std = metrics.kernel_inception_distance(x, y, num_subsets=1, subset_size=300)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    k = lambda a, b: (a @ b.T / 6 + 1) ** 3
    off = lambda kk: (kk.sum() - np.trace(kk)) / (300 * 299)
    reference = off(k(x64, x64)) + off(k(y64, y64)) - 2 * k(x64, y64).mean()
    # Float64 sums of the same 9e4 kernel values in other orders: ~1e-15.
    assert mean == pytest.approx(reference, rel=1e-9) and std == 0.0


def test_random_features_are_the_documented_relu_embedding_of_the_key():
    x = gaussian(11, 50, 0.0, 1.0, 6)
    key = jax.random.PRNGKey(0)
    kw, kb = jax.random.split(key)
    w = np.asarray(jax.random.normal(kw, (6, 16)), np.float64) / np.sqrt(6)
    b = np.asarray(jax.random.normal(kb, (16,)), np.float64)
    expected = np.maximum(x.astype(np.float64) @ w + b, 0.0) / 4.0
    got = np.asarray(metrics.random_features(key, 16)(x))
    assert got.shape == (50, 16)
    # One float32 matmul over 6 terms of O(1) values: ~1e-7.
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    other = np.asarray(metrics.random_features(jax.random.PRNGKey(1), 16)(x))
    assert np.abs(other - got).max() > 0.1  # another key, another embedding


def test_mode_coverage_and_mean_log_density_on_the_example_mixture():
    mixture = example_mixture()
    x, labels = mixture.sample(jax.random.PRNGKey(3), 20_000)
    covered, share = metrics.mode_coverage(x, mixture)
    assert float(covered) == 1.0
    # Shares are the weights up to binomial noise (SE <= 0.0035) and overlap.
    np.testing.assert_allclose(np.asarray(share), np.asarray(mixture.weights), atol=0.015)
    dropped = np.asarray(x)[np.asarray(labels) != 0]
    assert float(metrics.mode_coverage(dropped, mixture)[0]) == 0.75
    # The mixture density restated with SciPy from its weights, means and covariances.
    covs = np.einsum(
        "kij,kj,klj->kil",
        np.asarray(mixture.eigvecs, np.float64),
        np.asarray(mixture.eigvals, np.float64),
        np.asarray(mixture.eigvecs, np.float64),
    )
    x64 = np.asarray(x, np.float64)
    weights, means = np.asarray(mixture.weights, np.float64), np.asarray(mixture.means, np.float64)
    log_terms = [
        np.log(weights[k]) + multivariate_normal(means[k], covs[k]).logpdf(x64)
        for k in range(len(weights))
    ]
    expected = np.mean(logsumexp(np.stack(log_terms), axis=0))
    # float32 log-densities of O(1) averaged over 2e4 points: ~1e-6 relative.
    got = float(metrics.mean_log_density(x, mixture.log_prob))
    assert got == pytest.approx(expected, rel=1e-5)
