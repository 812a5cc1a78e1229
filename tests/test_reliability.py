"""The fault scenarios of RELIABILITY.md, through the real launcher in subprocesses.

Every run is tests/configs/ci_tiny.py (20 updates of batch 8, a checkpoint
every 5) on 2 fake CPU devices, so the data-parallel path is the one under
test. Each test asserts the exit code, the message and what the work
directory holds. Runs that several tests read are made once per session
(`lu.once`): the uninterrupted reference run, the kill-during-save run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import chex
import jax
import jax.numpy as jnp
import launcher_util as lu
import numpy as np
import pytest

DEVICES = 2
STEPS = [5, 10, 15, 20]  # the reference run's committed checkpoints


def train(workdir, *args, **kw):
    return lu.run(workdir, *args, devices=DEVICES, **kw)


def committed(workdir) -> list[int]:
    """Committed steps, read from the directory (no manager, so nothing is cleaned up)."""
    root = workdir / "checkpoints"
    return sorted(
        int(n)
        for n in lu.checkpoint_entries(workdir)
        if n.isdigit() and (root / n / "COMMIT").exists()
    )


def final_metrics(workdir) -> dict:
    """The last metrics row without its timings (those differ between runs)."""
    row = lu.read_metrics(workdir)[-1]
    return {k: row[k] for k in ("step", "loss", "grad_norm")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(workdir, result, final state) of the uninterrupted run."""
    workdir, result = lu.reference_run(tmp_path_factory)
    return workdir, result, lu.restore(workdir)


def copy_of(workdir, tmp_path):
    dest = tmp_path / "run"
    shutil.copytree(workdir, dest)
    return dest


# -- B1: SIGKILL at a step, then the same command --------------------------------------------


def _random_kill_step() -> int:
    """A step off the checkpoint grid, drawn from a seeded RNG (it is 13)."""
    rng = np.random.default_rng(2024)
    while (k := int(rng.integers(11, 20))) % 5 == 0:
        pass
    return k


KILL_STEPS = [1, 10, _random_kill_step()]


@pytest.fixture(scope="module")
def kill_chain(tmp_path_factory):
    """One work directory killed at each of KILL_STEPS in turn, each time by a rerun of the
    same command, and then run to the end: 4 runs instead of 6 for three kill points.

    Stage i's run resumes from what stage i - 1's kill left, so every kill point
    is checked both for what it leaves and for the resume it leads to.
    """

    def make(workdir):
        runs = []
        for k in KILL_STEPS:
            result = train(workdir, DU_FAULT_KILL_AT_STEP=k)
            runs.append({"result": result, "entries": lu.checkpoint_entries(workdir)})
        return {"runs": runs, "final": train(workdir)}

    return lu.once(tmp_path_factory, "kill_chain", make)


@pytest.mark.slow
@pytest.mark.parametrize("stage", range(len(KILL_STEPS)), ids=[f"k={k}" for k in KILL_STEPS])
def test_b1_sigkill_then_rerun_resumes_bit_identically(stage, kill_chain, reference):
    workdir, chain = kill_chain
    kill_at, run = KILL_STEPS[stage], chain["runs"][stage]
    killed = run["result"]
    assert killed.code == -signal.SIGKILL, killed
    # The kill comes right after update k, before its checkpoint: k = 10 leaves only 5.
    left = [s for s in STEPS if s < kill_at]
    assert run["entries"] == sorted(map(str, left))
    assert f"saved checkpoint step {kill_at} " not in killed.stderr
    # The same command, run again, resumes from the newest committed step before k.
    rerun = chain["runs"][stage + 1]["result"] if stage + 1 < len(KILL_STEPS) else chain["final"]
    if left:
        assert f"Resuming from step {left[-1]} (" in rerun.stderr, rerun
    else:
        assert "WARNING No checkpoint found; starting from step 0" in rerun.stderr, rerun

    final = chain["final"]
    assert final.code == 0, final
    assert lu.checkpoint_entries(workdir) == sorted(map(str, STEPS))
    lu.assert_trees_equal(lu.restore(workdir), reference[2], "killed 3 times and resumed")
    assert final_metrics(workdir) == final_metrics(reference[0])


# -- B2, B3 and B20: SIGKILL inside a save, before and after its commit ---------------------------


@pytest.fixture(scope="module")
def killed_in_saves(tmp_path_factory):
    """keep=2. Run 1 dies saving step 10, before the commit; run 2 resumes, saves 10, and
    dies right after committing 15, before pruning; run 3 finishes. The checkpoint
    directory and log are recorded after each kill."""

    def make(workdir):
        stages = {}
        for name, fault in [
            ("before_commit", "before_commit:2"),
            ("after_commit", "after_commit_before_cleanup:2"),
        ]:
            result = train(workdir, KEEP_2, DU_FAULT_KILL_IN_SAVE=fault)
            stages[name] = {
                "result": result,
                "entries": lu.checkpoint_entries(workdir),
                "log": lu.read_log(workdir),
            }
        stages["final"] = {"result": train(workdir, KEEP_2)}
        return stages

    return lu.once(tmp_path_factory, "killed_in_saves", make)


