"""The package as a user installs it: the launcher from any directory, configs by name, and a
wheel installed into a fresh virtual environment that trains and samples.

The wheel is built offline (`pip wheel --no-build-isolation`, with the setuptools and
wheel of the test extras) from the repository's tracked files, and installed with
`--no-deps` into a virtual environment that sees the already-installed dependencies
(`--system-site-packages`): no network, yet the package itself comes from the wheel
alone (a check asserts where it is imported from).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import launcher_util as lu
import pytest


def outside_env(**extra) -> dict[str, str]:
    """lu.env() for a child that must not see the checkout (no PYTHONPATH)."""
    env = lu.env(**extra)
    env.pop("PYTHONPATH", None)
    return env


def launch(args, cwd, env=None, python=sys.executable, timeout=180):
    return subprocess.run(
        [python, "-m", "diffusers_unified", *args],
        cwd=cwd,
        env=env or lu.env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_and_shipped_configs_work_from_another_directory(tmp_path):
    # (PYTHONPATH points at this checkout, as in every launcher test; the wheel test below
    # runs without it.)
    result = launch(["--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    for flag in ("--config", "--workdir", "--mode", "--checkpoint", "--log_level"):
        assert flag in result.stdout, flag
    script = shutil.which("diffusers-unified")
    if script is not None:  # the console script of the installed package
        proc = subprocess.run([script, "--help"], cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == 0 and "--workdir" in proc.stdout, proc.stderr

    # A shipped config by name, and by the checkout's spelling, where no configs/ exists.
    for name in ("vpsde/toy2d", "configs/vpsde/toy2d.py"):
        result = launch([f"--config={name}", "--mode=describe"], tmp_path)
        assert result.returncode == 0, result.stderr
        described = json.loads(result.stdout.strip().splitlines()[-1])
        assert described["process"]["name"] == "vpsde" and described["data_shape"] == [2]
    result = launch(["--config=cifar10/ddmp", "--mode=describe"], tmp_path)
    assert result.returncode == 2
    assert "config 'cifar10/ddmp' is neither a file nor a shipped config. Did you mean " in (
        result.stderr
    )
    assert "'cifar10/ddpm'?" in result.stderr


def tracked_files(dest: Path) -> None:
    """A copy of the repository's tracked files (what a clone or an sdist holds)."""
    listing = subprocess.run(
        ["git", "ls-files", "-z"], cwd=lu.REPO, capture_output=True, check=True
    ).stdout
    for name in filter(None, listing.decode().split("\0")):
        source, target = lu.REPO / name, dest / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the work tree
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            os.symlink(os.readlink(source), target)
        else:
            shutil.copy2(source, target)


# A config file written by a user against the shipped ones, in the score SDE code's
# spelling (`from configs import ...`), which resolves to the package's configs.
TINY = """
from configs import formulations
from configs.default import get_config as default_config


def get_config():
    config = formulations.vpsde(formulations.toy2d(default_config()))
    config.data.num_train, config.data.num_test = 64, 128
    config.model.hidden, config.model.emb_dim = (16, 16), 8
    config.training.batch_size, config.training.n_iters = 8, 10
    config.training.n_jitted_steps = 1
    config.training.log_freq = config.training.checkpoint_freq = 5
    config.training.eval_freq = 5
    config.optim.warmup = 0
    config.sampling.num_steps, config.sampling.num_samples = 10, 32
    config.sampling.batch_size = 16
    return config
"""


@pytest.mark.slow
def test_the_wheel_installs_into_a_fresh_environment_and_trains_and_samples(tmp_path):
    if shutil.which("git") is None or not (lu.REPO / ".git").exists():
        pytest.skip("needs the git checkout to list the tracked files")
    src, dist, venv, work = (tmp_path / d for d in ("src", "dist", "venv", "work"))
    tracked_files(src)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    built = subprocess.run(
        [*pip, "wheel", "--no-build-isolation", "--no-deps", "-w", str(dist), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = dist.glob("diffusers_unified-*.whl")

    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    installed = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]

    work.mkdir()
    env = outside_env()
    where = subprocess.run(
        [python, "-c", "import diffusers_unified as d, sys; print(d.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(venv)), where.stdout  # the wheel's copy

    script = venv / "bin" / "diffusers-unified"
    for command in ([str(script), "--help"], [python, "-m", "diffusers_unified", "--help"]):
        proc = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
        assert proc.returncode == 0 and "--workdir" in proc.stdout, proc.stderr

    (work / "tiny.py").write_text(textwrap.dedent(TINY))
    trained = subprocess.run(
        [str(script), "--config=tiny.py", "--workdir=run"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert trained.returncode == 0, trained.stderr[-4000:]
    assert "training finished at step 10" in trained.stderr
    sampled = launch(["--workdir=run", "--mode=sample"], work, env, python)
    assert sampled.returncode == 0, sampled.stderr[-4000:]
    assert (work / "run" / "samples" / "step_10" / "samples.npz").is_file()
