"""The data layer: toy sets, data set builders, deterministic batches, dequantisation, DataError."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from diffusers_unified import data
from diffusers_unified.errors import ConfigError, DataError

# -- toy sets ------------------------------------------------------------------------

# One sample size (and toy_dataset sizes adding up to it) so that each toy
# sampler compiles once for the whole file.
N, N_TRAIN, N_TEST = 20_000, 15_000, 5_000


@pytest.mark.parametrize("name", data.TOY_NAMES)
def test_toy_sets_are_deterministic_float32_at_unit_scale(name):
    n = N
    x = np.asarray(data.sample_toy(name, jax.random.PRNGKey(0), n))
    assert x.shape == (n, 2) and x.dtype == np.float32
    np.testing.assert_array_equal(x, data.sample_toy(name, jax.random.PRNGKey(0), n))
    assert not np.array_equal(x, data.sample_toy(name, jax.random.PRNGKey(1), n))
    # Centred, isotropically scaled to mean per-axis variance 1. Monte-Carlo
    # standard errors at n = 20000 are below 0.015 for both; 0.05 leaves > 3 sigma.
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=0.05)
    np.testing.assert_allclose(x.var(axis=0).mean(), 1.0, atol=0.05)
    assert np.abs(x).max() < 4.0


def test_unknown_toy_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="swiss_roll, two_moons, eight_gaussians"):
        data.sample_toy("spiral", jax.random.PRNGKey(0), 10)
    with pytest.raises(ValueError, match="gmm"):
        data.toy_dataset("spiral")


def test_eight_gaussians_mixture_is_the_law_of_the_samples():
    n = N
    x, y = data.sample_toy_with_labels("eight_gaussians", jax.random.PRNGKey(3), n)
    x, y = np.asarray(x, np.float64), np.asarray(y)
    mixture = data.eight_gaussians_mixture()
    assert mixture.num_components == 8
    means, covs = np.asarray(mixture.means), np.asarray(mixture.covs)
    # Whole-law moments (standard errors ~0.007 for the mean, ~0.01 for the covariance).
    np.testing.assert_allclose(x.mean(0), mixture.mean(), atol=0.03)
    np.testing.assert_allclose(np.cov(x.T), mixture.covariance(), atol=0.04)
    # Component k of the mixture is label k: its mean, its spread and its weight 1/8
    # (standard errors 0.0035, 0.0009 and 0.0023 with ~2500 points per component).
    for k in range(8):
        xk = x[y == k]
        np.testing.assert_allclose(xk.mean(0), means[k], atol=0.02)
        np.testing.assert_allclose(np.cov(xk.T), covs[k], atol=0.005)
        assert abs(len(xk) / n - 1 / 8) < 0.01
    # The same law, so the same density: the samples' mean log-likelihood under the
    # mixture matches its entropy estimate from exact mixture samples (MC error ~0.01).
    exact, _ = jax.jit(mixture.sample, static_argnums=1)(jax.random.PRNGKey(4), n)
    log_prob = jax.jit(mixture.log_prob)
    assert abs(float(log_prob(jnp.asarray(x, jnp.float32)).mean() - log_prob(exact).mean())) < 0.05


def nearest_mean(x, means):
    return np.argmin(((x[:, None, :] - np.asarray(means)[None]) ** 2).sum(-1), axis=1)


def test_toy_dataset_labels_and_metadata():
    ds = data.toy_dataset("eight_gaussians", N_TRAIN, N_TEST, seed=1)
    assert ds.kind == "vector" and ds.data_shape == (2,) and ds.num_classes == 8
    assert ds.x_train.shape == (N_TRAIN, 2) and ds.y_test.shape == (N_TEST,)
    assert ds.scaling.model_range is None and ds.bits is None
    # Equal weights and spreads: the Bayes classifier is the nearest mean (~0.2% errors,
    # adjacent means being 3.1 standard deviations from their midpoint).
    mixture = data.exact_mixture("eight_gaussians")
    assert np.mean(nearest_mean(ds.x_train, mixture.means) == ds.y_train) > 0.99

    gmm = data.toy_dataset("gmm", num_train=256, num_test=64)
    assert gmm.num_classes == 4 and set(np.unique(gmm.y_train)) <= {0, 1, 2, 3}
    assert data.toy_dataset("swiss_roll", N_TRAIN, N_TEST).y_train is None
    assert data.toy_dataset("rings", N_TRAIN, N_TEST).num_classes == 4
    # Same seed, same data; train and test are different draws.
    again = data.toy_dataset("gmm", num_train=256, num_test=64)
    np.testing.assert_array_equal(gmm.x_train, again.x_train)
    assert not np.array_equal(gmm.x_train[:64], gmm.x_test)


# -- deterministic batching -------------------------------------------------------------


def index_arrays(n):
    """A vector data set whose example i is the number i, so a batch shows its indices."""
    x = np.arange(n, dtype=np.float32)[:, None]
    ds = data.Dataset("index", x_train=x, x_test=x[:0], kind="vector")
    return ds.device_arrays()


def indices_of(b):
    return np.asarray(b["x"][:, 0]).astype(int)


def test_same_seed_and_step_give_the_same_batch_even_after_a_rebuild():
    ds = data.toy_dataset("two_moons", N_TRAIN, N_TEST)
    first = data.batch(ds.device_arrays(), 7, 12, 16)
    # A "resumed" process: the data set rebuilt from its config, the same (seed, step).
    resumed = data.batch(data.toy_dataset("two_moons", N_TRAIN, N_TEST).device_arrays(), 7, 12, 16)
    np.testing.assert_array_equal(first["x"], resumed["x"])
    np.testing.assert_array_equal(first["y"], resumed["y"])
    assert first["x"].shape == (16, 2) and first["y"].dtype == jnp.int32
    assert not np.array_equal(first["x"], data.batch(ds.device_arrays(), 7, 13, 16)["x"])
    assert not np.array_equal(first["x"], data.batch(ds.device_arrays(), 8, 12, 16)["x"])


@pytest.mark.parametrize("n,batch_size", [(10, 4), (12, 4), (10, 25)])
def test_every_example_appears_once_per_epoch(n, batch_size):
    arrays = index_arrays(n)
    epochs = 3 * max(1, batch_size // n + 1)
    steps = -(-epochs * n // batch_size)
    stream = np.concatenate(
        [indices_of(data.batch(arrays, 0, s, batch_size)) for s in range(steps)]
    )
    for e in range(epochs):
        epoch = stream[e * n : (e + 1) * n]
        np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
        np.testing.assert_array_equal(epoch, data.epoch_permutation(0, e, n))
    assert not np.array_equal(stream[:n], stream[n : 2 * n])  # a new order each epoch


def test_a_batch_straddling_an_epoch_takes_the_tail_and_the_next_head():
    n, batch_size = 10, 4
    arrays = index_arrays(n)
    perm0, perm1 = (np.asarray(data.epoch_permutation(5, e, n)) for e in (0, 1))
    # Step 2 covers stream positions 8..11: the last two of epoch 0, the first two of epoch 1.
    np.testing.assert_array_equal(
        indices_of(data.batch(arrays, 5, 2, batch_size)), np.r_[perm0[8:], perm1[:2]]
    )


def test_batching_is_jittable_and_safe_at_large_steps():
    n, batch_size = 10, 4
    arrays = index_arrays(n)
    inside = jax.jit(lambda a, s: data.batch(a, 3, s, batch_size))
    for step in (0, 2, 7):
        np.testing.assert_array_equal(
            inside(arrays, step)["x"], data.batch(arrays, 3, step, batch_size)["x"]
        )
    # step * batch_size = 4e9 overflows int32; the epoch and offset must not.
    step = 10**9
    position = step * batch_size
    perm = np.asarray(data.epoch_permutation(3, position // n, n))
    got = indices_of(data.batch(arrays, 3, step, batch_size))
    np.testing.assert_array_equal(got[0], perm[position % n])


@pytest.mark.parametrize("n,batch_size", [(10, 4), (12, 6), (10, 25)])
def test_the_host_batcher_gives_the_batch_indices_and_splits_them_by_process(n, batch_size):
    x = np.arange(n)[:, None].astype(np.uint8)
    y = np.arange(n) % 3
    whole = data.Batcher(x, y, 4, batch_size)
    for step in (0, 1, 3, 10**9 // batch_size):
        np.testing.assert_array_equal(
            whole.indices(step), data.batch_indices(4, step, n, batch_size)
        )
    steps = [2, 3]
    full = whole.local(steps)
    assert full["x"].shape == (2, batch_size, 1) and full["x"].dtype == np.uint8
    np.testing.assert_array_equal(full["x"][..., 0], np.stack([whole.indices(s) for s in steps]))
    np.testing.assert_array_equal(full["y"], full["x"][..., 0] % 3)
    # Two processes: each gathers its own half of every batch, and the halves make the batch.
    halves = (
        [
            data.Batcher(x, y, 4, batch_size, process_index=p, process_count=2).local(steps)
            for p in range(2)
        ]
        if batch_size % 2 == 0
        else None
    )
    if halves:
        np.testing.assert_array_equal(np.concatenate([h["x"] for h in halves], axis=1), full["x"])
    with pytest.raises(ConfigError, match="divisible by the process count 3"):
        data.Batcher(x, y, 4, 4, process_index=0, process_count=3)


def test_to_model_batch_dequantises_like_batch_and_flips_whole_images():
    ds = data.digits_dataset(centered=True)
    idx = np.asarray(data.batch_indices(0, 1, ds.num_train, 32))
    stored = ds.x_train[idx]
    key = data.dequantize_key(0, 1)
    b = data.to_model_batch(stored, None, ds.scaling, dequantize_key=key)
    np.testing.assert_array_equal(
        b["x"], data.batch(ds.device_arrays(), 0, 1, 32, dequantize=True)["x"]
    )
    plain = np.asarray(ds.scaling.to_model(stored))
    flipped = np.asarray(
        data.to_model_batch(stored, None, ds.scaling, flip_key=data.flip_key(0, 1))["x"]
    )
    mirrored = np.all(flipped == plain[:, :, ::-1, :], axis=(1, 2, 3))
    kept = np.all(flipped == plain, axis=(1, 2, 3))
    # Every image is either itself or its mirror image (some digits are symmetric: both).
    assert np.all(mirrored | kept)
    # About half are mirrored: of 32 fair coins fewer than 6 heads (or tails) has
    # probability 2e-4; an asymmetric digit shows which way its coin fell.
    assert np.sum(mirrored & ~kept) >= 6 and np.sum(kept & ~mirrored) >= 6, (mirrored, kept)
    again = data.to_model_batch(stored, None, ds.scaling, flip_key=data.flip_key(0, 1))["x"]
    np.testing.assert_array_equal(again, flipped)  # a pure function of (seed, step)


def test_eval_batches_cover_each_example_once_with_a_mask():
    arrays = index_arrays(10)
    batches = list(data.eval_batches(arrays, 4))
    assert [b["x"].shape for b in batches] == [(4, 1)] * 3
    seen = np.concatenate([indices_of(b)[np.asarray(b["mask"])] for b in batches])
    np.testing.assert_array_equal(seen, np.arange(10))


# -- digits, npz files, image folders --------------------------------------------------


@pytest.mark.parametrize("centered", [False, True])
def test_digits_shape_range_and_labels(centered):
    ds = data.digits_dataset(centered=centered, test_size=0.2, seed=0)
    assert ds.num_train + ds.num_test == 1797 and ds.num_test == 359
    assert ds.data_shape == (8, 8, 1) and ds.kind == "image" and ds.bits == 4
    assert ds.num_classes == 10 and set(np.unique(ds.y_train)) == set(range(10))
    assert ds.x_train.dtype == np.uint8 and ds.x_train.max() == 15
    x, _ = ds.model_data("train")
    lo, hi = (-1.0, 1.0) if centered else (0.0, 1.0)
    assert x.dtype == np.float32 and x.min() == lo and x.max() == hi
    b = data.batch(ds.device_arrays(), 0, 0, 32, dequantize=True)
    data.validate_batch(b, (8, 8, 1), centered, name="digits")


@pytest.mark.parametrize("centered", [False, True])
def test_uniform_dequantisation_stays_in_its_bin(centered):
    # The digits are 4-bit: levels v in 0..15, bins [v/16, (v+1)/16] in [0, 1] units.
    # (Same shapes as the digits test above, so the batch function is compiled already.)
    ds = data.digits_dataset(centered=centered)
    arrays = ds.device_arrays()
    b = data.batch(arrays, 0, 0, 32, dequantize=True)
    v = ds.x_train[np.asarray(data.batch_indices(0, 0, ds.num_train, 32))].astype(np.float64)
    unit = np.asarray(ds.scaling.to_unit(b["x"]), np.float64)
    assert np.all(unit >= v / 16 - 1e-6) and np.all(unit <= (v + 1) / 16 + 1e-6)
    # u ~ U[0, 1): its mean over 2048 values is 1/2 (standard error 0.0064).
    assert abs(np.mean(unit * 16 - v) - 0.5) < 0.03
    # The same step redraws the same noise, another step other noise.
    np.testing.assert_array_equal(b["x"], data.batch(arrays, 0, 0, 32, dequantize=True)["x"])
    with_noise = data.batch(arrays, 0, 1, 32, dequantize=True)["x"]
    without = data.batch(arrays, 0, 1, 32)["x"]
    assert not np.array_equal(with_noise, without)
    np.testing.assert_array_equal(
        data.batch(arrays, 0, 1, 32)["y"], data.batch(arrays, 0, 1, 32, dequantize=True)["y"]
    )


def test_bits_per_dim_offset_follows_the_score_sde_code():
    # offset = bits - log2(width of the model range): 7 for centred 8-bit data.
    assert data.Scaling(centered=True, bits=8).bpd_offset == 7.0
    assert data.Scaling(centered=False, bits=8).bpd_offset == 8.0
    assert data.Scaling(bounded=False).bpd_offset == 0.0


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(40, 6, 6, 3), dtype=np.uint8)
    y = rng.integers(0, 5, size=40)
    path = tmp_path / "faces.npz"
    np.savez(path, x=x, y=y)
    ds = data.npz_dataset(path, centered=True, test_size=10, seed=2)
    assert ds.name == "faces" and ds.kind == "image" and ds.bits == 8
    assert ds.num_train == 30 and ds.num_test == 10 and ds.num_classes == int(y.max()) + 1
    # Train and test together are the file's examples, each with its own label.
    both = np.concatenate([ds.x_train, ds.x_test])
    order = [int(np.flatnonzero((x == e).all(axis=(1, 2, 3)))[0]) for e in both]
    assert sorted(order) == list(range(40))
    np.testing.assert_array_equal(np.concatenate([ds.y_train, ds.y_test]), y[order])
    xm, _ = ds.model_data("test")
    np.testing.assert_allclose(xm, ds.x_test / 255 * 2 - 1, atol=1e-6)

    vectors = rng.normal(size=(20, 3))
    np.savez(tmp_path / "vec.npz", x=vectors, x_test=vectors[:5])
    vds = data.npz_dataset(tmp_path / "vec.npz")
    assert vds.kind == "vector" and vds.num_train == 20 and vds.num_test == 5
    np.testing.assert_allclose(vds.x_train, vectors, rtol=1e-6)


def write_image(path, size, colour, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


def test_image_folder_with_class_subfolders(tmp_path):
    colours = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}
    for name, colour in colours.items():
        for i in range(4):
            write_image(tmp_path / name / f"{i}.png", (12, 10), colour)  # 12 wide, 10 high
    (tmp_path / "notes.txt").write_text("not an image")
    ds = data.image_folder_dataset(tmp_path, 8, num_channels=3, test_size=0.25, seed=0)
    assert ds.class_names == ("blue", "green", "red") and ds.num_classes == 3
    assert ds.data_shape == (8, 8, 3) and ds.num_train == 9 and ds.num_test == 3
    x = np.concatenate([ds.x_train, ds.x_test])
    y = np.concatenate([ds.y_train, ds.y_test])
    for label, colour in enumerate(colours.values()):
        np.testing.assert_array_equal(x[y == label], np.broadcast_to(colour, (4, 8, 8, 3)))

    gray = data.image_folder_dataset(tmp_path, (4, 6), num_channels=1, centered=True)
    assert gray.data_shape == (4, 6, 1) and gray.centered


def test_flat_image_folder_has_no_labels(tmp_path):
    for i in range(5):
        write_image(tmp_path / f"img{i}.jpg", (8, 8), (10 * i, 0, 0))
    ds = data.image_folder_dataset(tmp_path, None, num_channels=3, test_size=1)
    assert ds.y_train is None and ds.num_classes is None and ds.data_shape == (8, 8, 3)
    b = data.batch(ds.device_arrays(), 0, 0, 4)
    assert b["y"] is None and b["x"].shape == (4, 8, 8, 3)


# -- DataError messages (RELIABILITY B13, B14) -------------------------------------------


def test_data_error_is_exit_code_4():
    assert DataError.exit_code == 4 and issubclass(DataError, ValueError)


def test_wrong_shape_names_both_shapes_and_the_config_keys():
    b = {"x": jnp.zeros((8, 32, 32, 3)), "y": None}
    message = (
        "dataset 'cifar' yields images of shape (B, 32, 32, 3); config expects (B, 8, 8, 1) "
        "from data.image_size=8, data.num_channels=1"
    )
    with pytest.raises(DataError) as info:
        data.validate_batch(
            b, (8, 8, 1), False, name="cifar", shape_source="data.image_size=8, data.num_channels=1"
        )
    assert str(info.value) == message


def test_uint8_batch_names_dtype_range_and_the_centered_flag():
    b = {"x": np.full((4, 8, 8, 1), 255, np.uint8)}
    b["x"][0] = 0
    with pytest.raises(DataError) as info:
        data.validate_batch(b, (8, 8, 1), True, batch_index=0, name="raw")
    text = str(info.value)
    for part in ("dtype uint8", "min 0", "max 255", "[-1, 1]", "data.centered=True", "8-bit"):
        assert part in text, (part, text)
    # A float batch out of range names its range too.
    with pytest.raises(DataError, match=r"min -0\.5, max 0\.5.*\[0, 1\] \(data\.centered=False"):
        data.validate_batch(
            {"x": np.linspace(-0.5, 0.5, 64, dtype=np.float32).reshape(1, 64)}, (64,), False
        )


def test_uint8_data_without_a_bit_depth_fail_at_build_time():
    pixels = np.full((4, 8, 8, 1), 255, np.uint8)
    with pytest.raises(DataError, match=r"dtype uint8, min 255, max 255.*bits=8.*data\.centered"):
        data.Dataset("raw", pixels, pixels[:0], kind="image", scaling=data.Scaling())
    # The same pixels declared 8-bit are fine, and float pixels 0..255 get a hint.
    data.Dataset("raw", pixels, pixels[:0], kind="image", scaling=data.Scaling(bits=8))
    with pytest.raises(DataError, match="look like 0..255 pixels"):
        data.array_dataset("raw", pixels.astype(np.float32), test_size=0)


def test_non_finite_values_name_the_batch_index():
    x = np.zeros((4, 2), np.float32)
    x[2, 1] = np.nan
    with pytest.raises(DataError, match="batch 17 has non-finite values .* example 2"):
        data.validate_batch({"x": x}, (2,), None, batch_index=17, name="toy")
    with pytest.raises(DataError, match="first at index 2"):
        data.array_dataset("toy", x, test_size=0)


def test_missing_or_malformed_user_data_name_the_path(tmp_path):
    missing = tmp_path / "nowhere.npz"
    with pytest.raises(DataError, match=f"{missing} does not exist.*under 'x'"):
        data.npz_dataset(missing)
    np.savez(tmp_path / "wrong.npz", images=np.zeros((3, 2)))
    with pytest.raises(DataError, match=r"wrong.npz has no array 'x' \(found: images\)"):
        data.npz_dataset(tmp_path / "wrong.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="cannot read .*junk.npz"):
        data.npz_dataset(tmp_path / "junk.npz")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"image folder {empty} holds no images"):
        data.image_folder_dataset(empty, 8)
    with pytest.raises(DataError, match="does not exist"):
        data.image_folder_dataset(tmp_path / "absent", 8)
    broken = tmp_path / "broken"
    write_image(broken / "good.png", (8, 8), (0, 0, 0))
    (broken / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image .*bad.png"):
        data.image_folder_dataset(broken, 8)
    mixed = tmp_path / "sizes"
    write_image(mixed / "a.png", (8, 8), (0, 0, 0))
    write_image(mixed / "b.png", (9, 8), (0, 0, 0))
    with pytest.raises(DataError, match=r"b.png is 9x8 \(WxH\) but .*a.png is 8x8"):
        data.image_folder_dataset(mixed, None)


def test_bad_arguments_are_config_errors():
    arrays = index_arrays(10)
    with pytest.raises(ConfigError, match="dequantisation needs quantised data"):
        data.batch(arrays, 0, 0, 4, dequantize=True)
    with pytest.raises(ConfigError, match="at least one must remain"):
        data.split_indices(10, 10, seed=0)
    with pytest.raises(ConfigError, match="num_channels"):
        data.image_folder_dataset(".", 8, num_channels=2)
