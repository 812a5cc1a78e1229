"""Score SDE checkpoints: converted reference parameters reproduce the reference's outputs.

The fixture (tests/fixtures/make_score_sde_fixture.py) ran the score SDE code's
own JAX NCSN++ and NCSNv2 on parameters drawn from a fixed NumPy seed in the
reference's layout; here the same parameters are drawn again, converted, and
run through this package's NCSNpp / RefineNet.
"""

import functools
import json
import pathlib

import jax
import numpy as np
import pytest
from fixtures.make_score_sde_fixture import CASES, draw_reference_params
from flax import serialization

from diffusers_unified.convert.score_sde import (
    convert_score_sde_params,
    load_score_sde_checkpoint,
    module_from_score_sde_config,
    module_kwargs_from_score_sde_config,
    read_score_sde_checkpoint,
    reference_layout,
)
from diffusers_unified.errors import CheckpointError, ConfigError
from diffusers_unified.nets import NetApply
from diffusers_unified.nets.ncsnpp import NCSNpp

FAST_COMPILE = True  # nearly all compile: no LLVM optimisation passes (conftest.py)

FIXTURE = np.load(pathlib.Path(__file__).parent / "fixtures" / "score_sde_outputs.npz")

# Relative to the output's largest magnitude. Converted parameters run the same
# float32 arithmetic in a different order (depthwise instead of per-channel FIR
# convolutions, reshaped means): observed <= 2e-6 on every case, so 1e-5 is
# ~5x margin. With positional embeddings the package's sinusoidal frequencies are
# the correctly rounded float32 values while the reference's come from a float32
# exp, 1 ulp off for some; times t up to 998 that moves the embedding by up to
# 2.3e-5, which the networks turn into up to 8e-6 of the output: 3e-5 there.
RTOL = {"sigma": 1e-5, "index": 1e-5, "time": 3e-5}
SLOW = {"ncsnpp_residual", "ncsnpp_cat_unconditional", "ncsnv2_128", "ncsnv2_256"}


def case_data(case):
    config = json.loads(str(FIXTURE[f"{case}/config"]))
    layout = [(path, tuple(shape)) for path, shape in json.loads(str(FIXTURE[f"{case}/layout"]))]
    data = config["data"]
    image_shape = (data["image_size"], data["image_size"], data["num_channels"])
    return config, layout, image_shape


@functools.partial(jax.jit, static_argnums=0)
def apply(net, params, x, noise_cond):
    return net(params, x, noise_cond)


def assert_matches_reference(case, module, params):
    out = np.asarray(
        apply(NetApply(module), params, FIXTURE[f"{case}/x"], FIXTURE[f"{case}/noise_cond"])
    )
    ref = FIXTURE[f"{case}/out"]
    assert out.shape == ref.shape
    err = np.max(np.abs(out - ref)) / np.max(np.abs(ref))
    assert err < RTOL[CASES[case][2]], f"{case}: relative error {err:.2e}"


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES]
)
def test_converted_parameters_give_the_reference_outputs(case):
    config, layout, image_shape = case_data(case)
    module = module_from_score_sde_config(config)
    params = convert_score_sde_params(draw_reference_params(layout), module, image_shape)
    assert_matches_reference(case, module, params)


def test_the_derived_reference_layout_is_the_reference_codes():
    # The fixture's layout came from the reference code itself.
    for case in CASES:
        config, layout, image_shape = case_data(case)
        ours = reference_layout(module_from_score_sde_config(config), image_shape)
        assert sorted((p, s) for p, s in layout) == sorted(
            ("/".join(ref), shape) for ref, shape, _ in ours.values()
        ), case


def test_a_sublayer_without_reference_counterpart_is_refused():
    config, _, image_shape = case_data("ncsnpp_vp_ddpm")
    kwargs = module_kwargs_from_score_sde_config(config["model"], centered=True)
    with pytest.raises(ConfigError, match=r"label_embed \(Embed\) has no counterpart"):
        reference_layout(NCSNpp(**kwargs, num_classes=10), image_shape)


def write_checkpoint(path, ema, raw):
    state = {
        "step": 7,
        "optimizer": {"target": raw, "state": {"step": 7}},
        "lr": 2e-4,
        "model_state": {},
        "ema_rate": 0.999,
        "params_ema": ema,
        "rng": np.zeros(2, np.uint32),
    }
    path.write_bytes(serialization.msgpack_serialize(state))


