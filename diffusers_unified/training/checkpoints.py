"""Checkpoints with an explicit, testable commit protocol (orbax writes the arrays).

A checkpoint is all-or-nothing, restarts find the newest *committed* step, keep
policies are numeric, and write errors (synchronous or asynchronous) surface as
`CheckpointError` (launcher exit code 5) without leaving a phantom step.

On-disk layout under the manager's directory::

    <directory>/
      10/                      a committed step (unpadded decimal name)
        state/                 the orbax PyTree payload (OCDBT files, orbax metadata)
        metadata.json          the caller's free-form JSON dict (config hash, metrics, ...)
        COMMIT                 manifest written last: every other file's size and crc32
      15.tmp-<pid>-<n>/        a save in progress, or one that died: never a checkpoint
      corrupt/10/              a step moved aside by ``restore(on_corrupt="fallback")``

Commit protocol of `CheckpointManager.save`:

1. write the payload, ``metadata.json`` and finally ``COMMIT`` inside a temporary
   directory ``<step>.tmp-<pid>-<n>``, fsyncing every file and directory;
2. ``rename`` the temporary directory to ``<step>`` (atomic on POSIX) and fsync
   the parent directory: this is the commit point;
3. only then prune old steps down to ``keep`` (each is first renamed to a
   ``*.tmp-*`` name, so a kill half-way through a deletion never leaves a
   half-deleted directory that still looks committed).

A directory is a checkpoint if and only if its name is a decimal integer and it
contains ``COMMIT``. Steps are always ordered as integers (``10000`` is newer
than ``9000``). On restore, every file listed in ``COMMIT`` is checked for size
and crc32 *before* orbax reads it, so a truncated or garbage file is reported
by step and file name instead of surfacing as an obscure decoding error or a
hang inside the reader.

The state is any pytree of arrays (dicts, lists, NamedTuples such as optax
states, flax struct dataclasses). Leaves are jax or numpy arrays, numpy scalars,
Python numbers, or typed PRNG key arrays (stored as their ``key_data`` and
re-wrapped on restore). The state is copied to host memory before the write, so
an asynchronous save is unaffected by later updates or buffer donation. A
manager is used by one process: in a multi-process run one process (the
launcher's process 0) owns it, and orbax is told that this process alone takes
part, so that its internal barriers do not wait for the others.

Fault-injection hooks (read from the environment at every save; no effect when
unset). ``n`` counts the saves this *process* has started (across managers),
starting at 1, and defaults to 1:

``DU_FAULT_KILL_IN_SAVE=before_commit[:n]``
    SIGKILL the process after the payload, ``metadata.json`` and ``COMMIT`` are
    written to the temporary directory but before the rename. A restart must
    ignore and remove the temporary directory.
``DU_FAULT_KILL_IN_SAVE=after_commit_before_cleanup[:n]``
    SIGKILL right after the rename, before old steps are pruned: a restart sees
    ``keep + 1`` committed steps, and the next save prunes the extra one.
``DU_FAULT_SAVE_ERROR=ENOSPC[:n]``
    raise ``OSError(errno.ENOSPC, ...)`` from inside the write of the n-th save,
    after orbax has written the payload. Any errno name works (``EIO``,
    ``EDQUOT``, ...).

Notes on orbax (0.12): the payload is written with a synchronous
``ocp.Checkpointer(ocp.PyTreeCheckpointHandler())``; orbax's own temporary
directory (``state.orbax-checkpoint-tmp``) and its ``commit_success.txt`` live
inside our temporary directory, so our rename is the only commit point that
matters. Disk errors raised by tensorstore arrive as ``ValueError`` (with the
OS text, e.g. "File too large [os_error_code='27']"); they are reported as
`CheckpointError` like any ``OSError``. Asynchronous saving is done by our own
background thread rather than orbax's ``AsyncCheckpointer`` so that the
commit, pruning and fault hooks follow the same code path in both modes.
Orbax reports progress through absl logging (the ``absl`` Python logger) at
INFO on every save and restore, and logs failed writes at ERROR itself.
"""

from __future__ import annotations

import errno
import json
import logging
import operator
import os
import shutil
import signal
import threading
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from diffusers_unified.errors import CheckpointError

logger = logging.getLogger("diffusers_unified")

