"""Noise scales from data: NCSNv2's techniques 1, 2 and 4 (Song and Ermon 2020).

For data in D dimensions and geometric levels sigma_1 > ... > sigma_L with
ratio gamma = sigma_{i-1} / sigma_i:

* Technique 1 (initial noise scale): sigma_1 = the largest Euclidean distance
  between two training examples, so that the first level can move any
  example to any other.
* Technique 2 (other noise scales): ||x|| of x ~ N(0, sigma^2 I) concentrates
  near sqrt(D) sigma with standard deviation about sigma / sqrt(2), so
  adjacent levels overlap when

      C(gamma) = Phi(sqrt(2D)(gamma - 1) + 3 gamma) - Phi(sqrt(2D)(gamma - 1) - 3 gamma)

  is about 0.5 (the mass of level i's shell inside the 3-sd shell of level
  i - 1); L follows from gamma, sigma_1 and sigma_L. The criterion needs
  sqrt(2D) > 3 (D >= 5): below that C > 0.5 for every gamma and it sets no
  number of levels.
* Technique 4 (step size): annealed Langevin dynamics with T steps per level
  and step alpha_i = eps sigma_i^2 / sigma_L^2, started at level i - 1's
  variance, ends at the variance ratio (NCSNv2, eq. 7)

      f(eps) = (1 - eps / sigma_L^2)^(2T) (gamma^2 - s) + s,
      s = 2 eps / (sigma_L^2 - sigma_L^2 (1 - eps / sigma_L^2)^2)   (the stationary ratio),

  and eps is chosen to bring f as close to 1 as it gets.

Step-size conventions: NCSNv2 (paper and code) updates x + alpha_i s + sqrt(2
alpha_i) z. This package's `samplers.annealed_langevin` follows the NCSN
paper's Algorithm 1, x + alpha_i / 2 s + sqrt(alpha_i) z with alpha_i =
step_size sigma_i^2 / sigma_L^2, so its step_size is 2 eps:
`NoiseScales.step_size` is in the sampler's convention (e.g. NCSNv2's
CIFAR-10 eps = 6.2e-6 is step_size = 1.24e-5 here).

On the paper's own settings (sigma_L = 0.01; CIFAR-10 sigma_1 = 50, L = 232;
CelebA 64 90, 500; LSUN church 96 140, 788; bedroom 128 190, 1086; FFHQ 256
348, 2311), C(gamma) is 0.567 every time, not 0.5: their L are about 6 %
above the smallest L with C >= 0.5, which is what `num_scales_for` returns at
its default `overlap=0.5` (`overlap=0.567` gives their L + 1). With their L
and T, their eps minimise |f - 1| to within 2 % for four of the five data
sets; LSUN church's 4.9e-6 (T = 4) has f = 1.0247 against the minimum 1.0224
at eps = 2.3e-6 (f is flat near its minimum).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


class NoiseScales(NamedTuple):
    sigma_max: float  # technique 1: sigma_1
    num_scales: int  # technique 2: L
    step_size: float  # technique 4, in `annealed_langevin`'s convention (2 eps of NCSNv2)
    gamma: float  # ratio of adjacent levels, (sigma_max / sigma_min)^(1 / (L - 1))


def max_pairwise_distance(x, max_examples: int = 5_000, seed: int = 0) -> float:
    """Technique 1: the largest Euclidean distance between two rows of x (n, ...).

    On at most `max_examples` rows, drawn without replacement under `seed`
    when there are more (the exact maximum of that sample, a lower bound on
    the whole set's).
    """
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    if len(x) < 2:
        raise ValueError(f"need at least 2 examples for a pairwise distance, got {len(x)}")
    if len(x) > max_examples:
        x = x[np.random.default_rng(seed).choice(len(x), max_examples, replace=False)]
    sq = np.sum(x * x, axis=1)
    best = 0.0
    for start in range(0, len(x), 1024):  # (1024, n) blocks of the Gram matrix
        block = x[start : start + 1024]
        d2 = sq[start : start + 1024, None] + sq[None, :] - 2.0 * block @ x.T
        best = max(best, float(d2.max()))
    return math.sqrt(max(best, 0.0))


def _phi(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def shell_overlap(gamma: float, dim: int) -> float:
    """Technique 2's criterion C(gamma) for data in `dim` dimensions."""
    a = math.sqrt(2.0 * dim) * (gamma - 1.0)
    return _phi(a + 3.0 * gamma) - _phi(a - 3.0 * gamma)


def gamma_for(dim: int, overlap_target: float = 0.5) -> float:
    """The ratio gamma > 1 with C(gamma) = overlap_target (C decreases in gamma for D >= 5)."""
    if not 0.0 < overlap_target < shell_overlap(1.0, dim):
        raise ValueError(
            f"overlap target must be in (0, C(1) = {shell_overlap(1.0, dim):.4f}), "
            f"got {overlap_target}"
        )
    if math.sqrt(2.0 * dim) <= 3.0:
        raise ValueError(
            f"NCSNv2's technique 2 needs D >= 5 dimensions (sqrt(2D) > 3); with D = {dim} the "
            "overlap C(gamma) exceeds 0.5 for every gamma: choose the number of levels yourself"
        )
    lo, hi = 1.0, 2.0
    while shell_overlap(hi, dim) > overlap_target:
        lo, hi = hi, 2.0 * hi
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if shell_overlap(mid, dim) > overlap_target else (lo, mid)
    return 0.5 * (lo + hi)


def num_scales_for(sigma_max: float, sigma_min: float, dim: int, overlap: float = 0.5) -> int:
    """Technique 2: the fewest geometric levels sigma_max ... sigma_min with C(gamma) >= overlap."""
    if not 0.0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    steps = math.log(sigma_max / sigma_min) / math.log(gamma_for(dim, overlap))
    return max(2, math.ceil(steps - 1e-9) + 1)


def final_variance_ratio(eps, gamma: float, sigma_min: float, num_steps_each: int):
    """Technique 4's f(eps) (NCSNv2 eq. 7): s_T^2 / sigma_L^2 after T steps at the last level.

    eps is NCSNv2's step size (the sampler's step_size / 2).
    """
    u = np.asarray(eps, np.float64) / sigma_min**2
    stationary = 2.0 * u / (1.0 - (1.0 - u) ** 2)  # = 2 eps / (sigma_L^2 - sigma_L^2 (1 - u)^2)
    return (1.0 - u) ** (2 * num_steps_each) * (gamma**2 - stationary) + stationary


def step_size_for(gamma: float, sigma_min: float, num_steps_each: int) -> float:
    """Technique 4: the eps in (0, sigma_L^2) minimising |f(eps) - 1|, as step_size = 2 eps."""
    if num_steps_each < 1:
        raise ValueError(f"num_steps_each must be >= 1, got {num_steps_each}")
    cost = lambda log_u: np.abs(
        final_variance_ratio(np.exp(log_u) * sigma_min**2, gamma, sigma_min, num_steps_each) - 1
    )
    grid = np.linspace(math.log(1e-10), math.log(0.999), 20_001)
    i = int(np.argmin(cost(grid)))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    for _ in range(100):  # golden-section refinement inside the bracketing cells
        m1, m2 = lo + 0.382 * (hi - lo), hi - 0.382 * (hi - lo)
        lo, hi = (lo, m2) if cost(m1) <= cost(m2) else (m1, hi)
    eps = math.exp(0.5 * (lo + hi)) * sigma_min**2
    return 2.0 * eps


def suggest_noise_scales(
    x,
    *,
    num_steps_each: int = 5,
    sigma_min: float = 0.01,
    sigma_max: float | None = None,
    num_scales: int | None = None,
    overlap: float = 0.5,
    max_examples: int = 5_000,
    seed: int = 0,
) -> NoiseScales:
    """NCSNv2's sigma_max, number of levels and Langevin step size for the data x (n, ...).

    `sigma_max` (technique 1) and `num_scales` (technique 2) are computed
    unless given; the step size (technique 4) is for `num_steps_each` (T)
    Langevin steps per level ending at `sigma_min` (NCSNv2: T = 5 for
    CIFAR-10, sigma_L = 0.01), in `samplers.annealed_langevin`'s convention.
    """
    x = np.asarray(x)
    dim = math.prod(x.shape[1:])
    if sigma_max is None:
        sigma_max = max_pairwise_distance(x, max_examples, seed)
    if not sigma_max > sigma_min:
        raise ValueError(f"sigma_max={sigma_max:.4g} must exceed sigma_min={sigma_min}")
    if num_scales is None:
        num_scales = num_scales_for(sigma_max, sigma_min, dim, overlap)
    gamma = (sigma_max / sigma_min) ** (1.0 / (num_scales - 1))
    step_size = step_size_for(gamma, sigma_min, num_steps_each)
    return NoiseScales(float(sigma_max), int(num_scales), float(step_size), float(gamma))
