"""FID, Inception Score and KID in `--mode=eval`, through the real launcher.

The Inception weights here are random (drawn from a seed in the layout of the
real file: nothing is downloaded), so the figures mean nothing; what is
checked is the plumbing: the weights key and its errors, the figures in the
eval file against the metric functions applied to the same features, the
reference statistics cached once in pytorch-fid's layout, the labelled
random-feature metrics beside them, and PNG files of the samples.
"""

from __future__ import annotations

import json
import math
import shutil

import launcher_util as lu
import numpy as np
import pytest

from diffusers_unified.nets.inception import expected_shapes

pytestmark = pytest.mark.slow  # the Inception network at 299x299 on ~60 images: ~20 s on CPU

IMAGE_TINY = lu.CONFIGS / "image_tiny.py"


def launch(workdir, *args, mode="train"):
    """The launcher on the tiny image config, compiled without LLVM's optimisation passes
    (`lu.FAST_COMPILE`: these runs are nearly all compile)."""
    return lu.run(workdir, *args, mode=mode, config=IMAGE_TINY, fast_compile=True)


def random_inception_weights(path) -> None:
    """A weights file of the FID Inception-v3's shapes, with a seeded random draw.

    Kernels ~ N(0, 1 / fan_in) and batch norm the identity, so activations stay O(1).
    """
    rng = np.random.default_rng(0)
    arrays = {}
    for key, shape in expected_shapes().items():
        name = key.rsplit("/", 1)[-1]
        if name in ("var", "scale"):
            value = np.ones(shape)
        elif name in ("mean", "bias"):
            value = np.zeros(shape)
        else:
            value = rng.standard_normal(shape) / math.sqrt(np.prod(shape[:-1]))
        arrays[key] = value.astype(np.float32)
    np.savez(path, **arrays)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    x = np.random.default_rng(1).integers(0, 256, (32, 8, 8, 3), dtype=np.uint8)
    np.savez(root / "images.npz", x=x)
    random_inception_weights(root / "inception.npz")
    workdir = root / "trained"
    result = launch(workdir, f"--config.data.path={root / 'images.npz'}")
    assert result.code == 0, result
    return root, workdir


def eval_args(root, *extra):
    return (f"--config.data.path={root / 'images.npz'}", "--config.eval.fid=True", *extra)


def test_fid_without_weights_exits_2_naming_the_key_and_the_converter(trained, tmp_path):
    root, workdir = trained
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    result = launch(run, *eval_args(root), mode="eval")
    assert result.code == 2, result
    assert "eval.inception_weights" in result.stderr
    assert "diffusers-unified-convert inception" in result.stderr
    assert not (run / "eval").exists()  # nothing written


def test_eval_reports_fid_is_and_kid_and_caches_the_reference(trained, tmp_path):
    from diffusers_unified import metrics

    root, workdir = trained
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    weights = f"--config.eval.inception_weights={root / 'inception.npz'}"
    first = launch(run, *eval_args(root, weights), mode="eval")
    assert first.code == 0, first
    result = json.loads((run / "eval" / "step_4.json").read_text())
    for key in ("fid", "inception_score", "kid", "frechet_distance_rf", "kid_rf"):
        assert math.isfinite(result[key]), key
    assert result["fid_examples"] == 16 and result["fid_reference"] == "train split"
    assert result["fid"] > 0 and 1.0 <= result["inception_score"] <= 1008
    (reference,) = (run / "eval").glob("fid_reference_*.npz")
    with np.load(reference) as f:  # pytorch-fid's layout: mu, sigma
        mu, sigma, kid_features = f["mu"], f["sigma"], f["kid_features"]
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and len(kid_features) == 24
    # The figures are the metric functions of the cached sample features.
    parts = run / "eval" / "step_4_parts" / "inception_samples"
    pool = np.concatenate([np.load(p)["pool"] for p in sorted(parts.glob("features_*.npz"))])
    assert pool.shape == (16, 2048)
    expected = metrics.fid_from_statistics(*metrics.statistics(pool), mu, sigma)
    assert result["fid"] == pytest.approx(expected, rel=1e-12)
    # A second eval reuses the cached reference and features: the same figures exactly.
    mtime = reference.stat().st_mtime_ns
    (run / "eval" / "step_4.json").unlink()
    again = launch(run, *eval_args(root, weights), mode="eval")
    assert again.code == 0, again
    assert reference.stat().st_mtime_ns == mtime
    assert json.loads((run / "eval" / "step_4.json").read_text()) == result


def test_sample_mode_writes_png_files(trained, tmp_path):
    from PIL import Image

    root, workdir = trained
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    args = (f"--config.data.path={root / 'images.npz'}", "--config.sampling.write_png=True")
    result = launch(run, *args, mode="sample")
    assert result.code == 0, result
    pngs = sorted((run / "samples" / "step_4" / "png").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(16)]
    samples = np.load(run / "samples" / "step_4" / "samples.npz")["samples"]
    first = np.asarray(Image.open(pngs[0]))
    expected = np.round(np.clip((samples[0] + 1) / 2, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(first, expected)
