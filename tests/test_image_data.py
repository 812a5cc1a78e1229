"""Image data in the forms the data sets ship: CIFAR's python batches, image folders, TFDS, HF.

Each loader is checked against the files it was given, written here on the
fly (`image_data_util`): the CIFAR loader against miniature batch files in
the real layout (pixel order R, G, B planes, row-major; labels; splits;
class names; a `.tar.gz` read in place), the image folder against a
resize written out from pillow's published algorithm, and the TFDS and
Hugging Face readers against stand-ins with those libraries' interface
(neither library is installed here; that path gets its own test).
"""

from __future__ import annotations

import io
import os
import pickle
import sys

import image_data_util as util
import numpy as np
import pytest
from PIL import Image

from diffusers_unified import data
from diffusers_unified.data import pixels
from diffusers_unified.errors import ConfigError, DataError
from diffusers_unified.experiment import config as config_lib
from diffusers_unified.experiment import kinds

# -- CIFAR-10 / CIFAR-100 python batches ---------------------------------------------------------


@pytest.fixture
def cifar10(tmp_path):
    return util.write_cifar(tmp_path, "cifar10", per_file=12)


def test_cifar10_pixels_labels_splits_and_class_names(cifar10):
    ds = data.cifar_dataset(cifar10["folder"], centered=True)
    # The known image: pixel (r, c) is (8 r, 8 c, 255 - r - c) only if the 3072 values are
    # read as planes R, G, B, each row-major; a transposed or channel-swapped read fails.
    r, c = 5, 17
    assert tuple(ds.x_train[0, r, c]) == (8 * r, 8 * c, 255 - r - c)
    np.testing.assert_array_equal(ds.x_train[0], util.known_image())
    # Train is data_batch_1 .. data_batch_5 in order, test is test_batch.
    np.testing.assert_array_equal(ds.x_train, cifar10["x_train"])
    np.testing.assert_array_equal(ds.y_train, cifar10["y_train"])
    np.testing.assert_array_equal(ds.x_test, cifar10["x_test"])
    np.testing.assert_array_equal(ds.y_test, cifar10["y_test"])
    assert (ds.num_train, ds.num_test) == (5 * 12, 15)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32
    assert ds.data_shape == (32, 32, 3) and ds.bits == 8 and ds.centered
    assert ds.num_classes == 10 and ds.class_names == cifar10["names"]
    x, _ = ds.model_data("train")  # 8-bit levels 0..255 -> [-1, 1]
    assert x[0, r, c, 0] == pytest.approx(2 * 8 * r / 255 - 1)


def test_cifar10_reads_the_parent_folder_and_the_archive_in_place(cifar10, tmp_path):
    reference = data.cifar_dataset(cifar10["folder"])
    archive = util.tar_folder(cifar10["folder"], tmp_path / "cifar-10-python.tar.gz")
    download = tmp_path / "download"
    download.mkdir()
    archive_only = util.tar_folder(cifar10["folder"], download / "cifar-10-python.tar.gz")
    for path in (tmp_path, archive, download):
        ds = data.cifar_dataset(path)
        for split in ("train", "test"):
            for got, want in zip(ds.split(split), reference.split(split), strict=True):
                np.testing.assert_array_equal(got, want)
        assert ds.class_names == reference.class_names
    assert sorted(p.name for p in download.iterdir()) == [archive_only.name]  # nothing extracted


def test_cifar100_uses_the_fine_labels_and_names(tmp_path):
    written = util.write_cifar(tmp_path, "cifar100", per_file=20)
    ds = data.cifar_dataset(tmp_path, name="cifar100")
    np.testing.assert_array_equal(ds.x_train, written["x_train"])
    np.testing.assert_array_equal(ds.y_train, written["y_train"])  # fine, not coarse (y // 5)
    np.testing.assert_array_equal(ds.y_test, written["y_test"])
    assert (ds.num_train, ds.num_test, ds.num_classes) == (20, 23, 100)
    assert ds.class_names[99] == "class 99"


def test_cifar_max_examples_keeps_the_first_of_each_split(cifar10):
    ds = data.cifar_dataset(cifar10["folder"], max_examples=14)  # crosses into data_batch_2
    np.testing.assert_array_equal(ds.x_train, cifar10["x_train"][:14])
    np.testing.assert_array_equal(ds.y_test, cifar10["y_test"][:14])


