"""The DDPM U-Net at the level of values: against diffusers' UNet2DModel and a NumPy transcription.

Two references. (1) diffusers' `UNet2DModel` of the `google/ddpm-cifar10-32` family
(attention after every upsampling block), run once by
`fixtures/make_diffusers_fixture.py` on weights the tests regenerate from a NumPy
seed. (2) `numpy_unet` below, a float64 NumPy transcription of the architecture of
the DDPM code, written independently of the Flax module and itself checked against
(1); it covers what diffusers cannot express: the score SDE code's once-per-level
attention on the way up, and DDPM++'s 1/sqrt(2) rescaling of residual sums.
"""

import collections
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures.make_diffusers_fixture import (
    FIXTURE,
    SHAPE,
    TIMESTEPS,
    TINY_CONFIG,
    draw_weights,
    make_inputs,
)

from diffusers_unified.convert.diffusers import convert_state_dict, unet_kwargs
from diffusers_unified.nets import NetApply, UNet, count_params

FAST_COMPILE = True  # nearly all compile: no LLVM optimisation passes (conftest.py)


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURE))


@pytest.fixture(scope="module")
def tiny(reference):
    """The tiny diffusers network: UNet keyword arguments and converted parameters."""
    shapes = {k: tuple(v) for k, v in json.loads(str(reference["tensor_shapes"])).items()}
    return unet_kwargs(TINY_CONFIG), convert_state_dict(draw_weights(shapes), TINY_CONFIG)


def apply_all(kwargs, params, xs=None, conds=TIMESTEPS):
    """The U-Net on each (x, noise_cond) pair of the fixture's inputs, in one compiled program."""
    net = NetApply(UNet(**kwargs))
    xs = make_inputs() if xs is None else xs
    run = jax.jit(jax.vmap(net, in_axes=(None, 0, 0)))
    return np.asarray(run(params, jnp.asarray(xs), jnp.asarray(conds, jnp.float32)))


def assert_close_to(out, expected, rel):
    """max |out - expected| <= rel * max |expected|: one scale for the whole output."""
    err = np.abs(np.asarray(out, np.float64) - expected).max()
    assert err <= rel * np.abs(expected).max(), (
        f"max error {err:.3g}, scale {np.abs(expected).max():.3g}"
    )


# -- a NumPy transcription of the DDPM U-Net ---------------------------------------


class _Modules:
    """Hands out the parameters of each Flax submodule, by class, in creation order."""

    def __init__(self, tree):
        self.tree, self.count = tree, collections.Counter()

    def take(self, cls):
        self.count[cls] += 1
        return self.tree[f"{cls}_{self.count[cls] - 1}"]


def _conv3x3(p, x, stride=1):
    # DDPM pads 1 on each side; its stride-2 downsampling pads (0, 1), as diffusers'
    # Downsample2D with padding=0 does.
    pad = (1, 1) if stride == 1 else (0, 1)
    xp = np.pad(x, ((0, 0), pad, pad, (0, 0)))
    h, w = (xp.shape[1] - 3) // stride + 1, (xp.shape[2] - 3) // stride + 1
    out = sum(
        xp[:, dy : dy + stride * h : stride, dx : dx + stride * w : stride] @ p["kernel"][dy, dx]
        for dy in range(3)
        for dx in range(3)
    )
    return out + p["bias"]


def _dense(p, x):
    return x @ p["kernel"] + p["bias"]


def _group_norm(p, x, groups, eps=1e-6):
    g = x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    g = (g - g.mean(axes, keepdims=True)) / np.sqrt(g.var(axes, keepdims=True) + eps)
    return g.reshape(x.shape) * p["scale"] + p["bias"]


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _resnet(p, x, temb, out_ch, groups, skip_rescale):
    h = _conv3x3(p["Conv_0"], _silu(_group_norm(p["GroupNorm_0"], x, groups)))
    h = h + _dense(p["Dense_0"], _silu(temb))[:, None, None, :]
    h = _conv3x3(p["Conv_1"], _silu(_group_norm(p["GroupNorm_1"], h, groups)))
    x = _dense(p["Dense_1"], x) if x.shape[-1] != out_ch else x
    return (x + h) / math.sqrt(2.0) if skip_rescale else x + h


