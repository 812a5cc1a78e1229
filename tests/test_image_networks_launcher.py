"""Each image network of the image-scale configs, at tiny size, trained by the launcher's
train mode and sampled by its sample mode with every process's native sampler.

NCSN++ as DDPM++ (positional embedding of 999 t, eps prediction) is trained under
the VP SDE and sampled with the native samplers of the VP SDE, sub-VP SDE and DDPM
(the processes whose networks it conditions on 999 t); NCSN++ as in the VE configs
(Fourier features of log sigma, output divided by sigma, score prediction) is trained
under the VE SDE and sampled with the VE SDE's and NCSN's; NCSNv2's RefineNet under
NCSN, trained and sampled (annealed Langevin) through the command line (it is
conditioned on sigma as NCSN++ is, so the VE SDE's samplers add a compile, not a
case); the
DDPM U-Net with attention after every up block in bfloat16 under DDPM. Each trains 2
updates on 8x8x3 images; each sampler draws 4 samples on 3 grid points (1 Langevin
step per level). What is checked: every combination builds, trains to a finite loss,
conditions the network on what it needs (999 t or sigma) and samples finite images
of the data's shape.
"""

from __future__ import annotations

import json

import launcher_util as lu
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # 4 tiny trainings, 10 samplings: about a minute on 2 cores

FAST_COMPILE = True  # nearly all compile: no LLVM optimisation passes (conftest.py)

NATIVE = {
    "ddpm": ("ancestral", {}),
    "vpsde": ("pc", {"predictor": "euler_maruyama", "corrector": "none"}),
    "subvpsde": ("pc", {"predictor": "euler_maruyama", "corrector": "none"}),
    "vesde": ("pc", {"predictor": "reverse_diffusion", "corrector": "langevin"}),
    "ncsn": ("ald", {"n_steps_each": 1, "step_size": 2e-5}),
}
DDPMPP = {"embedding": "sinusoidal", "scale_by_sigma": False, "parametrization": "eps"}
NCSNPP = {"embedding": "fourier", "scale_by_sigma": True, "parametrization": "score"}
# (network, the process it trains under, its options, the processes it is sampled under)
CASES = [
    ("ncsnpp", "vpsde", DDPMPP, ("vpsde", "subvpsde", "ddpm")),
    ("ncsnpp", "vesde", NCSNPP, ("vesde", "ncsn")),
    ("unet", "ddpm", {"up_attention": "per_block", "dtype": "bfloat16"}, ("ddpm",)),
]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "images.npz"
    np.savez(path, x=np.random.default_rng(0).integers(0, 256, (24, 8, 8, 3), dtype=np.uint8))
    return path


def tiny_config(network: str, process: str, options: dict, images):
    from diffusers_unified.experiment import config as config_lib

    config = config_lib.load_module(str(lu.CONFIGS / "image_tiny.py")).get_config()
    config.data.path = str(images)
    config.process.name = process
    config.process.num_scales = 10
    config.process.sigma_max = 5.0
    config.training.loss = {"ddpm": "ddpm", "ncsn": "ncsn"}.get(process, "dsm")
    config.training.n_iters = config.training.checkpoint_freq = 2
    m = config.model
    # Two resolutions (the smallest that resamples), one block each, attention at the lower.
    m.name, m.nf, m.ch_mult, m.num_res_blocks, m.attn_resolutions = network, 8, (1, 1), 1, (4,)
    for key, value in options.items():
        m[key] = value
    method, sampling = NATIVE[process]
    config.sampling.method = method
    for key, value in sampling.items():
        config.sampling[key] = value
    config.sampling.num_steps = 3
    config.sampling.num_samples = config.sampling.batch_size = 4
    config_lib.check_against_schema(config)
    config_lib.check_values(config)
    return config


def sample_under(config, process: str, workdir) -> np.ndarray:
    """Sample mode on `workdir` with `process` and its native sampler; the samples."""
    from diffusers_unified.experiment import config as config_lib
    from diffusers_unified.experiment import sample

    method, options = NATIVE[process]
    config = config_lib.apply_overrides(
        config,
        [f"--config.process.name={process}", f"--config.sampling.method={method}"]
        + [f"--config.sampling.{k}={v}" for k, v in options.items()],
    )
    config_lib.check_values(config)
    sample.sample(config, str(workdir))
    tag = sample.sampler_tag(config)  # this sampler's shards, apart from the others'
    (step,) = (workdir / "samples").glob("step_*")
    shards = sorted((step / "shards" / tag).glob("shard_*.npz"))
    return np.concatenate([np.load(s)["samples"] for s in shards])


@pytest.mark.parametrize(
    ("network", "process", "options", "samplers"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES]
)
def test_the_launcher_trains_and_samples_each_image_network(
    network, process, options, samplers, images, tmp_path
):
    from diffusers_unified.experiment import train
    from diffusers_unified.experiment.run import build_run

    config = tiny_config(network, process, options, images)
    run = build_run(config)
    wants_sigma = options.get("scale_by_sigma") or options.get("embedding") == "fourier"
    assert run.process.conditioning == ("sigma" if wants_sigma else "time")
    workdir = tmp_path / "run"
    train.train(config, str(workdir))
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(np.isfinite(m["loss"]) for m in metrics)
    for other in samplers:
        samples = sample_under(config, other, workdir)
        assert samples.shape == (4, 8, 8, 3) and samples.dtype == np.float32, other
        assert np.isfinite(samples).all(), other


def test_the_command_line_trains_and_samples_refinenet(images, tmp_path):
    """The same through the real launcher's command line, for one network."""
    args = (
        f"--config.data.path={images}",
        "--config.model.name=refinenet",
        "--config.model.nf=8",
        "--config.model.scale_by_sigma=True",
        "--config.model.parametrization=score",
        "--config.process.name=ncsn",
        "--config.process.num_scales=10",
        "--config.process.sigma_max=5.0",
        "--config.training.loss=ncsn",
        "--config.sampling.method=ald",
        "--config.sampling.n_steps_each=1",
        "--config.sampling.step_size=2e-5",
        "--config.sampling.num_steps=3",
    )
    result = lu.run(tmp_path / "run", *args, config=lu.CONFIGS / "image_tiny.py", fast_compile=True)
    assert result.code == 0, result
    result = lu.run(tmp_path / "run", mode="sample", config=None, fast_compile=True)
    assert result.code == 0, result
    assert "wrote 16 samples of ald" in result.stderr
    samples = np.load(tmp_path / "run" / "samples" / "step_4" / "samples.npz")["samples"]
    assert samples.shape == (16, 8, 8, 3) and np.isfinite(samples).all()
