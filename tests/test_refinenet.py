"""NCSNv2's RefineNet: the PyTorch reference's outputs, parameter counts, InstanceNorm++,
interpolation, the 1/sigma output, mixed precision and a few training steps.

Agreement with the score SDE code's JAX port is tested in test_convert_score_sde.py.
"""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from fixtures.make_score_sde_fixture import draw_reference_params
from fixtures.make_score_sde_ncsnv2_torch_fixture import CASES, package_layout

from diffusers_unified.errors import ConfigError
from diffusers_unified.nets import NetApply, count_params
from diffusers_unified.nets.refinenet import ARCHITECTURES, RefineNet, refinenet_kwargs
from diffusers_unified.nets.refinenet_layers import InstanceNorm2dPlus, _interp_matrix

FAST_COMPILE = True  # nearly all compile: no LLVM optimisation passes (conftest.py)

TORCH = np.load(pathlib.Path(__file__).parent / "fixtures" / "score_sde_ncsnv2_torch_outputs.npz")


@functools.partial(jax.jit, static_argnums=0)
def run(net, params, x, noise_cond):
    return net(params, x, noise_cond)


@pytest.mark.parametrize("case", ["ncsnv2", pytest.param("ncsnv2_deeper", marks=pytest.mark.slow)])
def test_defaults_give_the_pytorch_references_outputs(case):
    kwargs, size, channels, _ = CASES[case]
    assert json.loads(str(TORCH[f"{case}/kwargs"])) == json.loads(json.dumps(kwargs))
    module = RefineNet(**kwargs)
    params = draw_reference_params(package_layout(module, (size, size, channels)))
    out = run(NetApply(module), params, TORCH[f"{case}/x"], TORCH[f"{case}/noise_cond"])
    ref = TORCH[f"{case}/out"]
    # Relative to the output's scale. The same float32 maths in another order (XLA vs
    # PyTorch convolutions, the align_corners interpolation as a matrix product):
    # observed <= 3e-6, against 0.05-0.3 when either PyTorch/JAX-port switch is flipped.
    err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
    assert err < 1e-5, err


# (kwargs, image size, parameters counted by the reference code itself)
COUNTS = {
    # ncsnv2 configs/cifar10.yml (ngf 128), counted on the PyTorch NCSNv2.
    "ncsnv2_cifar10": (refinenet_kwargs("ncsnv2"), 32, 29_694_083),
    # The score SDE port (configs/ve/ncsnv2/cifar10.py), counted on its JAX NCSNv2.
    "score_sde_ncsnv2_cifar10": (refinenet_kwargs("ncsnv2", score_sde_port=True), 32, 33_970_563),
    # NCSNv2Deeper (configs/bedroom.yml) and NCSNv2Deepest (configs/ffhq.yml), PyTorch.
    "ncsnv2_deeper": (refinenet_kwargs("ncsnv2_deeper"), 128, 83_445_379),
    "ncsnv2_deepest": (refinenet_kwargs("ncsnv2_deepest"), 256, 94_132_611),
}


@pytest.mark.parametrize("name", list(COUNTS))
def test_parameter_counts(name):
    kwargs, size, expected = COUNTS[name]
    net = NetApply(RefineNet(**kwargs))
    shapes = jax.eval_shape(lambda k: net.init(k, (1, size, size, 3)), jax.random.PRNGKey(0))
    assert count_params(shapes) == expected