def test_numpy_1_pickles_as_the_original_files_name_them_load(cifar10):
    # The originals were pickled by NumPy 1, whose arrays name numpy.core.multiarray.
    path = cifar10["folder"] / "test_batch"
    raw = path.read_bytes()
    assert b"numpy._core.multiarray\n_reconstruct" in raw
    path.write_bytes(raw.replace(b"numpy._core.", b"numpy.core."))
    np.testing.assert_array_equal(data.cifar_dataset(cifar10["folder"]).x_test, cifar10["x_test"])


class _RunsCode:
    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_a_pickle_naming_any_other_global_is_refused_unrun(cifar10, tmp_path):
    payload = _RunsCode()
    payload.target = str(tmp_path / "pwned")
    util.write_pickle(cifar10["folder"] / "data_batch_2", {b"data": payload, b"labels": []})
    with pytest.raises(DataError, match=r"data_batch_2 .*refused to load the global (posix|os)"):
        data.cifar_dataset(cifar10["folder"])
    assert not (tmp_path / "pwned").exists()


def test_missing_file_wrong_shape_and_wrong_path_name_what_was_expected(cifar10, tmp_path):
    folder = cifar10["folder"]
    layout = r"cifar-10-batches-py/ \(data_batch_1 \.\. data_batch_5, test_batch, batches\.meta\)"
    no_download = r"https://www\.cs\.toronto\.edu/~kriz/cifar\.html \(the package does not download"
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match=f"{folder} lacks data_batch_3 .*{layout}.*{no_download}"):
        data.cifar_dataset(folder)

    util.write_cifar(tmp_path, "cifar10")
    batch = pickle.loads((folder / "data_batch_4").read_bytes())
    batch[b"data"] = batch[b"data"][:, :3000]
    util.write_pickle(folder / "data_batch_4", batch)
    with pytest.raises(
        DataError,
        match=r"data_batch_4: b'data' is a uint8 array of shape \(12, 3000\); "
        r"expected a uint8 array of shape \(N, 3072\)",
    ):
        data.cifar_dataset(folder)

    util.write_cifar(tmp_path, "cifar10")
    batch = pickle.loads((folder / "test_batch").read_bytes())
    batch[b"labels"] = batch[b"labels"][:-1]
    util.write_pickle(folder / "test_batch", batch)
    with pytest.raises(DataError, match=r"test_batch: b'labels' is int64 of shape \(14,\); "):
        data.cifar_dataset(folder)

    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"CIFAR path {missing} does not exist; .*{layout}"):
        data.cifar_dataset(missing)
    (tmp_path / "x.tar.gz").write_bytes(b"not an archive")
    with pytest.raises(DataError, match=r"x\.tar\.gz is a file but not a readable tar archive"):
        data.cifar_dataset(tmp_path / "x.tar.gz")


def test_the_other_cifar_gets_a_hint_and_the_launcher_exit_code_is_4(tmp_path):
    written = util.write_cifar(tmp_path, "cifar100")
    archive = util.tar_folder(written["folder"], tmp_path / "cifar-100-python.tar.gz")
    for path in (written["folder"], archive):
        with pytest.raises(DataError, match="looks like CIFAR-100: use data.dataset='cifar100'"):
            data.cifar_dataset(path)
    d = config_lib.default_config().data
    d.dataset, d.path = "cifar10", str(tmp_path / "absent")
    with pytest.raises(DataError) as info:
        kinds.DATASETS["cifar10"].build(d, 0)
    assert info.value.exit_code == 4 and str(tmp_path / "absent") in str(info.value)


def test_a_cifar10_config_builds_a_run_whose_data_shape_is_the_config_s(tmp_path):
    from diffusers_unified.experiment import run

    util.write_cifar(tmp_path, "cifar10", per_file=4)
    config = config_lib.default_config()
    d, m = config.data, config.model
    d.dataset, d.path, d.image_size, d.num_channels = "cifar10", str(tmp_path), 32, 3
    m.name, m.nf, m.ch_mult, m.num_res_blocks, m.attn_resolutions = "unet", 8, (1,), 1, ()
    config_lib.check_values(config)
    assert run.build_run(config).data_shape == (32, 32, 3)
    d.image_size = 64
    with pytest.raises(
        DataError, match=r"yields images of shape \(B, 32, 32, 3\); .*image_size=64"
    ):
        run.build_run(config)


# -- image folders -------------------------------------------------------------------------------


