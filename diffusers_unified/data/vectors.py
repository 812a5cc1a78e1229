"""Vector data sets: the toy 2-D sets and Gaussian mixtures with exact scores."""

from __future__ import annotations

import functools

import jax
import numpy as np

from diffusers_unified.data.dataset import Dataset
from diffusers_unified.data.gaussian import GaussianMixture, example_mixture
from diffusers_unified.data.scaling import Scaling
from diffusers_unified.data.toy import (
    TOY_NAMES,
    TOY_NUM_CLASSES,
    eight_gaussians_mixture,
    sample_toy_with_labels,
)
from diffusers_unified.errors import ConfigError


def exact_mixture(name: str, dim: int = 2) -> GaussianMixture | None:
    """The exact law of a `toy_dataset` when it is a Gaussian mixture, else None."""
    if name == "gmm":
        return example_mixture(dim)
    if name == "eight_gaussians":
        return eight_gaussians_mixture()
    return None


@functools.partial(jax.jit, static_argnums=2)
def _sample_mixture(mixture: GaussianMixture, key, n: int):
    return mixture.sample(key, n)


def toy_dataset(
    name: str, num_train: int = 10_000, num_test: int = 2_000, seed: int = 0, *, dim: int = 2
) -> Dataset:
    """A toy vector data set: one of `TOY_NAMES`, or "gmm" (`example_mixture(dim)`).

    Train and test points are num_train + num_test iid draws under
    PRNGKey(seed), split in that order. Labels: the mixture component for "gmm" and
    eight_gaussians, the moon for two_moons, the ring for rings; none for
    the others. The data are already zero-centred at unit scale, so there is
    no `centered` option. `dim` applies to "gmm" only.
    """
    if name not in (*TOY_NAMES, "gmm"):
        raise ConfigError(f"unknown toy data set {name!r}; valid: {', '.join((*TOY_NAMES, 'gmm'))}")
    if name != "gmm" and dim != 2:
        raise ConfigError(f"toy data set {name!r} is 2-D; dim={dim} applies to 'gmm' only")
    for label, n, least in (("num_train", num_train, 1), ("num_test", num_test, 0)):
        if isinstance(n, bool) or not isinstance(n, int) or n < least:
            raise ConfigError(f"{label} must be an int >= {least}, got {n!r}")
    # One draw of num_train + num_test iid points (one compilation), split in two.
    key, n = jax.random.PRNGKey(seed), num_train + num_test
    if name == "gmm":
        mixture = example_mixture(dim)
        x, y = _sample_mixture(mixture, key, n)
        num_classes = mixture.num_components
    else:
        x, y = sample_toy_with_labels(name, key, n)
        num_classes = TOY_NUM_CLASSES.get(name)
    x = np.asarray(x, np.float32)
    y = None if y is None else np.asarray(y, np.int32)
    x_train, x_test = x[:num_train], x[num_train:]
    y_train, y_test = (None, None) if y is None else (y[:num_train], y[num_train:])
    return Dataset(
        name=name,
        x_train=x_train,
        x_test=x_test,
        kind="vector",
        scaling=Scaling(bounded=False),
        y_train=y_train,
        y_test=y_test,
        num_classes=num_classes,
        mixture=exact_mixture(name, dim),
    )
