"""Planned coefficients and noise in blocks (issue 13): the same samplers, at float rounding.

Since issue 13 the fixed-grid samplers take every coefficient that depends
on the grid alone from it once, before their loop (in float64, cast once),
where they computed them at every step in float32, and draw their noise in
blocks of steps, each step's from its own key as before. The draws are the
same bits (checked below); the coefficients differ from the old ones by
float32 rounding, and so do the samples. The adaptive solvers are diffrax's
Dopri5 and Tsit5 with their stages unrolled (`samplers.unrolled`): the same
tableaux, summed in another order. The fixture holds what the old code drew
on a fixed key (tests/fixtures/make_sampler_fixture.py).
"""

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures.make_sampler_fixture import CASES, FIXTURE

from diffusers_unified import samplers
from diffusers_unified.data.gaussian import example_mixture
from diffusers_unified.processes import DDPM, VESDE, VPSDE
from diffusers_unified.samplers import common
from diffusers_unified.samplers.pc import sampler_noise

OLD = np.load(FIXTURE)
EPS32 = float(np.finfo(np.float32).eps)


@pytest.mark.parametrize("name", CASES)
def test_samples_move_only_by_float_rounding(name):
    """Old and new samples (or log-likelihoods) on the same key, and the same NFE.

    A step's coefficients now differ from the old float32 ones by about one
    float32 rounding (6e-8 relative). Most trajectories carry that through
    unchanged (measured: median difference 0 to 4.6 float32 epsilons of the
    samples' scale, the most for DDPM's 1000 steps); a few, passing between
    two modes of the mixture where the reverse dynamics separate nearby
    points, magnify it (measured: at most 2.6e-5 of the scale, VP ancestral
    over 100 steps). The bounds are twice those: a real change to a
    coefficient (a wrong level, a missing factor) moves samples by 1e-3 and
    more.
    """
    values, nfe = CASES[name]()
    values, old = np.asarray(values), OLD[name]
    assert int(nfe) == int(OLD[f"{name}.nfe"])
    scale = np.max(np.abs(old))
    diff = np.abs(values - old) / scale
    assert np.median(diff) <= 10 * EPS32, np.median(diff) / EPS32
    assert np.max(diff) <= 5e-5, np.max(diff)


def test_noise_block_size_is_the_largest_divisor_that_fits(monkeypatch):
    monkeypatch.setattr(common, "NOISE_BLOCK_BYTES", 1000)
    assert common.noise_block_size(999, 10) == 37  # 999 = 27 x 37; 100 steps would fit
    assert common.noise_block_size(999, 1) == 999
    assert common.noise_block_size(997, 10) == 1  # a prime: step by step
    assert common.noise_block_size(12, 5000) == 1  # not even one step fits: one at a time


@dataclasses.dataclass(frozen=True)
class LastDraw:
    """A predictor whose output is its step's standard-normal draw (called step by step)."""

    nfe: ClassVar[int] = 0

    def __call__(self, key, score_fn, process, x, t, s, noise=None):
        return jax.random.normal(key, x.shape) if noise is None else noise


def _fresh(sampler, **options):
    """The sampler traced anew (NOISE_BLOCK_BYTES is read when it is traced)."""
    return jax.jit(functools.partial(sampler.raw, **options), static_argnums=(2, 3))


@pytest.mark.parametrize("block_bytes", [64 * 2 * 4 * 3, 1])
def test_noise_drawn_in_blocks_is_the_step_by_step_draw(monkeypatch, block_bytes):
    """Blocks of 3 steps (of 10) or of one step: the same bits as the whole draw at once."""
    monkeypatch.setattr(common, "NOISE_BLOCK_BYTES", block_bytes)
    process, key = VPSDE(), jax.random.PRNGKey(3)
    score_fn = jax.tree_util.Partial(lambda x, t: jnp.zeros_like(x))
    out = _fresh(
        samplers.predictor_corrector,
        predictor=LastDraw(),
        corrector=samplers.NoCorrector(),
        num_steps=10,
        denoise=False,
    )(key, score_fn, process, (64, 2))
    np.testing.assert_array_equal(out.samples, sampler_noise(key, (64, 2), 10)[9])


@pytest.mark.parametrize(
    "sampler,process,options",
    [
        (samplers.predictor_corrector, VESDE(), {"corrector": samplers.Langevin(0.16, 2)}),
        (
            samplers.predictor_corrector,
            DDPM(),
            {"predictor": samplers.Ancestral(), "corrector": samplers.NoCorrector()},
        ),
        (samplers.edm_stochastic, VESDE(), {"S_churn": 10.0}),
    ],
    ids=["pc-langevin", "ancestral", "edm-stochastic"],
)
def test_blocked_samplers_match_the_unblocked(monkeypatch, sampler, process, options):
    """A sampler whose noise comes in blocks of 3 steps (of 12) draws what it draws at once.

    The two programs differ only in their loop nesting, which XLA fuses
    differently: equal to float32 rounding over 12 steps (measured <= 5e-7).
    """
    key, shape = jax.random.PRNGKey(5), (64, 2)
    score_fn = example_mixture().score_fn(process)
    whole = sampler(key, score_fn, process, shape, num_steps=13, **options).samples
    # 12 steps of noise (and a Langevin corrector's 2 draws per step), in blocks of 3 steps.
    per_step = 64 * 2 * 4 * (3 if "corrector" in options else 1)
    monkeypatch.setattr(common, "NOISE_BLOCK_BYTES", 3 * per_step)
    assert common.noise_block_size(12, per_step) == 3
    blocked = _fresh(sampler, num_steps=13, **options)(key, score_fn, process, shape).samples
    np.testing.assert_allclose(blocked, whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "predictor",
    [
        samplers.Ancestral(),
        samplers.Ancestral("small", clip_x0=True),
        samplers.DDIM(0.5),
        samplers.DDIM(0.0, clip_x0=True),
        samplers.EulerMaruyama(),
        samplers.EulerMaruyama(probability_flow=True),
        samplers.ReverseDiffusion(),
    ],
    ids=repr,
)
def test_a_planned_step_is_the_called_step(predictor):
    """`plan` + `step` (the sampler's loop) against `__call__` (one step, coefficients on the
    fly, float32): the same step to float32 rounding (relative 1e-6; inputs of size ~2)."""
    process = DDPM()
    ts = process.sampling_grid(20)
    plan = common.as_arrays(predictor.plan(process, common.grid_values(process, ts)))
    score_fn = example_mixture().score_fn(process)
    x = 2.0 * jax.random.normal(jax.random.PRNGKey(0), (32, 2))
    z = jax.random.normal(jax.random.PRNGKey(1), (32, 2))
    i = 7
    t, s = jnp.float32(ts[i]), jnp.float32(ts[i + 1])
    step = jax.tree.map(lambda a: a[i], plan)
    noise = z if predictor.adds_noise else None
    planned = jax.jit(lambda c, x, z: predictor.step(c, score_fn, x, t, z))(step, x, noise)
    called = jax.jit(lambda x, z: predictor(None, score_fn, process, x, t, s, noise=z))(x, z)
    np.testing.assert_allclose(planned, called, rtol=1e-5, atol=1e-5)
