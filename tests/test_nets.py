"""Networks: shapes, the shared-noise-level shortcut, labels, dropout, embeddings, NetApply."""

import ast
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusers_unified import nets
from diffusers_unified.nets import (
    MLP,
    GaussianFourierProjection,
    NetApply,
    UNet,
    count_params,
    sinusoidal_embedding,
    trainable_mask,
)
from diffusers_unified.parametrization import make_score_fn
from diffusers_unified.processes import NOISE_COND_SCALE, VPSDE

FAST_COMPILE = True  # nearly all compile: no LLVM optimisation passes (conftest.py)

TINY = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
IMAGE = (3, 8, 8, 1)
COND = jnp.asarray([0.0, 250.0, 999.0])


def param_shapes(net: NetApply, x_shape):
    return jax.eval_shape(lambda key: net.init(key, x_shape), jax.random.PRNGKey(0))


def numpy_params(net: NetApply, x_shape, scale=0.3, seed=0):
    """Random parameters of the right structure, drawn in NumPy.

    The U-Net zero-initialises the last layer of each residual branch and its
    output layer, so freshly initialised parameters would make every output 0
    and most comparisons below vacuous. NumPy draws also keep the tests fast:
    XLA takes about a second on CPU to compile each random-number kernel of
    an initialisation.
    """
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype), param_shapes(net, x_shape)
    )


# -- embeddings ----------------------------------------------------------------


def ddpm_timestep_embedding(timesteps, dim):
    """`get_timestep_embedding` of the DDPM code (diffusion_tf/nn.py), in NumPy."""
    half = dim // 2
    freqs = np.exp(np.arange(half, dtype=np.float64) * -(math.log(10000) / (half - 1)))
    arg = np.asarray(timesteps, np.float64)[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(arg), np.cos(arg)], axis=1)
    return np.pad(emb, [(0, 0), (0, dim % 2)])


@pytest.mark.parametrize("dim", [4, 33, 128])
def test_sinusoidal_embedding_matches_ddpm(dim):
    t = np.asarray([0.0, 1.0, 17.0, 500.0, 999.0])
    expected = ddpm_timestep_embedding(t, dim)
    # float32 sin/cos of arguments up to 999: absolute error ~ 999 * 2^-24 ~ 6e-5.
    np.testing.assert_allclose(sinusoidal_embedding(t, dim), expected, atol=2e-4)
    shared = sinusoidal_embedding(jnp.float32(17.0), dim)
    assert shared.shape == (dim,)
    np.testing.assert_allclose(shared, expected[2], atol=2e-4)


def test_fourier_features_are_fixed_random_features_of_t():
    assert nets.embeddings.NOISE_COND_SCALE == NOISE_COND_SCALE
    scale, weights = 4.0, nets.embeddings.FOURIER_WEIGHTS
    proj = GaussianFourierProjection(2048, scale=scale)
    params = proj.init(jax.random.PRNGKey(0), COND)["params"]
    w = np.asarray(params[weights], np.float64)
    # 1024 draws of N(0, scale^2): the sample std is within 5 standard errors (2.2% each).
    assert w.shape == (1024,) and abs(w.std() / scale - 1) < 0.11

    arg = 2 * np.pi * w[None, :] * (np.asarray(COND)[:, None] / 999.0)
    expected = np.concatenate([np.sin(arg), np.cos(arg)], axis=1)
    # float32 sin/cos of arguments up to 2 pi * 5 scale.
    np.testing.assert_allclose(proj.apply({"params": params}, COND), expected, atol=1e-4)
    assert proj.apply({"params": params}, COND[1]).shape == (2048,)


def test_ddpm_init_is_fan_avg_uniform():
    init = nets.embeddings.ddpm_init(2.0)
    kernel = np.asarray(init(jax.random.PRNGKey(0), (3, 3, 16, 32)))
    limit = math.sqrt(3 * 2.0 / (9 * (16 + 32) / 2))
    assert kernel.shape == (3, 3, 16, 32) and np.abs(kernel).max() <= limit
    # 4608 uniform draws: the variance limit^2 / 3 to within 5 standard errors (~2% each).
    assert abs(kernel.var() / (limit**2 / 3) - 1) < 0.1
    np.testing.assert_array_equal(nets.embeddings.ddpm_init(0.0)(None, (3, 3, 4, 4)), 0.0)