COMMIT_FILE = "COMMIT"
METADATA_FILE = "metadata.json"
PAYLOAD_DIR = "state"
CORRUPT_DIR = "corrupt"
TMP_MARKER = ".tmp-"
MANIFEST_FORMAT = "diffusers_unified.checkpoint/1"

KILL_ENV = "DU_FAULT_KILL_IN_SAVE"
SAVE_ERROR_ENV = "DU_FAULT_SAVE_ERROR"
KILL_PHASES = ("before_commit", "after_commit_before_cleanup")
ON_CORRUPT = ("raise", "fallback")

_CHUNK = 1 << 20

# Saves started by this process, for the ":n" of the fault hooks. Module-level
# because the hooks speak of "the n-th save of this process", not of a manager.
_save_attempts = 0
_save_attempts_lock = threading.Lock()

# Temporary directories being written by this process right now; `cleanup`
# must not delete them (a second manager on the same directory, or a cleanup
# call while an asynchronous save runs).
_in_flight: set[str] = set()
_in_flight_lock = threading.Lock()


# --------------------------------------------------------------------------- helpers


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


def _check_step(step: Any) -> int:
    try:
        value = operator.index(step)
    except TypeError:
        raise TypeError(f"checkpoint step must be an integer, got {step!r}") from None
    if isinstance(step, bool) or value < 0:
        raise ValueError(f"checkpoint step must be a non-negative integer, got {step!r}")
    return value


def _is_step_name(name: str) -> bool:
    return name.isascii() and name.isdigit()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_digest(path: Path, *, fsync: bool = False) -> tuple[int, str]:
    """(size, crc32 hex) of a file; with `fsync`, also flush it to disk."""
    crc = 0
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
        if fsync:
            os.fsync(f.fileno())
    return size, f"{crc:08x}"


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _to_host(state: Any, *, copy: bool) -> tuple[dict, dict[tuple[str, ...], np.ndarray], list]:
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


def _check_finite(step: int, flat: Mapping[tuple[str, ...], np.ndarray]) -> None:
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


