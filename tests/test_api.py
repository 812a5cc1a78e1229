"""`diffusers_unified.load(workdir)`: the Python API over a trained work directory.

The work directory is the reliability tests' reference run (tests/configs/ci_tiny.py:
a VP SDE MLP on 2-D data, 20 updates, checkpoints 5 to 20). The README's example is
extracted and run as it stands, against a copy of it named `runs/vp`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import launcher_util as lu
import numpy as np
import pytest

import diffusers_unified
from diffusers_unified import likelihood
from diffusers_unified.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    workdir, _ = lu.reference_run(tmp_path_factory)
    return workdir


@pytest.fixture(scope="module")
def model(workdir):
    return diffusers_unified.load(str(workdir))


def test_import_is_light_and_load_is_public():
    code = (
        "import sys, diffusers_unified; "
        "assert callable(diffusers_unified.load) and 'load' in diffusers_unified.__all__; "
        "assert 'jax' not in sys.modules, 'import diffusers_unified imported JAX'"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=lu.env(), capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()


def test_load_gives_the_checkpoints_parameters_config_and_process(model, workdir):
    assert model.step == 20
    assert model.config.process.name == "vpsde" and model.config.model.hidden == (32, 32)
    assert type(model.process).__name__ == "VPSDE"
    state = lu.restore(workdir, 20)
    same = lambda a, b: chex.assert_trees_all_equal(lu.leaves(a), lu.leaves(b))
    same(model.params("ema"), state["ema_params"])
    same(model.params("raw"), state["params"])
    earlier = diffusers_unified.load(str(workdir), checkpoint=10)
    assert earlier.step == 10
    same(earlier.params(), lu.restore(workdir, 10)["ema_params"])


def test_score_fn_is_minus_eps_over_sigma_of_the_chosen_parameters(model):
    """An eps network's score is -eps / sigma(t) (the VP SDE's marginal std)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 2))
    t = jnp.linspace(0.1, 0.9, 8)
    _, sigma = model.process.marginal_prob(jnp.zeros_like(x), t)
    for which in ("ema", "raw"):
        params = model.params(which)
        eps = model.run.net(params, x, model.process.noise_cond(t))
        np.testing.assert_allclose(
            model.score_fn(which)(x, t), -eps / sigma[:, None], rtol=1e-5, atol=1e-6
        )
    assert not np.allclose(model.score_fn("ema")(x, t), model.score_fn("raw")(x, t))


def test_sample_takes_any_sampler_and_its_options(model):
    key = jax.random.PRNGKey(0)
    out = model.sample(key, 16, sampler="ode", ode_method="rk4", num_steps=5)
    assert out.samples.shape == (16, 2) and np.isfinite(out.samples).all()
    assert int(out.nfe) == 17  # 5 grid points: 4 RK4 steps of 4 evaluations, then denoising
    again = model.sample(key, 16, sampler="ode", ode_method="rk4", num_steps=5)
    np.testing.assert_array_equal(out.samples, again.samples)  # same key, same samples
    pc = model.sample(key, 16, sampler="pc", predictor="reverse_diffusion", num_steps=10)
    assert int(pc.nfe) == 10 and not np.allclose(pc.samples, out.samples)
    with pytest.raises(ConfigError, match="Did you mean 'num_steps'"):
        model.sample(key, 4, num_step=3)
    with pytest.raises(ConfigError, match="sampling.method='odee' is not one of"):
        model.sample(key, 4, sampler="odee")


def test_log_likelihood_follows_the_eval_options(model):
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 2))
    exact = model.log_likelihood(jax.random.PRNGKey(2), x, divergence="exact")
    assert exact.log_likelihood.shape == (8,) and np.isfinite(exact.log_likelihood).all()
    # Hutchinson's estimate with many probes approaches the exact trace (2-D: cheap).
    estimate = model.log_likelihood(jax.random.PRNGKey(2), x, num_probes=256)
    np.testing.assert_allclose(estimate.log_likelihood, exact.log_likelihood, atol=0.1)
    # Options not given come from the work directory's eval section: set non-default ones
    # there (a fixed-step solver, so that the two calls below differ only in XLA's rounding,
    # not in an adaptive solver's step choices) and compare with a direct call given them.
    e = model.config.eval
    saved = e.to_dict()
    e.ode_method, e.num_steps, e.t_min = "rk4", 40, 1e-3
    try:
        followed = model.log_likelihood(jax.random.PRNGKey(2), x, divergence="exact")
    finally:
        e.update(saved)
    direct = likelihood.ode_log_likelihood(
        jax.random.PRNGKey(2),
        model.score_fn(),
        model.process,
        x,
        divergence="exact",
        method="rk4",
        num_steps=40,
        t_min=1e-3,
    )
    # float32 rounding of 40 RK4 steps of a value of size ~10: 1e-5 relative is ~30 ulps.
    np.testing.assert_allclose(followed.log_likelihood, direct.log_likelihood, rtol=1e-5)
    # ... and the settings matter: dopri5 from 1e-5 (the defaults) is a different answer.
    assert np.abs(followed.log_likelihood - exact.log_likelihood).max() > 1e-3
    shifted = model.log_likelihood(jax.random.PRNGKey(2), x, divergence="exact", t_min=0.1)
    assert not np.allclose(shifted.log_likelihood, exact.log_likelihood)
    with pytest.raises(ConfigError, match="Did you mean 'divergence'"):
        model.log_likelihood(jax.random.PRNGKey(2), x, divergance="exact")


def test_load_of_a_missing_or_empty_work_directory_says_what_is_wrong(tmp_path, workdir):
    with pytest.raises(ConfigError, match="is not a work directory \\(no config.json\\)"):
        diffusers_unified.load(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(workdir / "config.json", empty / "config.json")
    with pytest.raises(CheckpointError, match="no committed checkpoint found"):
        diffusers_unified.load(str(empty))


def readme_example() -> str:
    text = (lu.REPO / "README.md").read_text()
    section = text[text.index("## Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readmes_example_runs(workdir, tmp_path):
    shutil.copytree(workdir, tmp_path / "runs" / "vp")  # the README's work directory
    proc = subprocess.run(
        [sys.executable, "-c", readme_example()],
        cwd=tmp_path,
        env=lu.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("vpsde 20 VPSDE(")
    assert lines[1] == "(256, 2) 77"
    assert lines[2].endswith(" bits/dim") and np.isfinite(float(lines[2].split()[0]))
    assert lines[3] == "(256, 2)"
