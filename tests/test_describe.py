"""`--mode=describe`: a config's parameter count, FLOPs, data shape, process and sampler.

For every CIFAR-10 config (and the CelebA-64 one) the parameter count that describe
prints equals the figure its docstring states (those figures are the papers'
reference code's own networks, counted in tests/test_ncsnpp.py and
test_refinenet.py), and the DDPM config is Ho et al.'s 35.7 M. Everything runs on
abstract shapes (`jax.eval_shape` and XLA's cost analysis of the lowered forward):
no full-size compute.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import launcher_util as lu
import pytest

from diffusers_unified.experiment import config as config_lib
from diffusers_unified.experiment import describe

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
IMAGE_CONFIGS = sorted(
    [*(CONFIGS / "cifar10").glob("[!_]*.py"), *(CONFIGS / "celeba64").glob("[!_]*.py")],
    key=lambda p: p.name,
)


def stated_parameters(path: Path) -> int:
    """The parameter count the config's docstring states ("...: 35,746,307 parameters.")."""
    (count,) = re.findall(r"([\d,]{7,}) parameters", path.read_text().split('"""')[1])
    return int(count.replace(",", ""))


@pytest.mark.parametrize("path", IMAGE_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_describe_counts_the_parameters_the_config_states(path):
    config = config_lib.load_module(str(path)).get_config()
    config_lib.check_against_schema(config)
    config_lib.check_values(config)
    out = describe.describe(config)
    assert out["parameters"] == stated_parameters(path)
    size = 64 if path.parent.name == "celeba64" else 32
    assert out["data_shape"] == [size, size, 3]
    # A forward of these networks costs 5-45 GFLOP per 32x32 image (DDPM: 6 GMACs).
    per_image = out["flops_per_forward"] / out["flops_batch"] / (size / 32) ** 2
    assert 5e9 < per_image < 5e10, per_image


def test_ddpm_is_ho_et_als_35_7_million():
    config = config_lib.load_module(str(CONFIGS / "cifar10" / "ddpm.py")).get_config()
    assert abs(describe.describe(config)["parameters"] - 35.7e6) <= 0.1e6


def test_the_command_line_prints_one_json_line(tmp_path):
    result = lu.run(
        tmp_path / "unused",
        mode="describe",
        config=CONFIGS / "cifar10" / "ncsnpp_continuous_ve.py",
    )
    assert result.code == 0, result
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["parameters"] == 62_758_915 and out["model"] == "ncsnpp"
    assert out["process"] == {
        "name": "vesde",
        "sigma_min": 0.01,
        "sigma_max": 50.0,
        "num_scales": 1000,
        "conditioning": "sigma",
    }
    assert out["sampler"] == "pc (reverse_diffusion + langevin)" and out["num_steps"] == 1000
    assert not (tmp_path / "unused").exists()  # describe writes nothing
