"""convert.diffusers: UNet2DModel directories and DDPM / DDIM scheduler configs in.

The reference values come from diffusers itself, recorded by
`fixtures/make_diffusers_fixture.py`: the tiny network's outputs, its tensor names,
the betas of each schedule, `set_timesteps`, and full DDPM and DDIM sampling loops on
noise that the tests regenerate. The directories are written here, with
safetensors' NumPy API, from the regenerated weights.
"""

import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures.make_diffusers_fixture import (
    BETA_SCHEDULES,
    DDPM_CIFAR10_CONFIG,
    DDPM_CIFAR10_SCHEDULER,
    FIXTURE,
    LOOPS,
    SHAPE,
    SPACINGS,
    TIMESTEPS,
    TINY_CONFIG,
    draw_weights,
    make_inputs,
    make_noise,
)

from diffusers_unified import samplers
from diffusers_unified.convert import diffusers as cd
from diffusers_unified.errors import CheckpointError, ConfigError
from diffusers_unified.nets import NetApply, UNet
from diffusers_unified.parametrization import make_score_fn
from diffusers_unified.processes import DDPM

FAST_COMPILE = True  # nearly all compile: no LLVM optimisation passes (conftest.py)


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURE))


@pytest.fixture(scope="module")
def weights(reference):
    """The tiny network's diffusers state dict (torch layout), regenerated from its seed."""
    shapes = {k: tuple(v) for k, v in json.loads(str(reference["tensor_shapes"])).items()}
    return draw_weights(shapes)


def write_unet(directory, config, tensors):
    """A diffusers UNet2DModel directory: config.json and the safetensors weights."""
    save_file = pytest.importorskip("safetensors.numpy").save_file
    directory.mkdir(parents=True, exist_ok=True)
    (directory / cd.CONFIG).write_text(json.dumps(config))
    save_file(tensors, str(directory / cd.WEIGHTS))
    return directory


def apply_all(kwargs, params):
    net = NetApply(UNet(**kwargs))
    run = jax.jit(jax.vmap(net, in_axes=(None, 0, 0)))
    return np.asarray(run(params, jnp.asarray(make_inputs()), jnp.asarray(TIMESTEPS, jnp.float32)))


# -- the network -------------------------------------------------------------------


def test_expected_tensors_are_diffusers_state_dict(reference):
    shapes = {k: tuple(v) for k, v in json.loads(str(reference["tensor_shapes"])).items()}
    assert cd.expected_tensors(TINY_CONFIG) == shapes


def test_converted_parameters_have_the_unet_structure(weights):
    kwargs = cd.unet_kwargs(TINY_CONFIG)
    net = NetApply(UNet(**kwargs))
    expected = jax.eval_shape(lambda key: net.init(key, SHAPE), jax.random.PRNGKey(0))
    params = cd.convert_state_dict(weights, TINY_CONFIG)
    shape_of = lambda a: (tuple(a.shape), np.dtype(a.dtype))
    assert jax.tree.map(shape_of, params) == jax.tree.map(shape_of, expected)


@pytest.mark.parametrize("flip", [False, True])
def test_load_unet2d_reproduces_diffusers(tmp_path, reference, weights, flip):
    config = dict(TINY_CONFIG, flip_sin_to_cos=flip)
    kwargs, params = cd.load_unet2d(write_unet(tmp_path / "unet", config, weights))
    assert kwargs == cd.unet_kwargs(TINY_CONFIG)
    expected = reference["unet_out_flip" if flip else "unet_out"]
    err = np.abs(apply_all(kwargs, params) - expected).max()
    # float32 in a different summation order than torch's through ~20 layers: measured
    # 5e-6 of the output scale (about 2); 1e-4 of it leaves a factor 20.
    assert err <= 1e-4 * np.abs(expected).max()


