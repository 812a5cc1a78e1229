"""Two-dimensional toy distributions, sampled by pure JAX functions of a PRNG key.

The shapes are the usual ones of the score-matching and flow literature: the
swiss roll and two moons of scikit-learn (`make_swiss_roll`, `make_moons`),
and the eight Gaussians, checkerboard and rings of FFJORD (Grathwohl et al.
2019, `toy_data.py`), which also fixed their noise levels. Each is drawn
from its continuous law (random angles, not a `linspace` as in the
originals), then centred and scaled *isotropically*, so its shape is kept and
its mean per-axis variance is 1: about unit scale, as standardised data would
be, and inside [-4, 4]. The constants come from the closed-form moments of
each law (the swiss roll's by quadrature, once, at import).

`eight_gaussians` is a Gaussian mixture; `eight_gaussians_mixture()` gives
the same law as a `GaussianMixture`, with exact scores and densities.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusers_unified.data.gaussian import GaussianMixture
from diffusers_unified.typing import Array, PRNGKey

TOY_NAMES = ("swiss_roll", "two_moons", "eight_gaussians", "checkerboard", "rings")

# Number of classes of the sets whose points carry a natural label (which moon,
# which component, which ring); the others are unlabelled.
TOY_NUM_CLASSES = {"two_moons": 2, "eight_gaussians": 8, "rings": 4}


def _standardisation(mean, per_axis_var) -> tuple[np.ndarray, float]:
    """(centre, scale) with (x - centre) / scale of mean per-axis variance 1."""
    return np.asarray(mean, np.float64), math.sqrt(float(np.mean(per_axis_var)))


# -- swiss roll: t ~ U[1.5 pi, 4.5 pi], (t cos t, t sin t) + N(0, 1) ---------------
# scikit-learn's make_swiss_roll(noise=1.0) seen from above, as in FFJORD.
_SWISS_T = (1.5 * math.pi, 4.5 * math.pi)
_SWISS_NOISE = 1.0


def _swiss_roll_moments():
    # Midpoint rule on the curve (error ~1e-9 at this resolution), plus the noise.
    lo, hi = _SWISS_T
    t = lo + (hi - lo) * (np.arange(200_000) + 0.5) / 200_000
    curve = np.stack([t * np.cos(t), t * np.sin(t)], axis=1)
    return _standardisation(curve.mean(0), curve.var(0) + _SWISS_NOISE**2)


_SWISS_CENTRE, _SWISS_SCALE = _swiss_roll_moments()

# -- two moons: the outer arc (cos t, sin t) and the inner arc (1 - cos t, 1/2 - sin t),
# t ~ U[0, pi], each with probability 1/2, plus N(0, 0.1^2) (make_moons(noise=0.1)).
# With E cos t = 0, E sin t = 2/pi, E cos^2 t = E sin^2 t = 1/2: the mean is (1/2, 1/4),
# Var x = 1 - 1/4 and E y^2 = (1/2 + (1/4 - 2/pi + 1/2)) / 2.
_MOONS_NOISE = 0.1
_MOONS_CENTRE, _MOONS_SCALE = _standardisation(
    [0.5, 0.25],
    [0.75 + _MOONS_NOISE**2, (1.25 - 2 / math.pi) / 2 - 1 / 16 + _MOONS_NOISE**2],
)

# -- eight Gaussians: means R (cos k pi/4, sin k pi/4), isotropic std s, equal weights.
# FFJORD's ratio s / R = 1/8; the per-axis variance R^2/2 + s^2 = 1 then fixes
# R = 8 / sqrt(33) and s = 1 / sqrt(33).
_EIGHT_RADIUS = 8 / math.sqrt(33)
_EIGHT_STD = 1 / math.sqrt(33)
_EIGHT_ANGLES = np.arange(8) * math.pi / 4
_EIGHT_MEANS = _EIGHT_RADIUS * np.stack([np.cos(_EIGHT_ANGLES), np.sin(_EIGHT_ANGLES)], axis=1)

# -- checkerboard (FFJORD): x1 ~ U[-2, 2]; x2 uniform on the squares of alternate
# colour. Both marginals are U[-2, 2] (variance 4/3) and uncorrelated.
_CHECKER_SCALE = math.sqrt(4 / 3)

# -- rings (FFJORD): four concentric circles of radii 0.75, 1.5, 2.25, 3 chosen with
# equal probability, a uniform angle, plus N(0, 0.08^2). Per-axis variance
# E r^2 / 2 + 0.08^2.
_RING_RADII = 0.75 * np.arange(1, 5)
_RING_NOISE = 0.08
_RING_SCALE = math.sqrt(np.mean(_RING_RADII**2) / 2 + _RING_NOISE**2)


def _swiss_roll(key: PRNGKey, n: int):
    key_t, key_e = jax.random.split(key)
    t = jax.random.uniform(key_t, (n,), jnp.float32, *_SWISS_T)
    curve = jnp.stack([t * jnp.cos(t), t * jnp.sin(t)], axis=1)
    x = curve + _SWISS_NOISE * jax.random.normal(key_e, (n, 2), jnp.float32)
    return (x - _SWISS_CENTRE) / _SWISS_SCALE, None


def _two_moons(key: PRNGKey, n: int):
    key_y, key_t, key_e = jax.random.split(key, 3)
    y = jax.random.bernoulli(key_y, 0.5, (n,)).astype(jnp.int32)  # 0 outer, 1 inner
    t = jax.random.uniform(key_t, (n,), jnp.float32, 0.0, math.pi)
    outer = jnp.stack([jnp.cos(t), jnp.sin(t)], axis=1)
    inner = jnp.stack([1 - jnp.cos(t), 0.5 - jnp.sin(t)], axis=1)
    x = jnp.where(y[:, None] == 1, inner, outer)
    x = x + _MOONS_NOISE * jax.random.normal(key_e, (n, 2), jnp.float32)
    return (x - _MOONS_CENTRE) / _MOONS_SCALE, y


def _eight_gaussians(key: PRNGKey, n: int):
    key_y, key_e = jax.random.split(key)
    y = jax.random.randint(key_y, (n,), 0, 8, jnp.int32)
    means = jnp.asarray(_EIGHT_MEANS, jnp.float32)
    return means[y] + _EIGHT_STD * jax.random.normal(key_e, (n, 2), jnp.float32), y


def _checkerboard(key: PRNGKey, n: int):
    key_1, key_2, key_b = jax.random.split(key, 3)
    x1 = jax.random.uniform(key_1, (n,), jnp.float32, -2.0, 2.0)
    # U[0, 1) moved to [-2, -1) or [0, 1), then up by one on odd columns: the
    # squares of one colour of the 4 x 4 board on [-2, 2]^2.
    x2 = (
        jax.random.uniform(key_2, (n,), jnp.float32)
        - 2.0 * jax.random.bernoulli(key_b, 0.5, (n,))
        + jnp.mod(jnp.floor(x1), 2.0)
    )
    return jnp.stack([x1, x2], axis=1) / _CHECKER_SCALE, None


def _rings(key: PRNGKey, n: int):
    key_y, key_a, key_e = jax.random.split(key, 3)
    y = jax.random.randint(key_y, (n,), 0, 4, jnp.int32)
    angle = jax.random.uniform(key_a, (n,), jnp.float32, 0.0, 2 * math.pi)
    radius = jnp.asarray(_RING_RADII, jnp.float32)[y]
    x = radius[:, None] * jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=1)
    x = x + _RING_NOISE * jax.random.normal(key_e, (n, 2), jnp.float32)
    return x / _RING_SCALE, y


_SAMPLERS = {
    "swiss_roll": _swiss_roll,
    "two_moons": _two_moons,
    "eight_gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "rings": _rings,
}


@functools.partial(jax.jit, static_argnums=(0, 2))
def _sample(name: str, key: PRNGKey, n: int):
    x, y = _SAMPLERS[name](key, n)
    return x.astype(jnp.float32), y


def sample_toy_with_labels(name: str, key: PRNGKey, n: int) -> tuple[Array, Array | None]:
    """n points of the toy set `name` (n, 2) float32, and their labels (n,) int32 or None.

    Labels: which moon (0 outer, 1 inner) for two_moons, which component
    (0..7, counter-clockwise from the positive x axis) for eight_gaussians,
    which ring (0 innermost .. 3) for rings; None for swiss_roll and
    checkerboard. Compiled once per (name, n).
    """
    if name not in _SAMPLERS:
        raise ValueError(f"unknown toy data set {name!r}; valid: {', '.join(TOY_NAMES)}")
    return _sample(name, key, int(n))


def sample_toy(name: str, key: PRNGKey, n: int) -> Array:
    """n points of the toy set `name`, shaped (n, 2), float32. Names: `TOY_NAMES`."""
    return sample_toy_with_labels(name, key, n)[0]


def eight_gaussians_mixture() -> GaussianMixture:
    """The law of `sample_toy("eight_gaussians", ...)` as a `GaussianMixture`.

    Eight equally weighted isotropic Gaussians with means 8/sqrt(33) (cos k pi/4,
    sin k pi/4) and standard deviation 1/sqrt(33): FFJORD's eight Gaussians
    (radius to spread 8 : 1) scaled to unit variance per axis. Component k is
    label k of `sample_toy_with_labels`.
    """
    return GaussianMixture.create(np.full(8, 1 / 8), _EIGHT_MEANS, stds=np.full(8, _EIGHT_STD))