def test_unknown_names_are_rejected_with_the_valid_ones():
    x = jnp.zeros((2, 2))
    with pytest.raises(ValueError, match="valid: silu"):
        MLP(act="tanhh").init(jax.random.PRNGKey(0), x, COND[:2])
    with pytest.raises(ValueError, match="valid: sinusoidal, fourier"):
        MLP(embedding="learned").init(jax.random.PRNGKey(0), x, COND[:2])
    with pytest.raises(ValueError, match=r"expected \(batch,\) or \(\)"):
        MLP().init(jax.random.PRNGKey(0), x, jnp.zeros((2, 1)))


# -- MLP -----------------------------------------------------------------------


def test_mlp_default_is_the_toy_score_network():
    net = NetApply(MLP())
    params = param_shapes(net, (5, 2))
    # (2 + 128) * 256 + 256, twice 256 * 256 + 256, then 256 * 2 + 2.
    assert count_params(params) == 130 * 256 + 256 + 2 * (256 * 256 + 256) + 256 * 2 + 2
    x = jax.ShapeDtypeStruct((5, 2), jnp.float32)
    assert jax.eval_shape(net, params, x, jax.ShapeDtypeStruct((5,), jnp.float32)).shape == (5, 2)
    assert param_shapes(NetApply(MLP(hidden=(16, 16))), (4, 7))["out"]["kernel"].shape == (16, 7)


def test_mlp_split_first_layer_is_the_concatenation():
    """W_x x + W_e e + b is the Dense layer on [x; e] that the architecture describes."""
    net = NetApply(MLP(hidden=(32, 32)))
    params = numpy_params(net, (4, 3))
    x, cond = jax.random.normal(jax.random.PRNGKey(1), (4, 3)), COND[jnp.asarray([0, 1, 2, 1])]
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    inputs = np.concatenate([np.asarray(x), ddpm_timestep_embedding(cond, 128)], axis=1)
    kernel = np.concatenate([p["in_x"]["kernel"], p["in_emb"]["kernel"]], axis=0)
    silu = lambda a: a / (1 + np.exp(-a))
    h = silu(inputs @ kernel + p["in_x"]["bias"])
    h = silu(h @ p["hidden_1"]["kernel"] + p["hidden_1"]["bias"])
    expected = h @ p["out"]["kernel"] + p["out"]["bias"]
    np.testing.assert_allclose(jax.jit(net)(params, x, cond), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("embedding", ["sinusoidal", "fourier"])
def test_mlp_scalar_noise_cond_is_the_broadcast_one(embedding):
    net = NetApply(MLP(hidden=(32, 32), embedding=embedding))
    params = numpy_params(net, (6, 2))
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 2))

    @jax.jit
    def both(value):
        return net(params, x, value), net(params, x, jnp.full((6,), value))

    for value in [0.0, 321.5, 999.0]:
        shared, broadcast = both(jnp.float32(value))
        np.testing.assert_allclose(shared, broadcast, rtol=1e-5, atol=1e-5)


def test_mlp_labels_condition_and_none_is_the_null_label():
    net = NetApply(MLP(hidden=(32, 32), num_classes=3))
    params = numpy_params(net, (3, 2))
    x, labels = jnp.ones((3, 2)), jnp.asarray([0, 1, 2])

    @jax.jit
    def outputs():
        return (
            net(params, x, COND, labels),
            net(params, x, COND, jnp.asarray([1, 2, 0])),
            net(params, x, COND),
            net(params, x, COND, jnp.full((3,), 3)),
            net(params, x, COND[1], labels),
            net(params, x, jnp.full((3,), COND[1]), labels),
        )

    out, other, none, null, shared, broadcast = outputs()
    assert np.all(np.abs(np.asarray(out - other)) > 1e-4)
    np.testing.assert_allclose(none, null, atol=1e-6)
    # Labels with a shared noise level: the per-label table gives the per-example result.
    np.testing.assert_allclose(shared, broadcast, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="num_classes=None"):
        MLP().init(jax.random.PRNGKey(0), x, COND, labels)


