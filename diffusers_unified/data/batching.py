"""Deterministic batches: every training batch is a pure function of (seed, step).

A resumed run sees exactly the batches an uninterrupted run would have seen:
the example order of each epoch is a permutation drawn from (seed, epoch),
and dequantisation noise from (seed, step).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from diffusers_unified.data.dataset import DataArrays
from diffusers_unified.errors import ConfigError
from diffusers_unified.typing import Array

# Streams folded into PRNGKey(seed) before the epoch or step: the training loop
# derives its noise keys as fold_in(PRNGKey(seed), step), and the data order and
# dequantisation noise must not reuse those keys.
_ORDER_STREAM = 0x0DA7A0D5
_DEQUANT_STREAM = 0x0DE0A7
_EVAL_STREAM = 0x0E7A1


def _order_key(seed) -> Array:
    return jax.random.fold_in(jax.random.PRNGKey(seed), _ORDER_STREAM)


def epoch_permutation(seed, epoch, n: int) -> Array:
    """The order of the n training examples in `epoch`: a permutation of range(n).

    Drawn from fold_in(fold_in(PRNGKey(seed), stream), epoch), where the
    stream constant keeps it apart from the training loop's fold_in(PRNGKey
    (seed), step) noise keys.
    """
    return jax.random.permutation(jax.random.fold_in(_order_key(seed), epoch), n)


def _epochs_per_batch(n: int, batch_size: int) -> int:
    """The most epochs one batch of `batch_size` positions can touch."""
    if batch_size % n == 0:
        return batch_size // n  # batches start on epoch boundaries
    if n % batch_size == 0:
        return 1  # batches tile each epoch
    return (batch_size - 1) // n + 2


def batch_indices(seed, step, n: int, batch_size: int) -> Array:
    """The example indices of batch `step`: positions step*B .. step*B + B - 1 of the stream.

    The stream is the concatenation of epoch_permutation(seed, 0, n),
    epoch_permutation(seed, 1, n), ...: position p is example
    perm_{p // n}[p % n]. So every example appears exactly once per epoch, a
    batch that straddles an epoch boundary takes the tail of one permutation
    and the head of the next, and the result depends on (seed, step) only.
    Traceable (step may be traced; n and batch_size are static).
    """
    step = jnp.asarray(step)
    # epoch and offset of step * B, without forming step * B (int32 overflow)
    q, r = step // n, step % n
    first_epoch = q * batch_size + (r * batch_size) // n
    offsets = (r * batch_size) % n + jnp.arange(batch_size)
    m = _epochs_per_batch(n, batch_size)
    perms = jax.vmap(lambda j: epoch_permutation(seed, first_epoch + j, n))(jnp.arange(m))
    return perms[offsets // n, offsets % n]


def gather(arrays: DataArrays, idx: Array, key=None) -> dict:
    """{'x': model inputs, 'y': labels or None} of the examples `idx` (dequantised with `key`)."""
    return _gather(arrays, idx, key)


def dequantize_key(seed, step) -> Array:
    """The key of batch `step`'s dequantisation noise (shared by `batch` and `Batcher`)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), _DEQUANT_STREAM), step)


def _gather(arrays: DataArrays, idx: Array, key) -> dict:
    x = arrays.scaling.to_model(jnp.take(arrays.x, idx, axis=0), key)
    y = None if arrays.y is None else jnp.take(arrays.y, idx, axis=0)
    return {"x": x, "y": y}


@functools.partial(jax.jit, static_argnames=("batch_size", "dequantize"))
def _batch(arrays: DataArrays, seed, step, batch_size: int, dequantize: bool) -> dict:
    idx = batch_indices(seed, step, arrays.num_examples, batch_size)
    key = None
    if dequantize:
        key = dequantize_key(seed, step)
    return _gather(arrays, idx, key)


def batch(
    arrays: DataArrays, seed, step, batch_size: int, *, dequantize: bool = False
) -> dict[str, Array | None]:
    """Training batch `step`: {'x': float32 model inputs (B, ...), 'y': int32 (B,) or None}.

    A pure function of (seed, step) (see `batch_indices`), compiled once per
    (batch_size, dequantize, array shapes); it may also be called inside a
    jitted function with a traced step. With `dequantize`, quantised data get
    uniform noise u/L before scaling (module docstring), keyed by
    fold_in(fold_in(PRNGKey(seed), stream), step): the same noise on resume.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    if dequantize and arrays.scaling.bits is None:
        raise ConfigError(
            f"dequantisation needs quantised data, but dataset {arrays.name!r} declares no bits"
        )
    return _batch(arrays, seed, step, batch_size, dequantize)


class Batcher:
    """`batcher(step)` == `batch(arrays, seed, step, batch_size, ...)`, for a training loop.

    `batch` draws the permutations of the epochs a batch touches every time it
    is called (it must, to stay a traceable function of the step), which on
    CPU costs more than a small model's update. A Batcher computes each epoch's
    permutation once, with the same `epoch_permutation`, keeps the last two,
    and only gathers per step: the batches are identical (a test checks it).
    """

    def __init__(self, arrays: DataArrays, seed: int, batch_size: int, *, dequantize=False):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        if dequantize and arrays.scaling.bits is None:
            raise ConfigError(
                f"dequantisation needs quantised data, but dataset {arrays.name!r} declares no bits"
            )
        self.arrays, self.seed, self.batch_size = arrays, seed, batch_size
        self.dequantize = dequantize
        self._perms: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            n = self.arrays.num_examples
            self._perms[epoch] = np.asarray(_permutation_jit(self.seed, epoch, n))
        return self._perms[epoch]

    def indices(self, step: int) -> np.ndarray:
        """The example indices of batch `step` (== `batch_indices(seed, step, n, B)`)."""
        n, b = self.arrays.num_examples, self.batch_size
        positions = step * b + np.arange(b, dtype=np.int64)  # Python ints: no overflow
        epochs = positions // n
        idx = np.empty(b, np.int32)
        for epoch in np.unique(epochs):
            where = epochs == epoch
            idx[where] = self._permutation(int(epoch))[positions[where] % n]
        return idx

    def __call__(self, step: int) -> dict[str, Array | None]:
        key = dequantize_key(self.seed, step) if self.dequantize else None
        return _gather_jit(self.arrays, self.indices(step), key)


_permutation_jit = jax.jit(epoch_permutation, static_argnums=2)
_gather_jit = jax.jit(_gather)


@functools.partial(jax.jit, static_argnames=("batch_size",))
def _eval_batch(arrays: DataArrays, start, batch_size: int, key) -> dict:
    idx = start + jnp.arange(batch_size)
    out = _gather(arrays, jnp.minimum(idx, arrays.num_examples - 1), key)
    out["mask"] = idx < arrays.num_examples
    return out


def eval_batches(
    arrays: DataArrays, batch_size: int, *, dequantize_seed: int | None = None
) -> Iterator[dict[str, Array | None]]:
    """All examples once, in order: {'x', 'y', 'mask'} batches of a fixed size.

    The last batch is padded by repeating the final example; `mask` is False
    on the padding, so one compiled evaluation step serves every batch. With
    `dequantize_seed`, batch i is dequantised with a key from (seed, i).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    if dequantize_seed is not None and arrays.scaling.bits is None:
        raise ConfigError(
            f"dequantisation needs quantised data, but dataset {arrays.name!r} declares no bits"
        )
    for i, start in enumerate(range(0, arrays.num_examples, batch_size)):
        key = None
        if dequantize_seed is not None:
            base = jax.random.fold_in(jax.random.PRNGKey(dequantize_seed), _EVAL_STREAM)
            key = jax.random.fold_in(base, i)
        yield _eval_batch(arrays, start, batch_size, key)
