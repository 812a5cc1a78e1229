"""NCSN++ / DDPM++: parameter counts of the paper's configs, FIR resampling, noise conditioning,
the 1/sigma output scaling, dropout, mixed precision and a few training steps.

Agreement with the reference code's outputs is tested in test_convert_score_sde.py.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusers_unified.errors import ConfigError
from diffusers_unified.nets import NetApply, count_params, resample
from diffusers_unified.nets.layerspp import FourierFeatures, ResnetBlockBigGAN
from diffusers_unified.nets.ncsnpp import NCSNpp

FAST_COMPILE = True  # nearly all compile: no LLVM optimisation passes (conftest.py)

# -- the paper's configs (score SDE code, configs/{vp,subvp,ve}/cifar10_*_continuous.py) -------

# DDPM++ cont. (VP and sub-VP): BigGAN blocks without FIR, positional embedding of 999 t.
DDPMPP_CONT = dict(
    nf=128,
    ch_mult=(1, 2, 2, 2),
    num_res_blocks=4,
    attn_resolutions=(16,),
    dropout=0.1,
    resamp_with_conv=True,
    fir=False,
    fir_kernel=(1, 3, 3, 1),
    resblock_type="biggan",
    progressive="none",
    progressive_input="none",
    progressive_combine="sum",
    skip_rescale=True,
    embedding_type="positional",
    init_scale=0.0,
    conditional=True,
    scale_by_sigma=False,
    centered=True,
    act="swish",
)
# NCSN++ cont. (VE): FIR, residual input pyramid, Fourier features of log sigma, 1/sigma;
# the VE configs keep data in [0, 1] (data.centered = False).
NCSNPP_CONT = dict(
    DDPMPP_CONT,
    fir=True,
    progressive_input="residual",
    embedding_type="fourier",
    fourier_scale=16.0,
    scale_by_sigma=True,
    centered=False,
)
# CelebA 64x64: configs/ve/celeba_ncsnpp.py (the reference's CelebA-64 network, the same
# architecture as CIFAR-10's) trained as NCSN++ cont.: Fourier features and 1/sigma in place
# of that config's discrete-SMLD positional embedding. Attention at 16x16, the third level.
CELEBA64_NCSNPP_CONT = NCSNPP_CONT

# (kwargs, image size, parameters counted by the reference code itself on jax.eval_shape)
PAPER_CONFIGS = {
    "ddpmpp_cont": (DDPMPP_CONT, 32, 61_804_419),  # VP and sub-VP alike
    "ncsnpp_cont": (NCSNPP_CONT, 32, 62_758_915),
    "celeba64_ncsnpp_cont": (CELEBA64_NCSNPP_CONT, 64, 62_758_915),
    "ddpmpp_deep_cont": (dict(DDPMPP_CONT, num_res_blocks=8), 32, 106_632_579),
    "ncsnpp_deep_cont": (dict(NCSNPP_CONT, num_res_blocks=8), 32, 107_587_075),
}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if "deep" in n else n for n in PAPER_CONFIGS],
)
def test_parameter_counts_of_the_papers_configs(name):
    kwargs, size, expected = PAPER_CONFIGS[name]
    net = NetApply(NCSNpp(**kwargs))
    shapes = jax.eval_shape(lambda key: net.init(key, (1, size, size, 3)), jax.random.PRNGKey(0))
    assert count_params(shapes) == expected


# -- FIR resampling: closed forms -------------------------------------------------------


def test_fir_resampling_closed_forms():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
    # The box kernel (1, 1) is nearest-neighbour upsampling and 2x2 mean pooling.
    np.testing.assert_allclose(resample.upsample_2d(x, (1, 1)), resample.naive_upsample_2d(x))
    # Means of four O(1) numbers summed in another order: 1e-6.
    np.testing.assert_allclose(
        resample.downsample_2d(x, (1, 1)), resample.naive_downsample_2d(x), atol=1e-6
    )
    # (1, 3, 3, 1) is normalised: a constant image stays constant away from the zero padding.
    const = jnp.full((1, 8, 8, 1), 2.5)
    np.testing.assert_allclose(resample.upsample_2d(const, (1, 3, 3, 1))[:, 2:-2, 2:-2], 2.5)
    np.testing.assert_allclose(resample.downsample_2d(const, (1, 3, 3, 1))[:, 1:-1, 1:-1], 2.5)
    # The fused ops equal resampling and convolution done apart, away from the borders
    # (they pad once rather than twice); float32 sums of ~40 terms: 1e-5.
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 4))

    def conv(h, stride=1):
        return jax.lax.conv_general_dilated(
            h, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    k = (1, 3, 3, 1)
    up = resample.upsample_conv_2d(x, w, k)
    np.testing.assert_allclose(
        up[:, 3:-3, 3:-3], conv(resample.upsample_2d(x, k))[:, 3:-3, 3:-3], atol=1e-5
    )
    down = resample.conv_downsample_2d(x, w, k)
    np.testing.assert_allclose(
        down[:, 1:-1, 1:-1], resample.downsample_2d(conv(x), k)[:, 1:-1, 1:-1], atol=1e-5
    )


# -- tiny networks ------------------------------------------------------------------

TINY = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1)
# Fourier features, BigGAN blocks, FIR, output and input skips, 1/sigma.
TINY_VE = dict(TINY, progressive="output_skip", progressive_input="input_skip", centered=False)
# Positional embedding of 999 t, DDPM blocks, no FIR, no pyramid.
TINY_VP = dict(
    TINY,
    resblock_type="ddpm",
    fir=False,
    progressive_input="none",
    embedding_type="positional",
    scale_by_sigma=False,
)
SHAPE = (3, 8, 8, 2)
SIGMAS = jnp.asarray([0.02, 1.0, 40.0])
TIMES = jnp.asarray([10.0, 500.0, 990.0])


def numpy_params(module, shape=SHAPE, seed=0, scale=0.2):
    """Random parameters of the right structure, drawn in NumPy.

    The reference's near-zero init of every block's last conv would make the
    output vanish and the comparisons below vacuous; NumPy draws also keep
    the tests fast (no compile per random-number kernel).
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda k: NetApply(module).init(k, shape), jax.random.PRNGKey(0))
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype), shapes)


