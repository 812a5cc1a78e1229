"""FID, IS and KID on features against closed forms, SciPy and direct NumPy loops; stats files."""

import numpy as np
import pytest
import scipy.linalg

from diffusers_unified.data import Scaling
from diffusers_unified.errors import ConfigError, DataError
from diffusers_unified.metrics import inception as m


def random_spd(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d + (0.0 if rank else 0.1) * np.eye(d)


def pytorch_fid_reference(mu1, s1, mu2, s2, eps=1e-6):
    """pytorch-fid's `calculate_frechet_distance`, restated with SciPy (no torch import)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(s1)) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = covmean.real
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


# -- FID -------------------------------------------------------------------------------------


def test_fid_of_a_set_with_itself_is_zero_also_when_rank_deficient():
    rng = np.random.default_rng(0)
    # Full rank (2,000 examples of 64 features) and rank-deficient (100 of 256,
    # like FID on fewer than 2,048 images): Tr (S S)^(1/2) must give back Tr S.
    for n, d in ((2000, 64), (100, 256)):
        mu, sigma = m.statistics(rng.standard_normal((n, d)) @ rng.standard_normal((d, d)))
        assert np.trace(sigma) > 10  # the zero below is a cancellation of O(10-100) terms
        assert abs(m.fid_from_statistics(mu, sigma, mu, sigma)) < 1e-6


def test_fid_closed_form_for_commuting_diagonal_covariances():
    rng = np.random.default_rng(1)
    d = 40
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    # Float64 eigendecompositions of well-conditioned 40 x 40 matrices: ~1e-14.
    assert m.fid_from_statistics(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(
        exact, rel=1e-10
    )


def test_fid_matches_scipy_sqrtm_for_non_commuting_covariances():
    rng = np.random.default_rng(2)
    d = 50
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    assert not np.allclose(s1 @ s2, s2 @ s1)
    mu1, mu2 = rng.standard_normal(d), np.zeros(d)
    exact = pytorch_fid_reference(mu1, s1, mu2, s2)
    # Both exact in float64 for well-conditioned SPD matrices; sqrtm's Schur
    # route and our eigenvalues agree to ~1e-12 of the trace.
    assert m.fid_from_statistics(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-9)


def test_fid_matches_pytorch_fid_on_rank_deficient_sample_covariances():
    # 60 samples of 128 features: both covariances have rank 59, as FID on a
    # small sample. pytorch-fid's sqrtm of the singular product adds the square
    # roots of roundoff-level eigenvalues (~1e-8 each), which we count as zero;
    # the two agree to that level.
    rng = np.random.default_rng(3)
    w = rng.standard_normal((128, 128))
    x = rng.standard_normal((60, 128)) @ w
    y = (rng.standard_normal((60, 128)) + 0.3) @ w
    stats = (*m.statistics(x), *m.statistics(y))
    reference = pytorch_fid_reference(*stats)
    assert m.fid_from_statistics(*stats) == pytest.approx(reference, rel=1e-6)


def test_statistics_are_the_mean_and_the_unbiased_covariance():
    rng = np.random.default_rng(4)
    f = rng.standard_normal((30, 5)).astype(np.float32)
    mu, sigma = m.statistics(f)
    f64 = f.astype(np.float64)
    centred = f64 - f64.sum(0) / 30
    sigma_loop = sum(np.outer(r, r) for r in centred) / 29
    np.testing.assert_allclose(mu, f64.sum(0) / 30, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(sigma, sigma_loop, rtol=1e-12, atol=1e-14)
    assert mu.dtype == sigma.dtype == np.float64
    with pytest.raises(DataError, match=r"\(n >= 2, d\)"):
        m.statistics(f[:1])
    with pytest.raises(DataError, match="disagree"):
        m.fid_from_statistics(mu, sigma, mu[:4], sigma[:4, :4])


# -- statistics files --------------------------------------------------------------------------


def test_statistics_file_round_trip_in_pytorch_fids_layout(tmp_path):
    rng = np.random.default_rng(5)
    mu, sigma = m.statistics(rng.standard_normal((50, 8)))
    ours = str(tmp_path / "ours.npz")
    m.save_statistics(ours, mu, sigma)
    # pytorch-fid reads a stats file with np.load(path)['mu'][:], ['sigma'][:].
    with np.load(ours) as f:
        assert sorted(f.files) == ["mu", "sigma"]
        np.testing.assert_array_equal(f["mu"][:], mu)
        np.testing.assert_array_equal(f["sigma"][:], sigma)
    # ... and writes one with np.savez_compressed(path, mu=m1, sigma=s1).
    theirs = str(tmp_path / "theirs.npz")
    np.savez_compressed(theirs, mu=mu.astype(np.float32), sigma=sigma)
    got_mu, got_sigma = m.load_statistics(theirs)
    np.testing.assert_array_equal(got_mu, mu.astype(np.float32))
    np.testing.assert_array_equal(got_sigma, sigma)
    # The score SDE code's reference files hold the features under 'pool_3'.
    feats = rng.standard_normal((40, 8))
    score_sde = str(tmp_path / "cifar10_stats.npz")
    np.savez_compressed(score_sde, pool_3=feats)
    got_mu, got_sigma = m.load_statistics(score_sde)
    np.testing.assert_allclose(got_mu, feats.mean(0), rtol=1e-14)
    np.testing.assert_allclose(got_sigma, np.cov(feats.T), rtol=1e-14)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cifar10_stats.npz",
        "ours.npz",
        "theirs.npz",
    ]  # no temporary file left


def test_statistics_files_fail_loudly(tmp_path):
    with pytest.raises(ConfigError, match=r"\.npz"):
        m.save_statistics(str(tmp_path / "stats"), np.zeros(2), np.eye(2))
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, mean=np.zeros(2))
    with pytest.raises(DataError, match=r"'mu' and 'sigma'.*found \['mean'\]"):
        m.load_statistics(bad)
    np.savez(bad, mu=np.zeros(3), sigma=np.eye(2))
    with pytest.raises(DataError, match=r"mu has shape \(3,\) and sigma \(2, 2\)"):
        m.load_statistics(bad)
    with pytest.raises(DataError, match="not found"):
        m.load_statistics(str(tmp_path / "absent.npz"))


# -- Inception Score -------------------------------------------------------------------------


def improved_gan_inception_score(logits, splits):
    """The improved-GAN code's loop (softmax, then per split KL to the split mean), in float64."""
    preds = np.exp(logits - logits.max(1, keepdims=True))
    preds /= preds.sum(1, keepdims=True)
    scores = []
    for i in range(splits):
        part = preds[(i * preds.shape[0] // splits) : ((i + 1) * preds.shape[0] // splits), :]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return np.mean(scores), np.std(scores)


def test_inception_score_closed_forms():
    # Uniform predictions: p(y|x) = p(y), every KL is 0, IS = 1.
    assert m.inception_score(np.zeros((50, 1008)), splits=5) == (1.0, 0.0)
    # Confident predictions spread evenly over K classes in every split: IS = K.
    # Logit gaps of 50 leave e^-50 off the argmax; gaps of 2,000 underflow
    # p to exactly 0, which must give 0 log 0 = 0, not NaN.
    k = 10
    for gap in (50.0, 2000.0):
        logits = gap * np.eye(1008)[np.arange(200) % k]
        mean, std = m.inception_score(logits, splits=10)
        assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0.0, abs=1e-10)


def test_inception_score_matches_the_improved_gan_loop_with_ragged_splits():
    rng = np.random.default_rng(6)
    logits = 3.0 * rng.standard_normal((103, 20))  # 103 / 10: parts of 10 and 11
    for splits in (1, 10):  # 1 is TF-GAN's classifier_score_from_logits (score SDE's IS)
        mean, std = m.inception_score(logits, splits=splits)
        ref_mean, ref_std = improved_gan_inception_score(logits, splits)
        assert mean == pytest.approx(ref_mean, rel=1e-12)  # same float64 sums, another order
        assert std == pytest.approx(ref_std, rel=1e-9, abs=1e-12)
    with pytest.raises(ConfigError, match="splits"):
        m.inception_score(logits, splits=104)


# -- KID -------------------------------------------------------------------------------------


def mmd2_double_loop(a, b):
    d = a.shape[1]
    k = lambda u, v: (float(u @ v) / d + 1.0) ** 3
    n = len(a)
    xx = sum(k(a[i], a[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(b[i], b[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(a[i], b[j]) for i in range(n) for j in range(n)) / (n * n)
    return xx + yy - 2 * xy


def test_kid_matches_a_double_loop_on_the_documented_subsets():
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((15, 4)), 0.5 + rng.standard_normal((11, 4))
    mean, std = m.kid(a, b, subset_size=1000, num_subsets=6, seed=3)
    # m = min(1000, 15, 11) = 11; subset k draws 11 of a, then 11 of b, from default_rng(seed).
    draws = np.random.default_rng(3)
    values = []
    for _ in range(6):
        ia, ib = draws.choice(15, 11, replace=False), draws.choice(11, 11, replace=False)
        values.append(mmd2_double_loop(a[ia], b[ib]))
    # Float64 sums of ~100 O(1) terms in two orders: ~1e-15 relative.
    assert mean == pytest.approx(np.mean(values), rel=1e-12)
    assert std == pytest.approx(np.std(values), rel=1e-9)
    assert std > 0  # the subsets differ


def test_kid_is_unbiased_for_equal_distributions():
    # 400 independent pairs of 20-point sets from one distribution: the
    # unbiased estimate averages to 0 (4 standard errors: a false alarm ~1e-4),
    # while the biased V-statistic (diagonals kept) is clearly positive.
    rng = np.random.default_rng(8)
    values, biased = [], []
    for _ in range(400):
        a, b = rng.standard_normal((20, 3)), rng.standard_normal((20, 3))
        values.append(m.kid(a, b, subset_size=20, num_subsets=1)[0])
        k = lambda p, q: (p @ q.T / 3 + 1) ** 3
        biased.append(k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean())
    se = np.std(values, ddof=1) / np.sqrt(len(values))
    assert abs(np.mean(values)) < 4 * se
    assert np.mean(biased) > 10 * se


# -- preprocessing ---------------------------------------------------------------------------


def test_inception_input_quantises_as_png_files_or_the_score_sde_code():
    rng = np.random.default_rng(9)
    x = rng.uniform(-1.1, 1.1, (2, 5, 5, 3)).astype(np.float32)  # model range, centred
    scaling = Scaling(centered=True, bits=8)
    got = np.asarray(m.to_inception_input(x, scaling.to_unit))
    # XLA's CPU division may differ from IEEE's v / 255 by an ulp (it multiplies
    # by the reciprocal), so compare the 8-bit levels exactly and the values to 1 ulp.
    ulp = np.finfo(np.float32).eps

    def assert_levels(values, pixels):
        np.testing.assert_array_equal(np.round(values * 255.0), pixels)
        np.testing.assert_allclose(values, pixels.astype(np.float32) / 255, rtol=ulp, atol=0)

    # round: the PNG pixels this package writes (Scaling.to_uint8), read back as v / 255.
    assert_levels(got, scaling.to_uint8(x))
    # floor: score SDE's np.clip(x * 255, 0, 255).astype(np.uint8) on [0, 1] samples.
    unit = (x + 1) / 2
    floor = np.asarray(m.to_inception_input(unit, quantize="floor"))
    assert_levels(floor, np.clip(unit * 255.0, 0, 255).astype(np.uint8))
    # uint8 pixels are v / 255; one grey channel becomes three equal ones.
    pixels = rng.integers(0, 256, (2, 4, 4, 1), dtype=np.uint8)
    rgb = np.asarray(m.to_inception_input(pixels))
    assert rgb.shape == (2, 4, 4, 3)
    assert_levels(rgb, np.repeat(pixels, 3, -1))
    with pytest.raises(ConfigError, match="quantize"):
        m.to_inception_input(x, quantize="nearest")