def _bicubic(x):
    # Keys' cubic with a = -0.5, pillow's BICUBIC (and tf.image.resize's bicubic).
    x = np.abs(x)
    a = -0.5
    return np.where(
        x < 1,
        ((a + 2) * x - (a + 3)) * x * x + 1,
        np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0),
    )


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of pillow's antialiased bicubic resize along one axis.

    Pillow (Imaging/Resample.c) centres output pixel i at (i + 1/2) s in input
    coordinates (s = n_in / n_out), widens the kernel by max(s, 1) when
    shrinking, truncates it to the input and normalises the weights to sum 1.
    """
    scale = n_in / n_out
    fscale = max(scale, 1.0)
    support = 2.0 * fscale
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), n_in)
        j = np.arange(lo, hi)
        w = _bicubic((j - centre + 0.5) / fscale)
        m[i, lo:hi] = w / w.sum()
    return m


def _reference_resize(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Pillow's two passes, horizontal first, each rounded to 8 bits, per channel."""
    x = x.astype(np.float64)
    if x.shape[1] != w:
        x = np.clip(
            np.floor(np.einsum("ow,hwc->hoc", _resize_matrix(x.shape[1], w), x) + 0.5), 0, 255
        )
    if x.shape[0] != h:
        x = np.clip(
            np.floor(np.einsum("oh,hwc->owc", _resize_matrix(x.shape[0], h), x) + 0.5), 0, 255
        )
    return x


def _odd_folder(tmp_path):
    """40x30 RGBA, 30x40 L and 40x30 RGB images of random pixels: (folder, {name: array})."""
    rng = np.random.default_rng(3)
    arrays = {
        "a_rgba.png": rng.integers(0, 256, (30, 40, 4), dtype=np.uint8),
        "b_gray.png": rng.integers(0, 256, (40, 30), dtype=np.uint8),
        "c_rgb.png": rng.integers(0, 256, (30, 40, 3), dtype=np.uint8),
    }
    folder = tmp_path / "odd"
    folder.mkdir()
    for name, a in arrays.items():
        Image.fromarray(a).save(folder / name)
    return folder, arrays


def _rgb(a):
    return np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a[..., :3]


def _assert_close_to_reference(got, want):
    # Pillow's weights are 22-bit fixed point, our reference float64: they agree to ~1e-6 of
    # a level before rounding, so only a value within 1e-6 of a rounding tie can land one
    # level apart; at most a handful of pixels may, and none by more than 1.
    diff = np.abs(got.astype(np.int64) - want.astype(np.int64))
    assert diff.max() <= 1 and np.mean(diff > 0) < 0.01, (diff.max(), np.mean(diff > 0))


def test_image_folder_crops_the_centre_and_resizes_images_of_any_size(tmp_path):
    folder, arrays = _odd_folder(tmp_path)
    a, b, c = (_rgb(arrays[k]) for k in sorted(arrays))
    # Square 12: the 40x30 images keep columns 5..34 ((40 - 30) // 2 = 5), the 30x40 one
    # rows 5..34; RGBA drops alpha, L is repeated into three channels.
    ds = data.image_folder_dataset(folder, 12, num_channels=3, test_size=0)
    assert ds.data_shape == (12, 12, 3) and ds.num_train == 3 and ds.y_train is None
    for got, src in zip(ds.x_train, (a[:, 5:35], b[5:35], c[:, 5:35]), strict=True):
        _assert_close_to_reference(got, _reference_resize(src, 12, 12))
    # (H, W) = (9, 12): 40x30 has that aspect ratio already (no crop); 30x40 is too tall and
    # keeps round(30 * 9 / 12) = 22 rows from (40 - 22) // 2 = 9.
    ds = data.image_folder_dataset(folder, (9, 12), num_channels=3, test_size=0)
    assert ds.data_shape == (9, 12, 3)
    for got, src in zip(ds.x_train, (a, b[9:31], c), strict=True):
        _assert_close_to_reference(got, _reference_resize(src, 9, 12))
    # A crop_size square first (the score SDE code's CelebA 140 -> 64): 20x20 at
    # ((40 - 20) // 2, (30 - 20) // 2) = (10, 5) of a 40x30 image, then 20 -> 8.
    ds = data.image_folder_dataset(folder, 8, num_channels=3, test_size=0, crop_size=20)
    _assert_close_to_reference(ds.x_train[0], _reference_resize(a[5:25, 10:30], 8, 8))
    _assert_close_to_reference(ds.x_train[1], _reference_resize(b[10:30, 5:25], 8, 8))
    # Image size = the crop: no resampling at all, so the pixels are exact.
    ds = data.image_folder_dataset(folder, 30, num_channels=3, test_size=0)
    np.testing.assert_array_equal(ds.x_train[0], a[:, 5:35])
    np.testing.assert_array_equal(ds.x_train[1], b[5:35])


