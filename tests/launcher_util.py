"""Running the real launcher in a subprocess, and reading what it leaves in a work directory.

Every child gets the repository's persistent compilation cache
(<repo>/.jax_cache, every compile cached), no fault hooks unless asked, and a
fixed number of fake CPU devices, so the tests see the launcher exactly as a
user does: exit code, stdout, stderr and files.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from diffusers_unified import faults

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "tests" / "configs"
CI_TINY = CONFIGS / "ci_tiny.py"
CACHE = REPO / ".jax_cache"
FAULT_VARS = faults.ALL


@dataclasses.dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    seconds: float

    def __str__(self):
        return f"exit code {self.code} after {self.seconds:.1f} s; stderr:\n{self.stderr[-4000:]}"


# XLA:CPU without LLVM's optimisation passes. For the tiny image networks' launcher runs,
# which are nearly all compile, it cuts a cold run by about 30 % (RefineNet train + sample,
# measured: 35 -> 24 s); for the MLP runs it saves nothing, so they keep the default. A
# run's numbers do not depend on it beyond float rounding; no test compares a run with it
# against one without (the compilation cache keys on the flags).
FAST_COMPILE = " --xla_backend_optimization_level=0"


def env(devices: int = 1, fast_compile: bool = False, **extra) -> dict[str, str]:
    """The child's environment: compilation cache, `devices` fake CPU devices, `extra` vars;
    `fast_compile` adds `FAST_COMPILE` to XLA_FLAGS."""
    out = {k: v for k, v in os.environ.items() if k not in FAULT_VARS}
    flags = f"--xla_force_host_platform_device_count={devices}"
    out.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(CACHE),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        XLA_FLAGS=flags + (FAST_COMPILE if fast_compile else ""),
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=str(REPO),
    )
    out.update({k: str(v) for k, v in extra.items()})
    return out


def command(workdir, *args, config=CI_TINY, mode: str = "train", python_args=()) -> list[str]:
    cmd = [sys.executable, *python_args, "-m", "diffusers_unified"]
    cmd += [f"--workdir={workdir}", f"--mode={mode}"]
    if config is not None:
        cmd.append(f"--config={config}")
    return cmd + list(args)


def run(
    workdir,
    *args,
    config=CI_TINY,
    mode="train",
    devices=1,
    timeout=180,
    python_args=(),
    fast_compile=False,
    **env_vars,
) -> Result:
    """Runs the launcher to completion (or `timeout` seconds) and returns what it did."""
    start, cpu = time.perf_counter(), _children_cpu()
    proc = subprocess.run(
        command(workdir, *args, config=config, mode=mode, python_args=python_args),
        cwd=REPO,
        env=env(devices, fast_compile, **env_vars),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    result = Result(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - start)
    if os.environ.get("DU_TEST_RUN_LOG"):  # a line per launcher run: wall and CPU seconds
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(os.environ["DU_TEST_RUN_LOG"], "a") as f:
            f.write(f"{test}\t{mode}\t{result.seconds:.2f}\t{_children_cpu() - cpu:.2f}\n")
    return result


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def start(workdir, *args, stderr_path, config=CI_TINY, mode="train", devices=1, **env_vars):
    """Starts the launcher in the background, its stderr going to `stderr_path`."""
    with open(stderr_path, "w") as err:
        return subprocess.Popen(
            command(workdir, *args, config=config, mode=mode),
            cwd=REPO,
            env=env(devices, **env_vars),
            stdout=subprocess.DEVNULL,
            stderr=err,
            text=True,
        )


def wait_for_text(path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Blocks until `text` appears in the file at `path` (fails if the process ends first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in Path(path).read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(
                f"the launcher exited ({proc.returncode}) before logging {text!r}:\n"
                + Path(path).read_text()[-4000:]
            )
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    raise AssertionError(f"{text!r} not logged within {timeout} s")


def once(tmp_path_factory, name: str, make):
    """`make(workdir)` run once per test session and shared by every xdist worker.

    Module-scoped fixtures run once per *worker*; runs that several tests
    read go through here instead (readers must not modify the work
    directory: copy it first). The first caller runs `make` under a file
    lock, the others wait and get the same work directory and value. The
    value must be JSON, or hold `Result`s in lists and dicts. A failed `make`
    is retried by the next caller. Returns (workdir, value).
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of one session
    root = root / "shared_runs"
    root.mkdir(exist_ok=True)
    workdir, done = root / name, root / f"{name}.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            if workdir.exists():
                shutil.rmtree(workdir)
            value = make(workdir)
            encode = lambda r: {"__result__": dataclasses.asdict(r)}
            done.write_text(json.dumps(value, default=encode))
    decode = lambda d: Result(**d["__result__"]) if "__result__" in d else d
    return workdir, json.loads(done.read_text(), object_hook=decode)


def reference_run(tmp_path_factory) -> tuple[Path, Result]:
    """The uninterrupted ci_tiny run on 2 devices that the reliability tests compare with."""
    workdir, result = once(tmp_path_factory, "reference", lambda wd: run(wd, devices=2))
    assert result.code == 0, result
    return workdir, result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- reading a work directory --------------------------------------------------------------


def checkpoint_entries(workdir) -> list[str]:
    """Every name in <workdir>/checkpoints, committed or not (read without a manager)."""
    directory = Path(workdir) / "checkpoints"
    return sorted(os.listdir(directory)) if directory.is_dir() else []


def checkpoints(workdir):
    """A CheckpointManager on the work directory (its construction removes incomplete steps)."""
    from diffusers_unified.training.checkpoints import CheckpointManager

    return CheckpointManager(Path(workdir) / "checkpoints")


def committed_steps(workdir) -> list[int]:
    return checkpoints(workdir).all_steps()


def restore(workdir, step: int | None = None) -> dict:
    """A committed checkpoint (default: the newest) as nested dicts of NumPy arrays."""
    state, _ = checkpoints(workdir).restore(step)
    return state


def leaves(tree) -> dict[str, np.ndarray]:
    """{path: array} of every leaf, typed PRNG keys as their key data."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out[jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def assert_trees_equal(a, b, what: str = "") -> None:
    """Bit-identical: same paths, shapes, dtypes and values (np.array_equal, NaN != NaN)."""
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys(), f"{what}: different leaves {sorted(la.keys() ^ lb.keys())}"
    assert len(la) > 10, f"{what}: suspiciously few leaves ({len(la)})"
    same = lambda x, y: x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
    differ = [k for k in la if not same(la[k], lb[k])]
    assert not differ, f"{what}: {len(differ)} of {len(la)} leaves differ, e.g. {differ[:4]}"


def assert_trees_close(a, b, rtol: float, atol: float = 0.0, what: str = "") -> None:
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys(), f"{what}: different leaves {sorted(la.keys() ^ lb.keys())}"
    for k in la:
        np.testing.assert_allclose(la[k], lb[k], rtol=rtol, atol=atol, err_msg=f"{what}: {k}")


def read_log(workdir) -> str:
    return (Path(workdir) / "log.txt").read_text()


def read_metrics(workdir) -> list[dict]:
    with open(Path(workdir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]