def test_old_attention_names_and_pipeline_directories_load(tmp_path, weights):
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def old(name):
        for new, legacy in renames.items():
            name = name.replace(f".{new}.", f".{legacy}.")
        return name

    legacy = {old(k): v for k, v in weights.items()}
    assert len(set(legacy) - set(weights)) == 4 * 2 * 4  # 4 attention blocks, weight and bias
    _, params = cd.load_unet2d(write_unet(tmp_path / "pipeline" / "unet", TINY_CONFIG, legacy))
    _, new = cd.load_unet2d(write_unet(tmp_path / "new", TINY_CONFIG, weights))
    jax.tree.map(np.testing.assert_array_equal, params, new)


def test_ddpm_cifar10_32_config_is_ddpms_cifar10_model():
    # Dropout is 0 in the published config (it only matters for training).
    assert UNet(**cd.unet_kwargs(DDPM_CIFAR10_CONFIG)) == UNet(
        up_attention="per_block", dropout=0.0
    )


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(downsample_padding=1), r"downsample_padding=1 .*supported: 0"),
        (dict(class_embed_type="timestep"), r"class_embed_type='timestep' .*supported: None"),
        (dict(num_class_embeds=10), r"num_class_embeds=10 .*supported: None"),
        (dict(cross_attention_dim=32), r"unsupported UNet2DModel option\(s\) cross_attention_dim"),
        (
            dict(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"]),
            r"down_block_types has 'CrossAttnDownBlock2D'; supported: DownBlock2D \| AttnDown",
        ),
        (dict(up_block_types=["UpBlock2D", "UpBlock2D"]), r"same resolutions"),
        (dict(freq_shift=0), r"freq_shift=0 .*supported: 1"),
        (dict(time_embedding_type="fourier"), r"time_embedding_type='fourier'"),
        (dict(resnet_time_scale_shift="scale_shift"), r"resnet_time_scale_shift="),
        (dict(attention_head_dim=8), r"attention_head_dim=8 gives 4 heads at 32 channels"),
        (dict(norm_num_groups=8), r"norm_num_groups=8 at a GroupNorm of 16 channels"),
        (dict(block_out_channels=[16, 24]), r"multiples of the first \(16\)"),
        (dict(out_channels=6), r"in_channels=3 and out_channels=6 differ"),
        (dict(act_fn="mish"), r"act_fn='mish' .*supported: 'silu' \| 'swish'"),
        (dict(_class_name="UNet2DConditionModel"), r"supported: UNet2DModel"),
    ],
)
def test_configs_it_cannot_express_raise_config_error(change, match):
    with pytest.raises(ConfigError, match=match):
        cd.unet_kwargs(dict(TINY_CONFIG, **change))


def test_defaults_of_diffusers_apply_to_missing_options():
    # diffusers' defaults: downsample_padding 1, freq_shift 0, flip_sin_to_cos True.
    config = {k: v for k, v in TINY_CONFIG.items() if k != "downsample_padding"}
    with pytest.raises(ConfigError, match="downsample_padding=1"):
        cd.unet_kwargs(config)


def test_bad_weights_raise_checkpoint_error(tmp_path, weights):
    name, file = "mid_block.attentions.0.to_q.weight", cd.WEIGHTS
    missing = {k: v for k, v in weights.items() if k != name}
    with pytest.raises(CheckpointError, match=rf"{file}.*'{name}' is missing \(expected shape"):
        cd.load_unet2d(write_unet(tmp_path / "missing", TINY_CONFIG, missing))
    extra = dict(weights, **{"class_embedding.weight": np.zeros((10, 64), np.float32)})
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'class_embedding.weight'"):
        cd.load_unet2d(write_unet(tmp_path / "extra", TINY_CONFIG, extra))
    wrong = dict(weights, **{"conv_in.weight": np.zeros((16, 3, 1, 1), np.float32)})
    shapes = r"has shape \(16, 3, 1, 1\), expected \(16, 3, 3, 3\)"
    with pytest.raises(CheckpointError, match=rf"{file}.*'conv_in.weight' {shapes}"):
        cd.load_unet2d(write_unet(tmp_path / "wrong", TINY_CONFIG, wrong))
    both = dict(weights, **{name.replace("to_q", "query"): weights[name]})
    with pytest.raises(CheckpointError, match="under both its old and its new name"):
        cd.convert_state_dict(both, TINY_CONFIG)