KEEP_2 = "--config.training.keep=2"


@pytest.mark.slow
def test_b2_kill_before_commit_leaves_tmp_dir_that_restart_removes(killed_in_saves):
    _, stages = killed_in_saves
    killed = stages["before_commit"]["result"]
    assert killed.code == -signal.SIGKILL, killed
    assert "fault injection: SIGKILL in checkpoint save (before_commit)" in killed.stderr
    # Step 10 was written in full in its temporary directory, but never renamed into place.
    entries = stages["before_commit"]["entries"]
    (tmp,) = [n for n in entries if n != "5"]
    assert tmp.startswith("10.orbax-checkpoint-tmp"), entries  # orbax names it

    restarted = stages["after_commit"]["result"]
    assert f"WARNING removed incomplete checkpoint {tmp} (no commit marker)" in restarted.stderr
    assert "Resuming from step 5 (" in restarted.stderr


@pytest.mark.slow
def test_b3_kill_after_commit_keeps_keep_plus_one_then_prunes(killed_in_saves, reference):
    workdir, stages = killed_in_saves
    killed = stages["after_commit"]["result"]
    assert killed.code == -signal.SIGKILL, killed
    assert "fault injection: SIGKILL in checkpoint save (after_commit_before_cleanup)" in (
        killed.stderr
    )
    assert stages["after_commit"]["entries"] == ["10", "15", "5"]  # keep + 1: nothing lost

    final = stages["final"]["result"]
    assert final.code == 0, final
    assert "Resuming from step 15 (" in final.stderr
    for step in (5, 10):
        assert f"removed old checkpoint step {step} (keep=2)" in final.stderr
    assert lu.checkpoint_entries(workdir) == ["15", "20"]
    lu.assert_trees_equal(lu.restore(workdir), reference[2], "killed in two saves and resumed")


@pytest.mark.slow
def test_b20_log_is_appended_and_metrics_have_no_duplicate_steps(killed_in_saves, reference):
    workdir, stages = killed_in_saves
    first_run, log = stages["before_commit"]["log"], lu.read_log(workdir)
    assert log.startswith(stages["after_commit"]["log"]), "a restart truncated log.txt"
    assert stages["after_commit"]["log"].startswith(first_run), "a restart truncated log.txt"
    markers = re.findall(r"^=== train (started|resumed at step \d+) \(run id \w+", log, re.M)
    assert markers == ["started", "resumed at step 5", "resumed at step 15"]
    # Run 1 logged step 10 before dying in its save; run 2 logged it again.
    assert first_run.count("INFO step 10: loss") == 1 and log.count("INFO step 10: loss") == 2
    # Run 1's metrics line for step 10 was dropped on resume and written again, the same.
    resumed = stages["after_commit"]["result"].stderr
    assert "Resuming from step 5 (dropped 1 metric lines past it)" in resumed
    assert "Resuming from step 15 (dropped 0 metric lines" in stages["final"]["result"].stderr
    rows = lu.read_metrics(workdir)
    assert [r["step"] for r in rows] == STEPS
    ref_rows = lu.read_metrics(reference[0])
    assert [(r["loss"], r["grad_norm"]) for r in rows] == [
        (r["loss"], r["grad_norm"]) for r in ref_rows
    ]


# -- B4: SIGTERM -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_b4_sigterm_saves_current_step_exits_75_and_resumes(reference, tmp_path):
    workdir, stderr = tmp_path / "run", tmp_path / "stderr.txt"
    # 0.5 s after each update: SIGTERM lands mid-run even on a loaded machine (steps 6 to 19).
    proc = lu.start(workdir, stderr_path=stderr, devices=DEVICES, DU_FAULT_STEP_SLEEP=0.5)
    lu.wait_for_text(stderr, "saved checkpoint step 5 ", proc)
    time.sleep(0.25)  # into step 6's 0.5 s, past step 5's pre-emption check (even when loaded)
    proc.send_signal(signal.SIGTERM)
    lu.wait_for_text(stderr, "SIGTERM received", proc)
    proc.send_signal(signal.SIGTERM)  # a second notice, before the job is done, changes nothing
    assert proc.wait(timeout=120) == 75, stderr.read_text()
    text = stderr.read_text()
    (k,) = map(int, re.findall(r"WARNING Pre-empted at step (\d+); checkpoint saved", text))
    assert 5 < k < 20
    # The step it stopped at was saved, on the checkpoint grid or not.
    assert committed(workdir) == sorted({s for s in STEPS if s < k} | {k})
    assert text.count("SIGTERM received") == 1

    resumed = train(workdir)
    assert resumed.code == 0, resumed
    assert f"Resuming from step {k} (dropped 0 metric lines past it)" in resumed.stderr
    assert committed(workdir) == sorted(set(STEPS) | {k})
    lu.assert_trees_equal(lu.restore(workdir), reference[2], f"pre-empted at {k}")


# -- B5: a failed checkpoint write -----------------------------------------------------------------


