"""The tables of names (`experiment.kinds`) and the config schema agree, and every name builds.

Each config key whose value names a kind (a process, network, loss,
predictor, corrector, sampler or dataset) takes exactly the names of its
table: every name the schema accepts builds, every buildable name is
accepted, and configs/default.py documents each of them.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusers_unified.errors import ConfigError
from diffusers_unified.experiment import config as config_lib
from diffusers_unified.experiment import kinds
from diffusers_unified.nets import NetApply
from diffusers_unified.processes import Process

TABLES = {
    "process.name": kinds.PROCESSES,
    "model.name": kinds.NETS,
    "training.loss": kinds.LOSSES,
    "sampling.predictor": kinds.PREDICTORS,
    "sampling.corrector": kinds.CORRECTORS,
    "sampling.method": kinds.SAMPLERS,
    "data.dataset": kinds.DATASETS,
}
DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "default.py"


def default():
    return config_lib.default_config()


@pytest.mark.parametrize("key", sorted(TABLES))
def test_the_schema_accepts_exactly_the_table_names(key):
    section, leaf = key.split(".")
    for name in TABLES[key]:
        config = default()
        config[section][leaf] = name
        if key == "data.dataset" and kinds.DATASETS[name].needs_path:
            config.data.path = "somewhere"
        config_lib.check_values(config)  # no ConfigError
    config = default()
    config[section][leaf] = "no_such_" + leaf
    with pytest.raises(ConfigError, match=f"{key}='no_such_{leaf}' is not one of: "):
        config_lib.check_values(config)


@pytest.mark.parametrize("key", sorted(config_lib.LIBRARY_CHOICES))
def test_option_choices_are_the_library_option_lists(key):
    import importlib

    module, attribute = config_lib.LIBRARY_CHOICES[key]
    value = importlib.import_module(f"diffusers_unified.{module}")
    for part in attribute.split("."):
        value = getattr(value, part)
    assert sorted(config_lib.CHOICES[key]) == sorted(value)


def test_every_choice_key_is_a_table_or_a_library_list():
    tables = {k for k in config_lib.CHOICES if k in TABLES}
    # Launcher-only choices: the likelihoods to report, "reference" for each process's own
    # ancestral variance, "auto" for the conditioning the network declares.
    own = {"eval.likelihood", "eval.fid_split", "sampling.variance", "process.conditioning"}
    own |= {"training.task"}
    assert set(config_lib.CHOICES) == tables | set(config_lib.LIBRARY_CHOICES) | own
    from diffusers_unified.processes import DDPM
    from diffusers_unified.samplers.predictors import VARIANCES

    assert config_lib.CHOICES["sampling.variance"] == ("reference", *VARIANCES)
    assert config_lib.CHOICES["process.conditioning"] == ("auto", *DDPM.CONDITIONINGS)


@pytest.mark.parametrize("key", sorted(TABLES))
def test_default_config_documents_every_name(key):
    # The comment on the key's line, or on the line above it.
    lines = DEFAULT.read_text().splitlines()
    (i,) = [i for i, line in enumerate(lines) if line.strip().startswith(f"{key} =")]
    comment = lines[i].partition("#")[2] + " " + lines[i - 1].partition("#")[2]
    documented = set(re.findall(r"[a-z_0-9]+", comment))
    missing = [name for name in TABLES[key] if name not in documented]
    assert not missing, f"configs/default.py does not name {missing} for {key}"


@pytest.mark.parametrize("name", sorted(kinds.PROCESSES))
def test_every_process_builds(name):
    process = kinds.PROCESSES[name].build(default().process)
    assert isinstance(process, Process)
    alpha, sigma = process.alpha_sigma(jnp.asarray([0.5]))
    assert np.all(np.isfinite(alpha)) and np.all(sigma > 0)


def test_the_variational_bound_property_marks_the_processes_with_levels_and_betas():
    # ddpm_bound needs the discrete chain's betas: exactly the kinds flagged have them.
    for name, kind in kinds.PROCESSES.items():
        process = kind.build(default().process)
        assert kind.variational_bound == hasattr(process, "betas"), name


@pytest.mark.parametrize("name", sorted(kinds.NETS))
def test_every_network_builds_for_its_data_kind(name):
    m = default().model
    m.hidden, m.emb_dim, m.nf, m.ch_mult, m.attn_resolutions = (8,), 8, 8, (1, 2), (4,)
    m.num_res_blocks = 1
    kind = kinds.NETS[name]
    shape = (2, 3) if kind.data == "vector" else (2, 8, 8, 1)
    net = NetApply(kind.build(m, None, True))
    # Shapes only (traced, not compiled): building is what this checks, and compiling six
    # networks op by op cost ~50 s cold; test_nets, test_ncsnpp, test_refinenet run them.
    params = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), shape))
    out = jax.eval_shape(lambda p: net(p, jnp.ones(shape), jnp.full((2,), 10.0)), params)
    assert out.shape == shape and out.dtype == jnp.float32


@pytest.mark.parametrize("name", sorted(kinds.LOSSES))
def test_every_loss_builds_and_evaluates(name):
    from diffusers_unified.nets import MLP

    process = kinds.PROCESSES["ddpm" if name == "ddpm" else "ncsn" if name == "ncsn" else "vpsde"]
    process = process.build(default().process)
    net = NetApply(MLP(hidden=(8,), emb_dim=8))
    params = net.init(jax.random.PRNGKey(0), (4, 2))
    loss_fn = kinds.LOSSES[name](default().training, process, net, "eps")
    loss, aux = loss_fn(params, jax.random.PRNGKey(1), {"x": jnp.ones((4, 2)), "y": None})
    assert np.isfinite(float(loss)) and aux["per_example"].shape == (4,)


@pytest.mark.parametrize("method", sorted(kinds.SAMPLERS))
def test_every_sampler_builds_and_traces(method):
    s = default().sampling
    s.method, s.num_steps = method, 4
    process = kinds.PROCESSES["ncsn" if method == "ald" else "vpsde"].build(default().process)
    sampler = kinds.SAMPLERS[method].build(s, s.num_steps)
    out = jax.eval_shape(
        lambda key: sampler(key, lambda x, t: jnp.zeros_like(x), process, (3, 2)),
        jax.random.PRNGKey(0),
    )
    assert out.samples.shape == (3, 2)
    assert kinds.describe_sampler(s).startswith(method)


@pytest.mark.parametrize("table", ["PREDICTORS", "CORRECTORS"])
def test_every_predictor_and_corrector_builds(table):
    for name, build in getattr(kinds, table).items():
        assert build(default().sampling) is not None, name


@pytest.mark.parametrize("name", sorted(kinds.DATASETS))
def test_every_dataset_builds(name, tmp_path, monkeypatch):
    import sys

    import image_data_util as util

    d = default().data
    d.num_train, d.num_test = 50, 10
    if name == "npz":
        d.path = str(tmp_path / "x.npz")
        np.savez(d.path, x=np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32))
    elif name == "image_folder":
        from PIL import Image

        for i in range(12):
            Image.fromarray(np.full((8, 8), 20 * i, np.uint8)).save(tmp_path / f"{i}.png")
        d.path, d.num_test = str(tmp_path), 2
    elif name in ("cifar10", "cifar100"):
        util.write_cifar(tmp_path, name, per_file=4)
        d.path = str(tmp_path)
    elif name in ("tfds", "hf"):
        # Stand-ins with the libraries' interface (neither is installed here).
        pixels = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
        records = [{"image": p, "label": i % 2} for i, p in enumerate(pixels)]
        splits = {"train": records[:3], "test": records[3:]}
        if name == "tfds":
            monkeypatch.setitem(sys.modules, "tensorflow_datasets", util.fake_tfds(splits))
            d.tfds_name = "cifar10"
        else:
            splits = {k: util.FakeHFDataset(v) for k, v in splits.items()}
            monkeypatch.setitem(sys.modules, "datasets", util.fake_hf(splits))
            d.hf_name = "uoft-cs/cifar10"
    kind = kinds.DATASETS[name]
    ds = kind.build(d, 0)
    assert ds.num_train > 0 and ds.num_test > 0
    assert kind.images == (ds.kind == "image") or name == "npz"
    if kind.images and name not in ("digits", "cifar10", "cifar100"):
        # The image builders resize to the config's shape; CIFAR and digits have their own.
        assert ds.data_shape == (d.image_size, d.image_size, d.num_channels)