def test_a_checkpoint_file_round_trips_to_the_reference_outputs(tmp_path):
    case = "ncsnpp_ve_skips"
    config, layout, image_shape = case_data(case)
    ema, raw = draw_reference_params(layout), draw_reference_params(layout, seed=5)
    path = tmp_path / "checkpoint_26"
    write_checkpoint(path, ema, raw)
    params = load_score_sde_checkpoint(path, config)
    assert_matches_reference(case, module_from_score_sde_config(config), params)
    # which="params" takes the optimiser's target, not the EMA.
    raw_params = load_score_sde_checkpoint(path, config, which="params")
    np.testing.assert_array_equal(raw_params["conv_in"]["kernel"], raw["Conv_0"]["kernel"])
    assert not np.array_equal(raw_params["conv_in"]["kernel"], params["conv_in"]["kernel"])


@pytest.fixture
def tiny_checkpoint(tmp_path):
    config, layout, image_shape = case_data("ncsnv2_64")
    params = draw_reference_params(layout)
    return tmp_path / "checkpoint_1", config, params, image_shape


def test_a_wrong_shape_is_named_with_both_shapes(tiny_checkpoint):
    path, config, params, _ = tiny_checkpoint
    params["RefineBlock_2"]["CRPBlock_0"]["Conv_1"]["kernel"] = np.zeros((3, 3, 16, 8), np.float32)
    write_checkpoint(path, params, params)
    with pytest.raises(CheckpointError) as err:
        load_score_sde_checkpoint(path, config)
    message = str(err.value)
    assert str(path) in message and "RefineBlock_2/CRPBlock_0/Conv_1/kernel" in message
    assert "(3, 3, 16, 8)" in message and "(3, 3, 16, 16)" in message


def test_missing_and_unknown_parameters_are_named(tiny_checkpoint):
    path, config, params, _ = tiny_checkpoint
    del params["InstanceNorm2dPlus_0"]["beta"]
    write_checkpoint(path, params, params)
    with pytest.raises(CheckpointError, match=r"missing parameter InstanceNorm2dPlus_0/beta"):
        load_score_sde_checkpoint(path, config)
    params["InstanceNorm2dPlus_0"]["beta"] = np.zeros((1, 1, 1, 8), np.float32)
    params["Dense_0"] = {"kernel": np.zeros((4, 4), np.float32)}
    write_checkpoint(path, params, params)
    with pytest.raises(CheckpointError, match=r"does not have: Dense_0/kernel"):
        load_score_sde_checkpoint(path, config)


def test_unreadable_files_raise_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no score SDE checkpoint"):
        read_score_sde_checkpoint(tmp_path / "absent")
    (tmp_path / "junk").write_bytes(b"\xc1 not msgpack")
    with pytest.raises(CheckpointError, match="not a readable flax msgpack"):
        read_score_sde_checkpoint(tmp_path / "junk")
    (tmp_path / "params_only").write_bytes(serialization.msgpack_serialize({"step": 1}))
    with pytest.raises(CheckpointError, match="has no params_ema"):
        read_score_sde_checkpoint(tmp_path / "params_only")


# -- configs ----------------------------------------------------------------------

# configs/ve/cifar10_ncsnpp_continuous.py of the score SDE code, model section, with
# the defaults it inherits from configs/default_cifar10_configs.py.
VE_NCSNPP = dict(
    sigma_min=0.01,
    sigma_max=50,
    num_scales=1000,
    beta_min=0.1,
    beta_max=20.0,
    dropout=0.1,
    embedding_type="fourier",
    name="ncsnpp",
    scale_by_sigma=True,
    ema_rate=0.999,
    normalization="GroupNorm",
    nonlinearity="swish",
    nf=128,
    ch_mult=(1, 2, 2, 2),
    num_res_blocks=4,
    attn_resolutions=(16,),
    resamp_with_conv=True,
    conditional=True,
    fir=True,
    fir_kernel=[1, 3, 3, 1],
    skip_rescale=True,
    resblock_type="biggan",
    progressive="none",
    progressive_input="residual",
    progressive_combine="sum",
    attention_type="ddpm",
    init_scale=0.0,
    fourier_scale=16,
    conv_size=3,
)


