"""Checkpoints on orbax's `CheckpointManager`, plus what it lacks: checksums, quarantine, hooks.

Orbax does the work it is made for: one directory per step, the atomic
commit (a temporary directory renamed into place), keep-the-newest-N,
asynchronous saves and multi-host coordination. A work directory's
checkpoints are therefore plain orbax checkpoints with two items, `state`
(a PyTree of nested dicts of arrays, see `checkpoint_tree`) and `metadata`
(JSON): `ocp.CheckpointManager(directory, item_names=("state", "metadata"))`
opens them without this package. On top of orbax this module keeps only
what the reliability scenarios need and orbax does not offer:

- a manifest, ``COMMIT``, written into the temporary directory just before
  orbax renames it into place: every file's size and crc32, checked before
  orbax reads a file, so a truncated or garbage file is reported by step
  and file name (`manifest`); a step that plain orbax wrote (no manifest)
  is restored unverified;
- quarantine: with ``on_corrupt="fallback"`` a corrupt step is moved to
  ``corrupt/<step>`` and the next older committed step is tried;
- the NaN guard (a non-finite state is never written), errors that name the
  step, path and OS error, and a cleanup at start that removes (with a
  warning) the temporary directories of saves that died;
- the fault hooks of `diffusers_unified.faults`, called inside the commit.

On-disk layout under the manager's directory::

    10/                              a committed step (orbax's unpadded step name)
      state/                         the orbax PyTree payload (OCDBT files)
      metadata/metadata              the caller's JSON dict
      COMMIT                         this module's manifest
      _CHECKPOINT_METADATA           orbax's step metadata
    15.orbax-checkpoint-tmp/         a save in progress, or one that died: never a checkpoint
    corrupt/10/                      a step moved aside by ``restore(on_corrupt="fallback")``

A manager is used by one process: in a multi-process run one process (the
launcher's process 0) owns it, and orbax is told that this process alone
takes part, so that its barriers do not wait for the others.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from diffusers_unified.errors import CheckpointError
from diffusers_unified.training import checkpoint_tree as tree
from diffusers_unified.training import manifest
from diffusers_unified.training.checkpoint_tree import estimate_checkpoint_bytes

__all__ = ["CheckpointManager", "estimate_checkpoint_bytes"]

logger = logging.getLogger("diffusers_unified")

ITEMS = ("state", "metadata")
CORRUPT_DIR = "corrupt"
ORBAX_TMP = ".orbax-checkpoint-tmp"
ON_CORRUPT = ("raise", "fallback")


def _check_step(step: Any) -> int:
    try:
        value = int(step.__index__())
    except (AttributeError, TypeError):
        raise TypeError(f"checkpoint step must be an integer, got {step!r}") from None
    if isinstance(step, bool) or value < 0:
        raise ValueError(f"checkpoint step must be a non-negative integer, got {step!r}")
    return value


# -- the manager --------------------------------------------------------------------------------


class NewestSteps(checkpoint_managers.PreservationPolicy):
    """Orbax preservation policy: the `n` numerically largest steps, and the one just written.

    Orbax's `LatestN` keeps the n most recently *saved* checkpoints, so saving
    an older step (an evaluation of a past run, a re-run from an old
    checkpoint) would delete the newest one. Checkpoints are listed in save
    order, so the last one is the step just written.
    """

    def __init__(self, n: int | None):
        self.n = n

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        if self.n is None:
            return [True] * len(checkpoints)
        keep = set(sorted(c.step for c in checkpoints)[-self.n :])
        if checkpoints:
            keep.add(checkpoints[-1].step)
        return [c.step in keep for c in checkpoints]


class CheckpointManager:
    """Numbered, committed checkpoints in one directory (see the module docstring).

    Guarantees:

    * ``save`` is all-or-nothing: a step appears in `all_steps` only once orbax
      has renamed its directory into place, manifest included. A kill or a
      write error at any point leaves the previously committed steps intact
      and loadable.
    * ``keep=N`` keeps exactly the N numerically newest committed steps
      (orbax, with the `NewestSteps` policy); ``keep=None`` or ``0`` keeps all. Pruning
      happens after the commit, never before.
    * A non-finite floating value in the state is refused before anything is
      written.
    * With ``async_save=True`` orbax writes in the background (one save at a
      time); an error is raised, as `CheckpointError`, by the next `save`,
      `wait_until_finished` or `close`, and the failed step is never listed.
    * Construction removes leftover temporary directories (see `cleanup`) but
      never creates the directory: a mistyped path stays absent and restoring
      from it fails loudly (the first `save` creates it). With `read_only` (a
      reader, such as sample or eval, of a directory that a training run may
      be writing) it removes nothing, and `save` is refused.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        keep: int | None = None,
        async_save=False,
        *,
        read_only: bool = False,
    ):
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int)):
            raise ValueError(f"keep must be a non-negative integer or None, got {keep!r}")
        if keep is not None and keep < 0:
            raise ValueError(
                f"keep must be a non-negative integer or None (0 = keep all), got {keep}"
            )
        self.directory = Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(
                f"checkpoint directory {self.directory} exists but is not a directory"
            )
        self.keep = keep or None
        self.async_save = bool(async_save)
        self.read_only = bool(read_only)
        self._pending: int | None = None
        self._before: list[int] = []  # committed steps when the pending save started
        self._closed = False
        if not self.read_only:  # a reader's temporary directories may be saves in progress
            self.cleanup()
        me = jax.process_index()
        options = ocp.CheckpointManagerOptions(
            preservation_policy=NewestSteps(self.keep),
            create=False,
            cleanup_tmp_directories=False,  # `cleanup` does it, and says so
            read_only=self.read_only,
            enable_async_checkpointing=self.async_save,
            temporary_path_class=manifest.ManifestTemporaryPath,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me}
            ),
        )
        self._orbax = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def __repr__(self) -> str:
        return (
            f"CheckpointManager({str(self.directory)!r}, keep={self.keep}, "
            f"async_save={self.async_save})"
        )

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- listing ---------------------------------------------------------------------------

    def step_path(self, step: int) -> Path:
        """Where the committed directory of `step` lives (whether or not it exists)."""
        return self.directory / str(_check_step(step))

    def all_steps(self) -> list[int]:
        """Committed steps, ascending by integer value. Pending async saves are not listed."""
        if not self.directory.is_dir():
            return []
        self._orbax.reload()
        return sorted(
            int(s) for s in self._orbax.all_steps() if manifest.committed(self.step_path(s))
        )

    def latest_step(self) -> int | None:
        """The numerically largest committed step, or None if there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def cleanup(self) -> list[str]:
        """Delete the leftovers of saves that died: orbax temporary directories, and
        step-named directories that carry neither a manifest nor orbax's commit marks.

        Each removal is logged at WARNING as "removed incomplete checkpoint
        <name> (no commit marker)". Returns the removed names.
        """
        if not self.directory.is_dir():
            return []
        removed = []
        for entry in sorted(os.scandir(self.directory), key=lambda e: e.name):
            path = Path(entry.path)
            if ORBAX_TMP not in entry.name and not (
                manifest.is_step_name(entry.name)
                and entry.is_dir()
                and not manifest.committed(path)
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

    # -- saving ----------------------------------------------------------------------------

    def save(self, step: int, state: Any, metadata: Mapping[str, Any] | None = None) -> None:
        """Write `state` (and the JSON dict `metadata`) as committed step `step`.

        Raises `CheckpointError` if the state holds a non-finite float, if the
        step is already committed, if the write fails (the message names the
        path and the OS error; the partial directory is removed), or, with
        ``async_save``, if the *previous* asynchronous save failed (in that
        case this save is not started). Synchronous saves return once the step
        is committed and pruning is done.
        """
        if self._closed or self.read_only:
            what = "read-only" if self.read_only else "closed"
            raise CheckpointError(f"{self!r} is {what}; cannot save step {step}")
        step = _check_step(step)
        self.wait_until_finished()
        final = self.step_path(step)
        if final.exists():
            raise CheckpointError(
                f"checkpoint step {step} already exists at {final}; committed steps are never "
                "overwritten"
            )
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, Mapping):
            raise TypeError(f"checkpoint metadata must be a dict, got {type(metadata).__name__}")
        try:
            metadata = json.loads(json.dumps(dict(metadata)))
        except (TypeError, ValueError) as err:
            raise CheckpointError(
                f"checkpoint metadata for step {step} is not JSON: {err}"
            ) from err
        nested, flat, typed_keys = tree.to_host(state, copy=self.async_save)
        tree.check_finite(step, flat)
        manifest.SaveContext.current = manifest.SaveContext(typed_keys)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._before = self.all_steps()
        args = ocp.args.Composite(
            state=ocp.args.PyTreeSave(nested), metadata=ocp.args.JsonSave(metadata)
        )
        try:
            self._orbax.save(step, args=args, force=True)
        except Exception as err:
            raise self._failed(step, err) from err
        if self.async_save:
            self._pending = step
        else:
            self._log_pruned()

    def _log_pruned(self) -> None:
        for step in sorted(set(self._before) - set(self.all_steps())):
            logger.info("removed old checkpoint step %d (keep=%d)", step, self.keep)

    def _failed(self, step: int, err: BaseException, asynchronous=False) -> CheckpointError:
        """Removes the partial write of `step`; the error to raise, naming path and cause."""
        with manifest.SaveContext.lock:
            err = manifest.SaveContext.errors.pop(str(self.step_path(step)), err)
        for leftover in self.directory.glob(f"{step}{ORBAX_TMP}*"):
            shutil.rmtree(leftover, ignore_errors=True)
        self._orbax.reload()
        what = (
            f"asynchronous save of checkpoint step {step} failed ({self.step_path(step)})"
            if asynchronous
            else f"could not write checkpoint step {step} to {self.step_path(step)}"
        )
        return CheckpointError(
            f"{what}: {err}. The partial "
            f"write was removed; committed checkpoints are untouched (latest committed step: "
            f"{self.latest_step()})."
        )

    def wait_until_finished(self) -> None:
        """Block until a pending asynchronous save ends; raise its error if it failed."""
        step, self._pending = self._pending, None
        try:
            self._orbax.wait_until_finished()
        except Exception as err:
            if step is None:
                raise CheckpointError(
                    f"a checkpoint save in {self.directory} failed: {err}"
                ) from err
            raise self._failed(step, err, asynchronous=True) from err
        if step is not None and step not in self.all_steps():
            raise self._failed(step, RuntimeError("orbax did not commit it"), asynchronous=True)
        if step is not None:
            self._log_pruned()

    def close(self) -> None:
        """Wait for pending saves (raising their error) and refuse further saves."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait_until_finished()
        finally:
            self._orbax.close()

    # -- restoring -------------------------------------------------------------------------

    def read_metadata(self, step: int | None = None) -> dict:
        """The metadata dict of a committed step (default: the latest), checksum verified."""
        step = self._resolve_step(step)
        try:
            found = manifest.read_manifest(self.step_path(step), step)
            if found is not None:
                for rel in found["files"]:
                    if rel.startswith("metadata/"):
                        manifest.verify_file(self.step_path(step), step, found, rel)
            return self._read_step(step, items=("metadata",))[2]
        except manifest.Corrupt as err:
            raise CheckpointError(self._corrupt_message(err)) from None

    def restore(
        self, step: int | None = None, target: Any = None, *, on_corrupt: str = "raise"
    ) -> tuple[Any, dict]:
        """Load committed step `step` (default: the latest) as ``(state, metadata)``.

        Without `target` the state comes back as nested dicts (string keys, one
        level per pytree node) of numpy arrays, with typed PRNG keys re-wrapped;
        with `target`, in the target's structure (see `checkpoint_tree.fit`).

        Every file is checked against the manifest before it is read. A corrupt
        step raises `CheckpointError` naming the step and file and the
        previous committed step. With ``on_corrupt="fallback"`` the corrupt
        step is logged at ERROR, moved to ``<directory>/corrupt/<step>`` and
        the next older committed step is tried, until one is intact; if none
        is left, `CheckpointError` is raised. The search only moves to older
        steps, so it always terminates. A missing step raises `CheckpointError`
        listing the available steps.
        """
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        step = self._resolve_step(step)
        while True:
            try:
                raw, typed_keys, metadata = self._read_step(step)
                break
            except manifest.Corrupt as err:
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
        where = f"checkpoint step {step} in {self.directory}"
        return tree.fit(raw, typed_keys, target, where), metadata

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

    def _corrupt_message(self, err: manifest.Corrupt) -> str:
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

    def _read_step(self, step: int, items=ITEMS) -> tuple[dict | None, list, dict]:
        found = manifest.read_manifest(self.step_path(step), step)
        if found is None:
            logger.warning(
                "checkpoint step %d in %s has no %s manifest (written by plain orbax?); "
                "restoring it without checksums",
                step,
                self.directory,
                manifest.COMMIT_FILE,
            )
        elif items == ITEMS:
            for rel in found["files"]:
                manifest.verify_file(self.step_path(step), step, found, rel)
        restore_args = {"state": ocp.args.PyTreeRestore(), "metadata": ocp.args.JsonRestore()}
        try:
            out = self._orbax.restore(
                step, args=ocp.args.Composite(**{k: restore_args[k] for k in items})
            )
        except Exception as err:  # checksums passed (or absent), yet orbax cannot read it
            raise manifest.Corrupt(
                step, "/".join(items), f"cannot be read by orbax ({err})"
            ) from None
        metadata = out.metadata if "metadata" in items else None
        if "metadata" in items and not isinstance(metadata, dict):
            raise manifest.Corrupt(step, "metadata", f"holds {type(metadata).__name__}, not a dict")
        state = out.state if "state" in items else None
        return state, (found or {}).get("typed_keys", []), metadata

    def _quarantine(self, step: int) -> None:
        corrupt = self.directory / CORRUPT_DIR
        dest = corrupt / str(step)
        n = 0
        while dest.exists():  # the same step may have been corrupted before
            n += 1
            dest = corrupt / f"{step}.{n}"
        try:
            corrupt.mkdir(exist_ok=True)
            os.rename(self.step_path(step), dest)
        except OSError as err:
            logger.error("could not move corrupt checkpoint step %d to %s: %s", step, dest, err)
        self._orbax.reload()
