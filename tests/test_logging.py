"""What a run logs besides metrics.jsonl, through the real launcher: TensorBoard event files
(read back with TensorBoard's own reader), a Weights & Biases offline run, the held-out
loss and learning rate, and the progress bars (on a terminal only, quiet under --log_level).
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import termios

import launcher_util as lu
import numpy as np
import pytest

DEVICES = 2
# ci_tiny (20 updates, metrics every 5) with a checkpoint every 10, the held-out loss every
# 10 and a snapshot every 10; run 1 dies after update 17, having logged step 15 past its last
# checkpoint (10), which run 2 then logs again.
LOGGED = (
    "--config.training.checkpoint_freq=10",
    "--config.training.eval_freq=10",
    "--config.training.snapshot_freq=10",
)


def tensorboard_run(tmp_path_factory):
    pytest.importorskip("tensorboardX")

    def make(workdir):
        killed = lu.run(workdir, *LOGGED, devices=DEVICES, DU_FAULT_KILL_AT_STEP=17)
        return {"killed": killed, "final": lu.run(workdir, *LOGGED, devices=DEVICES)}

    return lu.once(tmp_path_factory, "tensorboard", make)


def accumulator(logdir):
    """TensorBoard's own reader, as its server uses it (every event kept)."""
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    acc = event_accumulator.EventAccumulator(
        str(logdir), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0}
    )
    acc.Reload()
    return acc


@pytest.mark.slow
def test_tensorboard_holds_the_logged_scalars_and_snapshots_once_per_step(tmp_path_factory):
    workdir, runs = tensorboard_run(tmp_path_factory)
    assert runs["killed"].code == -signal.SIGKILL, runs["killed"]
    assert runs["final"].code == 0, runs["final"]
    assert "Resuming from step 10 (dropped 1 metric lines past it)" in runs["final"].stderr
    logdir = workdir / "tensorboard" / "train"
    acc = accumulator(logdir)
    rows = {r["step"]: r for r in lu.read_metrics(workdir)}
    assert sorted(rows) == [5, 10, 15, 20]

    for name in ("loss", "grad_norm", "learning_rate", "steps_per_sec"):
        events = acc.Scalars(f"train/{name}")
        # One value per step, the resumed run's: the killed run's step 15 is purged.
        assert [e.step for e in events] == [5, 10, 15, 20], name
        # TensorBoard stores float32: the metrics.jsonl values, rounded to float32.
        expected = [np.float32(rows[e.step][name]) for e in events]
        assert [np.float32(e.value) for e in events] == expected, name
    # ci_tiny has no warmup: the learning rate is optim.lr throughout.
    assert {e.value for e in acc.Scalars("train/learning_rate")} == {np.float32(1e-3)}
    held_out = acc.Scalars("train/eval_loss")
    assert [e.step for e in held_out] == [10, 20]
    assert [np.float32(e.value) for e in held_out] == [
        np.float32(rows[s]["eval_loss"]) for s in (10, 20)
    ]
    images = acc.Images("train/samples")
    assert [e.step for e in images] == [10, 20]
    assert all(e.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" for e in images)
    assert all(e.width > 100 and e.height > 100 for e in images)  # the scatter plot figure

    # Both runs' files hold a step-15 loss: the purge, not luck, makes it appear once.
    loader = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")
    files = sorted(logdir.iterdir())
    assert len(files) == 2
    raw = [
        (event.step, value.tag)
        for path in files
        for event in loader.EventFileLoader(str(path)).Load()
        for value in event.summary.value
    ]
    assert raw.count((15, "train/loss")) == 2


@pytest.mark.slow
def test_the_held_out_loss_is_the_ema_training_loss_on_test_batches(tmp_path_factory):
    """The score SDE code's eval_loss: the loss of the EMA parameters on the k-th test batch,
    recomputed here on one device from checkpoint 10 (no launcher code but the Run)."""
    import jax

    from diffusers_unified import data
    from diffusers_unified.experiment import config as config_lib
    from diffusers_unified.experiment.run import build_run
    from diffusers_unified.experiment.updates import EVAL_LOSS_STREAM

    workdir, _ = tensorboard_run(tmp_path_factory)
    rows = lu.read_metrics(workdir)
    held_out = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert sorted(held_out) == [10, 20]

    config = config_lib.from_json((workdir / "config.json").read_text())
    run = build_run(config)
    state = lu.restore(workdir, 10)
    x, _ = run.dataset.split("test")
    idx = data.Batcher(x, None, config.seed, config.training.batch_size).indices(0)  # k = 0
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), EVAL_LOSS_STREAM + 0)
    batch = {"x": run.dataset.scaling.to_model(x[idx]), "y": None}
    loss = lambda params: float(run.loss_fn(params, jax.random.split(key)[0], batch)[0])
    # 2 devices against 1: the same noise (drawn for the whole batch), summed in another
    # order (test_reliability's B22 measures 1e-5 for the same reason).
    assert held_out[10] == pytest.approx(loss(state["ema_params"]), rel=1e-5)
    assert held_out[10] != pytest.approx(loss(state["params"]), rel=1e-3)  # not the raw ones


