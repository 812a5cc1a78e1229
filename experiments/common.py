"""Helpers shared by the experiment scripts: result tables, the final JSON line, and timing
that benchmarks can trust (interleaved best-of-many, the machine's load, self-checks)."""

from __future__ import annotations

import csv
import json
import os
import platform
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, {jax.devices()[0]}"
    )


def write_table(name: str, header: list[str], rows: list[list], out_dir: str = RESULTS, note=""):
    """Writes <name>.csv and <name>.md under out_dir and prints the Markdown table."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.csv"), "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    stamp = f"\n\n_{time.strftime('%Y-%m-%d')}, {machine()}._"
    text = "\n".join(lines) + ("\n\n" + note if note else "") + stamp + "\n"
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(text)
    print(text)


def matmul(n: int, dtype=jnp.float32) -> tuple[Callable[[], jax.Array], float]:
    """(call, FLOPs of one call): a jitted n x n x n matmul in `dtype` on random operands.

    The benchmarks' peak: timed in the same process as (and interleaved with)
    what they measure, so that a fraction of it is a fraction of this
    machine's rate at that moment.
    """
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n)).astype(dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n)).astype(dtype)
    f = jax.jit(jnp.matmul)
    return (lambda: f(a, b)), 2.0 * n**3


def interleaved_best(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Best wall time (seconds) of each zero-argument fn over `rounds` interleaved rounds.

    Each fn is called once to compile and warm up; then every round calls each
    fn once, in turn, and blocks on its result. Interleaving lets every figure
    see the same machine (a shared machine's load drifts over minutes), and
    the best of many rounds is the figure least disturbed by other work;
    ratios of figures taken apart from each other can come out impossible
    (a sampler faster than its own network evaluations, above the matmul peak).
    """
    for fn in fns.values():
        jax.block_until_ready(fn())
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def load_average() -> float:
    """The machine's 1-minute load average (recorded with every benchmark's figures)."""
    return os.getloadavg()[0]


class Checks:
    """A benchmark's consistency checks: `check(ok, message)`, then `finish()` exits 1 on any.

    A figure that cannot be true (a fraction of the matmul peak above 1, a
    sampler faster than its own network evaluations) means the measurement
    is broken: the script prints why and exits non-zero rather than
    reporting it as a result.
    """

    def __init__(self):
        self.failures: list[str] = []

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.failures.append(message)

    def stamp(self, note: str) -> str:
        """A table's note, with the failed checks after it: such a table is not a result."""
        if not self.failures:
            return note
        return f"{note} SELF-CHECK FAILED, not a result: {'; '.join(self.failures)}."

    def finish(self) -> None:
        for message in self.failures:
            print(f"INCONSISTENT: {message}", file=sys.stderr)
        if self.failures:
            sys.exit(1)


def final_json(payload: dict) -> None:
    """The last line of every experiment's output: its headline figures."""
    print(json.dumps(payload, sort_keys=True))