def test_missing_files_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"config.json: no such file"):
        cd.load_unet2d(tmp_path)
    (tmp_path / cd.CONFIG).write_text(json.dumps(TINY_CONFIG))
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"found \['diffusion_pytorch_model.bin'\].*safet"):
        cd.load_unet2d(tmp_path)
    (tmp_path / cd.WEIGHTS).write_bytes(b"not safetensors")
    pytest.importorskip("safetensors")
    with pytest.raises(CheckpointError, match="cannot read it as NumPy safetensors"):
        cd.load_unet2d(tmp_path)
    (tmp_path / cd.CONFIG).write_text("{not json")
    with pytest.raises(CheckpointError, match="not a JSON config file"):
        cd.load_unet2d(tmp_path)


# -- the scheduler -----------------------------------------------------------------


def write_scheduler(directory, **change):
    path = directory / cd.SCHEDULER_CONFIG
    path.write_text(json.dumps(dict(DDPM_CIFAR10_SCHEDULER, **change)))
    return path


def test_ddpm_cifar10_32_scheduler(tmp_path):
    write_scheduler(tmp_path)
    scheduler = cd.load_ddpm_scheduler(tmp_path)
    betas = scheduler.pop("betas")
    assert scheduler == dict(
        scheduler="DDPMScheduler",
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        variance="small",
        clip_x0=True,
        clip_sample_range=1.0,
        parametrization="eps",
        timestep_spacing="leading",
        steps_offset=0,
    )
    np.testing.assert_array_equal(betas, DDPM().betas())


@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
def test_betas_are_diffusers_betas(tmp_path, reference, schedule):
    scheduler = cd.load_ddpm_scheduler(write_scheduler(tmp_path, beta_schedule=schedule))
    # diffusers computes them in float32 (a linspace, then a square or a sigmoid): a few
    # roundings of 6e-8 each, 3e-7 at most as measured.
    np.testing.assert_allclose(scheduler["betas"], reference[f"betas_{schedule}"], rtol=1e-6)
    package = {"linear": "linear", "squaredcos_cap_v2": "cosine"}.get(schedule)
    assert scheduler["beta_schedule"] == package
    if package is not None:  # the DDPM process computes the same betas
        process = DDPM(N=1000, schedule=package, beta_start=1e-4, beta_end=0.02)
        # One float64 formula evaluated in two ways: 1 - f(t + 1) / f(t) cancels to an
        # absolute 1e-16 on betas of 5e-5.
        np.testing.assert_allclose(process.betas(), scheduler["betas"], rtol=1e-12, atol=1e-15)


def test_scheduler_options_map_to_the_package(tmp_path):
    for prediction, parametrization in [
        ("epsilon", "eps"),
        ("sample", "x0"),
        ("v_prediction", "v"),
    ]:
        path = write_scheduler(tmp_path, prediction_type=prediction)
        assert cd.load_ddpm_scheduler(path)["parametrization"] == parametrization
    for variance, name in [("fixed_small", "small"), ("fixed_large", "large")]:
        assert (
            cd.load_ddpm_scheduler(write_scheduler(tmp_path, variance_type=variance))["variance"]
            == name
        )
    path = write_scheduler(tmp_path, trained_betas=[0.1] * 4, num_train_timesteps=4)
    scheduler = cd.load_ddpm_scheduler(path)
    assert scheduler["beta_schedule"] is None and scheduler["betas"].tolist() == [0.1] * 4
    nested = tmp_path / "pipeline" / "scheduler"
    nested.mkdir(parents=True)
    write_scheduler(nested, _class_name="DDIMScheduler", clip_sample=False)
    scheduler = cd.load_ddpm_scheduler(tmp_path / "pipeline")
    assert scheduler["scheduler"] == "DDIMScheduler" and not scheduler["clip_x0"]
    assert scheduler["set_alpha_to_one"]


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(variance_type="learned_range"), r"variance_type='learned_range'.*fixed_small"),
        (dict(thresholding=True), r"thresholding=True is not supported"),
        (dict(rescale_betas_zero_snr=True), r"rescale_betas_zero_snr=True"),
        (dict(prediction_type="flow"), r"prediction_type='flow'.*epsilon \| sample"),
        (dict(beta_schedule="laplace"), r"beta_schedule='laplace'.*scaled_linear"),
        (dict(_class_name="PNDMScheduler"), r"supported: DDPMScheduler, DDIMScheduler"),
        (dict(solver_order=2), r"unsupported scheduler option\(s\) solver_order"),
    ],
)
def test_schedulers_it_cannot_follow_raise_config_error(tmp_path, change, match):
    with pytest.raises(ConfigError, match=match):
        cd.load_ddpm_scheduler(write_scheduler(tmp_path, **change))


