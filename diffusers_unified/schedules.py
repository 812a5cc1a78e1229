"""Noise schedules: the discrete beta and sigma grids of DDPM, NCSN and EDM.

Grids are computed in float64 NumPy (cumulative products lose digits in
float32) and returned as NumPy arrays; callers cast them where they are used.
"""

from __future__ import annotations

import numpy as np


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """DDPM's linear schedule (Ho et al. 2020, sec. 4): beta_1 = 1e-4 ... beta_T = 0.02."""
    _check_count("num_steps", num_steps, 1)
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(
            f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}"
        )
    return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """The cosine schedule of Nichol and Dhariwal (2021), eq. 17.

    alphabar(t) = f(t) / f(0) with f(t) = cos^2(pi/2 (t/T + s) / (1 + s)), and
    beta_t = 1 - alphabar(t) / alphabar(t - 1) clipped at `max_beta`.
    """
    _check_count("num_steps", num_steps, 1)
    steps = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    f = np.cos((steps + s) / (1.0 + s) * np.pi / 2.0) ** 2
    alphabar = f / f[0]
    return np.minimum(1.0 - alphabar[1:] / alphabar[:-1], max_beta)


def geometric_sigmas(sigma_min: float, sigma_max: float, num_scales: int) -> np.ndarray:
    """NCSN's noise levels, ascending: sigma_min * (sigma_max / sigma_min)^(i / (L - 1)).

    Song and Ermon (2019) list them descending (sigma_1 > ... > sigma_L); this
    package indexes every grid from the least noisy level up, as the score SDE
    reference code does, so that level i sits at time t_i = i / (L - 1).
    """
    _check_count("num_scales", num_scales, 2)
    if not 0.0 < sigma_min < sigma_max:
        raise ValueError(
            f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}"
        )
    return np.exp(np.linspace(np.log(sigma_min), np.log(sigma_max), num_scales))


def karras_sigmas(
    num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0
) -> np.ndarray:
    """EDM's sigma spacing (Karras et al. 2022, eq. 5), descending from sigma_max to sigma_min."""
    _check_count("num_steps", num_steps, 2)
    ramp = np.linspace(0.0, 1.0, num_steps)
    inv = sigma_max ** (1.0 / rho) + ramp * (sigma_min ** (1.0 / rho) - sigma_max ** (1.0 / rho))
    return inv**rho


def _check_count(name: str, value: int, minimum: int) -> None:
    if int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def pchip_slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Knot derivatives of the monotone piecewise-cubic interpolant (Fritsch and Carlson 1980).

    The interpolant through (x, y) with these slopes is C^1 and monotone
    wherever the data are (as scipy's PchipInterpolator): interior slopes are
    weighted harmonic means of the neighbouring secant slopes (0 at a local
    extremum), end slopes a shape-preserving three-point formula.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    h = np.diff(x)
    delta = np.diff(y) / h
    d = np.zeros_like(y)
    w1 = 2 * h[1:] + h[:-1]
    w2 = h[1:] + 2 * h[:-1]
    same_sign = delta[:-1] * delta[1:] > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        harmonic = (w1 + w2) / (w1 / delta[:-1] + w2 / delta[1:])
    d[1:-1] = np.where(same_sign, harmonic, 0.0)
    for end, (h0, h1, d0, d1) in (
        (0, (h[0], h[1], delta[0], delta[1])),
        (-1, (h[-1], h[-2], delta[-1], delta[-2])),
    ):
        slope = ((2 * h0 + h1) * d0 - h0 * d1) / (h0 + h1)
        if np.sign(slope) != np.sign(d0):
            slope = 0.0
        elif np.sign(d0) != np.sign(d1) and abs(slope) > abs(3 * d0):
            slope = 3 * d0
        d[end] = slope
    return d
