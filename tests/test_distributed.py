"""Several hosts with JAX's own engine: two launcher processes train one model.

Two launcher processes on localhost, 2 host-platform CPU devices each, join
through `jax.distributed.initialize` (gloo CPU collectives) and train the
tiny config data-parallel over all 4 devices. A third, single process with 4
devices trains the same config. Every process dumps its final state as its
own devices hold it (the DU_DUMP_FINAL_STATE hook of experiment.train).

Checked: both processes exit 0; they hold bit-identical states; process 0
alone wrote the work directory (one log marker, one metrics line per logged
step, the checkpoints, which hold that same state); and the state matches the
one-process run to rtol 1e-5. And when process 0 fails before training (here:
--resume=required without a checkpoint), process 1 exits with the same code
instead of waiting for it at a collective.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import jax
import launcher_util as lu
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # 15 s on an idle 2-core machine, up to ~70 s on a busy one

N_ITERS = 10
ARGS = (
    f"--config.training.n_iters={N_ITERS}",
    "--config.training.n_jitted_steps=5",  # the scan of several updates, twice
    "--config.training.log_freq=5",
    "--config.training.checkpoint_freq=5",
)
TIMEOUT = 150  # seconds, for all three processes together (a hung collective fails, not blocks)


def _distributed_args(port: int, process_id: int) -> tuple[str, ...]:
    return (
        "--config.distributed.enabled=True",
        f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        "--config.distributed.num_processes=2",
        f"--config.distributed.process_id={process_id}",
        "--config.distributed.cpu_collectives=gloo",
    )


def _wait_all(procs: dict[str, subprocess.Popen], stderr: dict[str, Path]) -> dict[str, int]:
    deadline = time.monotonic() + TIMEOUT
    codes = {}
    try:
        for name, proc in procs.items():
            codes[name] = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        logs = "\n".join(f"--- {n}:\n{stderr[n].read_text()[-3000:]}" for n in procs)
        pytest.fail(f"the launchers did not finish within {TIMEOUT} s:\n{logs}")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return codes


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _flat(tree) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(a) for p, a in flat}


def test_two_processes_train_like_one(tmp_path):
    port = lu.free_port()
    work, single = tmp_path / "two", tmp_path / "one"
    dumps = {"p0": work / "dump", "p1": tmp_path / "dump_p1", "one": single / "dump"}
    stderr = {name: tmp_path / f"{name}.stderr" for name in dumps}
    procs = {}
    for pid in (0, 1):
        procs[f"p{pid}"] = lu.start(
            work,
            *ARGS,
            *_distributed_args(port, pid),
            stderr_path=stderr[f"p{pid}"],
            devices=2,
            DU_DUMP_FINAL_STATE=dumps[f"p{pid}"],
        )
    procs["one"] = lu.start(
        single, *ARGS, stderr_path=stderr["one"], devices=4, DU_DUMP_FINAL_STATE=dumps["one"]
    )
    codes = _wait_all(procs, stderr)
    for name, code in codes.items():
        assert code == 0, f"{name}: exit code {code}\n{stderr[name].read_text()[-4000:]}"

    # The two processes hold the same state, bit for bit.
    p0 = _load(dumps["p0"] / "final_state.0.npz")
    p1 = _load(dumps["p1"] / "final_state.1.npz")
    assert p0.keys() == p1.keys() and len(p0) > 10
    assert int(p0["step"]) == N_ITERS
    differ = [k for k in p0 if not np.array_equal(p0[k], p1[k])]
    assert not differ, f"processes 0 and 1 differ in {differ}"

    # Process 0 alone wrote the work directory, and its checkpoint is that state.
    assert lu.committed_steps(work) == [5, N_ITERS]
    assert not [p.name for p in (work / "checkpoints").iterdir() if "tmp" in p.name]
    assert [m["step"] for m in lu.read_metrics(work)] == [5, N_ITERS]
    assert lu.read_log(work).count("=== train started") == 1
    assert "step 5: loss" not in stderr["p1"].read_text()  # process 1 logs problems only
    saved = _flat(lu.restore(work, N_ITERS))
    for k in [k for k in p0 if k.startswith(("params/", "ema_params/"))]:
        assert np.array_equal(saved[k], p0[k]), f"checkpoint differs from process 0 in {k}"

    # And it is the state of one process with 4 devices, up to the order of the
    # gradient all-reduce's float32 sums (relative differences ~1e-6 after 10
    # Adam steps; atol for the few entries within 1e-3 of zero).
    one = _load(dumps["one"] / "final_state.0.npz")
    assert one.keys() == p0.keys()
    for k in p0:
        if k.startswith(("params/", "ema_params/")):
            np.testing.assert_allclose(p0[k], one[k], rtol=1e-5, atol=1e-8, err_msg=k)
        elif p0[k].dtype.kind in "iu":
            assert np.array_equal(p0[k], one[k]), k  # step, counts, key


def test_a_failure_on_process_0_stops_both_with_its_exit_code(tmp_path):
    """Only process 0 opens the work directory; when that fails, process 1 must not hang."""
    port = lu.free_port()
    stderr = {f"p{pid}": tmp_path / f"p{pid}.stderr" for pid in (0, 1)}
    procs = {
        f"p{pid}": lu.start(
            tmp_path / "work",
            "--resume=required",  # with no checkpoint there: exit 5 on process 0
            *_distributed_args(port, pid),
            stderr_path=stderr[f"p{pid}"],
            devices=2,
        )
        for pid in (0, 1)
    }
    codes = _wait_all(procs, stderr)
    logs = {name: path.read_text() for name, path in stderr.items()}
    assert codes == {"p0": 5, "p1": 5}, logs
    assert "refusing to start from scratch" in logs["p0"]
    assert "process 0 failed (exit code 5)" in logs["p1"]


SAMPLE_ARGS = (
    "--config.sampling.num_samples=96",  # 6 shards of 16: two rounds over 4 devices
    "--config.sampling.batch_size=16",
)


def test_two_processes_sample_like_one_device(tmp_path):
    """Sample mode over both processes' 4 devices gives the one-device samples.

    Each shard of samples has its own key, fold_in(key, shard), and runs on one
    device; so 4 devices in two processes draw the shards a single device draws
    one after another, and each process writes the shards its devices drew.
    """
    work = tmp_path / "two"
    trained = lu.run(work, *ARGS, devices=1)
    assert trained.code == 0, trained
    single = tmp_path / "one"
    shutil.copytree(work, single)
    port = lu.free_port()
    stderr = {name: tmp_path / f"{name}.stderr" for name in ("p0", "p1", "one")}
    procs = {
        f"p{pid}": lu.start(
            work,
            *ARGS,
            *SAMPLE_ARGS,
            *_distributed_args(port, pid),
            stderr_path=stderr[f"p{pid}"],
            mode="sample",
            devices=2,
        )
        for pid in (0, 1)
    }
    procs["one"] = lu.start(
        single, *ARGS, *SAMPLE_ARGS, stderr_path=stderr["one"], mode="sample", devices=1
    )
    codes = _wait_all(procs, stderr)
    for name, code in codes.items():
        assert code == 0, f"{name}: exit code {code}\n{stderr[name].read_text()[-4000:]}"
    many = _load(work / "samples" / f"step_{N_ITERS}" / "samples.npz")
    one = _load(single / "samples" / f"step_{N_ITERS}" / "samples.npz")
    assert many["samples"].shape == (96, 2) and int(many["nfe"]) == int(one["nfe"])
    # The same arithmetic on the same inputs: equal up to XLA's choice of fusion on each
    # compile (measured: bit-identical).
    np.testing.assert_allclose(many["samples"], one["samples"], rtol=1e-6, atol=1e-6)
    (tag,) = (work / "samples" / f"step_{N_ITERS}" / "shards").iterdir()
    assert sorted(p.name for p in tag.iterdir()) == [f"shard_{i:05d}.npz" for i in range(6)]