def test_image_folder_grayscale_is_the_luma_of_rgb(tmp_path):
    folder, arrays = _odd_folder(tmp_path)
    ds = data.image_folder_dataset(folder, 30, num_channels=1, test_size=0)
    assert ds.data_shape == (30, 30, 1)
    rgb = arrays["a_rgba.png"][:, 5:35, :3].astype(np.float64)
    luma = rgb @ np.array([0.299, 0.587, 0.114])  # ITU-R 601-2
    # pillow computes it in 16-bit fixed point: within one level of the exact value.
    assert np.abs(ds.x_train[0, ..., 0] - luma).max() <= 1
    np.testing.assert_array_equal(ds.x_train[1, ..., 0], arrays["b_gray.png"][5:35])


def test_image_folder_fills_one_array_split_by_seed_and_subsets(tmp_path):
    for k in range(3):
        for i in range(10):
            folder = tmp_path / f"class{k}"
            folder.mkdir(exist_ok=True)
            Image.new("RGB", (9 + i, 7), (20 * i, 80 * k, 7)).save(folder / f"{i}.png")
    ds = data.image_folder_dataset(tmp_path, 4, test_size=6, seed=1, workers=2)
    # Both splits are views of one array: the images were written in place, never stacked.
    assert ds.x_train.base is not None and ds.x_train.base is ds.x_test.base
    # Each image is one colour, so it says which file it came from: every file once.
    seen = {(int(p[0, 0, 0]) // 20, int(p[0, 0, 1]) // 80) for p in (*ds.x_train, *ds.x_test)}
    assert len(seen) == 30 and ds.num_test == 6
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        np.testing.assert_array_equal(x[:, 0, 0, 1] // 80, y)
    sub = data.image_folder_dataset(tmp_path, 4, test_size=2, seed=1, max_examples=12)
    again = data.image_folder_dataset(tmp_path, 4, test_size=2, seed=1, max_examples=12)
    assert (sub.num_train, sub.num_test) == (10, 2)
    np.testing.assert_array_equal(sub.x_train, again.x_train)
    assert set(np.concatenate([sub.y_train, sub.y_test])) == {0, 1, 2}  # a random subset


def test_image_folder_refuses_wide_images_small_crops_and_bad_options(tmp_path):
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(DataError, match=r"deep\.png is a I(;16\w?)? image .*expected 8-bit"):
        data.image_folder_dataset(tmp_path, 8)
    (tmp_path / "deep.png").unlink()
    Image.new("RGB", (10, 12)).save(tmp_path / "small.png")
    with pytest.raises(DataError, match=r"small\.png is 10x12 \(WxH\), smaller than the crop"):
        data.image_folder_dataset(tmp_path, 8, crop_size=11)
    with pytest.raises(ConfigError, match="resample='cubic' is not one of: bicubic"):
        data.image_folder_dataset(tmp_path, 8, resample="cubic")
    with pytest.raises(ConfigError, match="crop_size must be an int >= 0"):
        data.image_folder_dataset(tmp_path, 8, crop_size=-1)


# -- TFDS and Hugging Face datasets --------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "build", "extra"),
    [
        ("tensorflow_datasets", lambda: data.tfds_dataset("cifar10"), "tfds"),
        ("datasets", lambda: data.hf_dataset("uoft-cs/cifar10"), "hf"),
    ],
)
def test_a_missing_optional_library_names_its_pip_extra(monkeypatch, module, build, extra):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(ConfigError, match=rf"pip install 'diffusers_unified\[{extra}\]'"):
        build()


def test_hf_is_put_offline_before_datasets_is_first_imported(monkeypatch):
    monkeypatch.delitem(sys.modules, "datasets", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(sys, "path", [])  # so the import fails, whatever is installed
    with pytest.raises(ConfigError):
        data.hf_dataset("uoft-cs/cifar10")
    assert os.environ["HF_DATASETS_OFFLINE"] == "1" and os.environ["HF_HUB_OFFLINE"] == "1"


def _flat(colours, size):
    """Images of one colour each, (n, size, size, 3)."""
    return np.broadcast_to(colours[:, None, None], (len(colours), size, size, 3))


def _records(n, seed):
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (n, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, n)
    return colours, labels


def test_tfds_examples_become_the_same_uint8_dataset(monkeypatch, tmp_path):
    colours, labels = _records(7, 0)
    # TFDS's as_numpy yields dicts of NumPy values; images (H, W, 3) uint8, any size.
    examples = [
        {"image": np.broadcast_to(c, (12 + i, 10, 3)).copy(), "label": np.int64(y)}
        for i, (c, y) in enumerate(zip(colours, labels, strict=True))
    ]
    calls = []
    fake = util.fake_tfds({"train": examples[:5], "validation": examples[5:]}, "abcd", calls)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    ds = data.tfds_dataset(
        "celeb_a", data_dir=str(tmp_path), split_test="validation", image_size=6, centered=True
    )
    assert calls == [
        dict(name="celeb_a", split=s, data_dir=str(tmp_path), download=False)
        for s in ("train", "validation")
    ]
    assert ds.data_shape == (6, 6, 3) and (ds.num_train, ds.num_test) == (5, 2)
    # One colour per image, so resizing keeps it exactly (the weights sum to 1).
    np.testing.assert_array_equal(
        ds.x_train, np.broadcast_to(colours[:5, None, None], (5, 6, 6, 3))
    )
    np.testing.assert_array_equal(ds.y_test, labels[5:])
    assert ds.class_names == ("a", "b", "c", "d") and ds.num_classes == 4 and ds.centered

    with pytest.raises(DataError, match=r"TFDS 'celeb_a' split 'test' .*never downloads"):
        data.tfds_dataset("celeb_a", image_size=6)  # no "test" split prepared
    ds = data.tfds_dataset("x", split_test="", test_size=2, image_size=6, max_examples=4)
    assert (ds.num_train, ds.num_test) == (2, 2)  # the first 4 of train, 2 held out


def test_hf_records_with_pil_array_and_bytes_images(monkeypatch, tmp_path):
    colours, labels = _records(6, 1)
    images = [Image.new("RGBA", (10 + i, 8), (*c, 9)) for i, c in enumerate(colours)]
    buffer = io.BytesIO()
    images[2].convert("RGB").save(buffer, format="PNG")
    records = [{"img": im, "label": int(y)} for im, y in zip(images, labels, strict=True)]
    records[1]["img"] = np.asarray(images[1])  # arrays (H, W, 4) too
    records[2]["img"] = {"bytes": buffer.getvalue(), "path": None}  # a not-yet-decoded Image
    splits = {
        "train": util.FakeHFDataset(records[:4], names=["w", "x", "y", "z"]),
        "test": util.FakeHFDataset(records[4:], names=["w", "x", "y", "z"]),
    }
    calls = []
    monkeypatch.setitem(sys.modules, "datasets", util.fake_hf(splits, calls))
    ds = data.hf_dataset(str(tmp_path), image_size=4, num_channels=3, image_key="img")
    assert calls == [("load_from_disk", str(tmp_path))]
    np.testing.assert_array_equal(ds.x_train, _flat(colours[:4], 4))
    np.testing.assert_array_equal(ds.y_train, labels[:4])
    assert ds.class_names == ("w", "x", "y", "z")
    # A hub name is read with load_dataset, from the cache directory given.
    data.hf_dataset("uoft-cs/cifar10", cache_dir="cache", image_size=4, image_key="img")
    assert calls[1:] == [("load_dataset", "uoft-cs/cifar10", s, "cache") for s in ("train", "test")]
    with pytest.raises(DataError, match=r"example 0 has no label under 'fine_label'"):
        data.hf_dataset(str(tmp_path), image_size=4, image_key="img", label_key="fine_label")
    with pytest.raises(DataError, match=r"example 0 has no image under 'image' \(found: "):
        data.hf_dataset(str(tmp_path), image_size=4)
    unlabelled = data.hf_dataset(str(tmp_path), image_size=4, image_key="img", label_key="")
    assert unlabelled.y_train is None and unlabelled.num_classes is None


def test_pixels_growing_buffer_matches_a_stack():
    buf = pixels.Growing(2)
    images = [np.full((3, 2, 1), i, np.uint8) for i in range(5)]
    for i, im in enumerate(images):
        buf.append(im, f"image {i}")
    np.testing.assert_array_equal(buf.array(), np.stack(images))
    with pytest.raises(DataError, match=r"odd is 3x3 \(WxH\) but image 0 is 2x3"):
        buf.append(np.zeros((3, 3, 1), np.uint8), "odd")