@pytest.mark.parametrize("spacing,num_steps,offset", SPACINGS)
def test_inference_timesteps_are_diffusers_set_timesteps(reference, spacing, num_steps, offset):
    scheduler = dict(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=offset)
    ours = cd.inference_timesteps(scheduler, num_steps)
    for cls in ("DDPMScheduler", "DDIMScheduler"):
        expected = reference[f"timesteps_{cls}_{spacing}_{num_steps}_{offset}"]
        np.testing.assert_array_equal(ours, expected)


# -- sampling: this package's samplers against diffusers' loops --------------------


def _takes_noise(sampler):
    parameters = inspect.signature(sampler).parameters
    return "noise" in parameters and "clip_x0" in parameters


needs_noise = pytest.mark.skipif(
    not (_takes_noise(samplers.ancestral) and _takes_noise(samplers.ddim)),
    reason="samplers.ancestral / samplers.ddim take no `noise` and `clip_x0` yet",
)

# How far this package's float32 loop may be from diffusers' float32 loop, as a
# fraction of the samples' scale (max |x_0|: 1 with clipping, ~500-1000 without, as a
# random network's eps is no data's). Both are float32 renderings of one float64
# loop, and the loop amplifies their errors. Measured (fractions of the scale):
#   A: diffusers float32 vs diffusers float64,
#   B: the float64 loop with its network output perturbed by 5e-6 (relative, random
#      per entry and step: how far torch's and XLA's float32 networks differ),
#   C: this package vs diffusers float32 (samplers with `noise` and `clip_x0` as the
#      contract states them),
#   D: C with a mistake in the maths: the large variance (ddpm), no clipping of the
#      last x_0 (ddpm_clip), eps recomputed from the clipped x_0 (ddim_clip, eta05).
#                      A        B        C        D           tolerance
#   ddpm_clip        3.5e-5   1.5e-6   5.5e-5   2.8e-2        2e-4
#   ddpm             5.5e-6   3.4e-7   7.4e-6   4.0e-5        2e-5
#   ddim_clip        1.5e-3   9.1e-3   6.6e-3   2.0           3e-2
#   ddim             6.8e-7   1.0e-6   8.0e-7   -             5e-6
#   ddim_eta05_clip  1.4e-4   5.0e-4   3.7e-4   2.0 (1.1 for eta 0.4)   2e-3
# The clipped DDIM loop is the touchiest: deterministic, and an x_0 entry at the clip
# boundary passes its rounding on undamped (B shows the float64 loop itself does so).
LOOP_TOLERANCE = {
    "ddpm_clip": 2e-4,
    "ddpm": 2e-5,
    "ddim_clip": 3e-2,
    "ddim": 5e-6,
    "ddim_eta05_clip": 2e-3,
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, weights):
    directory = write_unet(tmp_path_factory.mktemp("ddpm-tiny"), TINY_CONFIG, weights)
    return cd.load_unet2d(directory)