def test_tensorboard_off_writes_no_event_files(tmp_path):
    workdir = tmp_path / "run"
    args = ("--config.logging.tensorboard=False", "--config.training.n_iters=5")
    result = lu.run(workdir, *args, devices=1)
    assert result.code == 0, result
    assert not (workdir / "tensorboard").exists()
    assert [r["step"] for r in lu.read_metrics(workdir)] == [5]


@pytest.mark.slow
def test_wandb_offline_run_writes_its_run_directory(tmp_path):
    pytest.importorskip("wandb")
    workdir = tmp_path / "run"
    args = ("--config.logging.wandb=True", "--config.training.n_iters=10")
    result = lu.run(workdir, *args, devices=1, WANDB_MODE="offline", WANDB_SILENT="true")
    assert result.code == 0, result
    ids = json.loads((workdir / "wandb_ids.json").read_text())
    (run_dir,) = (workdir / "wandb").glob(f"offline-run-*-{ids['train']}")
    (records,) = run_dir.glob(f"run-{ids['train']}.wandb")
    data = records.read_bytes()
    for key in (b"train/loss", b"train/learning_rate", b"train/grad_norm"):
        assert key in data, key  # the history rows W&B will sync


# -- progress bars -----------------------------------------------------------------------------


def run_on_a_terminal(workdir, *args) -> tuple[int, str]:
    """The launcher with its stdout and stderr on a pseudo-terminal, as a user sees it."""
    main, child = pty.openpty()
    # A terminal 120 columns wide (a new pty has 0: tqdm would draw an empty bar).
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(
        lu.command(workdir, *args, mode="sample", config=None),
        cwd=lu.REPO,
        env=lu.env(DEVICES),
        stdin=subprocess.DEVNULL,
        stdout=child,
        stderr=child,
    )
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(main)
    return proc.wait(timeout=120), out.decode(errors="replace")


@pytest.mark.slow
def test_sampling_shows_a_progress_bar_on_a_terminal_only(tmp_path_factory, tmp_path):
    reference, _ = lu.reference_run(tmp_path_factory)
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    n = "--config.sampling.num_samples=96"  # 3 shards of 32, two at a time on 2 devices
    code, text = run_on_a_terminal(workdir, n)
    assert code == 0, text
    # tqdm's bar: the count, the elapsed time, the ETA and the rate (shards per second,
    # or seconds per shard when slower).
    bar = r"sample: 100%\|[^|]*\| 3/3 \[\d\d:\d\d<00:00, +[\d.]+(shard/s|s/shard)\]"
    assert re.search(bar, text), text

    quiet_dir = tmp_path / "quiet"
    shutil.copytree(reference, quiet_dir)
    code, text = run_on_a_terminal(quiet_dir, n, "--log_level=warning")
    assert code == 0, text
    assert "sample:" not in text and " INFO " not in text, text
    assert "INFO wrote 96 samples" in lu.read_log(quiet_dir)  # log.txt keeps the info lines

    piped = lu.run(quiet_dir, n, mode="sample", config=None, devices=DEVICES)
    assert piped.code == 0, piped
    assert "wrote 96 samples" in piped.stderr and "%|" not in piped.stderr  # not a terminal
