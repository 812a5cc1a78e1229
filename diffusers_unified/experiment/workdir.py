"""The work directory: resolved config, logs, metrics, checkpoints and outputs.

<workdir>/config.json      the resolved config of the first run (resumes compare with it)
<workdir>/log.txt          every run's log, appended, with a marker per (re)start
<workdir>/metrics.jsonl    training metrics, one JSON object per line, by step
<workdir>/checkpoints/     committed checkpoints (see training.checkpoints)
<workdir>/snapshots/       sample snapshots taken during training
<workdir>/samples/         --mode=sample output: samples.npz, a figure, shards
<workdir>/eval/            --mode=eval output: one JSON file per checkpoint
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import uuid

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
