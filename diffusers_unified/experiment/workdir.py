"""The work directory: resolved config, logs, metrics, checkpoints and outputs.

<workdir>/.lock            held by the training run writing here (pid, host, time)
<workdir>/config.json      the resolved config of the first run (resumes compare with it)
<workdir>/log.txt          every run's log, appended, with a marker per (re)start
<workdir>/metrics.jsonl    training metrics, one JSON object per line, by step
<workdir>/checkpoints/     committed checkpoints (see training.checkpoints)
<workdir>/snapshots/       sample snapshots taken during training
<workdir>/samples/         --mode=sample output: samples.npz, a figure, shards
<workdir>/eval/            --mode=eval output: one JSON file per checkpoint
<workdir>/tensorboard/     TensorBoard event files: train/ and eval/ (with tensorboardX)
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import uuid

from diffusers_unified import faults
from diffusers_unified.errors import ConfigError
from diffusers_unified.experiment import config as config_lib

logger = logging.getLogger("diffusers_unified")


def atomic_write(path: str, data: str | bytes) -> None:
    """Writes a file under a temporary name, then renames it: readers never see half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Workdir:
    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.config_path = os.path.join(self.path, "config.json")
        self.log_path = os.path.join(self.path, "log.txt")
        self.metrics_path = os.path.join(self.path, "metrics.jsonl")
        self.checkpoints = os.path.join(self.path, "checkpoints")
        self.snapshots = os.path.join(self.path, "snapshots")
        self.samples = os.path.join(self.path, "samples")
        self.eval = os.path.join(self.path, "eval")

    def create(self) -> None:
        os.makedirs(self.path, exist_ok=True)

    def lock(self, force: bool = False, where: str | None = None) -> WorkdirLock:
        """Takes the lock of the training run (or of `where`, a folder inside the work
        directory, e.g. eval/); see `WorkdirLock`."""
        lock = WorkdirLock(os.path.join(where or self.path, ".lock"))
        lock.acquire(force)
        return lock

    # -- config ------------------------------------------------------------------------
    def saved_config(self):
        if not os.path.exists(self.config_path):
            return None
        with open(self.config_path) as f:
            return config_lib.from_json(f.read())

    def save_config(self, config) -> None:
        atomic_write(self.config_path, config_lib.to_json(config) + "\n")

    # -- logging ------------------------------------------------------------------------
    def start_logging(self, mode: str, step: int | None) -> str:
        """Appends to log.txt (never truncates) and writes a start or resume marker."""
        run_id = uuid.uuid4().hex[:8]
        handler = logging.FileHandler(self.log_path, mode="a")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler.set_name("du-workdir")
        for old in [h for h in logger.handlers if h.get_name() == "du-workdir"]:
            logger.removeHandler(old)
            old.close()
        logger.addHandler(handler)
        what = "started" if not step else f"resumed at step {step}"
        with open(self.log_path, "a") as f:
            f.write(
                f"=== {mode} {what} (run id {run_id}, pid {os.getpid()} on "
                f"{socket.gethostname()}, {time.strftime('%Y-%m-%d %H:%M:%S')}) ===\n"
            )
        logger.info("command: %s", " ".join(sys.argv))
        return run_id

    # -- metrics -----------------------------------------------------------------------
    def append_metrics(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def truncate_metrics(self, step: int) -> int:
        """Drops metric lines past `step` (a resumed run recomputes them); returns how many."""
        if not os.path.exists(self.metrics_path):
            return 0
        with open(self.metrics_path) as f:
            lines = f.readlines()
        keep = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        if len(keep) != len(lines):
            atomic_write(self.metrics_path, "".join(keep))
        return len(lines) - len(keep)

    def read_metrics(self) -> list[dict]:
        if not os.path.exists(self.metrics_path):
            return []
        with open(self.metrics_path) as f:
            return [json.loads(line) for line in f if line.strip()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class WorkdirLock:
    """A lock file: one process at a time writes a work directory (RELIABILITY.md, B19).

    The file holds the holder's pid, host, start time and a random token. It
    is created whole or not at all (written under a temporary name, then
    hard-linked into place, which fails if the lock exists), so a reader
    never sees half a lock. A lock whose pid is not alive on this host is
    stale (its process was killed): it is broken with a warning. A lock of
    another host, or of a live process, is an error (exit 2) unless `force`
    (`--force_unlock`). Released on a normal exit and on errors; a SIGKILL
    leaves it behind, stale.
    """

    def __init__(self, path: str):
        self.path = path
        self.token = uuid.uuid4().hex

    def _read(self) -> dict | None:
        try:
            with open(self.path) as f:
                holder = json.load(f)
            return holder if isinstance(holder, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # not a lock this package wrote: only --force_unlock removes it

    def acquire(self, force: bool = False) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        mine = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "token": self.token,
        }
        tmp = f"{self.path}.tmp-{os.getpid()}"
        atomic_write(tmp, json.dumps(mine) + "\n")
        try:
            for _ in range(100):  # each pass either takes the lock or breaks a stale one
                try:
                    os.link(tmp, self.path)
                    logger.info("took the lock %s", self.path)
                    faults.hold_lock()
                    return
                except FileExistsError:
                    pass
                holder = self._read()
                if holder is None:
                    continue  # released meanwhile
                self._break_or_raise(holder, force)
            raise ConfigError(f"could not take the lock {self.path}: it keeps changing hands")
        finally:
            os.unlink(tmp)

    def _break_or_raise(self, holder: dict, force: bool) -> None:
        pid, host = holder.get("pid"), holder.get("host")
        since = holder.get("since", "an unknown time")
        who = f"pid {pid} on host {host} since {since}"
        stale = host == socket.gethostname() and isinstance(pid, int) and not _alive(pid)
        if not (stale or force):
            raise ConfigError(
                f"workdir is locked by {who} (lockfile {self.path}); use --force_unlock if "
                "that process is dead"
            )
        why = "its process is gone" if stale else "--force_unlock"
        # Renamed aside first: of two processes breaking the same lock, one wins the rename.
        aside = f"{self.path}.broken-{os.getpid()}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            with open(aside) as f:
                taken = json.load(f)
        except (OSError, ValueError):
            taken = {}
        if taken.get("token") != holder.get("token"):  # a fresh lock replaced the stale one
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        else:
            logger.warning("breaking the stale lock of %s (lockfile %s): %s", who, self.path, why)
        os.unlink(aside)

    def release(self) -> None:
        """Removes the lock if it is still this process's own."""
        holder = self._read()
        if holder and holder.get("token") == self.token:
            os.unlink(self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.release()