@functools.partial(jax.jit, static_argnums=(0, 5))
def run(net, params, x, noise_cond, rng=None, train=False):
    return net(params, x, noise_cond, train=train, rng=rng)


def images(shape=SHAPE, seed=1):
    return jax.random.uniform(jax.random.PRNGKey(seed), shape)


def test_noise_cond_kind_and_refused_settings():
    assert NCSNpp(**TINY_VE).noise_cond_kind == "sigma"
    assert NCSNpp(**TINY_VP).noise_cond_kind == "time"
    fourier_unscaled = NCSNpp(**dict(TINY_VP, embedding_type="fourier"))
    assert fourier_unscaled.noise_cond_kind == "sigma"
    with pytest.raises(ConfigError, match="parametrization 'eps'"):
        NCSNpp(embedding_type="positional", scale_by_sigma=True)
    with pytest.raises(ConfigError, match=r"progressive='skip' is not valid.*output_skip"):
        NCSNpp(progressive="skip")
    with pytest.raises(ConfigError, match="dtype must be one of float32, bfloat16, float16"):
        NCSNpp(dtype="float64")
    with pytest.raises(ConfigError, match="7x7 is not divisible by 2"):
        jax.eval_shape(
            lambda k: NetApply(NCSNpp(**TINY_VE)).init(k, (1, 7, 7, 2)), jax.random.PRNGKey(0)
        )
    with pytest.raises(ConfigError, match="12x12 is not divisible by 8"):
        jax.eval_shape(lambda k: NetApply(NCSNpp()).init(k, (1, 12, 12, 3)), jax.random.PRNGKey(0))


@pytest.mark.parametrize("kind", ["ve", "vp"])
def test_shape_and_noise_conditioning(kind):
    kwargs, cond = (TINY_VE, SIGMAS) if kind == "ve" else (TINY_VP, TIMES)
    net = NetApply(NCSNpp(**dict(kwargs, scale_by_sigma=False)))
    params = numpy_params(net.module)
    x = images()
    out = run(net, params, x, cond)
    assert out.shape == x.shape and out.dtype == jnp.float32
    # One image at three noise levels: three different outputs (the embedding reaches them).
    same = run(net, params, jnp.broadcast_to(x[:1], x.shape), cond)
    assert float(jnp.abs(same[0] - same[1]).max()) > 1e-2
    assert float(jnp.abs(same[1] - same[2]).max()) > 1e-2
    if kind == "ve":
        # A noise level shared by the batch is the per-example one repeated; float32: 1e-5.
        shared = run(net, params, x, cond[1])
        np.testing.assert_allclose(shared, run(net, params, x, jnp.full(3, cond[1])), atol=1e-5)


def test_labels_shift_the_noise_embedding():
    net = NetApply(NCSNpp(**dict(TINY_VP, num_classes=3)))
    params = numpy_params(net.module)
    assert params["label_embed"]["embedding"].shape == (4, 64)  # 3 classes + the null label
    x = images()
    labelled = jax.jit(lambda y: net(params, x, TIMES, y))
    by_label = [labelled(jnp.full(3, c)) for c in range(4)]
    assert float(jnp.abs(by_label[0] - by_label[1]).max()) > 1e-2
    # No labels means the null label, row num_classes; float32, another graph: 1e-5.
    np.testing.assert_allclose(run(net, params, x, TIMES), by_label[3], atol=1e-5)
    with pytest.raises(ValueError, match="labels y were given to an NCSNpp with num_classes=None"):
        NetApply(NCSNpp(**TINY_VP))(numpy_params(NCSNpp(**TINY_VP)), x, TIMES, jnp.zeros(3, int))


