"""Sampling and evaluation on every device of every process: independent units in parallel.

Sampling and likelihood evaluation split into units that do not talk to
each other: a shard of samples (`sampling.batch_size` of them, drawn with
the key fold_in(key, shard)) or a batch of held-out examples. A unit's
result depends only on its own key and inputs, never on how many devices
there are, so running G units at once, one per device of the mesh (every
process's devices, `jax.sharding`), gives the one-device result within
float tolerance, and a run may resume on another number of devices.

The module also holds what several processes need to agree: `any_process`,
`barrier`, and process 0's outcome and state shared with the others.

`DeviceMap` runs a function on G units at once with `jax.shard_map` over
the mesh's "data" axis: unit j of a call on the device at mesh position j,
its inputs sliced there, the rest (parameters, score function) replicated.
Each process gets back the results of the units on its own devices.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffusers_unified import errors


class DeviceMap:
    """`DeviceMap(mesh, fn)(per_unit, shared)`: fn on up to G units at once, G = mesh size.

    `fn(unit, *shared) -> pytree of arrays`, where `unit` is one row of each
    leaf of `per_unit` (NumPy arrays with a leading unit axis, the same on
    every process) and `shared` is passed to every device whole. Compiled
    once per shapes. Returns {unit index: result as NumPy arrays} for the
    units this process's devices ran (every unit with `everywhere`, gathered
    from all processes); fewer than G units are padded (the padding's
    results are dropped).
    """

    def __init__(self, mesh: Mesh, fn):
        self.mesh = mesh
        self.size = mesh.devices.size
        self._rows = NamedSharding(mesh, P("data"))
        self._everywhere = NamedSharding(mesh, P())

        def body(units, shared):
            out = fn(jax.tree.map(lambda a: a[0], units), *shared)
            return jax.tree.map(lambda a: a[None], out)

        self._mapped = jax.jit(
            jax.shard_map(
                body, mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data"), check_vma=False
            )
        )

    def __call__(self, per_unit, shared=(), *, everywhere: bool = False) -> dict[int, object]:
        n = len(jax.tree.leaves(per_unit)[0])
        if not 0 < n <= self.size:
            raise ValueError(f"DeviceMap runs 1 to {self.size} units at once, got {n}")

        def global_rows(a):
            a = np.asarray(a)
            pad = np.repeat(a[-1:], self.size - n, axis=0)  # padding: copies of the last unit
            a = np.concatenate([a, pad]) if len(pad) else a
            return jax.make_array_from_callback(a.shape, self._rows, lambda idx: a[idx])

        def replicated(a):
            a = np.asarray(a)
            return jax.make_array_from_callback(a.shape, self._everywhere, lambda idx: a[idx])

        shared = jax.tree.map(replicated, tuple(shared))
        out = self._mapped(jax.tree.map(global_rows, per_unit), shared)
        if everywhere:  # every unit's result on every process
            if jax.process_count() > 1:
                out = multihost_utils.process_allgather(out, tiled=True)
            out = jax.tree.map(np.asarray, out)
            return {j: jax.tree.map(lambda a, j=j: a[j], out) for j in range(n)}
        leaves, treedef = jax.tree.flatten(out)
        # Unit j ran on the device at mesh position j; this process holds its own devices'.
        mine = [shard.index[0].start or 0 for shard in leaves[0].addressable_shards]
        per_leaf = [
            {
                shard.index[0].start or 0: np.asarray(shard.data)[0]
                for shard in leaf.addressable_shards
            }
            for leaf in leaves
        ]  # (`start` is None when the mesh has a single device)
        return {
            j: jax.tree.unflatten(treedef, [values[j] for values in per_leaf])
            for j in sorted(mine)
            if j < n
        }


def any_process(flag: bool) -> bool:
    """Whether `flag` holds on any process (a collective where there are several)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op for one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def is_primary() -> bool:
    """Process 0 owns the work directory: config, log, metrics, checkpoints, snapshots."""
    return jax.process_index() == 0


def from_primary(tree):
    """`tree` (arrays of equal shapes everywhere) as process 0 holds it, on every process."""
    if jax.process_count() == 1:
        return tree
    return multihost_utils.broadcast_one_to_all(tree)


_EXIT_CODE_ERRORS = {
    cls.exit_code: cls
    for cls in (
        errors.ConfigError,
        errors.NonFiniteError,
        errors.DataError,
        errors.CheckpointError,
        errors.Preempted,
    )
}


def share_outcome(error: BaseException | None) -> None:
    """Process 0 tells the others whether something only it does (open, resume, save) worked.

    Called by every process at the same point. Where process 0 failed, the
    others raise the error type of its exit code, so every process exits with
    that code instead of waiting at the next collective for a process that
    has gone.
    """
    if jax.process_count() == 1:
        return
    code = int(from_primary(np.int32(getattr(error, "exit_code", 1) if error else 0)))
    if code and not is_primary():
        cls = _EXIT_CODE_ERRORS.get(code, errors.DiffusersUnifiedError)
        raise cls(f"process 0 failed (exit code {code}); its log says why")
