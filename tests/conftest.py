"""Shared test settings: a persistent compilation cache, so reruns skip XLA compiles."""

import os

import jax
import pytest

_CACHE = os.environ.get(
    "DU_TEST_JAX_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache")
)
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)