@pytest.mark.slow
def test_b5_disk_full_exits_5_and_previous_checkpoint_still_samples(tmp_path):
    workdir = tmp_path / "run"
    failed = train(workdir, DU_FAULT_SAVE_ERROR="ENOSPC:2")
    assert failed.code == 5, failed
    assert "No space left on device" in failed.stderr
    assert f"could not write checkpoint step 10 to {workdir}/checkpoints/10" in failed.stderr
    assert "latest committed step: 5" in failed.stderr
    assert lu.checkpoint_entries(workdir) == ["5"]  # no partial directory left behind

    sampled = lu.run(workdir, "--checkpoint=latest", mode="sample", config=None, devices=DEVICES)
    assert sampled.code == 0, sampled
    with np.load(workdir / "samples" / "step_5" / "samples.npz") as f:
        assert f["samples"].shape == (64, 2) and np.isfinite(f["samples"]).all()


# -- B7, B8: non-finite loss -----------------------------------------------------------------------


def test_b7_nan_loss_exits_3_naming_step_and_keeps_good_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    result = train(workdir, DU_FAULT_NAN_AT_STEP=7)
    assert result.code == 3, result
    assert (
        "non-finite loss=nan at step 7; no checkpoint was written at or after it. "
        "The last good checkpoint is step 5." in result.stderr
    )
    assert "Rerun with --debug_nans" in result.stderr
    assert lu.checkpoint_entries(workdir) == ["5"]
    assert [r["step"] for r in lu.read_metrics(workdir)] == [5]
    state = lu.restore(workdir)
    assert int(state["step"]) == 5
    chex.assert_tree_all_finite({k: v for k, v in state.items() if k != "key"})


def test_b8_skip_nonfinite_leaves_state_unchanged_and_gives_up_after_n(tmp_path):
    """NaN losses at 7 and 8 are skipped; three in a row (11, 12, 13) stop the run."""
    workdir = tmp_path / "run"
    args = ("--config.optim.skip_nonfinite=3", "--config.training.checkpoint_freq=2")
    result = train(workdir, *args, "--config.training.keep=10", DU_FAULT_NAN_AT_STEP="7,8,11,12,13")
    assert result.code == 3, result
    for step, in_a_row in [(7, 1), (8, 2), (11, 1), (12, 2), (13, 3)]:
        assert (
            f"skipped 1 non-finite update(s) in steps {step}-{step} (first at step {step}: "
            f"loss=nan); {in_a_row} in a row now (limit 3)" in result.stderr
        )
    assert (
        "3 consecutive non-finite updates (optim.skip_nonfinite=3) at step 13; no checkpoint "
        "was written at or after it. The last good checkpoint is step 12." in result.stderr
    )
    assert committed(workdir) == [2, 4, 6, 8, 10, 12]
    # The metrics average the applied updates only, and count the skipped ones.
    records = lu.read_metrics(workdir)
    assert [r["step"] for r in records] == [5, 10], records
    assert "skipped_updates" not in records[0] and records[1]["skipped_updates"] == 2
    assert all(math.isfinite(r["loss"]) for r in records), records
    at_6, at_8 = lu.restore(workdir, 6), lu.restore(workdir, 8)
    assert int(at_6["step"]) == 6 and int(at_8["step"]) == 8
    kept = lambda state: {k: state[k] for k in ("params", "ema_params", "opt_state")}
    lu.assert_trees_equal(kept(at_8), kept(at_6), "the state after two skipped updates")
    chex.assert_tree_all_finite(kept(lu.restore(workdir, 12)))


# -- B9 to B12, B18: bad config, before anything is written ----------------------------------------


def assert_jax_never_imported(result) -> None:
    """For runs under `python -X importtime`: the launcher stopped before importing JAX."""
    imported = re.findall(r"^import time:.*\| +(\S+)$", result.stderr, re.M)
    assert "diffusers_unified.experiment.cli" in [m.strip() for m in imported], result
    assert "jax" not in [m.strip() for m in imported], "JAX was imported before the config check"


def assert_untouched(workdir, before=None):
    if before is None:
        assert not workdir.exists(), f"{workdir} was created: {os.listdir(workdir)}"
    else:
        assert {p.name: p.read_bytes() for p in workdir.iterdir()} == before


def test_b9_override_typo_exits_2_with_suggestion_and_writes_nothing(tmp_path):
    message = "Unknown config key 'training.snaphot_freq'. Did you mean 'training.snapshot_freq'?"
    fresh = tmp_path / "fresh"
    result = train(fresh, "--config.training.snaphot_freq=5", python_args=("-X", "importtime"))
    assert result.code == 2, result
    assert message in result.stderr
    assert_jax_never_imported(result)
    assert_untouched(fresh)

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep me")
    result = train(existing, "--config.training.snaphot_freq=5")
    assert result.code == 2 and message in result.stderr, result
    assert_untouched(existing, {"notes.txt": b"keep me"})