def test_instance_norm_plus_closed_form():
    x = np.random.default_rng(0).normal(size=(2, 5, 4, 6)).astype(np.float32) * 3 + 1
    alpha, gamma, beta = (
        np.random.default_rng(i).normal(size=6).astype(np.float32) for i in (1, 2, 3)
    )
    params = {"alpha": alpha, "gamma": gamma, "beta": beta}
    for unbiased in (True, False):
        mu, var = x.mean(axis=(1, 2)), x.var(axis=(1, 2))
        spread = (mu - mu.mean(-1, keepdims=True)) / np.sqrt(
            mu.var(-1, ddof=int(unbiased), keepdims=True) + 1e-5
        )
        h = (x - mu[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5) + spread[
            :, None, None
        ] * alpha
        out = InstanceNorm2dPlus(unbiased).apply({"params": params}, x)
        # float32 statistics of 20 values: 1e-5.
        np.testing.assert_allclose(out, gamma * h + beta, rtol=1e-5, atol=1e-5)


def test_interpolation_matrices():
    # align_corners: the corners map to the corners, so a linear ramp stays exactly linear.
    m = _interp_matrix(4, 8, align_corners=True)
    np.testing.assert_allclose(m @ np.arange(4.0), np.arange(8) * 3 / 7, atol=1e-6)
    # Half-pixel centres: jax.image.resize's bilinear upsampling, edges held.
    x = np.random.default_rng(0).normal(size=5).astype(np.float32)
    half = _interp_matrix(5, 10, align_corners=False) @ x
    np.testing.assert_allclose(half, jax.image.resize(x, (10,), "bilinear"), atol=1e-6)
    np.testing.assert_allclose(np.sum(m, axis=1), 1.0, atol=1e-6)


TINY = dict(ngf=8, centered=False)
SHAPE = (3, 16, 16, 3)
SIGMAS = jnp.asarray([0.05, 1.0, 30.0])


def tiny_params(module, shape=SHAPE):
    return draw_reference_params(package_layout(module, shape[1:]))


def test_output_is_divided_by_sigma_and_otherwise_unconditioned():
    net = NetApply(RefineNet(**TINY))
    assert net.module.noise_cond_kind == "sigma"
    params = tiny_params(net.module)
    x = jnp.broadcast_to(jax.random.uniform(jax.random.PRNGKey(0), SHAPE[1:]), SHAPE)
    out = run(net, params, x, SIGMAS)
    assert out.shape == SHAPE and out.dtype == jnp.float32
    # One image at three noise levels: sigma s(x, sigma) is the same network output; 1e-6.
    scaled = out * SIGMAS[:, None, None, None]
    np.testing.assert_allclose(scaled, jnp.broadcast_to(scaled[1], SHAPE), rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(scaled).max()) > 1.0
    plain = NetApply(RefineNet(**dict(TINY, scale_by_sigma=False)))
    assert plain.module.noise_cond_kind == "time"
    np.testing.assert_allclose(run(plain, params, x, SIGMAS), scaled, rtol=1e-6, atol=1e-6)


def test_bad_settings_and_inputs():
    with pytest.raises(ConfigError, match="one length"):
        RefineNet(ch_mult=(1, 2), dilations=(1, 1, 2))
    with pytest.raises(ConfigError, match="interpolation='bicubic'"):
        RefineNet(interpolation="bicubic")
    with pytest.raises(ConfigError, match="unknown RefineNet architecture 'huge'"):
        refinenet_kwargs("huge")
    net = NetApply(RefineNet(**TINY))
    with pytest.raises(ConfigError, match="15x15 is not divisible by 2"):
        jax.eval_shape(lambda k: net.init(k, (1, 15, 15, 3)), jax.random.PRNGKey(0))
    deepest = NetApply(RefineNet(**ARCHITECTURES["ncsnv2_deepest"]))
    with pytest.raises(ConfigError, match="20x20 is not divisible by 8"):
        jax.eval_shape(lambda k: deepest.init(k, (1, 20, 20, 3)), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="takes no labels"):
        RefineNet(**TINY).apply({"params": {}}, jnp.zeros(SHAPE), SIGMAS, jnp.zeros(3, int))


@pytest.mark.parametrize("dtype, tol", [("bfloat16", 0.05), ("float16", 0.01)])
def test_half_precision_activations_track_float32(dtype, tol):
    full = NetApply(RefineNet(**TINY))
    half = NetApply(RefineNet(**dict(TINY, dtype=dtype)))
    params = tiny_params(full.module)
    x = jax.random.uniform(jax.random.PRNGKey(0), SHAPE)
    ref, out = run(full, params, x, SIGMAS), run(half, params, x, SIGMAS)
    assert out.dtype == jnp.float32
    # As for NCSN++: 8 (bfloat16) or 11 (float16) significant bits per operation, here
    # through ~40 layers with float32 normalisation statistics; relative to the output's
    # scale, observed 2.3% and 0.23%: limits ~2x and ~4x those.
    err = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
    assert err < tol, err


def test_adam_steps_lower_a_denoising_loss():
    """sigma^2-weighted denoising score matching, E || sigma s(x + sigma z, sigma) + z ||^2.

    On a two-stage RefineNet (the second dilated, not downsampled): the gradient of the
    paper's four stages took ~20 s to compile cold, and adds no kind of layer.
    """
    net = NetApply(
        RefineNet(ngf=4, ch_mult=(1, 2), dilations=(1, 2), refine_mult=(1, 2), centered=False)
    )
    shape = (8, 8, 8, 1)
    params = net.init(jax.random.PRNGKey(0), shape)
    x = jnp.broadcast_to(jnp.linspace(0.0, 1.0, 8)[None, :, None, None], shape)  # ramps
    sigma = jnp.geomspace(0.05, 2.0, 8)[:, None, None, None]
    z = jax.random.normal(jax.random.PRNGKey(1), shape)
    opt = optax.adam(1e-3)

    def loss(p):
        score = net(p, x + sigma * z, sigma[:, 0, 0, 0])
        return jnp.mean(jnp.sum((sigma * score + z) ** 2, axis=(1, 2, 3)))

    @jax.jit
    def step(p, s):
        value, grads = jax.value_and_grad(loss)(p)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, value

    state, losses = opt.init(params), []
    for _ in range(15):
        params, state, value = step(params, state)
        losses.append(float(value))
    assert np.all(np.isfinite(losses))
    # Fitting z on a fixed batch takes a visible bite out of the loss within 15 steps.
    assert losses[-1] < 0.8 * losses[0], losses
