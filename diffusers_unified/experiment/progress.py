"""Progress bars on every long job: training, sampling, likelihoods, eval metrics, studies.

One tqdm bar per loop, with its rate and ETA, on stderr. A bar shows only
where someone watches: on a terminal (tqdm's `disable=None` turns it off when
stderr is not a TTY, so logs and CI output stay clean), on process 0 of a
multi-process run, and not under `--log_level=warning` or quieter.
"""

from __future__ import annotations

import sys

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Turns every bar off (the launcher's --log_level above info)."""
    global _quiet
    _quiet = quiet


def bar(total: int, desc: str, unit: str, initial: int = 0, primary: bool = True):
    """A tqdm bar counting `total` units of `unit` (shown only where someone watches)."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        mininterval=1.0,
        dynamic_ncols=True,
        file=sys.stderr,
        disable=True if _quiet or not primary else None,
    )
