"""The FID Inception-v3 port against pytorch-fid's outputs, and its weights file and converter.

The reference outputs come from tests/fixtures/make_inception_fixture.py (run
once with torch); the weights are rebuilt here from the same NumPy seeds, in
pytorch-fid's layout, and mapped by the converter's own `convert_state_dict`.
"""

import functools
import importlib.util
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from diffusers_unified.convert import inception as convert
from diffusers_unified.errors import CheckpointError, DataError
from diffusers_unified.metrics.inception import InceptionFeatures
from diffusers_unified.nets import inception as net

FAST_COMPILE = True  # nearly all compile: no LLVM optimisation passes (conftest.py)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@functools.lru_cache(maxsize=1)
def fixture_module():
    path = os.path.join(FIXTURES, "make_inception_fixture.py")
    spec = importlib.util.spec_from_file_location("make_inception_fixture", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # NumPy only at import; torch is imported in main()
    return module


@functools.lru_cache(maxsize=1)
def reference():
    with np.load(os.path.join(FIXTURES, "inception_reference.npz")) as f:
        return dict(f)


@functools.lru_cache(maxsize=1)
def torch_layout_weights():
    return fixture_module().reference_state_dict(convert.expected_torch_shapes())


@functools.lru_cache(maxsize=1)
def variables():
    flat = convert.convert_state_dict(torch_layout_weights())
    return traverse_util.unflatten_dict(flat, sep="/")


@functools.lru_cache(maxsize=2)
def apply_fn(output_bias=True):
    return jax.jit(net.InceptionV3(output_bias=output_bias).apply)


def close_at_scale(got, want, rel):
    """|got - want| <= rel * max|want| elementwise: float32 errors scale with the activations."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=rel * np.abs(want).max())


@pytest.mark.slow  # ~22 s cold on two busy cores (two compiles of the network), 10 s cached
def test_port_matches_pytorch_fid_on_32px_and_299px_images():
    ref, fx = reference(), fixture_module()
    np.testing.assert_array_equal(ref["images32"], fx.images32())  # the seeds still agree
    apply = apply_fn()
    pool32, logits32 = apply(variables(), ref["images32"])  # resized inside, 32 -> 299
    pool299, logits299 = apply(variables(), fx.image299())  # no resize
    pool = np.concatenate([pool32, pool299])
    logits = np.concatenate([logits32, logits299])
    assert pool.shape == (4, 2048) and logits.shape == (4, 1008)
    # Both sides run float32 through 94 conv layers with different summation
    # orders; measured 3e-7 (pool) and 1e-6 (logits) of the largest value.
    # 1e-4 leaves room for other BLAS kernels, while the subtle mistakes move
    # pool3 far more (measured): batch-norm eps 1e-5 instead of 1e-3 by 6e-3,
    # count_include_pad=True by 4e-2, Mixed_7c's max pool as an average by 0.2.
    # (The random weights keep activations O(1): pool3 mean 0.46, max 4.9.)
    close_at_scale(pool, ref["pool"], 1e-4)
    close_at_scale(logits, ref["logits"], 1e-4)
    # The 299 image differs from the upsampled ones: the check is not of a constant.
    assert np.abs(pool[3] - pool[0]).max() > 0.1 * np.abs(pool).max()


def test_output_bias_false_gives_pool_times_kernel():
    ref = reference()
    pool, logits = apply_fn(False)(variables(), ref["images32"])  # one more compile: ~9 s cold
    kernel = np.asarray(variables()["params"]["fc"]["kernel"], np.float64)
    bias = np.asarray(variables()["params"]["fc"]["bias"])
    # The improved-GAN IS logits: pytorch-fid's logits less the fc bias.
    close_at_scale(logits, ref["logits"][:3] - bias, 1e-4)
    close_at_scale(logits, np.asarray(pool, np.float64) @ kernel, 1e-5)  # one float32 matmul


def test_resize_matches_torch_interpolate_bilinear():
    ref, fx = reference(), fixture_module()
    for i, (_, size) in enumerate(fx.RESIZE_CASES):
        x = fx.resize_input(i).transpose(0, 2, 3, 1)  # NCHW -> NHWC
        got = np.asarray(net.resize_bilinear(x, size))
        # Convex combinations of values in [0, 1]: float32 rounding only.
        np.testing.assert_allclose(got, ref[f"resize{i}"], rtol=0, atol=1e-6)
    # The identity case really is one (no smoothing at equal size).
    x = fx.resize_input(2).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(net.resize_bilinear(x, (12, 12))), x, atol=1e-7)


def test_full_size_shapes_and_input_checks():
    model = net.InceptionV3()
    shapes = jax.eval_shape(model.apply, variables(), jax.ShapeDtypeStruct((2, 64, 48, 3), "f4"))
    assert [s.shape for s in shapes] == [(2, 2048), (2, 1008)]
    with pytest.raises(DataError, match=r"\(n, h, w, 3\)"):
        jax.eval_shape(model.apply, variables(), jax.ShapeDtypeStruct((2, 32, 32, 1), "f4"))
    small = net.InceptionV3(resize_input=False)
    with pytest.raises(DataError, match="at least 75"):
        jax.eval_shape(small.apply, variables(), jax.ShapeDtypeStruct((1, 64, 64, 3), "f4"))


# -- the weights file and the converter ------------------------------------------------------


def test_key_mapping_is_one_to_one_and_matches_torchvision_names():
    shapes = net.expected_shapes()
    torch_shapes = convert.expected_torch_shapes()
    assert len(shapes) == len(torch_shapes) == 472  # 94 x (conv + 4 BN) + fc weight and bias
    for key in shapes:
        assert convert.flax_key(convert.torch_key(key)) == key
    # Spot checks against pytorch-fid's names and layouts (OIHW, (out, in)).
    assert torch_shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert torch_shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
    assert torch_shapes["Mixed_7c.branch3x3dbl_3b.bn.running_var"] == (384,)
    assert torch_shapes["fc.weight"] == (1008, 2048)
    assert shapes["params/Mixed_6b/branch7x7_2/conv/kernel"] == (1, 7, 128, 128)
    assert convert.flax_key("Mixed_5b.branch_pool.bn.num_batches_tracked") is None
    # 23.9 M numbers: torchvision's Inception-v3 without the auxiliary head, 1008 classes.
    assert sum(int(np.prod(s)) for s in shapes.values()) == 23_885_392


def test_convert_state_dict_transposes_and_names_bad_keys():
    state = dict(torch_layout_weights())
    flat = convert.convert_state_dict(state)
    w = state["Mixed_5b.branch5x5_2.conv.weight"]  # (out, in, kh, kw)
    np.testing.assert_array_equal(
        flat["params/Mixed_5b/branch5x5_2/conv/kernel"][1, 3, 7, 5], w[5, 7, 1, 3]
    )
    np.testing.assert_array_equal(flat["params/fc/kernel"], state["fc.weight"].T)
    np.testing.assert_array_equal(
        flat["batch_stats/Mixed_7a/branch3x3_2/bn/var"],
        state["Mixed_7a.branch3x3_2.bn.running_var"],
    )
    # Counters are dropped; anything else unknown, missing or misshapen is named.
    convert.convert_state_dict({**state, "fc.num_batches_tracked": np.zeros(())})
    with pytest.raises(CheckpointError, match=r"unexpected keys \['AuxLogits.fc.weight'\]"):
        convert.convert_state_dict({**state, "AuxLogits.fc.weight": np.zeros((1008, 768))})
    missing = {k: v for k, v in state.items() if k != "Mixed_6e.branch_pool.bn.bias"}
    with pytest.raises(
        CheckpointError, match=r"missing key 'Mixed_6e.branch_pool.bn.bias'.*\(192,\)"
    ):
        convert.convert_state_dict(missing, source="w.pth")
    with pytest.raises(
        CheckpointError, match=r"'fc.weight' has shape \(1000, 2048\).*\(1008, 2048\)"
    ):
        convert.convert_state_dict({**state, "fc.weight": np.zeros((1000, 2048), np.float32)})


def test_load_inception_params_checks_every_key_and_shape(tmp_path):
    flat = convert.convert_state_dict(torch_layout_weights())
    good = str(tmp_path / "w.npz")
    convert.save_weights(flat, good)
    assert os.listdir(tmp_path) == ["w.npz"]  # the temporary file was renamed
    loaded = net.load_inception_params(good)
    np.testing.assert_array_equal(
        loaded["params"]["Conv2d_4a_3x3"]["conv"]["kernel"],
        flat["params/Conv2d_4a_3x3/conv/kernel"],
    )
    bad = str(tmp_path / "bad.npz")
    key = "batch_stats/Mixed_5c/branch1x1/bn/mean"
    convert.save_weights({**flat, key: np.zeros(65, np.float32)}, bad)
    with pytest.raises(
        CheckpointError, match=rf"bad.npz.*'{key}' has shape \(65,\), expected \(64,\)"
    ):
        net.load_inception_params(bad)
    convert.save_weights({k: v for k, v in flat.items() if k != key}, bad)
    with pytest.raises(CheckpointError, match=rf"missing key '{key}' \(expected shape \(64,\)\)"):
        net.load_inception_params(bad)
    with pytest.raises(CheckpointError, match="not found"):
        net.load_inception_params(str(tmp_path / "absent.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable"):
        net.load_inception_params(str(tmp_path / "junk.npz"))


def test_converter_cli_exit_codes_and_no_partial_output(tmp_path, capsys):
    from diffusers_unified.experiment.imports import main

    out = tmp_path / "out.npz"
    code = main(["inception", f"--weights={tmp_path / 'absent.pth'}", f"--out={out}"])
    assert code == 5 and "absent.pth" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit) as e:
        main(["inception", f"--out={out}"])  # --weights is required
    assert e.value.code == 2
    code = main(["inception", f"--weights={tmp_path / 'absent.pth'}", "--out=/no/such/dir/x.npz"])
    assert code == 5  # the missing input is reported first
    # A failed write (here: the target is a directory) leaves no temporary file.
    (tmp_path / "taken").mkdir()
    with pytest.raises(OSError):
        convert.save_weights({"a": np.zeros(2)}, str(tmp_path / "taken"))
    assert os.listdir(tmp_path) == ["taken"]


def test_inception_features_batches_pads_and_compiles_once():
    ref = reference()
    features = InceptionFeatures(
        variables(), to_unit=lambda x: (x + 1) / 2, batch_size=2, quantize=None
    )
    # Three images in model range [-1, 1]: one full batch and one padded with zeros.
    pool, logits = features(2 * ref["images32"] - 1)
    assert pool.shape == (3, 2048) and logits.shape == (3, 1008)
    # As the port test; (x + 1) / 2 of 2 x - 1 differs from x by an ulp at most.
    close_at_scale(pool, ref["pool"][:3], 1e-4)
    close_at_scale(logits, ref["logits"][:3], 1e-4)
    assert features._run._cache_size() == 1  # the padded batch reused the compilation
