"""Every shipped study runs end to end on a tiny grid, through the same code as the full one.

Each study file under experiments/studies/ is loaded as the ablation runner
loads it, then shrunk (a few updates of a tiny MLP, few samples, its first
variants and samplers only) and run: every variant trains, samples with each
sampler and is measured; the summary (CSV, Markdown, figures) is written;
a rerun skips the finished variants. The full studies' results are
committed under experiments/results/.
"""

import csv
import dataclasses
import os
from pathlib import Path

import pytest

from diffusers_unified.experiment import study as study_lib

FAST_COMPILE = True  # nearly all compile: no LLVM optimisation passes (conftest.py)

STUDIES = sorted((Path(__file__).resolve().parents[1] / "experiments" / "studies").glob("*.py"))


def tiny(config):
    config.data.num_train = 512
    config.data.num_test = 256
    config.model.hidden = (16, 16)
    config.model.emb_dim = 16
    config.training.n_iters = 10
    config.training.n_jitted_steps = 10
    config.training.log_freq = 10
    config.training.checkpoint_freq = 10
    config.training.batch_size = 16
    config.eval.num_samples = 64
    config.sampling.batch_size = 32  # two shards, as the timing expects
    config.eval.num_likelihood = 32
    config.eval.likelihood_batch = 32
    # Few levels and fixed-step ODEs: an untrained network makes adaptive solvers crawl.
    config.process.num_scales = 20
    config.sampling.ode_method = "rk4"
    config.eval.ode_method = "rk4"
    config.eval.num_steps = 10
    return config


def shrink(study, variants=1, samplers=2):
    names = list(study.samplers)
    keep = names[: samplers - 1] + names[-1:] if samplers > 1 else names[:1]
    return dataclasses.replace(
        study,
        base=lambda: tiny(study.base()),
        variants=study.variants[:variants],
        samplers={k: study.samplers[k] for k in keep},
    )


@pytest.mark.slow
@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_study_runs_end_to_end_on_a_tiny_grid(path, tmp_path):
    study = shrink(study_lib.load_study(str(path)))
    rows = study_lib.run_study(study, str(tmp_path))
    expected = len(study.variants) * len(study.samplers)
    assert len(rows) == expected
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["variant"], r["sampler"]) for r in table] == [
        (v, s) for v, _ in study.variants for s in study.samplers
    ]
    for r in table:
        assert float(r["sliced_wasserstein"]) > 0 and float(r["sw_noise_floor"]) > 0
        assert int(r["nfe"]) > 0
        if study.likelihood != "none":
            assert float(r["data_nll_nats"]) > 0 and r["ode_nll_nats"]
    assert (tmp_path / "results.md").read_text().startswith(f"# {study.name}")
    assert (tmp_path / "samples.png").stat().st_size > 0
    assert (tmp_path / "plot.png").exists() == (study.plot is not None)

    # A rerun finds every variant finished and recomputes nothing.
    stamps = {p: os.stat(p).st_mtime_ns for p in tmp_path.rglob("results.json")}
    assert study_lib.run_study(study, str(tmp_path)) == rows
    assert {p: os.stat(p).st_mtime_ns for p in tmp_path.rglob("results.json")} == stamps
