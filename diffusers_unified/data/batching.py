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
from diffusers_unified.data.scaling import Scaling
from diffusers_unified.errors import ConfigError
from diffusers_unified.typing import Array

# Streams folded into PRNGKey(seed) before the epoch or step: the training loop
# derives its noise keys as fold_in(PRNGKey(seed), step), and the data order and
# dequantisation noise must not reuse those keys.
_ORDER_STREAM = 0x0DA7A0D5
_DEQUANT_STREAM = 0x0DE0A7
_EVAL_STREAM = 0x0E7A1
_FLIP_STREAM = 0x0F11B


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
    """Training batches assembled on the host, each process only its own rows.

    `indices(step)` is `batch_indices(seed, step, n, B)` (a test checks it),
    computed with each epoch's permutation drawn once (the last two are
    kept): `batch_indices` draws the permutations of every epoch a batch
    touches each time, which on CPU costs more than a small model's update.

    The split stays on the host in its stored form (uint8 pixels for 8-bit
    images). `local(steps)` gathers this process's share of each step's
    global batch, rows [p B / P, (p + 1) B / P) for process p of P, stacked
    over `steps`; the training loop places them on this process's devices
    and turns them into model inputs there (`to_model_batch`). So no device
    holds the data set, and no process gathers another's rows.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray | None,
        seed: int,
        batch_size: int,
        *,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        if batch_size % process_count:
            raise ConfigError(
                f"batch_size={batch_size} must be divisible by the process count {process_count}"
            )
        self.x, self.y, self.seed, self.batch_size = x, y, seed, batch_size
        per = batch_size // process_count
        self._rows = slice(process_index * per, (process_index + 1) * per)
        self._perms: dict[int, np.ndarray] = {}

    @property
    def num_examples(self) -> int:
        return int(self.x.shape[0])

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            n = self.num_examples
            self._perms[epoch] = np.asarray(_permutation_jit(self.seed, epoch, n))
        return self._perms[epoch]

    def indices(self, step: int) -> np.ndarray:
        """The example indices of batch `step` (== `batch_indices(seed, step, n, B)`)."""
        n, b = self.num_examples, self.batch_size
        positions = step * b + np.arange(b, dtype=np.int64)  # Python ints: no overflow
        epochs = positions // n
        idx = np.empty(b, np.int32)
        for epoch in np.unique(epochs):
            where = epochs == epoch
            idx[where] = self._permutation(int(epoch))[positions[where] % n]
        return idx

    def local(self, steps) -> dict[str, np.ndarray | None]:
        """This process's rows of the batches of `steps`, stored form: (len(steps), B / P, ...)."""
        idx = np.stack([self.indices(step)[self._rows] for step in steps])
        y = None if self.y is None else np.asarray(self.y, np.int32)[idx]
        return {"x": self.x[idx], "y": y}


def flip_key(seed, step) -> Array:
    """The key of batch `step`'s random horizontal flips."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), _FLIP_STREAM), step)


def to_model_batch(
    x, y, scaling: Scaling, *, dequantize_key=None, flip_key=None
) -> dict[str, Array | None]:
    """A batch in stored form -> {"x": float32 model inputs, "y": labels}, on the device.

    With `dequantize_key`, quantised data get uniform noise u/L (see
    `Scaling.to_model`); with `flip_key`, each image is mirrored left-right
    with probability 1/2 (the score SDE code's `data.random_flip`), drawn
    for the whole batch at once, so the result does not depend on how the
    batch is split over devices. Traceable; call it inside the jitted step.
    """
    x = scaling.to_model(x, dequantize_key)
    if flip_key is not None:
        if x.ndim != 4:
            raise ConfigError(f"random flips need NHWC images, got data of shape {x.shape}")
        flip = jax.random.bernoulli(flip_key, 0.5, (x.shape[0],))
        x = jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)
    return {"x": x, "y": y}


_permutation_jit = jax.jit(epoch_permutation, static_argnums=2)


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