def test_b10_config_file_typo_names_file_key_and_suggestion(tmp_path):
    config = tmp_path / "typo.py"
    config.write_text(
        textwrap.dedent(
            f"""
            import importlib.util

            spec = importlib.util.spec_from_file_location("ci_tiny", {str(lu.CI_TINY)!r})
            ci_tiny = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(ci_tiny)


            def get_config():
                config = ci_tiny.get_config()
                config.model.ema_rte = 0.99
                return config
            """
        )
    )
    workdir = tmp_path / "run"
    result = train(workdir, config=config)
    assert result.code == 2, result
    assert (
        f"Unknown config key 'model.ema_rte' in {config}. Did you mean 'model.ema_rate'?"
        in result.stderr
    )
    assert_untouched(workdir)


@pytest.mark.parametrize(
    "value, message",
    [
        ('"64"', 'flag --config.training.batch_size="64": invalid literal for int()'),
        ("-8", "training.batch_size=-8 must be a positive integer"),
        (
            "7",
            "training.batch_size=7 must be divisible by device count 2 (per-device batch would "
            "be 3.5)",
        ),
    ],
    ids=["string", "negative", "indivisible"],
)
def test_b11_bad_value_exits_2_naming_key_constraint_and_value(value, message, tmp_path):
    workdir = tmp_path / "run"
    result = train(workdir, f"--config.training.batch_size={value}")
    assert result.code == 2, result
    assert message in result.stderr
    assert_untouched(workdir)


def test_b12_inconsistent_frequencies_exit_2_even_under_python_O(tmp_path):
    workdir = tmp_path / "run"
    args = ("--config.training.n_jitted_steps=5", "--config.training.snapshot_freq=7")
    result = train(workdir, *args, python_args=("-O", "-X", "importtime"))
    assert result.code == 2, result
    assert (
        "training.snapshot_freq=7 must be a multiple of training.n_jitted_steps=5" in result.stderr
    )
    assert_jax_never_imported(result)
    assert_untouched(workdir)


@pytest.mark.parametrize("keep", ["0", "-1"])
def test_b18_keep_below_one_is_rejected_at_config_time(keep, tmp_path):
    workdir = tmp_path / "run"
    result = train(workdir, f"--config.training.keep={keep}")
    assert result.code == 2, result
    assert f"training.keep={keep} must be a positive integer" in result.stderr
    assert_untouched(workdir)


def test_sample_overrides_apply_to_the_work_directorys_config(reference, tmp_path):
    """`--mode=sample --workdir=W --config.a.b=v` without --config: W's config.json, overridden."""
    workdir = copy_of(reference[0], tmp_path)
    saved = (workdir / "config.json").read_text()
    args = ("--config.sampling.method=ode", "--config.sampling.ode_method=rk4")
    result = lu.run(workdir, *args, "--config.sampling.num_steps=5", mode="sample", config=None)
    assert result.code == 0, result
    # 5 grid points: 4 RK4 steps of 4 evaluations, and the final denoising step
    assert "samples of ode (rk4) (NFE 17 each)" in result.stderr
    assert (workdir / "config.json").read_text() == saved  # the overrides are not saved
    typo = lu.run(workdir, "--config.sampling.methd=ode", mode="sample", config=None)
    assert typo.code == 2 and "Did you mean 'sampling.method'?" in typo.stderr, typo
    wrong = lu.run(workdir, "--config.sampling.num_steps=2.5", mode="sample", config=None)
    assert wrong.code == 2 and "sampling.num_steps='2.5' is not a int" in wrong.stderr, wrong


def test_a_work_directory_checkpoint_opens_with_plain_orbax(reference):
    """The checkpoints are orbax's own: orbax alone reads the newest one, without this package."""
    import orbax.checkpoint as ocp

    workdir, _, state = reference
    manager = ocp.CheckpointManager(workdir / "checkpoints", item_names=("state", "metadata"))
    step = manager.latest_step()
    restored = manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.PyTreeRestore(), metadata=ocp.args.JsonRestore()),
    )
    manager.close()
    assert step == 20 and restored.metadata == {"step": 20}
    chex.assert_trees_all_equal(lu.leaves(restored.state), lu.leaves(state))


def test_b18_keep_policy_is_numeric_across_restarts(tmp_path):
    """Unit test of the manager: no training. test_checkpoints.py covers one manager's keep;
    here the steps come from three "runs" (managers) and the names sort differently as text."""
    from diffusers_unified.training.checkpoints import CheckpointManager

    state = lambda step: {"w": jnp.full((2,), float(step))}
    for steps in ([5, 10, 95], [100, 995], [1000, 9000, 10000]):
        manager = CheckpointManager(tmp_path, keep=2)
        assert manager.all_steps() == sorted(manager.all_steps())
        for step in steps:
            manager.save(step, state(step))
        manager.close()
    (tmp_path / "10000.orbax-checkpoint-tmp").mkdir()  # a dead save's leftover is never a step
    manager = CheckpointManager(tmp_path, keep=2)
    assert manager.all_steps() == [9000, 10000]
    assert manager.latest_step() == 10000
    restored, _ = manager.restore()
    np.testing.assert_array_equal(restored["w"], [10000.0, 10000.0])
    assert sorted(os.listdir(tmp_path)) == ["10000", "9000"]


# -- B13, B14: bad data ----------------------------------------------------------------------------

