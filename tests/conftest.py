"""Shared test settings: a persistent compilation cache, so reruns skip XLA compiles, and
compiles without XLA's backend optimisations for tests that are nearly all compile.

A test module that sets `FAST_COMPILE = True` has its programs compiled with
`jax_disable_most_optimizations` (XLA's backend optimisation level 0, without LLVM's
expensive passes). That is for the tiny image networks and the tiny studies, whose tests
spend most of their time compiling. Measured on 2 cores, two workers, cold
caches: the image-network and classifier modules took 232 s before and 163 s after
(RefineNet training 22 -> 9 s, NCSN++ training 19 -> 12 s, the imported NCSNv2
20 -> 11 s). Their numbers change by float rounding only, and each comparison in them is
against a tolerance or between two runs of one program.
Tests whose time is in running programs (the samplers' exact-score tests, simulations)
keep the default: unoptimised code made those up to 6x slower. So do tests that compare
two programs' results at float-rounding tolerance: under it, `probability_flow` and
`decode(..., denoise=True)`, the same adaptive solve in two programs, differed by 2e-4
(test_flow_encoding), and a solve against the fixture of test_sampler_precompute failed.
"""

import contextlib
import os

import jax
import pytest

_CACHE = os.environ.get(
    "DU_TEST_JAX_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache")
)
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@contextlib.contextmanager
def _unoptimised_compiles():
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="module", autouse=True)
def _fast_compile_module(request):
    # Module scope, and autouse: set before the module's own module-scoped fixtures.
    if getattr(request.module, "FAST_COMPILE", False):
        with _unoptimised_compiles():
            yield
    else:
        yield


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)
