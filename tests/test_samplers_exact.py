"""Every process x every sampler, driven by the exact score of a Gaussian mixture.

The mixture is `example_mixture()` (2-D, four components, weights 0.1 ... 0.4,
standard deviations 0.25 ... 0.45, means 1.5 from the origin). Each case samples
at the papers' default step counts and checks, against a
reference of 400,000 exact samples classified the same way (each sample goes
to its most probable component, so the rare overlap is treated alike):

* component weights within 3 standard errors (binomial);
* per-component means and covariances within 4 standard errors (about 60
  cases x 20 moments: 4 SE keeps the chance of a false alarm anywhere in the
  file near 1 %, 3 SE would make one likely);
* the sliced Wasserstein distance to exact samples within 1.5x the noise
  floor, the mean distance from the same exact sets to independent exact
  sets of the same size.
  In 2-D one such distance fluctuates by 25 % (its coefficient of variation,
  measured: the tails of the 1-D quantile functions dominate it), so 1.5x
  would be only two standard deviations; each case therefore draws 4 x 4,000
  samples and averages their distances to 4 independent exact sets of 4,000,
  which brings the spread to about 13 % (measured). The moments use all
  16,000 samples. (The spread is relative to the floor, which shrinks with
  the set size alike: 4,000 rather than 5,000 keeps the check as sharp and
  costs a fifth less.)

Langevin MCMC at a finite step size is biased, which these checks resolve at
this N, so the samplers that run it get their bias added to the tolerances,
measured with 200,000 samples:

* annealed Langevin dynamics (NCSN paper: L = 10, T = 100, eps = 4e-5, the
  NCSN code's step_lr = 2e-5, with sigma_max = 5, the data's largest
  pairwise distance, NCSNv2's technique 1): weights off by up to 0.015 (the
  issue allows 0.05; we check 0.03), covariances by up to 5 % (relaxation at
  the small sigmas is slow: the spread frozen in at sigma ~ 0.1 stays; 10 %
  with the paper's text's eps = 2e-5), SW about 1.8x the floor (checked
  below 4x);
* the same algorithm on the VE SDE's finer ladder (100 of its levels): weights
  0.005, covariances 0.5 % (0.003 and 1.5 % with eps = 2e-5);
* predictor-corrector with the Langevin corrector (snr 0.16, one step, the
  score SDE paper's VE setting): weights 0.003, covariances up to 4 %.

The SDE samplers take 1000 steps (DDPM; the score SDE paper's N), DDIM 1000
(its longest setting, where its first-order bias, 4 % in variance at 100
steps on this mixture, is below the Monte-Carlo error), and the ODE sampler
Dopri5 at rtol = atol = 1e-5 (the score SDE code's RK45). The other ODE
methods, and both ancestral variances, have sharper tests in
test_samplers.py (convergence order, tolerance, Ho et al.'s update written
out); their accuracy against NFE is in experiments/sampler_accuracy.py.
NCSN with 10 levels is sampled by annealed Langevin dynamics, as in its
paper; NCSN with the score SDE code's 1000 levels (its "VE, discrete" models)
by everything else.
"""

import functools

import jax
import numpy as np
import pytest

from diffusers_unified import samplers
from diffusers_unified.data.gaussian import example_mixture
from diffusers_unified.metrics import sliced_wasserstein
from diffusers_unified.processes import DDPM, NCSN, VESDE, VPSDE, SubVPSDE

N = 4_000  # samples per sliced-Wasserstein comparison
BATCHES = 4  # comparisons per case; the moments use all N * BATCHES samples
MIXTURE = example_mixture()
K = MIXTURE.num_components