TINY_UNET = (
    "--config.data.dataset=npz",
    "--config.data.num_test=8",
    "--config.model.name=unet",
    "--config.model.nf=8",
    "--config.model.ch_mult=(1,)",
    "--config.model.num_res_blocks=1",
    "--config.model.attn_resolutions=()",
)


def train_on(tmp_path, name, x):
    path = tmp_path / f"{name}.npz"
    np.savez(path, x=x)
    workdir = tmp_path / "run"
    return workdir, train(workdir, *TINY_UNET, f"--config.data.path={path}")


def test_b13_wrong_image_shape_exits_4_naming_both_shapes(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    workdir, result = train_on(tmp_path, "big_rgb", x)
    assert result.code == 4, result
    assert (
        "dataset 'big_rgb' yields images of shape (B, 32, 32, 3); config expects (B, 8, 8, 1) "
        "from data.image_size=8, data.num_channels=1" in result.stderr
    )
    assert_untouched(workdir)


@pytest.mark.parametrize("fault", ["raw_pixels", "nan"])
def test_b14_bad_values_exit_4_naming_range_or_example(fault, tmp_path):
    x = np.random.default_rng(0).uniform(0, 1, (40, 8, 8, 1)).astype(np.float32)
    if fault == "raw_pixels":
        x *= 255  # 0..255 floats where [0, 1] is expected
        expected = re.compile(
            r"float images have dtype float32, min [\d.]+, max 25\d\.\d+; expected values in "
            r"\[0, 1\] \(float_range; data.centered then sets the model's range"
        )
    else:
        x[17, 3, 3, 0] = np.nan
        expected = re.compile(r"non-finite values \(NaN or inf\) in 1 example\(s\), .*index 17")
    workdir, result = train_on(tmp_path, fault, x)
    assert result.code == 4, result
    assert expected.search(result.stderr), result
    assert_untouched(workdir)


# -- B15: no checkpoint where one is required ------------------------------------------------------


def test_b15_resume_required_without_checkpoint_exits_5(tmp_path):
    workdir = tmp_path / "typo"
    result = train(workdir, "--resume=required")
    assert result.code == 5, result
    assert (
        f"no committed checkpoint found in {workdir}/checkpoints; refusing to start from "
        "scratch because --resume=required" in result.stderr
    )
    assert_untouched(workdir)


@pytest.mark.parametrize("mode", ["sample", "eval"])
def test_b15_sample_or_eval_without_checkpoint_exits_5(mode, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    result = lu.run(workdir, mode=mode, devices=DEVICES)
    assert result.code == 5, result
    assert (
        f"no committed checkpoint found in {workdir}/checkpoints: sampling and evaluation need a "
        "trained model" in result.stderr
    )
    assert_untouched(workdir, {})


def test_b15_fresh_start_warns(reference):
    assert "WARNING No checkpoint found; starting from step 0" in reference[1].stderr


# -- B16: resuming with a changed config -----------------------------------------------------------


@pytest.mark.slow
def test_b16_changed_config_exits_5_with_diff_unless_allowed(reference, tmp_path):
    workdir = copy_of(reference[0], tmp_path)
    saved = (workdir / "config.json").read_text()
    wider = "--config.model.hidden=(64,64)"

    result = train(workdir, wider, "--config.seed=1")
    assert result.code == 5, result
    assert "  model.hidden: (32, 32) -> (64, 64)\n  seed: 42 -> 1\n" in result.stderr
    assert "pass --allow_config_change to resume anyway" in result.stderr

    # Allowed, the change still cannot load: the restore names the parameter and both shapes.
    result = train(workdir, wider, "--allow_config_change")
    assert result.code == 5, result
    assert (
        f"checkpoint step 20 in {workdir}/checkpoints does not match the target: at "
        "'params/hidden_1/bias' expected shape (64,) (target), found (32,); at "
        "'params/hidden_1/kernel' expected shape (64, 64) (target), found (32, 32);"
    ) in result.stderr
    # Nothing changed: the saved config is replaced only once a checkpoint fits the new one.
    assert (workdir / "config.json").read_text() == saved
    assert lu.checkpoint_entries(workdir) == sorted(map(str, STEPS))


# -- B17: a corrupt committed checkpoint -----------------------------------------------------------


@pytest.mark.slow
def test_b17_corrupt_checkpoint_exits_5_or_falls_back(reference, tmp_path):
    workdir = copy_of(reference[0], tmp_path)
    step_dir = workdir / "checkpoints" / "20"
    victim = max(
        (p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"),
        key=lambda p: p.stat().st_size,
    )
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    rel = victim.relative_to(step_dir).as_posix()

    result = train(workdir)
    assert result.code == 5, result
    assert (
        f"checkpoint step 20 in {workdir}/checkpoints is corrupt: file '{rel}' has "
        in result.stderr
    )
    assert "The previous committed step is 15" in result.stderr
    assert "--on_corrupt=fallback" in result.stderr
    assert committed(workdir) == STEPS  # nothing moved without being asked

    result = train(workdir, "--on_corrupt=fallback")
    assert result.code == 0, result
    assert "ERROR checkpoint step 20 in" in result.stderr and "falling back" in result.stderr
    assert "Resuming from step 15 (" in result.stderr
    assert sorted(os.listdir(workdir / "checkpoints" / "corrupt")) == ["20"]
    assert committed(workdir) == STEPS
    lu.assert_trees_equal(lu.restore(workdir), reference[2], "resumed after the corrupt step")


# -- B22: 1 device against 2 -----------------------------------------------------------------------


@pytest.mark.slow
def test_b22_one_and_two_devices_agree(reference, tmp_path_factory):
    workdir, result = lu.once(tmp_path_factory, "one_device", lambda wd: lu.run(wd, devices=1))
    assert result.code == 0, result
    one, two = lu.restore(workdir), reference[2]
    # Not bitwise: the two devices' partial gradient sums are added in another order.
    lu.assert_trees_close(one, two, rtol=1e-5, atol=1e-7, what="1 vs 2 devices")


def test_b22_devices_draw_different_noise(tmp_path):
    """Each device's share of the batch gets its own noise, the same as on one device.

    Eight copies of one example, four per device: if the devices drew the same
    noise, examples i and i + 4 would get the same loss.
    """
    code = textwrap.dedent(
        f"""
        import json
        import jax
        import numpy as np
        from diffusers_unified.experiment import config as config_lib
        from diffusers_unified.experiment.run import build_run

        run = build_run(config_lib.load_module({str(lu.CI_TINY)!r}).get_config())
        params = run.init_state().params
        x = np.repeat(run.dataset.model_data("train")[0][:1], 8, axis=0)
        loss = jax.jit(lambda p, k, b: run.loss_fn(p, k, b)[1]["per_example"])
        key = jax.random.PRNGKey(3)
        sharded = loss(params, key, {{"x": jax.device_put(x, run.batch_sharding), "y": None}})
        single = loss(params, key, {{"x": jax.device_put(x, jax.devices()[0]), "y": None}})
        shards = [np.asarray(s.data).tolist() for s in sharded.addressable_shards]
        print(json.dumps({{"shards": shards, "single": np.asarray(single).tolist()}}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=lu.env(devices=2),
        cwd=lu.REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    first, second = out["shards"]
    assert len(first) == len(second) == 4
    assert not np.allclose(first, second)
    np.testing.assert_allclose(first + second, out["single"], rtol=1e-5)


# -- B23: one compilation --------------------------------------------------------------------------


def test_b23_train_step_compiles_once_across_epochs(reference):
    from diffusers_unified.experiment import config as config_lib

    config = config_lib.load_module(str(lu.CI_TINY)).get_config()
    t = config.training
    assert t.n_iters * t.batch_size > 2 * config.data.num_train  # two epoch boundaries
    assert config.data.num_train % t.batch_size  # one batch straddles two epochs
    assert "training finished at step 20; the train step compiled 1 time(s)" in reference[1].stderr


# -- B6: free space, checked before step 0 ---------------------------------------------------------

# The child's shutil.disk_usage reports FREE bytes (a sitecustomize module, imported at
# interpreter start), so the launcher's real pre-flight code runs against a "full" disk.
FREE = 12_345
SITECUSTOMIZE = f"""
import collections
import shutil

_usage = collections.namedtuple("usage", "total used free")
shutil.disk_usage = lambda path: _usage(10**12, 10**12 - {FREE}, {FREE})
"""


def ci_tiny_parameter_count() -> int:
    from diffusers_unified.experiment import config as config_lib
    from diffusers_unified.experiment.run import build_run

    run = build_run(config_lib.load_module(str(lu.CI_TINY)).get_config())
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(run.init_state().params))


def test_b6_too_little_free_space_warns_or_fails_under_strict_disk(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    pythonpath = f"{site}{os.pathsep}{lu.REPO}"
    short = "--config.training.n_iters=5"

    strict = tmp_path / "strict"
    result = train(strict, short, "--strict_disk", PYTHONPATH=pythonpath)
    assert result.code == 5, result
    found = re.search(
        r"not enough free disk space for checkpoints: 5 \+ 1 checkpoints of (\d+) bytes need "
        rf"(\d+) bytes in {strict}/checkpoints, but only {FREE} bytes are available",
        result.stderr,
    )
    assert found, result
    per, need = map(int, found.groups())
    # Parameters, their EMA and Adam's two slots, float32: 16 bytes per parameter, plus the
    # step, key and optimiser counters (a few scalars).
    params = ci_tiny_parameter_count()
    assert 16 * params <= per <= 16 * params + 64, (per, params)
    assert need == 6 * per  # keep + 1: a new checkpoint is committed before the oldest goes
    assert_untouched(strict)  # checked before the work directory is created

    warned = tmp_path / "warned"
    result = train(warned, short, PYTHONPATH=pythonpath)
    assert result.code == 0, result
    message = found.group(0).replace(str(strict), str(warned))
    assert f"WARNING {message} (--strict_disk makes this an error)" in result.stderr
    assert committed(warned) == [5]


# -- B19: two processes on one work directory ------------------------------------------------------


@pytest.mark.slow
def test_b19_second_process_exits_2_and_a_dead_holders_lock_is_broken(tmp_path):
    workdir, stderr = tmp_path / "run", tmp_path / "a.txt"
    # Run A takes the lock and then sleeps (the fault hook) until the test kills it.
    a = lu.start(workdir, stderr_path=stderr, devices=DEVICES, DU_FAULT_HOLD_LOCK=300)
    try:
        lu.wait_for_text(stderr, f"took the lock {workdir}/.lock", a)
        holder = json.loads((workdir / ".lock").read_text())
        assert holder["pid"] == a.pid and holder["host"] == socket.gethostname()

        b = train(workdir)
        assert b.code == 2, b
        assert (
            f"workdir is locked by pid {a.pid} on host {holder['host']} since "
            f"{holder['since']} (lockfile {workdir}/.lock); use --force_unlock if that "
            "process is dead" in b.stderr
        )
        assert a.poll() is None and json.loads((workdir / ".lock").read_text()) == holder
        assert not (workdir / "checkpoints").exists() and not (workdir / "log.txt").exists()
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait()

    # A died holding the lock: C finds its pid gone on this host, breaks it and trains.
    c = train(workdir)
    assert c.code == 0, c
    assert (
        f"WARNING breaking the stale lock of pid {a.pid} on host {holder['host']} since "
        f"{holder['since']} (lockfile {workdir}/.lock): its process is gone" in c.stderr
    )
    assert committed(workdir) == STEPS
    assert not (workdir / ".lock").exists()  # released at the end of the run


def test_b19_lock_of_another_host_needs_force_unlock(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    lock = {"pid": 1, "host": "elsewhere", "since": "2024-01-02 03:04:05", "token": "x"}
    (workdir / ".lock").write_text(json.dumps(lock))
    short = "--config.training.n_iters=5"
    # pid 1 may well be dead there: on another host that cannot be known, so it is no stale lock
    result = train(workdir, short)
    assert result.code == 2, result
    assert "workdir is locked by pid 1 on host elsewhere since 2024-01-02 03:04:05" in result.stderr
    assert sorted(os.listdir(workdir)) == [".lock"]

    result = train(workdir, short, "--force_unlock")
    assert result.code == 0, result
    assert (
        "WARNING breaking the stale lock of pid 1 on host elsewhere since 2024-01-02 03:04:05 "
        f"(lockfile {workdir}/.lock): --force_unlock" in result.stderr
    )
    assert committed(workdir) == [5] and not (workdir / ".lock").exists()


# -- B24: eval over a range of checkpoints, missing or late ones -----------------------------------


def evaluate(workdir, *args, **env_vars):
    return lu.run(workdir, *args, mode="eval", config=None, devices=DEVICES, **env_vars)


@pytest.mark.slow
def test_b24_eval_of_a_range_resumes_without_rescoring_after_a_kill(reference, tmp_path):
    workdir = copy_of(reference[0], tmp_path)
    # ci_tiny evaluates 64 samples in 2 shards of 32, one per device: the 5th shard written
    # is step 15's first, so the kill leaves steps 5 and 10 scored and step 15 half drawn.
    killed = evaluate(workdir, "--checkpoint=5:20", DU_FAULT_KILL_AFTER_SAMPLE_SHARDS=5)
    assert killed.code == -signal.SIGKILL, killed
    scored = {s: workdir / "eval" / f"step_{s}.json" for s in STEPS}
    assert [s for s, p in scored.items() if p.exists()] == [5, 10]
    before = {s: (scored[s].read_bytes(), scored[s].stat().st_mtime_ns) for s in (5, 10)}

    resumed = evaluate(workdir, "--checkpoint=5:20")
    assert resumed.code == 0, resumed
    for step in (5, 10):
        assert f"checkpoint {step} already evaluated ({scored[step]}); skipped" in resumed.stderr
        assert (scored[step].read_bytes(), scored[step].stat().st_mtime_ns) == before[step]
    assert resumed.stderr.count("1 of 2 sample shards reused") == 1  # step 15's first shard
    assert resumed.stderr.count("eval at step") == 2
    for step in STEPS:
        assert json.loads(scored[step].read_text())["step"] == step
    assert not (workdir / "eval" / ".lock").exists()
    # Each checkpoint's metrics reach TensorBoard once: the rerun logs only what it scored.
    loader = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")
    logged = [
        event.step
        for path in sorted((workdir / "tensorboard" / "eval").iterdir())
        for event in loader.EventFileLoader(str(path)).Load()
        for value in event.summary.value
        if value.tag == "eval/sliced_wasserstein"
    ]
    assert logged == STEPS


def test_b24_missing_checkpoint_exits_5_at_once_or_after_waiting(reference, tmp_path):
    workdir = copy_of(reference[0], tmp_path)
    result = evaluate(workdir, "--checkpoint=12")
    assert result.code == 5, result
    assert (
        f"checkpoint 12 does not exist in {workdir}/checkpoints (committed steps: 5, 10, 15, "
        "20); pass --wait_for_checkpoints=SECONDS" in result.stderr
    )
    result = evaluate(workdir, "--checkpoint=12", "--wait_for_checkpoints=2")
    assert result.code == 5, result
    assert f"checkpoint 12 did not appear within 2 s (waited for it in {workdir}/checkpoints" in (
        result.stderr
    )
    assert not (workdir / "eval").exists()  # nothing was evaluated, nothing written


def test_b24_checkpoint_selection_and_waiting_without_the_launcher():
    """`--checkpoint` parsed, and the polling of a directory whose steps appear late."""
    from diffusers_unified.errors import CheckpointError, ConfigError
    from diffusers_unified.experiment.selection import Selection, steps_to_evaluate

    assert Selection.parse("latest", 20) == Selection(latest=True)
    assert Selection.parse("10", 20) == Selection(10, 10, single=True)
    assert Selection.parse("5:15", 20) == Selection(5, 15)
    assert Selection.parse("5:", 20) == Selection(5, 20)  # up to training.n_iters
    assert Selection.parse(":15", 20) == Selection(0, 15)
    assert Selection.parse("all", 20) == Selection()
    for bad in ("15:5", "x", "-3", "1:2:3"):
        with pytest.raises(ConfigError, match="expected 'latest', a step, a range"):
            Selection.parse(bad, 20)

    class Appearing:
        """Committed steps that show up one per listing after the first `ready` listings."""

        directory = "ckpts"

        def __init__(self, steps, ready):
            self.steps, self.ready, self.calls = steps, ready, 0

        def all_steps(self):
            self.calls += 1
            return self.steps[: max(self.ready, self.calls - 1)]

    found = list(steps_to_evaluate(Appearing([5, 10, 15, 20], 2), Selection(10, 20), wait=2))
    assert found == [10, 15, 20]  # 5 is outside the range; 15 and 20 were waited for
    assert list(steps_to_evaluate(Appearing([5, 10], 2), Selection(), wait=0)) == [5, 10]
    with pytest.raises(CheckpointError, match="checkpoint 20 does not exist in ckpts"):
        next(steps_to_evaluate(Appearing([5, 10], 2), Selection(5, 20), wait=0))
    start = time.monotonic()
    late = steps_to_evaluate(Appearing([5], 1), Selection(5, 20), wait=0.3)
    assert next(late) == 5
    with pytest.raises(CheckpointError, match="checkpoint 20 did not appear within 0.3 s"):
        next(late)
    assert 0.3 <= time.monotonic() - start < 5


@pytest.mark.slow
def test_b24_eval_waits_for_a_late_checkpoint(reference, tmp_path):
    workdir = copy_of(reference[0], tmp_path)
    late = tmp_path / "20"
    os.rename(workdir / "checkpoints" / "20", late)  # as if training had not written it yet
    stderr = tmp_path / "eval.txt"
    args = ("--checkpoint=15:20", "--wait_for_checkpoints=120")
    proc = lu.start(workdir, *args, stderr_path=stderr, mode="eval", config=None, devices=DEVICES)
    lu.wait_for_text(stderr, "waiting up to 120 s for checkpoint 20 to appear", proc)
    assert (workdir / "eval" / "step_15.json").exists()  # the one there was done meanwhile
    os.rename(late, workdir / "checkpoints" / "20")  # committed: it appears whole
    assert proc.wait(timeout=120) == 0, stderr.read_text()
    assert json.loads((workdir / "eval" / "step_20.json").read_text())["step"] == 20


# -- B25: sample mode, killed and rerun ------------------------------------------------------------


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_b25_sample_killed_after_2_of_4_shards_reruns_to_identical_files(reference, tmp_path):
    n = "--config.sampling.num_samples=128"  # 4 shards of sampling.batch_size=32
    whole = copy_of(reference[0], tmp_path / "whole")
    result = lu.run(whole, n, mode="sample", config=None, devices=DEVICES)
    assert result.code == 0, result

    workdir = copy_of(reference[0], tmp_path / "killed")
    args = dict(mode="sample", config=None, devices=DEVICES)
    killed = lu.run(workdir, n, DU_FAULT_KILL_AFTER_SAMPLE_SHARDS=2, **args)
    assert killed.code == -signal.SIGKILL, killed
    out = workdir / "samples" / "step_20"
    (shard_dir,) = (out / "shards").iterdir()
    assert sorted(p.name for p in shard_dir.iterdir()) == ["shard_00000.npz", "shard_00001.npz"]
    assert not (out / "samples.npz").exists()

    rerun = lu.run(workdir, n, **args)
    assert rerun.code == 0, rerun
    assert "2 of 4 sample shards reused" in rerun.stderr
    names = [f"shard_{i:05d}.npz" for i in range(4)]
    assert sorted(p.name for p in shard_dir.iterdir()) == names  # no temporary files left
    reference_out = whole / "samples" / "step_20"
    for name in names:
        assert sha256(shard_dir / name) == sha256(reference_out / "shards" / shard_dir.name / name)
    with np.load(out / "samples.npz") as f, np.load(reference_out / "samples.npz") as g:
        assert f["samples"].shape == (128, 2)
        np.testing.assert_array_equal(f["samples"], g["samples"])  # bit for bit
    assert sha256(out / "samples.npz") == sha256(reference_out / "samples.npz")
