"""The checkpoint commit protocol against RELIABILITY.md promises 1, 2, 5, 8, 9, 10.

Scenarios B2 (kill before commit), B3 (kill after commit, before pruning), B5
(disk full), B17 (corrupt step), B18 (numeric keep policy) and B21 (async
errors surface) at the level of the manager, on tiny pytrees.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusers_unified import faults
from diffusers_unified.errors import CheckpointError
from diffusers_unified.training.checkpoints import CheckpointManager, estimate_checkpoint_bytes


@pytest.fixture(autouse=True)
def _no_faults(monkeypatch):
    """Each test starts with no fault hooks set and the process save counter at 0."""
    monkeypatch.delenv(faults.KILL_IN_SAVE, raising=False)
    monkeypatch.delenv(faults.SAVE_ERROR, raising=False)
    faults.reset_save_count()


def small_state(step: int = 0, width: int = 4):
    params = {
        "dense": {"w": jnp.arange(3 * width, dtype=jnp.float32).reshape(3, width) + step},
        "b": jnp.full((width,), 0.5, dtype=jnp.bfloat16),
    }
    return {
        "step": jnp.asarray(step, jnp.int32),
        "params": params,
        "ema_params": jax.tree.map(lambda x: x * 0.5, params),
        "opt_state": optax.adam(1e-3).init(params),
        "rng": jax.random.key_data(jax.random.PRNGKey(step)),
    }


def dir_names(path) -> list[str]:
    return sorted(os.listdir(path))


def run_child(directory, steps, env_updates, keep=2):
    """Save `steps` in a fresh interpreter with the given fault env vars; return the process."""
    code = textwrap.dedent(
        f"""
        import jax.numpy as jnp
        from diffusers_unified.training.checkpoints import CheckpointManager
        mgr = CheckpointManager({str(directory)!r}, keep={keep})
        for step in {list(steps)!r}:
            mgr.save(step, {{"w": jnp.full((3,), float(step))}}, metadata={{"step": step}})
        print("finished without being killed")
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DU_FAULT_")}
    env.update(env_updates)
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


# ------------------------------------------------------------------ round trip


def test_round_trip_with_target_keeps_structure_dtypes_and_values(tmp_path):
    mgr = CheckpointManager(tmp_path / "ckpt")
    state = small_state(step=7)
    state["typed_key"] = jax.random.key(3)
    state["host_step"] = 7  # a Python int leaf
    mgr.save(7, state, metadata={"config_hash": "abc123", "loss": 0.25})

    target = jax.tree.map(jnp.zeros_like, small_state(step=0))
    target["typed_key"] = jax.random.key(0)
    target["host_step"] = 0
    restored, metadata = mgr.restore(target=target)

    assert metadata == {"config_hash": "abc123", "loss": 0.25}
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
    assert restored["host_step"] == 7 and isinstance(restored["host_step"], int)
    assert restored["params"]["b"].dtype == jnp.bfloat16
    assert restored["rng"].dtype == jnp.uint32
    np.testing.assert_array_equal(
        jax.random.key_data(restored["typed_key"]), jax.random.key_data(state["typed_key"])
    )
    del restored["typed_key"], state["typed_key"]
    chex.assert_trees_all_equal(restored, state, strict=True)


def test_restore_without_target_gives_nested_numpy_dicts(tmp_path):
    mgr = CheckpointManager(tmp_path)
    state = small_state(step=3)
    state["typed_key"] = jax.random.key(5)
    mgr.save(3, state)
    raw, metadata = mgr.restore(3)
    assert metadata == {}
    assert isinstance(raw["params"]["dense"]["w"], np.ndarray)
    np.testing.assert_array_equal(raw["params"]["dense"]["w"], state["params"]["dense"]["w"])
    # optax's tuple of NamedTuples becomes dicts keyed by index and field name.
    np.testing.assert_array_equal(raw["opt_state"]["0"]["count"], 0)
    assert int(raw["step"]) == 3 and raw["step"].dtype == np.int32
    np.testing.assert_array_equal(
        jax.random.key_data(raw["typed_key"]), jax.random.key_data(state["typed_key"])
    )


