"""Classifier guidance through the launcher: a classifier trained with training.task=classifier
guides another work directory's score model (sampling.classifier_workdir).

Both runs are the tiny 20-update config on the labelled 2-D Gaussian mixture; the
numerics of guidance are checked against the exact mixture in test_classifier.py.
Here: the classifier run logs its accuracy and has no sampler; sample mode refuses
it; the guided score a sampler follows is the score plus the scale times the
gradient of the classifier's log-probability of the label; and guided sampling runs.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import launcher_util as lu
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # two tiny trainings and a sampling run: ~30 s

GMM = ("--config.data.dataset=gmm", "--config.data.num_train=64", "--config.data.num_test=64")


def test_a_trained_classifier_guides_another_runs_samples(tmp_path):
    from diffusers_unified.experiment import config as config_lib
    from diffusers_unified.experiment.run import build_run, restore
    from diffusers_unified.experiment.workdir import Workdir

    classifier = tmp_path / "classifier"
    result = lu.run(classifier, *GMM, "--config.training.task=classifier")
    assert result.code == 0, result
    metrics = lu.read_metrics(classifier)
    assert all(0.0 <= m["accuracy"] <= 1.0 for m in metrics) and len(metrics) == 4
    refused = lu.run(classifier, mode="sample", config=None)
    assert refused.code == 2 and "holds a classifier" in refused.stderr, refused

    score = tmp_path / "score"
    result = lu.run(score, *GMM)
    assert result.code == 0, result
    guide = (
        f"--config.sampling.classifier_workdir={classifier}",
        "--config.sampling.classifier_scale=2.0",
        "--config.sampling.class_label=1",
    )
    result = lu.run(score, *GMM, *guide, mode="sample")
    assert result.code == 0, result
    with np.load(score / "samples" / "step_20" / "samples.npz") as f:
        assert np.isfinite(f["samples"]).all() and (f["labels"] == 1).all()

    # The score a sampler follows: score + 2 grad_x log softmax(classifier logits)_1.
    config = Workdir(score).saved_config()
    config = config_lib.apply_overrides(
        config, [f"--config.{a[2 + len('config.') :]}" for a in guide]
    )
    run = build_run(config)
    _, state = restore(run, Workdir(score))
    net, classifier_params = run.classifier
    guided = run.sampling_score_fn(state.ema_params, run.labels(0, 5), classifier_params)
    x, t = jnp.asarray(np.random.default_rng(0).standard_normal((5, 2)), jnp.float32), 0.3
    tt = jnp.full((5,), t)

    def log_p1(x):
        logits = net(classifier_params, x, run.process.noise_cond(tt))
        return jnp.sum(jax.nn.log_softmax(logits)[:, 1])

    expected = run.score_fn(state.ema_params)(x, tt) + 2.0 * jax.grad(log_p1)(x)
    # float32 through the same operations in another order: 1e-5 relative.
    np.testing.assert_allclose(guided(x, tt), expected, rtol=1e-5, atol=1e-6)
    assert json.loads((classifier / "config.json").read_text())["training"]["task"] == "classifier"
