"""Distances between two sample sets, on arrays of shape (n, ...) (flattened per example)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusers_unified.typing import Array, PRNGKey


def _flat(x: Array) -> Array:
    x = jnp.asarray(x, jnp.float32)
    return x.reshape(x.shape[0], -1)


def _quantiles(sorted_proj: Array, m: int) -> Array:
    """The empirical quantile function of each column of `sorted_proj` at m midpoints."""
    n = sorted_proj.shape[0]
    if n == m:
        return sorted_proj
    levels = (jnp.arange(m) + 0.5) / m * n - 0.5
    lo = jnp.clip(jnp.floor(levels).astype(jnp.int32), 0, n - 1)
    hi = jnp.clip(lo + 1, 0, n - 1)
    w = jnp.clip(levels - lo, 0.0, 1.0)[:, None]
    return (1 - w) * sorted_proj[lo] + w * sorted_proj[hi]


def sliced_wasserstein(x: Array, y: Array, key: PRNGKey, num_projections: int = 256) -> Array:
    """The sliced 2-Wasserstein distance sqrt(E_theta W_2^2(theta^T x, theta^T y)).

    theta is uniform on the unit sphere (Monte Carlo over `num_projections`
    directions, shared by both sets); each 1-D W_2 compares sorted
    projections, via empirical quantiles when the set sizes differ.
    """
    x, y = _flat(x), _flat(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"sample sets differ in dimension: {x.shape[1]} vs {y.shape[1]}")
    theta = jax.random.normal(key, (x.shape[1], num_projections))
    theta = theta / jnp.linalg.norm(theta, axis=0, keepdims=True)
    m = max(x.shape[0], y.shape[0])
    px = _quantiles(jnp.sort(x @ theta, axis=0), m)
    py = _quantiles(jnp.sort(y @ theta, axis=0), m)
    return jnp.sqrt(jnp.mean((px - py) ** 2))
