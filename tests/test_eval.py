"""`--mode=eval` through the real launcher: what it writes, and resuming a killed eval.

The run is tests/configs/eval_tiny.py: a 20-update DDPM on the 2-D Gaussian
mixture, evaluated with both likelihoods on 96 held-out examples in three
batches of 32 per kind. The numbers of so short a training mean nothing;
these tests check the bookkeeping (every figure present and consistent,
nothing recomputed after a kill, and the same result as an uninterrupted
eval). The likelihood numerics are checked against closed forms in
test_likelihood.py.
"""

import json
import math
import os
import shutil

import launcher_util as lu
import pytest

EVAL_TINY = lu.CONFIGS / "eval_tiny.py"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("eval") / "trained"
    result = lu.run(workdir, config=EVAL_TINY)
    assert result.code == 0, result
    return workdir


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    """An uninterrupted eval of a copy of the trained run: (workdir, result)."""
    workdir = tmp_path_factory.mktemp("eval") / "full"
    shutil.copytree(trained, workdir)
    result = lu.run(workdir, mode="eval", config=None)
    assert result.code == 0, result
    return workdir, json.loads((workdir / "eval" / "step_20.json").read_text())


def test_eval_writes_sample_metrics_and_both_likelihoods(evaluated):
    _, result = evaluated
    assert result["step"] == 20
    for key in ("sliced_wasserstein", "sw_noise_floor", "mmd", "energy_distance"):
        assert math.isfinite(result[key]), key
    # The gmm data set has a known density: its log-density and mode metrics are reported.
    assert len(result["mode_share"]) == 4 and 0 <= result["mode_coverage"] <= 1
    assert math.isfinite(result["data_nll_nats"])
    assert result["ode_examples"] == result["bound_examples"] == 96
    assert result["ode_nfe"] == 4 * 25  # 25 RK4 steps of 4 evaluations
    assert result["bound_nfe"] == 100  # one network call per level of the 100-level DDPM
    # bits/dim of 2-D continuous data: nats / (2 ln 2), no offset.
    assert result["ode_bpd"] == pytest.approx(result["ode_nll_nats"] / (2 * math.log(2)), rel=1e-5)
    # The bound is the sum of its terms (float32 sums of 100 terms: 1e-5 relative).
    terms = result["bound_prior_bpd"] + result["bound_kl_bpd"] + result["bound_decoder_bpd"]
    assert result["bound_bpd"] == pytest.approx(terms, rel=1e-5)


@pytest.mark.slow
def test_killed_eval_resumes_without_recomputing_finished_parts(trained, evaluated, tmp_path):
    workdir = tmp_path / "killed"
    shutil.copytree(trained, workdir)
    killed = lu.run(workdir, mode="eval", config=None, DU_FAULT_KILL_AFTER_EVAL_PARTS=2)
    assert killed.code == -9, killed
    assert not (workdir / "eval" / "step_20.json").exists()
    parts = workdir / "eval" / "step_20_parts"
    before = {p: os.stat(p).st_mtime_ns for p in parts.rglob("batch_*.npz")}
    assert len(before) == 2, sorted(before)

    resumed = lu.run(workdir, mode="eval", config=None)
    assert resumed.code == 0, resumed
    log = lu.read_log(workdir)
    assert "ode likelihood on 96 held-out examples (2 of 3 batches reused from disk)" in log
    assert "bound likelihood on 96 held-out examples (0 of 3 batches reused from disk)" in log
    for path, mtime in before.items():
        assert os.stat(path).st_mtime_ns == mtime, f"{path} was rewritten"
    assert len(list(parts.rglob("batch_*.npz"))) == 6
    # Same keys, same part results: the resumed eval reports exactly what an
    # uninterrupted one does.
    assert json.loads((workdir / "eval" / "step_20.json").read_text()) == evaluated[1]


@pytest.mark.slow
def test_eval_on_four_devices_gives_the_one_device_figures(trained, evaluated, tmp_path):
    """Sample shards and likelihood batches run one per device (4 host-platform devices).

    Each unit has its own key and inputs whatever the device count, so the
    figures are the one-device ones: the same float32 arithmetic, up to XLA's
    fusion choices in each compilation (measured: identical).
    """
    workdir = tmp_path / "four"
    shutil.copytree(trained, workdir)
    result = lu.run(
        workdir,
        "--config.eval.num_samples=128",  # 2 shards of 64: two devices draw at once
        mode="eval",
        config=EVAL_TINY,
        devices=4,
    )
    assert result.code == 0, result
    four = json.loads((workdir / "eval" / "step_20.json").read_text())
    one_dir = tmp_path / "one"
    shutil.copytree(trained, one_dir)
    result = lu.run(one_dir, "--config.eval.num_samples=128", mode="eval", config=EVAL_TINY)
    assert result.code == 0, result
    one = json.loads((one_dir / "eval" / "step_20.json").read_text())
    assert four.keys() == one.keys()
    for key, value in one.items():
        if isinstance(value, float):
            assert four[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
        else:
            assert four[key] == value, key
    # And the likelihood parts are the uninterrupted eval's (same keys per batch).
    for key in ("ode_bpd", "bound_bpd"):
        assert four[key] == pytest.approx(evaluated[1][key], rel=1e-6), key
