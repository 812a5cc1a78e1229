"""Where a run's figures go besides metrics.jsonl: TensorBoard and Weights & Biases.

metrics.jsonl (`Workdir.append_metrics`) is always written; these are for
watching curves and sample grids.

TensorBoard (config `logging.tensorboard`, on by default): event files under
<workdir>/tensorboard/train and <workdir>/tensorboard/eval, written by
tensorboardX (the `tensorboard` extra). Without tensorboardX installed the
run says so once and goes on. Scalars are tagged `train/<metric>` (loss,
eval_loss, learning_rate, grad_norm, steps_per_sec, ...) and `eval/<metric>`;
images `train/samples` (the snapshot: an image grid, or a scatter plot of
2-D data). A resumed run opens its writer with `purge_step` = the resumed
step + 1: TensorBoard then hides whatever a killed run logged past the
checkpoint it resumes from, so no step appears twice (RELIABILITY.md, B20).

Weights & Biases (`logging.wandb=True`; wandb must be installed): one W&B run
per work directory and job (train, eval), grouped by the work directory's
name, its id kept in <workdir>/wandb_ids.json so that a resumed run continues
the same W&B run. `WANDB_MODE=offline` keeps it on disk
(<workdir>/wandb/offline-run-*), for `wandb sync` later. W&B needs steps to
increase: after a resume, the steps a killed run logged past its checkpoint
are logged again and W&B keeps its first values (TensorBoard's purge has no
W&B equivalent).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import time
import uuid

import numpy as np

from diffusers_unified.errors import ConfigError
from diffusers_unified.experiment.workdir import Workdir, atomic_write

logger = logging.getLogger("diffusers_unified")


def check_available(config) -> None:
    """W&B asked for but not installed is a config error (before any work starts)."""
    if config.logging.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "logging.wandb=True needs the wandb package (pip install 'diffusers_unified[wandb]'),"
            " which is not installed"
        )


class Writer:
    """Scalars and images to every sink the config turns on (none: every call does nothing)."""

    def __init__(self, sinks: list, prefix: str):
        self.sinks = sinks
        self.prefix = prefix

    def scalars(self, step: int, values: dict) -> None:
        """Logs each finite number of `values` (but "step") as `<prefix>/<name>` at `step`."""
        values = {
            f"{self.prefix}/{k}": float(v)
            for k, v in values.items()
            if k != "step" and isinstance(v, int | float | np.number) and not isinstance(v, bool)
            if math.isfinite(float(v))
        }
        for sink in self.sinks:
            sink.scalars(step, values)

    def image_file(self, step: int, name: str, path: str) -> None:
        """Logs a PNG file (a snapshot's grid or scatter plot) as image `<prefix>/<name>`."""
        if not self.sinks:
            return
        from PIL import Image

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        for sink in self.sinks:
            sink.image(step, f"{self.prefix}/{name}", pixels)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def open_writer(config, wd: Workdir, job: str, resume_step: int | None = None) -> Writer:
    """The writer of a train or eval `job` in work directory `wd`.

    `resume_step`: the step a training run resumes from (TensorBoard hides
    what was logged after it).
    """
    sinks = []
    if config.logging.tensorboard:
        if importlib.util.find_spec("tensorboardX") is None:
            logger.info(
                "TensorBoard logging is on (logging.tensorboard) but tensorboardX is not "
                "installed (pip install 'diffusers_unified[tensorboard]'): metrics go to "
                "metrics.jsonl only"
            )
        else:
            purge = None if resume_step is None else resume_step + 1
            sinks.append(_TensorBoard(os.path.join(wd.path, "tensorboard", job), purge))
    if config.logging.wandb:
        check_available(config)
        sinks.append(_WandB(config, wd, job))
    return Writer(sinks, job)


class _TensorBoard:
    """tensorboardX's event file writer and summaries, written through at each call.

    (tensorboardX's SummaryWriter queues events for a thread that flushes
    every few seconds: a killed run would lose what it logged last.) The
    first events of a resumed run are the file version and a SessionLog
    START at `purge_step`, which SummaryWriter(purge_step=...) also writes:
    TensorBoard then drops every event of the earlier files from that step on.
    """

    def __init__(self, logdir: str, purge_step: int | None):
        from tensorboardX import summary
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        os.makedirs(logdir, exist_ok=True)
        self.summary, self.Event = summary, Event
        self.events = EventsWriter(os.path.join(logdir, "events"), f".{os.getpid()}")
        if purge_step is not None:
            start = SessionLog(status=SessionLog.START)
            self._write(Event(step=purge_step, file_version="brain.Event:2"))
            self._write(Event(step=purge_step, session_log=start))

    def _write(self, *events):
        for event in events:
            event.wall_time = event.wall_time or time.time()
            self.events.write_event(event)
        self.events.flush()

    def scalars(self, step, values):
        self._write(
            *(
                self.Event(step=step, summary=self.summary.scalar(tag, value))
                for tag, value in values.items()
            )
        )

    def image(self, step, tag, pixels):
        summary = self.summary.image(tag, pixels, dataformats="HWC")
        self._write(self.Event(step=step, summary=summary))

    def close(self):
        self.events.close()


class _WandB:
    def __init__(self, config, wd: Workdir, job: str):
        import wandb

        ids_path = os.path.join(wd.path, "wandb_ids.json")
        ids = {}
        if os.path.exists(ids_path):
            with open(ids_path) as f:
                ids = json.load(f)
        if job not in ids:
            ids[job] = uuid.uuid4().hex[:12]
            atomic_write(ids_path, json.dumps(ids, indent=2) + "\n")
        name = os.path.basename(wd.path)
        self.wandb = wandb
        self.run = wandb.init(
            project=config.logging.wandb_project or None,
            entity=config.logging.wandb_entity or None,
            name=f"{name}/{job}",
            group=name,
            job_type=job,
            id=ids[job],
            resume="allow",
            dir=wd.path,
            config=config.to_dict(),
            settings=wandb.Settings(console="off", silent=True),
        )

    def scalars(self, step, values):
        if values:
            self.run.log(values, step=step)

    def image(self, step, tag, pixels):
        self.run.log({tag: self.wandb.Image(pixels)}, step=step)

    def close(self):
        self.run.finish()