def test_fourier_weights_get_no_gradient_and_are_masked():
    net = NetApply(MLP(hidden=(16,), emb_dim=16, embedding="fourier"))
    params = numpy_params(net, (4, 2))
    x, cond = jnp.ones((4, 2)), COND[jnp.asarray([0, 1, 2, 2])]
    grads = jax.jit(jax.grad(lambda p: jnp.sum(net(p, x, cond) ** 2)))(params)
    fourier = ("GaussianFourierProjection_0", nets.embeddings.FOURIER_WEIGHTS)
    np.testing.assert_array_equal(grads[fourier[0]][fourier[1]], 0.0)
    assert np.abs(np.asarray(grads["in_emb"]["kernel"])).max() > 0
    mask = trainable_mask(params)
    assert not mask[fourier[0]][fourier[1]]
    assert mask["in_x"]["kernel"] and mask["in_emb"]["kernel"] and mask["out"]["bias"]


# -- U-Net ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "config,shape",
    [
        (dict(ch=64, ch_mult=(1, 2), attn_resolutions=(4,)), (2, 8, 8, 1)),  # digits
        (dict(TINY, embedding="fourier", skip_rescale=True, resamp_with_conv=False), (2, 8, 8, 3)),
        (dict(ch=12, ch_mult=(1, 2, 2), num_groups=2, num_classes=10, act="relu"), (2, 16, 8, 2)),
    ],
)
def test_unet_output_shapes(config, shape):
    # Shapes only, through jax.eval_shape: traced, never compiled.
    net = NetApply(UNet(**config))
    params = param_shapes(net, shape)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    for cond_shape in [shape[:1], ()]:
        cond = jax.ShapeDtypeStruct(cond_shape, jnp.float32)
        assert jax.eval_shape(net, params, x, cond).shape == shape


def test_unet_default_is_the_ddpm_cifar10_model():
    # DDPM's 35.7M parameters include self-attention after every upsampling
    # block at 16x16; the score SDE code's ddpm.py, followed here, has one per
    # level on the way up (35.2M).
    params = param_shapes(NetApply(UNet()), (1, 32, 32, 3))
    assert 35.0e6 < count_params(params) < 35.8e6


@pytest.fixture(scope="module")
def unet_outputs():
    """One compiled run of a tiny labelled U-Net with dropout, in every mode the tests compare.

    Variants that differ only in array values are vmapped, so that the
    program holds three traced networks rather than eight: compiling them is
    what takes time here.
    """
    net = NetApply(UNet(**dict(TINY, num_classes=4, dropout=0.5)))
    params = numpy_params(net, IMAGE)
    x = jax.random.normal(jax.random.PRNGKey(1), IMAGE)
    cond = jnp.full((IMAGE[0],), 437.0)
    null, labels = jnp.full((IMAGE[0],), 4), jnp.asarray([0, 1, 2])

    def labelled(c, y):
        return net(params, x, c, y)

    def with_rng(key):  # y=None, in training and in evaluation mode
        return net(params, x, cond, train=True, rng=key), net(params, x, cond, rng=key)

    @jax.jit
    def run(params, x):
        conds, ys = jnp.stack([cond, cond, cond - 400.0]), jnp.stack([null, labels, null])
        by_label = jax.vmap(labelled)(conds, ys)
        train, evaluation = jax.vmap(with_rng)(jax.random.split(jax.random.PRNGKey(2)))
        return dict(
            scalar=net(params, x, jnp.float32(437.0)),
            null=by_label[0],
            labelled=by_label[1],
            other_noise=by_label[2],
            train1=train[0],
            train2=train[1],
            eval1=evaluation[0],
            eval2=evaluation[1],
        )

    return {name: np.asarray(out) for name, out in run(params, x).items()}


def _differs_per_example(a, b, tol=1e-3):
    return np.all(np.abs(a - b).reshape(a.shape[0], -1).max(axis=1) > tol)


