"""A training state as a checkpoint stores it: nested dicts of host arrays, and back.

Orbax's PyTree handler saves plain nested dicts; a `TrainState` holds
dataclasses, optax NamedTuples and typed PRNG keys. `to_host` flattens any
pytree to dicts keyed by the string form of each path entry (typed keys as
their `key_data`, their implementation recorded), and `fit` rebuilds a
target's structure from what was stored, checking every path, shape and
dtype family and naming what does not match. Orbax's own restore-to-target
would raise opaque errors for the mismatches a resumed run must explain
(a changed model width, a missing optimiser slot), hence this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusers_unified.errors import CheckpointError


def estimate_checkpoint_bytes(state: Any) -> int:
    """Bytes of array data in `state`: the sum of every leaf's ``nbytes``.

    Pure and cheap: it reads only shapes and dtypes, so it also accepts
    ``jax.ShapeDtypeStruct`` leaves (e.g. from ``jax.eval_shape``). Typed PRNG
    keys count as their ``key_data``. Orbax's own metadata and compression are
    ignored, so use it with a safety margin for a pre-flight disk check.
    """
    total = 0
    for leaf in jax.tree_util.tree_leaves(state):
        if _is_typed_key(leaf):
            leaf = jax.eval_shape(jax.random.key_data, leaf)
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            total += int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
        else:
            total += np.asarray(leaf).nbytes
    return total


def _is_typed_key(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_tuple(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(_key_str(k) for k in path)


def _path_name(keys: tuple[str, ...]) -> str:
    return "/".join(keys)


def _kind(dtype: Any) -> str:
    """The dtype family within which restore may cast (float32 <-> bfloat16, ...)."""
    if jnp.issubdtype(dtype, jnp.bool_):
        return "bool"
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return "complex"
    if jnp.issubdtype(dtype, jnp.floating):
        return "float"
    if jnp.issubdtype(dtype, jnp.integer):
        return "integer"
    return str(dtype)


def to_host(state: Any, *, copy: bool) -> tuple[dict, dict[tuple[str, ...], np.ndarray], list]:
    """Flatten `state` to ({nested str-keyed dict}, {path: array}, typed-key records).

    Every container becomes a dict keyed by the string form of its path entry,
    so orbax sees plain nested dicts whatever the original node types were, and
    `restore` can match leaves to a target by path alone.
    """
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    if not leaves:
        raise CheckpointError("nothing to save: the state has no array leaves")
    nested: dict = {}
    flat: dict[tuple[str, ...], np.ndarray] = {}
    typed_keys = []
    for path, leaf in leaves:
        keys = _path_tuple(path)
        if not keys:
            raise CheckpointError(
                "the state must be a pytree container (dict, NamedTuple, dataclass), "
                f"not a bare {type(leaf).__name__}"
            )
        name = _path_name(keys)
        if _is_typed_key(leaf):
            typed_keys.append([list(keys), str(jax.random.key_impl(leaf))])
            leaf = jax.random.key_data(leaf)
        try:
            arr = np.asarray(jax.device_get(leaf))
        except Exception as err:  # reported with the path
            raise CheckpointError(f"cannot save {name!r}: {err}") from err
        if _kind(arr.dtype) not in ("bool", "integer", "float", "complex"):
            raise CheckpointError(
                f"cannot save {name!r}: leaves must be numeric arrays, got {type(leaf).__name__} "
                f"of dtype {arr.dtype}"
            )
        if copy:
            # An asynchronous write must not see later in-place updates or donated buffers.
            arr = np.array(arr, copy=True)
        if keys in flat:
            raise CheckpointError(f"two leaves of the state share the path {name!r}")
        node = nested
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise CheckpointError(f"the state has a leaf and a subtree at {name!r}")
        node[keys[-1]] = arr
        flat[keys] = arr
    return nested, flat, typed_keys


def check_finite(step: int, flat: Mapping[tuple[str, ...], np.ndarray]) -> None:
    bad = []
    for keys, arr in flat.items():
        if _kind(arr.dtype) in ("float", "complex"):
            n_bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
            if n_bad:
                bad.append(f"{_path_name(keys)} ({n_bad} of {arr.size} values)")
    if bad:
        raise CheckpointError(
            f"refusing to save checkpoint step {step}: non-finite values in "
            + ", ".join(bad[:5])
            + (f" and {len(bad) - 5} more leaves" if len(bad) > 5 else "")
            + ". A NaN checkpoint is never written over good ones."
        )


def flatten_nested(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(tree, Mapping):
        out: dict[tuple[str, ...], Any] = {}
        for k, v in tree.items():
            out.update(flatten_nested(v, (*prefix, str(k))))
        return out
    return {prefix: tree}


class _Mismatch(Exception):
    """One target leaf that the checkpoint cannot fill (collected, then reported together)."""


def _fit_leaf(keys: tuple[str, ...], arr: np.ndarray, leaf: Any, impl: str | None) -> Any:
    """`arr` as the target `leaf` would have it; `_Mismatch` if it cannot be."""
    name = _path_name(keys)
    arr = np.asarray(arr)

    def mismatch(what: str, want: Any, found: Any) -> _Mismatch:
        return _Mismatch(f"at {name!r} expected {what} {want} (target), found {found}")

    if _is_typed_key(leaf):
        data = jax.eval_shape(jax.random.key_data, leaf)
        if arr.shape != data.shape:
            raise mismatch("key data shape", data.shape, arr.shape)
        if isinstance(leaf, jax.Array):
            impl = jax.random.key_impl(leaf)
        elif impl is None:
            raise _Mismatch(
                f"at {name!r} an abstract PRNG key target cannot be built from raw key data; "
                "pass a concrete key array as the target leaf"
            )
        key = jax.random.wrap_key_data(arr.astype(data.dtype), impl=impl)
        sharding = getattr(leaf, "sharding", None)
        return jax.device_put(key, sharding) if sharding is not None else key
    if isinstance(leaf, (bool, int, float, complex)):
        want_shape, want_dtype = (), np.asarray(leaf).dtype
    elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        want_shape, want_dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
    else:
        raise _Mismatch(f"at {name!r} the target leaf is a {type(leaf).__name__}, not an array")
    if arr.shape != want_shape:
        raise mismatch("shape", want_shape, arr.shape)
    if _kind(arr.dtype) != _kind(want_dtype):
        raise mismatch("dtype", want_dtype, arr.dtype)
    arr = arr.astype(want_dtype, copy=False)
    if isinstance(leaf, (bool, int, float, complex)):
        return type(leaf)(arr.item())
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        sharding = getattr(leaf, "sharding", None)
        return jax.device_put(arr, sharding) if sharding is not None else jnp.asarray(arr)
    if isinstance(leaf, np.generic):
        return arr[()]
    return arr


def fit(raw: dict, typed_keys: list, target: Any, where: str) -> Any:
    """The stored nested dicts `raw` in the structure of `target` (None: as stored).

    Each leaf gets the target leaf's shape, dtype (cast only within a family:
    float, integer, bool, complex), kind (jax array placed on the target
    leaf's sharding, numpy array, Python scalar) and PRNG key type. Missing
    or extra paths, a shape or a dtype-family mismatch raise
    `CheckpointError` naming `where`, the path and the expected and found
    values. `typed_keys` lists (path, key implementation) of the stored
    typed PRNG keys.
    """
    impls = {tuple(keys): impl for keys, impl in typed_keys}
    flat = flatten_nested(raw)
    if target is None:
        for keys, impl in impls.items():
            if keys in flat:
                node = raw
                for k in keys[:-1]:
                    node = node[k]
                node[keys[-1]] = jax.random.wrap_key_data(flat[keys], impl=impl)
        return raw
    leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    expected = {_path_tuple(path): leaf for path, leaf in leaves}
    missing = [_path_name(k) for k in expected if k not in flat]
    extra = [_path_name(k) for k in flat if k not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {', '.join(missing[:8])}")
        if extra:
            parts.append(f"not in the target: {', '.join(extra[:8])}")
        raise CheckpointError(f"{where} does not match the target structure ({'; '.join(parts)})")
    out, mismatches = [], []
    for keys, leaf in expected.items():
        try:
            out.append(_fit_leaf(keys, flat[keys], leaf, impls.get(keys)))
        except _Mismatch as err:
            mismatches.append(str(err))
    if mismatches:
        more = f" (and {len(mismatches) - 8} more)" if len(mismatches) > 8 else ""
        raise CheckpointError(
            f"{where} does not match the target: " + "; ".join(mismatches[:8]) + more
        )
    return jax.tree_util.tree_unflatten(treedef, out)
