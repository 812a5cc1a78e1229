"""A score function that counts its evaluations, shared by the sampler tests."""

import jax
from flax import struct


class CountingScore(struct.PyTreeNode):
    """An exact score that counts its evaluations at run time (and its traces in Python)."""

    exact: object
    traces = [0]
    calls = [0]

    def __call__(self, x, t):
        CountingScore.traces[0] += 1
        jax.debug.callback(lambda: CountingScore.calls.__setitem__(0, CountingScore.calls[0] + 1))
        return self.exact(x, t)
