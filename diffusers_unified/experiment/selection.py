"""Which checkpoints `--mode=eval` evaluates, and waiting for those not written yet.

`--checkpoint` is parsed into a `Selection`; `steps_to_evaluate` yields its
committed steps in increasing order, each once, polling the checkpoint
directory (read-only: a training run may be writing it) while a step it
must reach has not appeared (RELIABILITY.md, B24: exit 5 at once without
`--wait_for_checkpoints`, else after that many seconds without a new
checkpoint). With several processes, process 0 decides and the others
follow (`agreed`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import jax
import numpy as np

from diffusers_unified.errors import CheckpointError, ConfigError

logger = logging.getLogger("diffusers_unified")


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which checkpoints --mode=eval evaluates: `--checkpoint` parsed.

    'latest' (the newest committed), 'N' (step N), 'BEGIN:END' (every
    committed step in [BEGIN, END]; END must appear; 'BEGIN:' ends at
    training.n_iters, ':END' begins at 0) or 'all' (every committed step
    now there; nothing awaited).
    """

    begin: int = 0
    end: int | None = None  # the step that must appear; None: none
    latest: bool = False
    single: bool = False

    @property
    def skips_done(self) -> bool:
        """Ranges skip the checkpoints they already evaluated; one checkpoint is redone."""
        return not (self.single or self.latest)

    @classmethod
    def parse(cls, text: str, n_iters: int) -> Selection:
        text = text.strip()
        try:
            if text == "latest":
                return cls(latest=True)
            if text == "all":
                return cls()
            if ":" in text:
                a, b = text.split(":", 1)
                begin, end = int(a) if a else 0, int(b) if b else n_iters
                if 0 <= begin <= end:
                    return cls(begin, end)
            elif int(text) >= 0:
                return cls(int(text), int(text), single=True)
        except ValueError:
            pass
        raise ConfigError(
            f"--checkpoint={text!r}: expected 'latest', a step, a range 'BEGIN:END' (BEGIN <= "
            "END; either may be left out) or 'all'"
        )


def steps_to_evaluate(checkpoints, selection: Selection, wait: float):
    """Yields the committed steps to evaluate, in increasing order, each once (process 0).

    Ends once the selection's last step (`end`; for 'latest' and 'all', the
    first batch of steps found) has been yielded. What is missing fails at
    once with `wait` 0, else after `wait` seconds without a new step.
    """
    where = checkpoints.directory
    target = selection.end
    if target is None:
        what, missing = "a committed checkpoint", lambda steps: not steps
    else:
        what, missing = f"checkpoint {target}", lambda steps: target not in steps
    committed = checkpoints.all_steps()
    if missing(committed) and wait <= 0:
        if target is None:
            raise CheckpointError(
                f"no committed checkpoint found in {where}: sampling and evaluation need a "
                "trained model (train first with --mode=train)"
            )
        raise CheckpointError(
            f"{what} does not exist in {where} (committed steps: "
            f"{', '.join(map(str, committed)) or 'none'}); pass --wait_for_checkpoints=SECONDS "
            "to wait for a training run to write it"
        )
    seen: set[int] = set()
    deadline = None
    while True:
        committed = checkpoints.all_steps()
        if selection.latest:
            todo = committed[-1:] if not seen else []
        else:
            high = math.inf if target is None else target
            todo = [s for s in committed if selection.begin <= s <= high and s not in seen]
        if todo:
            seen.add(todo[0])
            deadline = None
            yield todo[0]
            continue
        if seen and (target is None or target in seen):
            return
        if deadline is None:
            deadline = time.monotonic() + wait
            logger.info("waiting up to %g s for %s to appear in %s", wait, what, where)
        elif time.monotonic() > deadline:
            raise CheckpointError(
                f"{what} did not appear within {wait:g} s (waited for it in {where}; "
                f"committed steps: {', '.join(map(str, committed)) or 'none'})"
            )
        time.sleep(min(1.0, wait / 10))


def agreed(steps):
    """The steps process 0 draws from `steps`, on every process (None ends them)."""
    if jax.process_count() == 1:
        yield from steps
        return
    from jax.experimental import multihost_utils

    while True:
        step, error = -1, 0
        if jax.process_index() == 0:
            try:
                step = next(steps, -1)
            except CheckpointError:
                error = 1
                raise
            finally:
                multihost_utils.broadcast_one_to_all(np.array([step, error], np.int64))
        else:
            step, error = map(int, multihost_utils.broadcast_one_to_all(np.zeros(2, np.int64)))
            if error:
                raise CheckpointError("process 0 found no checkpoint to evaluate; its log says why")
        if step < 0:
            return
        yield step