def test_layout_of_a_committed_step(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(12, small_state(), metadata={"a": 1})
    assert dir_names(tmp_path) == ["12"]
    step_dir = tmp_path / "12"
    assert {"COMMIT", "metadata", "state"} <= set(os.listdir(step_dir))
    assert mgr.read_metadata() == {"a": 1}


def test_estimate_checkpoint_bytes_counts_array_data():
    state = {"a": jnp.zeros((10, 10), jnp.float32), "k": jax.random.key(0), "n": np.int64(1)}
    assert estimate_checkpoint_bytes(state) == 400 + 8 + 8
    # Abstract leaves work too (jax canonicalises int64 to int32 without x64).
    abstract = jax.eval_shape(lambda: state)
    assert estimate_checkpoint_bytes(abstract) == 400 + 8 + 4


# ------------------------------------------------------------------ keep policy (B18)


def test_keep_is_exact_and_numeric(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    # String order would put 9000 after 10000 and 5 after 10.
    for step in (5, 10, 50, 100, 500, 1000, 5000, 9000, 10000):
        mgr.save(step, {"w": jnp.full((2,), float(step))})
    assert mgr.all_steps() == [9000, 10000]
    assert mgr.latest_step() == 10000
    assert dir_names(tmp_path) == ["10000", "9000"]
    restored, _ = mgr.restore()
    np.testing.assert_array_equal(restored["w"], [10000.0, 10000.0])


def test_keep_none_or_zero_keeps_all_and_negative_is_rejected(tmp_path):
    for keep in (None, 0):
        mgr = CheckpointManager(tmp_path / str(keep), keep=keep)
        for step in (1, 2, 3):
            mgr.save(step, {"w": jnp.zeros(1)})
        assert mgr.all_steps() == [1, 2, 3]
    with pytest.raises(ValueError, match="keep"):
        CheckpointManager(tmp_path, keep=-1)


def test_saving_an_older_step_never_prunes_that_step(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=1)
    mgr.save(10, {"w": jnp.zeros(1)})
    mgr.save(3, {"w": jnp.zeros(1)})
    assert mgr.all_steps() == [3, 10]


def test_existing_step_is_never_overwritten(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"w": jnp.zeros(1)})
    with pytest.raises(CheckpointError, match="already exists"):
        mgr.save(1, {"w": jnp.ones(1)})


# ------------------------------------------------------------------ incomplete checkpoints (B2)


def test_construction_removes_tmp_and_uncommitted_dirs_with_warning(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path)
    mgr.save(5, {"w": jnp.zeros(1)})
    (tmp_path / "10.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
    (tmp_path / "15").mkdir()  # integer name but no COMMIT
    (tmp_path / "15" / "metadata.json").write_text("{}")
    (tmp_path / "notes").mkdir()  # unrelated entries are left alone
    assert mgr.all_steps() == [5]

    with caplog.at_level(logging.WARNING, logger="diffusers_unified"):
        mgr = CheckpointManager(tmp_path)
    assert dir_names(tmp_path) == ["5", "notes"]
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "removed incomplete checkpoint 10.orbax-checkpoint-tmp (no commit marker)" in messages
    assert "removed incomplete checkpoint 15 (no commit marker)" in messages
    assert mgr.latest_step() == 5


def test_kill_before_commit_leaves_only_a_tmp_dir(tmp_path, caplog):
    proc = run_child(tmp_path, [1, 2], {faults.KILL_IN_SAVE: "before_commit:2"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "finished" not in proc.stdout
    names = dir_names(tmp_path)
    assert "1" in names and "2" not in names
    leftovers = [n for n in names if n.startswith("2.orbax-checkpoint-tmp")]
    assert len(leftovers) == 1
    # The partial step already carries its COMMIT file; only the rename makes it a checkpoint.
    assert (tmp_path / leftovers[0] / "COMMIT").is_file()

    with caplog.at_level(logging.WARNING, logger="diffusers_unified"):
        mgr = CheckpointManager(tmp_path, keep=2)
    assert dir_names(tmp_path) == ["1"]
    assert f"removed incomplete checkpoint {leftovers[0]} (no commit marker)" in caplog.text
    assert mgr.latest_step() == 1
    restored, metadata = mgr.restore()
    np.testing.assert_array_equal(restored["w"], [1.0, 1.0, 1.0])
    assert metadata == {"step": 1}


def test_kill_after_commit_before_cleanup_leaves_keep_plus_one(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2):
        mgr.save(step, {"w": jnp.full((3,), float(step))})
    proc = run_child(tmp_path, [3], {faults.KILL_IN_SAVE: "after_commit_before_cleanup"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr

    with caplog.at_level(logging.WARNING, logger="diffusers_unified"):
        mgr = CheckpointManager(tmp_path, keep=2)
    assert "removed incomplete" not in caplog.text
    assert mgr.all_steps() == [1, 2, 3]
    assert mgr.latest_step() == 3
    mgr.save(4, {"w": jnp.full((3,), 4.0)})
    assert mgr.all_steps() == [3, 4]
    assert dir_names(tmp_path) == ["3", "4"]


def test_invalid_fault_spec_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv(faults.KILL_IN_SAVE, "during_lunch")
    with pytest.raises(ValueError, match="before_commit"):
        CheckpointManager(tmp_path).save(1, {"w": jnp.zeros(1)})


# ------------------------------------------------------------------ write errors (B5, B21)


def test_enospc_keeps_previous_checkpoint_and_leaves_no_phantom(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep=2)
    mgr.save(5, small_state(5))
    monkeypatch.setenv(faults.SAVE_ERROR, "ENOSPC:2")
    with pytest.raises(CheckpointError, match="No space left on device") as info:
        mgr.save(10, small_state(10))
    assert str(tmp_path / "10") in str(info.value)
    assert info.value.exit_code == 5
    assert mgr.all_steps() == [5]
    assert dir_names(tmp_path) == ["5"]
    restored, _ = mgr.restore(target=small_state(0))
    chex.assert_trees_all_equal(restored, small_state(5))
    mgr.save(15, small_state(15))  # the hook fired on save 2 only
    assert mgr.all_steps() == [5, 15]


def test_real_write_error_from_orbax_is_a_checkpoint_error(tmp_path):
    """A genuine OS error inside orbax/tensorstore (EFBIG from RLIMIT_FSIZE), not the hook."""
    code = textwrap.dedent(
        f"""
        import resource
        import numpy as np
        from diffusers_unified.errors import CheckpointError
        from diffusers_unified.training.checkpoints import CheckpointManager
        mgr = CheckpointManager({str(tmp_path)!r})
        mgr.save(1, {{"w": np.zeros(4, np.float32)}})
        # CPython ignores SIGXFSZ, so the oversized write fails with EFBIG instead of a kill.
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
        noise = np.random.default_rng(0).standard_normal(1 << 16).astype(np.float32)
        try:
            mgr.save(2, {{"w": noise}})
        except CheckpointError as err:
            print("CheckpointError:", err)
        print("steps:", mgr.all_steps())
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "CheckpointError: could not write checkpoint step 2" in proc.stdout
    assert "File too large" in proc.stdout and str(tmp_path / "2") in proc.stdout
    assert "steps: [1]" in proc.stdout
    assert dir_names(tmp_path) == ["1"]


def test_async_save_commits_after_wait(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2, async_save=True)
    state = {"w": np.zeros(3, np.float32)}
    mgr.save(1, state)
    state["w"] += 1.0  # in-place update after save() returned must not leak into step 1
    mgr.save(2, state)
    mgr.save(3, state)
    mgr.wait_until_finished()
    assert mgr.all_steps() == [2, 3]
    mgr.close()
    restored, _ = mgr.restore(2)
    np.testing.assert_array_equal(restored["w"], [1.0, 1.0, 1.0])


def test_async_save_error_surfaces_at_wait_until_finished(tmp_path, monkeypatch):
    monkeypatch.setenv(faults.SAVE_ERROR, "ENOSPC:2")
    mgr = CheckpointManager(tmp_path, async_save=True)
    mgr.save(1, {"w": jnp.zeros(3)})
    mgr.save(2, {"w": jnp.ones(3)})  # fails in the background
    with pytest.raises(CheckpointError, match="step 2 failed.*No space left on device"):
        mgr.wait_until_finished()
    assert mgr.all_steps() == [1]
    assert dir_names(tmp_path) == ["1"]
    mgr.wait_until_finished()  # the error is reported once
    mgr.save(3, {"w": jnp.ones(3)})
    mgr.close()
    assert mgr.all_steps() == [1, 3]


def test_async_save_error_surfaces_at_next_save_and_close(tmp_path, monkeypatch):
    monkeypatch.setenv(faults.SAVE_ERROR, "ENOSPC")
    mgr = CheckpointManager(tmp_path, async_save=True)
    mgr.save(1, {"w": jnp.zeros(3)})
    with pytest.raises(CheckpointError, match="step 1 failed"):
        mgr.save(2, {"w": jnp.zeros(3)})
    assert mgr.all_steps() == []  # step 2 was not started

    monkeypatch.setenv(faults.SAVE_ERROR, "EIO:2")
    faults.reset_save_count()
    with pytest.raises(CheckpointError, match="Input/output error"):
        with CheckpointManager(tmp_path / "b", async_save=True) as mgr_b:
            mgr_b.save(1, {"w": jnp.zeros(3)})
            mgr_b.save(2, {"w": jnp.zeros(3)})
    assert mgr_b.all_steps() == [1]


# ------------------------------------------------------------------ refusals and mismatches


def test_nan_state_is_refused_before_writing(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, small_state(1))
    bad = small_state(2)
    bad["ema_params"]["dense"]["w"] = bad["ema_params"]["dense"]["w"].at[0, 0].set(jnp.nan)
    with pytest.raises(CheckpointError, match=r"step 2.*ema_params/dense/w \(1 of 12"):
        mgr.save(2, bad)
    assert dir_names(tmp_path) == ["1"]


def test_wrong_shaped_target_names_path_and_shapes(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, small_state(width=4))
    with pytest.raises(CheckpointError) as info:
        mgr.restore(target=small_state(width=8))
    message = str(info.value)
    assert "'params/dense/w' expected shape (3, 8) (target), found (3, 4)" in message
    assert "'params/b' expected shape (8,) (target), found (4,)" in message


def test_target_with_other_structure_names_the_paths(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"params": {"w": jnp.zeros(2)}})
    with pytest.raises(CheckpointError, match="missing from the checkpoint: params/v"):
        mgr.restore(target={"params": {"v": jnp.zeros(2)}})


def test_missing_step_lists_available_steps(tmp_path):
    mgr = CheckpointManager(tmp_path)
    for step in (5, 10):
        mgr.save(step, {"w": jnp.zeros(1)})
    with pytest.raises(CheckpointError, match=r"step 7 .*available steps: \[5, 10\]") as info:
        mgr.restore(7)
    assert str(tmp_path) in str(info.value)


def test_missing_directory_is_an_error_not_a_fresh_start(tmp_path):
    mgr = CheckpointManager(tmp_path / "typo")
    assert not (tmp_path / "typo").exists()
    assert mgr.latest_step() is None
    with pytest.raises(CheckpointError, match="no committed checkpoint found.*does not exist"):
        mgr.restore()


# ------------------------------------------------------------------ corruption (B17)


def payload_file(step_dir):
    """The largest array file of a step: the one a torn write would damage."""
    files = [
        os.path.join(root, name) for root, _, names in os.walk(step_dir / "state") for name in names
    ]
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_payload_names_step_file_and_previous(tmp_path, damage):
    mgr = CheckpointManager(tmp_path)
    mgr.save(5, small_state(5))
    mgr.save(10, small_state(10))
    victim = payload_file(tmp_path / "10")
    if damage == "truncate":
        os.truncate(victim, os.path.getsize(victim) // 2)
    else:
        with open(victim, "r+b") as f:
            f.write(b"\xde\xad\xbe\xef" * 4)
    with pytest.raises(CheckpointError) as info:
        mgr.restore()
    message = str(info.value)
    rel = os.path.relpath(victim, tmp_path / "10")
    assert "step 10" in message and rel in message
    assert "previous committed step is 5" in message
    assert mgr.all_steps() == [5, 10]  # raise mode moves nothing


def test_on_corrupt_fallback_quarantines_and_restores_previous(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path)
    for step in (5, 10, 15):
        mgr.save(step, small_state(step))
    os.truncate(payload_file(tmp_path / "15"), 3)
    (tmp_path / "10" / "COMMIT").write_text("not json")
    with caplog.at_level(logging.ERROR, logger="diffusers_unified"):
        restored, _ = mgr.restore(target=small_state(0), on_corrupt="fallback")
    chex.assert_trees_all_equal(restored, small_state(5))
    assert mgr.all_steps() == [5]
    assert dir_names(tmp_path / "corrupt") == ["10", "15"]
    assert "step 15" in caplog.text and "step 10" in caplog.text

    os.remove(tmp_path / "5" / "metadata" / "metadata")
    with pytest.raises(CheckpointError, match="no older committed checkpoint"):
        mgr.restore(on_corrupt="fallback")
    assert mgr.all_steps() == []


def test_a_read_only_manager_removes_nothing_and_refuses_to_save(tmp_path):
    """Readers (sample, eval) may open a directory a training run is saving into."""
    CheckpointManager(tmp_path).save(5, {"w": jnp.zeros(1)})
    (tmp_path / "10.orbax-checkpoint-tmp").mkdir()  # a save in progress elsewhere
    reader = CheckpointManager(tmp_path, read_only=True)
    assert reader.all_steps() == [5]
    assert "10.orbax-checkpoint-tmp" in os.listdir(tmp_path)
    with pytest.raises(CheckpointError, match="read-only; cannot save step 6"):
        reader.save(6, {"w": jnp.zeros(1)})
    restored, _ = reader.restore()
    np.testing.assert_array_equal(restored["w"], [0.0])