def test_unet_scalar_noise_cond_is_the_broadcast_one(unet_outputs):
    assert unet_outputs["scalar"].shape == IMAGE
    assert _differs_per_example(unet_outputs["null"], unet_outputs["other_noise"])
    # eval1 has noise_cond (437,) * batch, and y=None like "scalar".
    np.testing.assert_allclose(unet_outputs["scalar"], unet_outputs["eval1"], rtol=1e-5, atol=1e-5)


def test_unet_labels_condition_and_none_is_the_null_label(unet_outputs):
    assert _differs_per_example(unet_outputs["labelled"], unet_outputs["null"])
    np.testing.assert_allclose(unet_outputs["eval1"], unet_outputs["null"], rtol=1e-5, atol=1e-5)


def test_unet_dropout_only_in_training(unet_outputs):
    assert _differs_per_example(unet_outputs["train1"], unet_outputs["train2"])
    assert _differs_per_example(unet_outputs["train1"], unet_outputs["eval1"])
    np.testing.assert_array_equal(unet_outputs["eval1"], unet_outputs["eval2"])


def test_unet_rejects_what_it_cannot_take():
    net = NetApply(UNet(ch=8, ch_mult=(1, 2, 2)))
    with pytest.raises(ValueError, match="not divisible by 4"):
        param_shapes(net, (1, 6, 6, 1))
    with pytest.raises(ValueError, match="NHWC"):
        param_shapes(net, (1, 8, 8))
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        param_shapes(NetApply(UNet(**TINY, dropout=1.0)), IMAGE)


# -- NetApply and the score function ------------------------------------------


def test_netapply_init_equality_hashing_and_jit_cache():
    assert NetApply(MLP()) == NetApply(MLP()) and hash(NetApply(MLP())) == hash(NetApply(MLP()))
    assert NetApply(UNet(**TINY)) == NetApply(UNet(**TINY))
    assert NetApply(MLP()) != NetApply(MLP(emb_dim=64))
    with pytest.raises(TypeError, match="tuples, not lists"):
        NetApply(MLP(hidden=[16, 16]))

    traces = []

    def forward(net, params, x):
        traces.append(None)
        return net(params, x, jnp.float32(3.0))

    forward = jax.jit(forward, static_argnums=0)
    params = NetApply(MLP(hidden=(8,))).init(jax.random.PRNGKey(0), (2, 2))
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, param_shapes(NetApply(MLP(hidden=(8,))), (2, 2))
    )
    for _ in range(2):  # a new, equal NetApply each time: one trace
        assert np.all(np.isfinite(forward(NetApply(MLP(hidden=(8,))), params, jnp.ones((2, 2)))))
    assert len(traces) == 1


def test_make_score_fn_with_an_mlp_runs_under_jit():
    process, net = VPSDE(), NetApply(MLP(hidden=(32, 32)))
    params = numpy_params(net, (4, 2), scale=0.1)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 2))
    traces = []

    @jax.jit
    def score(score_fn, x, t):
        traces.append(None)
        return score_fn(x, t)

    t = jnp.full((4,), 0.5)
    out = score(make_score_fn(process, net, params, "eps"), x, t)
    _, sigma = process.alpha_sigma(t)
    eps = net(params, x, process.noise_cond(t))
    np.testing.assert_allclose(out, -eps / sigma[:, None], rtol=1e-5, atol=1e-5)
    # New parameters and a rebuilt, equal network: no re-trace.
    params2 = jax.tree.map(lambda p: p + 0.1, params)
    rebuilt = make_score_fn(process, NetApply(MLP(hidden=(32, 32))), params2, "eps")
    assert not np.allclose(score(rebuilt, x, t), out)
    assert len(traces) == 1


def test_nets_never_import_processes():
    files = sorted(pathlib.Path(nets.__file__).parent.glob("*.py"))
    assert len(files) >= 5
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for module in modules:
                assert "processes" not in module.split("."), f"{path.name} imports {module}"
                assert not module.startswith("ml_collections"), f"{path.name} imports {module}"