def _attention(p, x, groups, skip_rescale):
    b, height, width, c = x.shape
    h = _group_norm(p["GroupNorm_0"], x, groups).reshape(b, height * width, c)
    q, k, v = (_dense(p[f"Dense_{i}"], h) for i in range(3))
    logits = q @ k.transpose(0, 2, 1) / math.sqrt(c)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    h = _dense(p["Dense_3"], (w / w.sum(-1, keepdims=True)) @ v).reshape(x.shape)
    return (x + h) / math.sqrt(2.0) if skip_rescale else x + h


def numpy_unet(
    params,
    x,
    cond,
    *,
    ch,
    ch_mult,
    num_res_blocks,
    attn_resolutions,
    num_groups,
    up_attention,
    skip_rescale=False,
    **_,
):
    """DDPM's U-Net (diffusion_tf/models/unet.py) in float64, on a Flax parameter tree.

    `up_attention` "per_block" is Ho et al.'s placement of attention on the way up,
    "per_level" the score SDE code's `ddpm.py`. GroupNorm uses exactly `num_groups`.
    """
    params, groups = jax.tree.map(lambda a: np.asarray(a, np.float64), params), num_groups
    x, cond = np.asarray(x, np.float64), np.asarray(cond, np.float64)
    modules = _Modules(params)
    half = ch // 2
    arg = cond[:, None] * np.exp(-math.log(10000) / (half - 1) * np.arange(half))
    emb_params = modules.take("NoiseEmbedding")
    temb = _dense(emb_params["Dense_0"], np.concatenate([np.sin(arg), np.cos(arg)], axis=1))
    temb = _dense(emb_params["Dense_1"], _silu(temb))

    def res(h, out_ch):
        return _resnet(modules.take("ResnetBlock"), h, temb, out_ch, groups, skip_rescale)

    def attn(h):
        return _attention(modules.take("AttnBlock"), h, groups, skip_rescale)

    hs = [_conv3x3(modules.take("Conv"), x)]
    for level, mult in enumerate(ch_mult):
        for _ in range(num_res_blocks):
            h = res(hs[-1], ch * mult)
            hs.append(attn(h) if h.shape[1] in attn_resolutions else h)
        if level != len(ch_mult) - 1:
            hs.append(_conv3x3(modules.take("Downsample")["Conv_0"], hs[-1], stride=2))
    h = res(attn(res(hs[-1], hs[-1].shape[-1])), hs[-1].shape[-1])
    for level, mult in reversed(list(enumerate(ch_mult))):
        for _ in range(num_res_blocks + 1):
            h = res(np.concatenate([h, hs.pop()], axis=-1), ch * mult)
            if up_attention == "per_block" and h.shape[1] in attn_resolutions:
                h = attn(h)
        if up_attention == "per_level" and h.shape[1] in attn_resolutions:
            h = attn(h)
        if level != 0:
            h = np.repeat(np.repeat(h, 2, axis=1), 2, axis=2)
            h = _conv3x3(modules.take("Upsample")["Conv_0"], h)
    h = _silu(_group_norm(modules.take("GroupNorm"), h, groups))
    return _conv3x3(modules.take("Conv"), h)


def numpy_all(kwargs, params):
    xs = make_inputs()
    return np.stack(
        [numpy_unet(params, x, t, **kwargs) for x, t in zip(xs, TIMESTEPS, strict=True)]
    )


def seeded_params(kwargs, seed=0):
    """Parameters of UNet(**kwargs) for SHAPE: N(0, 1/fan_in) kernels, GroupNorm scales near 1.

    Not the U-Net's initialisation, which zeroes the last layer of every residual
    branch and would leave half of the network untested.
    """
    net = NetApply(UNet(**kwargs))
    shapes = jax.eval_shape(lambda key: net.init(key, SHAPE), jax.random.PRNGKey(0))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        z = rng.standard_normal(s.shape)
        name = path[-1].key
        if name == "kernel":
            return (z / math.sqrt(math.prod(s.shape[:-1]))).astype(np.float32)
        return (1.0 + 0.2 * z if name == "scale" else 0.1 * z).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


