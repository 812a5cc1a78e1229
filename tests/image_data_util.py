"""Miniature data sets in the forms the real ones ship, written on the fly for the tests.

`write_cifar` writes CIFAR's python batches (pickled dicts, the real file
names and keys) with a few dozen images per file; `fake_tfds` and
`fake_hf` are stand-ins with the parts of `tensorflow_datasets` and
`datasets` that `data.external` calls, to be put in `sys.modules`.
"""

from __future__ import annotations

import pickle
import tarfile
import types
from pathlib import Path

import numpy as np

CIFAR = {
    # name: (folder, train files, test files, meta file, label key, names key, classes)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        b"labels",
        b"label_names",
        10,
    ),
    "cifar100": (
        "cifar-100-python",
        ["train"],
        ["test"],
        "meta",
        b"fine_labels",
        b"fine_label_names",
        100,
    ),
}


def known_image() -> np.ndarray:
    """A 32x32 RGB image whose every pixel says where it is: (row * 8, col * 8, 255 - row - col)."""
    r, c = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    return np.stack([r * 8, c * 8, 255 - r - c], axis=-1).astype(np.uint8)


def cifar_row(image: np.ndarray) -> np.ndarray:
    """A (32, 32, 3) image as CIFAR stores it: the R plane, then G, then B, each row by row."""
    return np.concatenate([image[:, :, k].reshape(-1) for k in range(3)])


def write_cifar(root: Path, name: str = "cifar10", per_file: int = 12, seed: int = 0) -> dict:
    """The miniature batches folder under root; returns what it holds, in NHWC.

    Image 0 of the first train file is `known_image()`. Returns {"folder",
    "x_train", "y_train", "x_test", "y_test", "names"}; train files hold
    per_file images each, the test file per_file + 3 (so the splits differ).
    """
    folder_name, train, test, meta, label_key, names_key, k = CIFAR[name]
    folder = Path(root) / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {"folder": folder}
    for split, files in (("train", train), ("test", test)):
        xs, ys = [], []
        for i, file in enumerate(files):
            n = per_file + (3 if split == "test" else 0)
            x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            if split == "train" and i == 0:
                x[0] = known_image()
            y = rng.integers(0, k, n)
            batch = {
                b"batch_label": f"{split} batch {i}".encode(),
                b"data": np.stack([cifar_row(im) for im in x]),
                label_key: [int(v) for v in y],  # the real files hold Python int lists
                b"filenames": [f"img_{j}.png".encode() for j in range(n)],
            }
            if name == "cifar100":
                batch[b"coarse_labels"] = [int(v) // 5 for v in y]
            write_pickle(folder / file, batch)
            xs.append(x)
            ys.append(y)
        out[f"x_{split}"], out[f"y_{split}"] = np.concatenate(xs), np.concatenate(ys)
    out["names"] = tuple(f"class {j}" for j in range(k))
    write_pickle(folder / meta, {names_key: [s.encode() for s in out["names"]]})
    return out


def write_pickle(path: Path, obj) -> None:
    # Protocol 2, as the original files (Python 2's cPickle).
    path.write_bytes(pickle.dumps(obj, protocol=2))


def tar_folder(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


# -- stand-ins for the optional libraries -----------------------------------------------------


def fake_tfds(splits: dict[str, list[dict]], names=None, calls=None):
    """A `tensorflow_datasets` with `load(..., with_info=True)` and `as_numpy`.

    `splits`: {split: [example dict of NumPy values]}. Each `load` call's
    keyword arguments are appended to `calls`.
    """

    def load(name, *, split, data_dir=None, download=True, with_info=False, **kwargs):
        if calls is not None:
            calls.append(dict(name=name, split=split, data_dir=data_dir, download=download))
        if split not in splits:
            raise AssertionError(f"Dataset {name}: could not find data in {data_dir}")
        info = types.SimpleNamespace(
            splits={s: types.SimpleNamespace(num_examples=len(v)) for s, v in splits.items()},
            features={"label": types.SimpleNamespace(names=list(names))} if names else {},
        )
        return (iter(splits[split]), info) if with_info else iter(splits[split])

    return types.SimpleNamespace(load=load, as_numpy=lambda ds: ds)


class FakeHFDataset(list):
    """A list of records with the `features` a `datasets.Dataset` has."""

    def __init__(self, records, names=None, label_key="label"):
        super().__init__(records)
        self.features = {label_key: types.SimpleNamespace(names=list(names))} if names else {}


def fake_hf(splits: dict[str, FakeHFDataset], calls=None):
    """A `datasets` with `load_from_disk` (a DatasetDict: a dict of splits) and `load_dataset`."""

    def load_from_disk(path):
        if calls is not None:
            calls.append(("load_from_disk", str(path)))
        return dict(splits)

    def load_dataset(name, *, split, cache_dir=None, **kwargs):
        if calls is not None:
            calls.append(("load_dataset", name, split, cache_dir))
        if split not in splits:
            raise FileNotFoundError(f"Couldn't find a dataset script or cache for {name}")
        return splits[split]

    return types.SimpleNamespace(load_from_disk=load_from_disk, load_dataset=load_dataset)