def _flatten_nested(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(tree, Mapping):
        out: dict[tuple[str, ...], Any] = {}
        for k, v in tree.items():
            out.update(_flatten_nested(v, (*prefix, str(k))))
        return out
    return {prefix: tree}


def _fault_spec(var: str, valid: tuple[str, ...] | None) -> tuple[str, int] | None:
    raw = os.environ.get(var, "").strip()
    if not raw:
        return None
    name, _, nth = raw.partition(":")
    ok = (name in valid) if valid is not None else isinstance(getattr(errno, name, None), int)
    try:
        n = int(nth) if nth else 1
    except ValueError:
        ok = False
    if not ok or n < 1:
        expected = " or ".join(valid) if valid is not None else "an errno name such as ENOSPC"
        raise ValueError(f"{var}={raw!r}: expected {expected}, optionally followed by ':n' (n>=1)")
    return name, n


class _Faults:
    """The fault hooks that apply to one save (decided when the save starts)."""

    def __init__(self, save_number: int):
        kill = _fault_spec(KILL_ENV, KILL_PHASES)
        error = _fault_spec(SAVE_ERROR_ENV, None)
        self.kill_phase = kill[0] if kill and kill[1] == save_number else None
        self.error_code = getattr(errno, error[0]) if error and error[1] == save_number else None

    def maybe_kill(self, phase: str) -> None:
        if self.kill_phase == phase:
            logger.warning("fault injection: SIGKILL in checkpoint save (%s)", phase)
            os.kill(os.getpid(), signal.SIGKILL)

    def maybe_raise(self, path: Path) -> None:
        if self.error_code is not None:
            raise OSError(self.error_code, os.strerror(self.error_code), str(path))


class _Mismatch(Exception):
    """One target leaf that the checkpoint cannot fill (collected, then reported together)."""


class _Corrupt(Exception):
    """A committed step whose files do not match its COMMIT manifest."""

    def __init__(self, step: int, file: str, reason: str):
        super().__init__(f"file {file!r} {reason}")
        self.step, self.file, self.reason = step, file, reason


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


# --------------------------------------------------------------------------- manager


class CheckpointManager:
    """Numbered, committed checkpoints in one directory (see the module docstring).

    Guarantees:

    * ``save`` is all-or-nothing: a step appears in `all_steps` only once its
      directory has been atomically renamed into place with a complete
      ``COMMIT`` manifest. A kill or a write error at any point leaves the
      previously committed steps intact and loadable.
    * ``keep=N`` keeps exactly the N numerically newest committed steps (plus
      the step just written, if it is older); ``keep=None`` or ``0`` keeps all.
      Pruning happens after the commit, never before.
    * A non-finite floating value in the state is refused before anything is
      written.
    * With ``async_save=True`` the write runs in a background thread (one at a
      time); its error is raised, as `CheckpointError`, by the next `save`,
      `wait_until_finished` or `close`, and the failed step is never listed.
    * Construction removes leftover temporary and uncommitted directories (see
      `cleanup`) but never creates the directory: a mistyped path stays absent
      and restoring from it fails loudly (the first `save` creates it).

    The manager assumes it is the only writer of `directory` (the launcher
    holds a workdir lock).
    """

    def __init__(self, directory: str | os.PathLike, keep: int | None = None, async_save=False):
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int)):
            raise ValueError(f"keep must be a non-negative integer or None, got {keep!r}")
        if keep is not None and keep < 0:
            raise ValueError(
                f"keep must be a non-negative integer or None (0 = keep all), got {keep}"
            )
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(
                f"checkpoint directory {self.directory} exists but is not a directory"
            )
        self.keep = keep or None
        self.async_save = bool(async_save)
        me = jax.process_index()
        self._checkpointer = ocp.Checkpointer(
            ocp.PyTreeCheckpointHandler(),
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me}
            ),
        )
        self._thread: threading.Thread | None = None
        self._pending_step: int | None = None
        self._pending_error: BaseException | None = None
        self._closed = False
        self.cleanup()

    def __repr__(self) -> str:
        return (
            f"CheckpointManager({str(self.directory)!r}, keep={self.keep}, "
            f"async_save={self.async_save})"
        )

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ----------------------------------------------------------------- listing

    def step_path(self, step: int) -> Path:
        """Where the committed directory of `step` lives (whether or not it exists)."""
        return self.directory / str(_check_step(step))

    def all_steps(self) -> list[int]:
        """Committed steps, ascending by integer value. Pending async saves are not listed."""
        if not self.directory.is_dir():
            return []
        steps = set()
        for entry in os.scandir(self.directory):
            if (
                _is_step_name(entry.name)
                and entry.is_dir()
                and os.path.isfile(os.path.join(entry.path, COMMIT_FILE))
            ):
                steps.add(int(entry.name))
        return sorted(steps)

    def latest_step(self) -> int | None:
        """The numerically largest committed step, or None if there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def cleanup(self) -> list[str]:
        """Delete ``*.tmp-*`` entries and integer-named directories without ``COMMIT``.

        Each removal is logged at WARNING as "removed incomplete checkpoint
        <name> (no commit marker)". Temporary directories that this process is
        still writing are left alone. Returns the removed names.
        """
        if not self.directory.is_dir():
            return []
        removed = []
        for entry in sorted(os.scandir(self.directory), key=lambda e: e.name):
            path = Path(entry.path)
            if TMP_MARKER in entry.name:
                with _in_flight_lock:
                    if str(path) in _in_flight:
                        continue
            elif not (
                _is_step_name(entry.name) and entry.is_dir() and not (path / COMMIT_FILE).exists()
            ):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except OSError as err:
                logger.warning("could not remove incomplete checkpoint %s: %s", entry.name, err)
                continue
            logger.warning("removed incomplete checkpoint %s (no commit marker)", entry.name)
            removed.append(entry.name)
        return removed

    # ----------------------------------------------------------------- saving

    def save(self, step: int, state: Any, metadata: Mapping[str, Any] | None = None) -> None:
        """Write `state` (and the JSON dict `metadata`) as committed step `step`.

        Raises `CheckpointError` if the state holds a non-finite float, if the
        step is already committed, if the write fails (the message names the
        path and the OS error; the partial directory is removed), or, with
        ``async_save``, if the *previous* asynchronous save failed (in that
        case this save is not started). Synchronous saves return once the step
        is committed and pruning is done.
        """
        if self._closed:
            raise CheckpointError(f"{self!r} is closed; cannot save step {step}")
        step = _check_step(step)
        self.wait_until_finished()
        final = self.step_path(step)
        if final.exists():
            raise CheckpointError(
                f"checkpoint step {step} already exists at {final}; committed steps are never "
                "overwritten"
            )
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, Mapping):
            raise TypeError(f"checkpoint metadata must be a dict, got {type(metadata).__name__}")
        try:
            metadata_text = json.dumps(dict(metadata), indent=2)
        except (TypeError, ValueError) as err:
            raise CheckpointError(
                f"checkpoint metadata for step {step} is not JSON: {err}"
            ) from err
        nested, flat, typed_keys = _to_host(state, copy=self.async_save)
        _check_finite(step, flat)

        global _save_attempts
        with _save_attempts_lock:
            _save_attempts += 1
            number = _save_attempts
        faults = _Faults(number)
        tmp = self.directory / f"{step}{TMP_MARKER}{os.getpid()}-{number}"
        args = (step, nested, typed_keys, metadata_text, tmp, faults)
        if not self.async_save:
            self._write(*args)
            return
        with _in_flight_lock:  # registered before the thread starts, so no cleanup races it
            _in_flight.add(str(tmp))
        self._pending_step = step
        self._thread = threading.Thread(
            target=self._write_in_background, args=args, name=f"checkpoint-save-{step}"
        )
        self._thread.start()

    def wait_until_finished(self) -> None:
        """Block until a pending asynchronous save ends; raise its error if it failed."""
        self._join()
        if self._pending_error is not None:
            err, step = self._pending_error, self._pending_step
            self._pending_error = self._pending_step = None
            raise CheckpointError(
                f"asynchronous save of checkpoint step {step} failed: {err}"
            ) from err
        self._pending_step = None

    def close(self) -> None:
        """Wait for pending saves (raising their error) and refuse further saves."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait_until_finished()
        finally:
            self._checkpointer.close()

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _write_in_background(self, *args) -> None:
        try:
            self._write(*args)
        except Exception as err:  # re-raised by wait_until_finished
            self._pending_error = err

    def _write(self, step, nested, typed_keys, metadata_text, tmp: Path, faults: _Faults) -> None:
        final = self.directory / str(step)
        start = time.perf_counter()
        with _in_flight_lock:
            _in_flight.add(str(tmp))
        try:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                tmp.mkdir()
                self._checkpointer.save(tmp / PAYLOAD_DIR, args=ocp.args.PyTreeSave(nested))
                faults.maybe_raise(tmp / PAYLOAD_DIR)
                _write_durably(tmp / METADATA_FILE, metadata_text)
                nbytes = self._write_manifest(step, tmp, typed_keys)
                faults.maybe_kill("before_commit")
                os.rename(tmp, final)  # the commit point
            except Exception as err:
                shutil.rmtree(tmp, ignore_errors=True)
                latest = self.latest_step()
                raise CheckpointError(
                    f"could not write checkpoint step {step} to {final}: {err}. The partial "
                    f"write was removed; committed checkpoints are untouched (latest committed "
                    f"step: {latest})."
                ) from err
        finally:
            with _in_flight_lock:
                _in_flight.discard(str(tmp))
        try:
            _fsync_dir(self.directory)
        except OSError as err:  # the rename already happened; durability is best effort here
            logger.warning(
                "could not fsync %s after committing step %d: %s", self.directory, step, err
            )
        logger.info(
            "saved checkpoint step %d to %s (%d bytes, %.2f s)",
            step,
            final,
            nbytes,
            time.perf_counter() - start,
        )
        faults.maybe_kill("after_commit_before_cleanup")
        self._prune(step)

    def _write_manifest(self, step: int, tmp: Path, typed_keys: list) -> int:
        files = {}
        dirs = []
        for root, _dirnames, filenames in os.walk(tmp):
            dirs.append(Path(root))
            for name in sorted(filenames):
                path = Path(root, name)
                size, crc = _file_digest(path, fsync=True)
                files[path.relative_to(tmp).as_posix()] = {"bytes": size, "crc32": crc}
        manifest = {
            "format": MANIFEST_FORMAT,
            "step": step,
            "created_unix": time.time(),
            "files": dict(sorted(files.items())),
            "typed_keys": typed_keys,
        }
        _write_durably(tmp / COMMIT_FILE, json.dumps(manifest, indent=1))
        for d in reversed(dirs):  # children first, so every directory entry is durable
            _fsync_dir(d)
        return sum(f["bytes"] for f in files.values())

    def _prune(self, just_written: int) -> None:
        if not self.keep:
            return
        steps = self.all_steps()
        keep = set(steps[-self.keep :]) | {just_written}
        for step in steps:
            if step in keep:
                continue
            src = self.directory / str(step)
            doomed = self.directory / f"{step}{TMP_MARKER}{os.getpid()}-delete"
            try:
                # Renaming first makes the deletion atomic for readers: a kill mid-rmtree
                # leaves a *.tmp-* directory for cleanup, never a half-deleted "committed" step.
                os.rename(src, doomed)
                shutil.rmtree(doomed)
            except OSError as err:
                logger.warning("could not remove old checkpoint step %d: %s", step, err)
                continue
            logger.info("removed old checkpoint step %d (keep=%d)", step, self.keep)

    # ----------------------------------------------------------------- restoring

    def read_metadata(self, step: int | None = None) -> dict:
        """The ``metadata.json`` dict of a committed step (default: the latest).

        Cheap (no arrays are read), e.g. to compare a config hash before
        building the state. The file's checksum is verified.
        """
        step = self._resolve_step(step)
        try:
            manifest = self._read_manifest(step)
            self._verify_file(step, manifest, METADATA_FILE)
            return self._load_metadata(step)
        except _Corrupt as err:
            raise CheckpointError(self._corrupt_message(err)) from None

    def restore(
        self, step: int | None = None, target: Any = None, *, on_corrupt: str = "raise"
    ) -> tuple[Any, dict]:
        """Load committed step `step` (default: the latest) as ``(state, metadata)``.

        Without `target` the state comes back as nested dicts (string keys, one
        level per pytree node) of numpy arrays, with typed PRNG keys re-wrapped.
        With `target` (a pytree of arrays, Python scalars or
        ``jax.ShapeDtypeStruct``), the result has the target's structure and
        each leaf its shape, dtype (cast only within a family: float, integer,
        bool, complex), kind (jax array placed on the target leaf's sharding,
        numpy array, Python scalar) and PRNG key type. Missing or extra paths,
        a shape or a dtype-family mismatch raise `CheckpointError` naming the
        path and the expected and found values.

        Every file is checked against ``COMMIT`` before it is read. A corrupt
        step raises `CheckpointError` naming the step and file and the
        previous committed step. With ``on_corrupt="fallback"`` the corrupt
        step is logged at ERROR, moved to ``<directory>/corrupt/<step>`` and
        the next older committed step is tried, until one is intact; if none
        is left, `CheckpointError` is raised. The search only moves to older
        steps, so it always terminates.

        A missing step raises `CheckpointError` listing the available steps.
        A pending asynchronous save is waited for first (its error, if any, is
        kept for the next `save` or `wait_until_finished`).
        """
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        self._join()
        step = self._resolve_step(step)
        while True:
            try:
                raw, typed_keys, metadata = self._read_step(step)
                break
            except _Corrupt as err:
                if on_corrupt == "raise":
                    raise CheckpointError(self._corrupt_message(err)) from None
                logger.error(
                    "checkpoint step %d in %s is corrupt (%s); moving it to %s and falling back",
                    step,
                    self.directory,
                    err,
                    self.directory / CORRUPT_DIR,
                )
                self._quarantine(step)
                older = [s for s in self.all_steps() if s < step]
                if not older:
                    raise CheckpointError(
                        f"checkpoint step {step} in {self.directory} is corrupt ({err}) and no "
                        f"older committed checkpoint is left; corrupt steps are in "
                        f"{self.directory / CORRUPT_DIR}"
                    ) from None
                step = older[-1]
        logger.info("restored checkpoint step %d from %s", step, self.directory)
        return self._fit(step, raw, typed_keys, target), metadata

    def _resolve_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                where = "" if self.directory.is_dir() else " (the directory does not exist)"
                raise CheckpointError(f"no committed checkpoint found in {self.directory}{where}")
            return steps[-1]
        step = _check_step(step)
        if step not in steps:
            available = ", ".join(map(str, steps)) if steps else "none"
            raise CheckpointError(
                f"no committed checkpoint for step {step} in {self.directory}; "
                f"available steps: [{available}]"
            )
        return step

    def _corrupt_message(self, err: _Corrupt) -> str:
        older = [s for s in self.all_steps() if s < err.step]
        hint = (
            f"The previous committed step is {older[-1]}: restore it explicitly, or use "
            "on_corrupt='fallback' (--on_corrupt=fallback) to move this step to "
            f"{self.directory / CORRUPT_DIR} and resume from it."
            if older
            else "There is no earlier committed step."
        )
        return (
            f"checkpoint step {err.step} in {self.directory} is corrupt: "
            f"file {err.file!r} {err.reason}. {hint}"
        )

    def _read_manifest(self, step: int) -> dict:
        path = self.directory / str(step) / COMMIT_FILE
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise _Corrupt(step, COMMIT_FILE, f"is unreadable ({err})") from None
        if (
            not isinstance(manifest, dict)
            or manifest.get("format") != MANIFEST_FORMAT
            or not isinstance(manifest.get("files"), dict)
        ):
            raise _Corrupt(step, COMMIT_FILE, f"is not a {MANIFEST_FORMAT} manifest")
        return manifest

    def _verify_file(self, step: int, manifest: dict, rel: str) -> None:
        entry = manifest["files"].get(rel)
        if rel.startswith("/") or ".." in rel.split("/") or not isinstance(entry, dict):
            raise _Corrupt(step, COMMIT_FILE, f"has an invalid entry for {rel!r}")
        path = self.directory / str(step) / rel
        try:
            size, crc = _file_digest(path)
        except FileNotFoundError:
            raise _Corrupt(step, rel, "is missing") from None
        except OSError as err:
            raise _Corrupt(step, rel, f"cannot be read ({err})") from None
        if size != entry.get("bytes"):
            raise _Corrupt(
                step, rel, f"has {size} bytes, expected {entry.get('bytes')} (truncated or altered)"
            )
        if crc != entry.get("crc32"):
            raise _Corrupt(
                step, rel, f"fails its crc32 check ({crc}, expected {entry.get('crc32')})"
            )

    def _load_metadata(self, step: int) -> dict:
        try:
            metadata = json.loads((self.directory / str(step) / METADATA_FILE).read_text("utf-8"))
        except (OSError, ValueError) as err:
            raise _Corrupt(step, METADATA_FILE, f"is unreadable ({err})") from None
        return metadata

    def _read_step(self, step: int) -> tuple[dict, list, dict]:
        manifest = self._read_manifest(step)
        for rel in manifest["files"]:
            self._verify_file(step, manifest, rel)
        metadata = self._load_metadata(step)
        try:
            raw = self._checkpointer.restore(self.directory / str(step) / PAYLOAD_DIR)
        except Exception as err:  # checksums passed, yet orbax cannot read it
            raise _Corrupt(step, PAYLOAD_DIR, f"cannot be read by orbax ({err})") from None
        return raw, manifest.get("typed_keys", []), metadata

    def _quarantine(self, step: int) -> None:
        corrupt = self.directory / CORRUPT_DIR
        dest = corrupt / str(step)
        n = 0
        while dest.exists():  # the same step may have been corrupted before
            n += 1
            dest = corrupt / f"{step}.{n}"
        try:
            corrupt.mkdir(exist_ok=True)
            os.rename(self.directory / str(step), dest)
        except OSError as err:
            logger.error("could not move corrupt checkpoint step %d to %s: %s", step, dest, err)

    def _fit(self, step: int, raw: dict, typed_keys: list, target: Any) -> Any:
        impls = {tuple(keys): impl for keys, impl in typed_keys}
        flat = _flatten_nested(raw)
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
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not match the target "
                f"structure ({'; '.join(parts)})"
            )
        out, mismatches = [], []
        for keys, leaf in expected.items():
            try:
                out.append(_fit_leaf(keys, flat[keys], leaf, impls.get(keys)))
            except _Mismatch as err:
                mismatches.append(str(err))
        if mismatches:
            more = f" (and {len(mismatches) - 8} more)" if len(mismatches) > 8 else ""
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not match the target: "
                + "; ".join(mismatches[:8])
                + more
            )
        return jax.tree_util.tree_unflatten(treedef, out)