# -- the tests ---------------------------------------------------------------------


def test_ddpm_cifar10_model_has_the_parameters_of_ddpm_and_diffusers(reference):
    count = lambda net: count_params(
        jax.eval_shape(lambda key: net.init(key, (1, 32, 32, 3)), jax.random.PRNGKey(0))
    )
    # DDPM's CIFAR-10 model: Ho et al.'s placement of attention, 35.7M parameters, the
    # count of google/ddpm-cifar10-32's UNet2DModel exactly.
    assert count(NetApply(UNet(up_attention="per_block"))) == 35_746_307
    assert int(reference["ddpm_cifar10_32_params"]) == 35_746_307
    # The score SDE code's ddpm.py (one attention per upsampling level) has 35.2M.
    assert count(NetApply(UNet())) == 35_218_947


def test_every_block_attention_matches_diffusers_unet2d(reference, tiny):
    kwargs, params = tiny
    # float32 convolutions summed in another order than torch's, through ~20 layers
    # (and sin of arguments up to 999, whose float32 ulp is 6e-5): measured 5e-6 of the
    # output scale; 1e-4 leaves a factor 20.
    assert_close_to(apply_all(kwargs, params), reference["unet_out"], 1e-4)


def test_numpy_transcription_matches_diffusers_unet2d(reference, tiny):
    kwargs, params = tiny
    # float64 against diffusers' float32: the same 5e-6 of the scale.
    assert_close_to(numpy_all(kwargs, params), reference["unet_out"], 1e-4)


@pytest.mark.parametrize(
    "options",
    [
        dict(up_attention="per_level"),
        dict(up_attention="per_level", skip_rescale=True),
        dict(up_attention="per_block", skip_rescale=True),
    ],
)
def test_unet_matches_the_numpy_transcription(options):
    kwargs = dict(
        ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8, 4), num_groups=4, **options
    )
    params = seeded_params(kwargs)
    out = apply_all(kwargs, params)
    # float32 against float64 through ~25 layers, as above.
    assert_close_to(out, numpy_all(kwargs, params), 1e-4)


def test_skip_rescale_changes_the_transcription():
    """The transcription's skip_rescale matters by far more than the 1e-4 it is held to."""
    base = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8, 4), num_groups=4)
    params = seeded_params(dict(base, up_attention="per_level"))
    per_level = numpy_all(dict(base, up_attention="per_level"), params)
    rescaled = numpy_all(dict(base, up_attention="per_level", skip_rescale=True), params)
    assert np.abs(per_level - rescaled).max() > 0.1 * np.abs(per_level).max()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_keeps_parameters_and_output_float32(tiny, dtype):
    kwargs, params = tiny
    net = NetApply(UNet(**kwargs, dtype=dtype))
    shapes = jax.eval_shape(lambda key: net.init(key, SHAPE), jax.random.PRNGKey(0))
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype("float32")}
    low = apply_all(dict(kwargs, dtype=dtype), params)
    assert low.dtype == np.float32
    full = apply_all(kwargs, params)
    # Activations rounded to 8 (bfloat16) or 11 (float16) significant bits at every
    # layer: measured 1.4% (bfloat16) and 0.26% (float16) of the output scale.
    rel = {"bfloat16": 0.05, "float16": 0.01}[dtype]
    err = np.abs(low - full).max() / np.abs(full).max()
    assert 0 < err < rel


def test_unet_rejects_unknown_options():
    x = (1, 8, 8, 3)
    init = lambda **kw: jax.eval_shape(
        lambda key: NetApply(UNet(ch=16, ch_mult=(1, 2), **kw)).init(key, x), jax.random.PRNGKey(0)
    )
    with pytest.raises(ValueError, match="valid: per_level, per_block"):
        init(up_attention="every")
    with pytest.raises(ValueError, match="valid: float32, bfloat16, float16"):
        init(dtype="float64")