def test_scale_by_sigma_divides_the_output_by_sigma():
    scaled = NetApply(NCSNpp(**TINY_VE))
    plain = NetApply(NCSNpp(**dict(TINY_VE, scale_by_sigma=False)))
    params = numpy_params(scaled.module)  # the option adds no parameter
    x = images()
    out = run(scaled, params, x, SIGMAS)
    # One float32 division: 1e-6.
    sigma = SIGMAS[:, None, None, None]
    np.testing.assert_allclose(out * sigma, run(plain, params, x, SIGMAS), rtol=1e-6, atol=1e-7)


def test_dropout_only_in_train_mode():
    net = NetApply(NCSNpp(**TINY_VP))
    no_dropout = NetApply(NCSNpp(**dict(TINY_VP, dropout=0.0)))
    params = numpy_params(net.module)
    x, key = images(), jax.random.PRNGKey(3)
    evaluated = run(net, params, x, TIMES)
    a = run(net, params, x, TIMES, key, True)
    b = run(net, params, x, TIMES, jax.random.PRNGKey(4), True)
    assert float(jnp.abs(a - evaluated).max()) > 1e-3 and float(jnp.abs(a - b).max()) > 1e-3
    # Train mode changes nothing else.
    np.testing.assert_array_equal(run(no_dropout, params, x, TIMES, key, True), evaluated)


@pytest.mark.parametrize("dtype, tol", [("bfloat16", 0.03), ("float16", 0.005)])
def test_half_precision_activations_track_float32(dtype, tol):
    full = NetApply(NCSNpp(**TINY_VE))
    half = NetApply(NCSNpp(**dict(TINY_VE, dtype=dtype)))
    params = numpy_params(full.module)
    x = images()
    ref = run(full, params, x, SIGMAS)
    out = run(half, params, x, SIGMAS)
    assert out.dtype == jnp.float32
    half_shapes = jax.eval_shape(lambda k: half.init(k, SHAPE), jax.random.PRNGKey(0))
    assert {s.dtype for s in jax.tree.leaves(half_shapes)} == {jnp.dtype("float32")}
    # Relative to the output's scale. bfloat16 keeps 8 significant bits (relative rounding
    # 2^-9 = 0.2% per operation), float16 11 (0.02%); through ~20 layers with float32
    # normalisation statistics and softmax: observed 0.7% and 0.1%, limits ~5x those.
    err = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
    assert err < tol, err


def test_initialisation_follows_the_reference():
    block = ResnetBlockBigGAN(nn.silu, out_ch=32)
    params = block.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 16)))["params"]
    # DDPM's variance scaling, fan_avg uniform: Var = scale / fan_avg.
    kernel = np.asarray(params["conv_0"]["kernel"])  # 3x3, 16 -> 32
    assert abs(kernel.var() * 9 * (16 + 32) / 2 - 1.0) < 0.1  # 4608 draws: 2% standard error
    # init_scale 0 is the reference's 1e-10: U(-l, l), l = sqrt(3e-10 / fan_avg), not zero.
    limit = np.sqrt(3e-10 / (9 * 32))
    assert 0.5 * limit < np.abs(np.asarray(params["conv_1"]["kernel"])).max() <= limit
    np.testing.assert_array_equal(params["conv_0"]["bias"], 0.0)
    # Gaussian Fourier features: 256 fixed weights ~ N(0, 16^2), std within 15%.
    fourier = FourierFeatures(256, 16.0).init(jax.random.PRNGKey(0), jnp.zeros(1))["params"]
    assert abs(float(np.std(fourier["fourier_weights"])) / 16 - 1) < 0.15


@pytest.mark.slow  # ~25 s of CPU cold: one gradient compile of the whole network
def test_adam_steps_lower_a_denoising_loss():
    """VE denoising score matching, sigma^2-weighted: E || sigma s(x + sigma z, sigma) + z ||^2."""
    net = NetApply(NCSNpp(**dict(TINY_VE, nf=8, dropout=0.0)))
    shape = (8, 8, 8, 1)
    params = net.init(jax.random.PRNGKey(0), shape)
    x = jnp.broadcast_to(jnp.linspace(0.0, 1.0, 8)[None, :, None, None], shape)  # ramps
    sigma = jnp.geomspace(0.05, 2.0, 8)
    z = jax.random.normal(jax.random.PRNGKey(1), shape)
    opt = optax.adam(2e-3)

    def loss(p):
        score = net(p, x + sigma[:, None, None, None] * z, sigma)
        return jnp.mean(jnp.sum((sigma[:, None, None, None] * score + z) ** 2, axis=(1, 2, 3)))

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
    # At init the output is ~0, so the loss is E|z|^2 = 64; fitting z on a fixed batch
    # takes a visible bite out of it within 15 steps.
    assert losses[-1] < 0.8 * losses[0], losses