PROCESSES = {
    "VPSDE": VPSDE(),
    "SubVPSDE": SubVPSDE(),
    "VESDE": VESDE(),
    "DDPM": DDPM(),
    "NCSN-1000": NCSN(sigma_max=50.0, N=1000),
}
EM = samplers.EulerMaruyama()
SAMPLERS = {
    "ancestral": (samplers.ancestral, {}),  # the reference's variance: VP large, VE small
    "ddim": (samplers.ddim, {"num_steps": 1000}),
    "pc-em": (samplers.predictor_corrector, {"predictor": EM, "corrector": samplers.NoCorrector()}),
    "pc-rd": (samplers.predictor_corrector, {"corrector": samplers.NoCorrector()}),
    "pc-rd-langevin": (samplers.predictor_corrector, {}),
    "ode-dopri5": (samplers.probability_flow, {}),
}
# (weights, relative covariance, SW / floor) allowances for the biased samplers.
EXACT = (0.0, 0.0, 1.5)
BIASED = {"pc-rd-langevin": (0.004, 0.04, 1.5)}
# NCSN with 1000 levels shares its continuous extension, the VE SDE, with the
# VESDE row, so it skips the two samplers that only see that extension (the
# ODE and the Euler-Maruyama predictor), keeping those that use its levels.
SKIP = {("NCSN-1000", "ode-dopri5"), ("NCSN-1000", "pc-em")}
CASES = [
    (p, s, *SAMPLERS[s], BIASED.get(s, EXACT))
    for p in PROCESSES
    for s in SAMPLERS
    if (p, s) not in SKIP
]
CASES += [
    ("NCSN-10", "annealed-langevin", samplers.annealed_langevin, {}, (0.03, 0.07, 4.0)),
    (
        "VESDE",
        "annealed-langevin",
        samplers.annealed_langevin,
        {"num_steps": 100},
        (0.006, 0.02, 1.5),
    ),
]
PROCESSES["NCSN-10"] = NCSN(sigma_max=5.0)


@functools.cache
def reference():
    """Class frequencies, per-class moments and SW noise floor of exact samples."""
    x, _ = MIXTURE.sample(jax.random.PRNGKey(100), 400_000)
    labels = np.asarray(MIXTURE.classify(x))
    x = np.asarray(x, np.float64)
    freq = np.bincount(labels, minlength=K) / labels.size
    moments = [(x[labels == k].mean(0), np.cov(x[labels == k].T)) for k in range(K)]
    exact = [MIXTURE.sample(jax.random.PRNGKey(200 + i), N)[0] for i in range(BATCHES)]
    # The floor is paired with the sets the samplers are compared to: the mean
    # distance from each of them to 8 further independent exact sets. An
    # unpaired floor (other sets against each other) leaves the luck of
    # `exact` itself in the ratio (measured: 0.036 from 8 unpaired pairs
    # against 0.049 paired, with sampler distances of 0.052-0.055).
    others = [MIXTURE.sample(jax.random.PRNGKey(300 + i), N)[0] for i in range(8)]
    sw = functools.partial(sliced_wasserstein, key=jax.random.PRNGKey(7))
    floor = np.mean([float(sw(o, e)) for e in exact for o in others])
    return freq, moments, floor, exact, labels.size


@pytest.mark.slow
@pytest.mark.parametrize(
    "process_name,sampler_name,sampler,options,allowance",
    CASES,
    ids=[f"{c[0]}-{c[1]}" for c in CASES],
)
def test_sampler_matches_the_exact_mixture(process_name, sampler_name, sampler, options, allowance):
    w_bias, cov_bias, sw_factor = allowance
    freq, moments, floor, exact, n_ref = reference()
    process = PROCESSES[process_name]
    n = N * BATCHES
    out = sampler(jax.random.PRNGKey(0), MIXTURE.score_fn(process), process, (n, 2), **options)
    x = np.asarray(out.samples, np.float64)
    assert np.isfinite(x).all()
    labels = np.asarray(MIXTURE.classify(out.samples))
    got = np.bincount(labels, minlength=K) / n

    se_w = np.sqrt(freq * (1 - freq) / n + freq * (1 - freq) / n_ref)
    assert np.all(np.abs(got - freq) <= 3 * se_w + w_bias), (got, freq, se_w)

    for k, (mean, cov) in enumerate(moments):
        xk = x[labels == k]
        n_k, n_ref_k = len(xk), freq[k] * n_ref
        se_mean = np.sqrt(np.diag(cov) * (1 / n_k + 1 / n_ref_k))
        assert np.all(np.abs(xk.mean(0) - mean) <= 4 * se_mean), (k, xk.mean(0), mean)
        # Var of a sample covariance entry: (S_ii S_jj + S_ij^2) / n for Gaussians.
        se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) * (1 / n_k + 1 / n_ref_k))
        tol = 4 * se_cov + cov_bias * np.max(np.abs(cov))
        assert np.all(np.abs(np.cov(xk.T) - cov) <= tol), (k, np.cov(xk.T), cov)

    distance = np.mean(
        [
            float(sliced_wasserstein(x[b * N : (b + 1) * N], exact[b], jax.random.PRNGKey(7)))
            for b in range(BATCHES)
        ]
    )
    assert distance <= sw_factor * floor, (distance, floor)
