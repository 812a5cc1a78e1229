"""A score function that counts its evaluations, and the NFE / retrace check built on it."""

import jax
import numpy as np
from flax import struct

from diffusers_unified.data.gaussian import example_mixture
from diffusers_unified.processes import VESDE


class CountingScore(struct.PyTreeNode):
    """An exact score that counts its evaluations at run time (and its traces in Python)."""

    exact: object
    traces = [0]
    calls = [0]

    def __call__(self, x, t):
        CountingScore.traces[0] += 1
        jax.debug.callback(lambda: CountingScore.calls.__setitem__(0, CountingScore.calls[0] + 1))
        return self.exact(x, t)


def check_nfe_and_no_retrace(sampler, options) -> int:
    """Runs `sampler` on the VE SDE twice, with two score functions of the same shapes.

    Asserts that the first run evaluated its score exactly NFE times, and that
    the second (other values) reused the compiled sampler and drew other
    samples. Returns the NFE.
    """
    process = VESDE()
    first = CountingScore(example_mixture().score_fn(process))
    second_mixture = example_mixture().replace(means=example_mixture().means * 1.1)
    second = CountingScore(second_mixture.score_fn(process))

    CountingScore.calls[0] = 0
    out = sampler(jax.random.PRNGKey(0), first, process, (64, 2), **options)
    jax.block_until_ready(out)
    jax.effects_barrier()
    assert CountingScore.calls[0] == int(out.nfe), (CountingScore.calls[0], int(out.nfe))
    traces = CountingScore.traces[0]

    out2 = sampler(jax.random.PRNGKey(1), second, process, (64, 2), **options)
    jax.block_until_ready(out2)
    assert CountingScore.traces[0] == traces, "second call re-traced the sampler"
    assert not np.allclose(out.samples, out2.samples)
    return int(out.nfe)