@needs_noise
@pytest.mark.parametrize("loop", LOOPS)
def test_sampling_matches_diffusers_scheduler_loop(tmp_path, reference, converted, loop):
    kind, clip, eta = LOOPS[loop]
    name = "DDPMScheduler" if kind == "ddpm" else "DDIMScheduler"
    scheduler = cd.load_ddpm_scheduler(
        write_scheduler(tmp_path, _class_name=name, clip_sample=clip)
    )
    n = scheduler["num_train_timesteps"]
    process = DDPM(
        N=n,
        schedule=scheduler["beta_schedule"],
        beta_start=scheduler["beta_start"],
        beta_end=scheduler["beta_end"],
    )
    kwargs, params = converted
    score_fn = make_score_fn(
        process, NetApply(UNet(**kwargs)), params, scheduler["parametrization"]
    )
    timesteps = reference[f"{loop}_timesteps"]
    np.testing.assert_array_equal(cd.inference_timesteps(scheduler, len(timesteps)), timesteps)
    grid = timesteps / (n - 1)  # DDPM level i sits at t_i = i / (N - 1)
    noise = jnp.asarray(make_noise(len(grid) + 1))
    options = dict(grid=grid, noise=noise, clip_x0=scheduler["clip_x0"])
    key = jax.random.PRNGKey(0)  # unused: every draw comes from `noise`
    if kind == "ddpm":
        variance = scheduler["variance"]
        out = samplers.ancestral(key, score_fn, process, SHAPE, variance=variance, **options)
    else:
        out = samplers.ddim(key, score_fn, process, SHAPE, eta=eta, **options)
    assert int(out.nfe) == len(grid)
    expected = reference[f"{loop}_samples"]
    err, scale = np.abs(np.asarray(out.samples) - expected).max(), np.abs(expected).max()
    assert err <= LOOP_TOLERANCE[loop] * scale, f"{loop}: max error {err:.3g}, scale {scale:.3g}"


# -- a work directory from a diffusers model (diffusers-unified-convert diffusers) ----------------


def test_imported_work_directory_samples_with_any_sampler_and_is_the_converted_network(
    tmp_path, weights
):
    import launcher_util as lu

    from diffusers_unified.experiment import config as config_lib
    from diffusers_unified.experiment import imports
    from diffusers_unified.experiment.run import build_run, restore
    from diffusers_unified.experiment.workdir import Workdir

    model = write_unet(tmp_path / "pipeline" / "unet", TINY_CONFIG, weights)
    (tmp_path / "pipeline" / "scheduler").mkdir()
    write_scheduler(tmp_path / "pipeline" / "scheduler")  # found beside unet/, as diffusers does
    workdir = tmp_path / "imported"
    assert imports.main(["diffusers", f"--model={model}", f"--workdir={workdir}"]) == 0
    config = Workdir(workdir).saved_config()
    config_lib.check_against_schema(config)
    assert (config.process.name, config.process.num_scales) == ("ddpm", 1000)
    assert config.process.conditioning == "index" and config.model.up_attention == "per_block"
    assert config.sampling.clip_x0 and config.data.dataset == "none"

    # The work directory's score function is the converted network's, under its scheduler.
    run = build_run(config)
    _, state = restore(run, Workdir(workdir))
    kwargs, params = cd.load_unet2d(model)
    process = DDPM(N=1000, schedule="linear", beta_start=1e-4, beta_end=0.02)
    direct = make_score_fn(process, NetApply(UNet(**kwargs)), params, "eps")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)), jnp.float32)
    for t in (0.02, 0.5, 0.97):
        t = jnp.full((2,), t)
        np.testing.assert_array_equal(run.score_fn(state.ema_params)(x, t), direct(x, t))

    # Any sampler through the launcher, on the imported model.
    for method in ("ddim", "ode"):
        result = lu.run(
            workdir,
            "--config.sampling.num_steps=10",
            f"--config.sampling.method={method}",
            "--config.sampling.num_samples=4",
            "--config.sampling.batch_size=4",
            "--allow_config_change",
            mode="sample",
            config=None,
            fast_compile=True,
        )
        assert result.code == 0, result
        assert "wrote 4 samples" in result.stderr

    # A second import into the same directory is refused, and changes nothing.
    assert imports.main(["diffusers", f"--model={model}", f"--workdir={workdir}"]) == 2
    assert imports.main(["diffusers", f"--model={tmp_path}", f"--workdir={tmp_path / 'x'}"]) == 5
    assert not (tmp_path / "x").exists()
