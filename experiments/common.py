"""Helpers shared by the experiment scripts: result tables and the final JSON line."""

from __future__ import annotations

import csv
import json
import os
import platform
import time

import jax

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


def timed(fn, *args, repeats: int = 3):
    """Best-of-`repeats` wall time of fn(*args) after one warm-up call (compilation)."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def final_json(payload: dict) -> None:
    """The last line of every experiment's output: its headline figures."""
    print(json.dumps(payload, sort_keys=True))