def test_config_sections_become_constructor_kwargs():
    kwargs = module_kwargs_from_score_sde_config(VE_NCSNPP, centered=False)
    assert kwargs == dict(
        centered=False,
        nf=128,
        ch_mult=(1, 2, 2, 2),
        num_res_blocks=4,
        attn_resolutions=(16,),
        dropout=0.1,
        resamp_with_conv=True,
        conditional=True,
        fir=True,
        fir_kernel=(1, 3, 3, 1),
        skip_rescale=True,
        resblock_type="biggan",
        progressive="none",
        progressive_input="residual",
        progressive_combine="sum",
        embedding_type="fourier",
        init_scale=0.0,
        fourier_scale=16,
        scale_by_sigma=True,
        act="swish",
    )
    ncsnv2 = dict(nf=128, name="ncsnv2_64", normalization="InstanceNorm++", nonlinearity="elu")
    ncsnv2.update(interpolation="bilinear", scale_by_sigma=True, num_scales=232, dropout=0.1)
    assert module_kwargs_from_score_sde_config(ncsnv2, centered=False) == dict(
        centered=False,
        ch_mult=(1, 2, 2, 2),
        dilations=(1, 1, 2, 4),
        refine_mult=(1, 2, 2, 2),
        align_corners=False,
        unbiased_mean_var=False,
        ngf=128,
        interpolation="bilinear",
        scale_by_sigma=True,
        act="elu",
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(spectral_norm=True), "model.spectral_norm is not an option"),
        (
            dict(normalization="InstanceNorm++"),
            "normalization='InstanceNorm\\+\\+' is not implemented",
        ),
        (dict(conv_size=5), "conv_size=5 is not implemented"),
        (dict(name="ddpm"), "model.name 'ddpm' is not a network this converter reads"),
        (dict(nf=None), "model.nf is missing"),
    ],
)
def test_bad_config_sections_are_config_errors(change, message):
    section = {k: v for k, v in {**VE_NCSNPP, **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        module_kwargs_from_score_sde_config(section, centered=False)


def test_discrete_smld_ncsnpp_is_refused_with_the_equivalent():
    # configs/ve/celeba_ncsnpp.py: positional embedding of the index and 1/sigma from a table.
    section = dict(VE_NCSNPP, embedding_type="positional")
    with pytest.raises(ConfigError, match="parametrization 'eps'"):
        module_from_score_sde_config(dict(model=section, data=dict(centered=False)))


# -- a work directory from a score SDE checkpoint (diffusers-unified-convert score_sde) -----------


@pytest.mark.parametrize(
    ("case", "sde", "continuous", "process", "conditioning"),
    [
        ("ncsnpp_ve_skips", "vesde", True, "vesde", "sigma"),
        ("ncsnpp_vp_ddpm", "vpsde", True, "vpsde", "time"),
        ("ncsnv2_64", "vesde", False, "ncsn", "sigma"),
    ],
)
def test_an_imported_work_directory_runs_the_reference_network(
    case, sde, continuous, process, conditioning, tmp_path
):
    from diffusers_unified.experiment import imports
    from diffusers_unified.experiment.run import build_run, restore
    from diffusers_unified.experiment.workdir import Workdir

    config, layout, _ = case_data(case)
    config = {
        **config,
        "training": {"sde": sde, "continuous": continuous},
        "sampling": {"method": "pc", "predictor": "reverse_diffusion", "corrector": "langevin"},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    write_checkpoint(tmp_path / "checkpoint_26", draw_reference_params(layout), {})
    workdir = tmp_path / "imported"
    args = ["score_sde", f"--checkpoint={tmp_path / 'checkpoint_26'}"]
    code = imports.main([*args, f"--config={tmp_path / 'config.json'}", f"--workdir={workdir}"])
    assert code == 0
    saved = Workdir(workdir).saved_config()
    assert (saved.process.name, saved.process.conditioning) == (process, conditioning)
    assert saved.model.parametrization == ("eps" if sde == "vpsde" else "score")
    run = build_run(saved)
    assert run.process.conditioning == conditioning
    step, state = restore(run, Workdir(workdir))
    assert step == 7  # the step the score SDE checkpoint records
    assert_matches_reference(case, run.net.module, state.ema_params)
