"""Fault injection for the reliability tests: the one module that reads the DU_FAULT_* variables.

The library calls these hooks at its fault points; with none of the
variables set (every normal run) each hook is a dictionary lookup and does
nothing. The tests set them in a launcher subprocess's environment (or with
`monkeypatch.setenv` in process), so the values are read when a hook runs,
not at import.

    DU_FAULT_KILL_AT_STEP=k[,k2...]    SIGKILL right after update k, before its checkpoint
    DU_FAULT_NAN_AT_STEP=k[,k2...]     update k's loss is multiplied by NaN
    DU_FAULT_STEP_SLEEP=seconds        sleep after each chunk of updates (so a test can
                                       signal a run mid-way)
    DU_FAULT_KILL_IN_SAVE=phase[:n]    SIGKILL inside the n-th checkpoint save of this
                                       process (default 1): before_commit (files written,
                                       not yet renamed into place) or
                                       after_commit_before_cleanup (committed, old steps
                                       not yet pruned)
    DU_FAULT_SAVE_ERROR=ERRNO[:n]      raise OSError(errno.ERRNO) inside the n-th save,
                                       after the payload is written (ENOSPC, EIO, ...)
    DU_FAULT_KILL_AFTER_EVAL_PARTS=k   SIGKILL once eval has written k likelihood batches
    DU_FAULT_KILL_AFTER_SAMPLE_SHARDS=k  SIGKILL once sampling has written k shards
    DU_FAULT_HOLD_LOCK=seconds         sleep right after taking the work-directory lock
    DU_DUMP_FINAL_STATE=dir            every process writes its final training state to
                                       dir/final_state.<process>.npz
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time

logger = logging.getLogger("diffusers_unified")

KILL_AT_STEP = "DU_FAULT_KILL_AT_STEP"
NAN_AT_STEP = "DU_FAULT_NAN_AT_STEP"
STEP_SLEEP = "DU_FAULT_STEP_SLEEP"
KILL_IN_SAVE = "DU_FAULT_KILL_IN_SAVE"
SAVE_ERROR = "DU_FAULT_SAVE_ERROR"
KILL_AFTER_EVAL_PARTS = "DU_FAULT_KILL_AFTER_EVAL_PARTS"
KILL_AFTER_SAMPLE_SHARDS = "DU_FAULT_KILL_AFTER_SAMPLE_SHARDS"
HOLD_LOCK = "DU_FAULT_HOLD_LOCK"
DUMP_FINAL_STATE = "DU_DUMP_FINAL_STATE"
ALL = (
    KILL_AT_STEP,
    NAN_AT_STEP,
    STEP_SLEEP,
    KILL_IN_SAVE,
    SAVE_ERROR,
    KILL_AFTER_EVAL_PARTS,
    KILL_AFTER_SAMPLE_SHARDS,
    HOLD_LOCK,
    DUMP_FINAL_STATE,
)
SAVE_PHASES = ("before_commit", "after_commit_before_cleanup")


def _kill(what: str) -> None:
    logger.warning("fault injection: SIGKILL %s", what)
    os.kill(os.getpid(), signal.SIGKILL)


def _steps(name: str) -> set[int]:
    return {int(v) for v in os.environ.get(name, "").split(",") if v.strip()}


# -- training -------------------------------------------------------------------------------


def nan_steps() -> set[int]:
    """The updates whose loss is multiplied by NaN (1-based step numbers)."""
    return _steps(NAN_AT_STEP)


def after_updates(first: int, last: int) -> None:
    """Called after updates first + 1 ... last: sleeps and kills as asked."""
    sleep = float(os.environ.get(STEP_SLEEP, "0") or 0)
    if sleep:
        time.sleep(sleep)
    if any(first < s <= last for s in _steps(KILL_AT_STEP)):
        _kill(f"after step {last}")


def dump_directory() -> str | None:
    return os.environ.get(DUMP_FINAL_STATE) or None


# -- checkpoint saves --------------------------------------------------------------------------

_saves = 0
_saves_lock = threading.Lock()


def _spec(name: str, valid: tuple[str, ...] | None) -> tuple[str, int] | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    what, _, nth = raw.partition(":")
    ok = (what in valid) if valid is not None else isinstance(getattr(errno, what, None), int)
    try:
        n = int(nth) if nth else 1
    except ValueError:
        ok = False
    if not ok or n < 1:
        expected = " or ".join(valid) if valid is not None else "an errno name such as ENOSPC"
        raise ValueError(f"{name}={raw!r}: expected {expected}, optionally followed by ':n' (n>=1)")
    return what, n


class SaveFaults:
    """The faults that apply to one checkpoint save, decided when it starts.

    Saves are counted per process (across managers), from 1.
    """

    def __init__(self):
        global _saves
        kill, error = _spec(KILL_IN_SAVE, SAVE_PHASES), _spec(SAVE_ERROR, None)
        with _saves_lock:
            _saves += 1
            number = _saves
        self.kill_phase = kill[0] if kill and kill[1] == number else None
        self.error_code = getattr(errno, error[0]) if error and error[1] == number else None

    def at(self, phase: str) -> None:
        if self.kill_phase == phase:
            _kill(f"in checkpoint save ({phase})")

    def maybe_raise(self, path) -> None:
        if self.error_code is not None:
            raise OSError(self.error_code, os.strerror(self.error_code), str(path))


def reset_save_count() -> None:
    """Tests that run several managers in one process start the count afresh."""
    global _saves
    with _saves_lock:
        _saves = 0


# -- eval, sample and the work directory -------------------------------------------------------

_written = {KILL_AFTER_EVAL_PARTS: 0, KILL_AFTER_SAMPLE_SHARDS: 0}


def after_part_written(kind: str = KILL_AFTER_EVAL_PARTS) -> None:
    """Counts a finished eval part (or sample shard) and kills the process at the k-th."""
    _written[kind] += 1
    if os.environ.get(kind) == str(_written[kind]):
        _kill(f"after {_written[kind]} part(s) ({kind})")


def hold_lock() -> None:
    seconds = float(os.environ.get(HOLD_LOCK, "0") or 0)
    if seconds:
        time.sleep(seconds)
