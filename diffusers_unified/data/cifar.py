"""CIFAR-10 and CIFAR-100 from the "python version" archives their authors ship.

The files are Krizhevsky's (2009, "Learning multiple layers of features from
tiny images"), from https://www.cs.toronto.edu/~kriz/cifar.html:
`cifar-10-python.tar.gz` unpacks to `cifar-10-batches-py/` (`data_batch_1` ..
`data_batch_5`, `test_batch`, `batches.meta`) and `cifar-100-python.tar.gz`
to `cifar-100-python/` (`train`, `test`, `meta`). Each batch file is a
pickled dict: `b"data"`, a uint8 array (N, 3072) whose row holds one image
as three 32x32 planes R, G, B, each row-major, and the labels (`b"labels"`;
CIFAR-100: `b"fine_labels"`); the meta file names the classes. The train
and test splits are the official ones (50,000 / 10,000 images), as in the
score SDE code (TFDS's `cifar10`, which reads these same files) and DDPM's.

Pickles can run code when loaded, so only the files of these names are
read, and with an unpickler that builds nothing but dicts, lists, bytes,
numbers and NumPy arrays. Nothing is downloaded.
"""

from __future__ import annotations

import codecs
import dataclasses
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

from diffusers_unified.data.dataset import Dataset
from diffusers_unified.data.scaling import Scaling
from diffusers_unified.errors import ConfigError, DataError

IMAGE_SHAPE = (32, 32, 3)
URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclasses.dataclass(frozen=True)
class _Layout:
    folder: str  # the folder the archive unpacks to
    archive: str
    train: tuple[str, ...]  # batch files, in the order their images are concatenated
    test: tuple[str, ...]
    meta: str
    label_key: bytes
    names_key: bytes
    num_classes: int
    title: str

    def describe(self) -> str:
        files = ", ".join((*self.train, *self.test, self.meta))
        if len(self.train) > 2:
            files = f"{self.train[0]} .. {self.train[-1]}, {', '.join(self.test)}, {self.meta}"
        return (
            f"{self.title}'s python version: the folder {self.folder}/ ({files}), the folder "
            f"holding it, or {self.archive} itself. Get the archive from {URL} (the package "
            "does not download it)"
        )


LAYOUTS = {
    "cifar10": _Layout(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test=("test_batch",),
        meta="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
        num_classes=10,
        title="CIFAR-10",
    ),
    "cifar100": _Layout(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        train=("train",),
        test=("test",),
        meta="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
        num_classes=100,
        title="CIFAR-100",
    ),
}


def cifar_dataset(
    path, *, centered: bool = False, name: str = "cifar10", max_examples: int = 0
) -> Dataset:
    """CIFAR-10 or CIFAR-100 (`name`) as uint8 NHWC (32, 32, 3) images with labels, 8-bit.

    `path` is the unpacked folder (`cifar-10-batches-py/`, `cifar-100-python/`),
    the folder that holds it, or the `.tar.gz` archive itself (read in
    place, nothing extracted to disk). The splits are the official train and
    test batches; CIFAR-100 gets its 100 fine labels. Class names come from
    the meta file. `max_examples` > 0 keeps the first that many images of
    each split (quick runs); 0 keeps all. A missing path, file or a file of
    the wrong form raises `DataError` naming it and the expected layout.
    """
    if name not in LAYOUTS:
        raise ConfigError(f"CIFAR name must be one of {', '.join(LAYOUTS)}, got {name!r}")
    if not isinstance(max_examples, int) or max_examples < 0:
        raise ConfigError(f"max_examples must be an int >= 0 (0 = all), got {max_examples!r}")
    layout = LAYOUTS[name]
    files = _read_files(Path(path), layout)
    class_names = _class_names(files.pop(layout.meta), layout)
    splits = {}
    for split, members in (("train", layout.train), ("test", layout.test)):
        splits[split] = _assemble([files.pop(m) for m in members], layout, max_examples)
    (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
    return Dataset(
        name=name,
        x_train=x_train,
        x_test=x_test,
        kind="image",
        scaling=Scaling(centered=centered, bits=8),
        y_train=y_train,
        y_test=y_test,
        num_classes=layout.num_classes,
        class_names=class_names,
    )


# -- finding and unpickling the files ----------------------------------------------------------


def _read_files(path: Path, layout: _Layout) -> dict[str, tuple[str, object]]:
    """{member: (where, unpickled object)} for every file of the layout."""
    wanted = (*layout.train, *layout.test, layout.meta)
    if path.is_file():
        return _read_archive(path, layout, wanted)
    if not path.is_dir():
        raise DataError(f"CIFAR path {path} does not exist; expected {layout.describe()}")
    if not (path / layout.folder).is_dir() and (path / layout.archive).is_file():
        return _read_archive(path / layout.archive, layout, wanted)
    folder = path / layout.folder if (path / layout.folder).is_dir() else path
    missing = [m for m in wanted if not (folder / m).is_file()]
    if missing:
        found = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        raise DataError(
            f"CIFAR folder {folder} lacks {', '.join(missing)} (found: "
            f"{', '.join(found[:12]) or 'nothing'}{', ...' if len(found) > 12 else ''})"
            f"{_other_layout_hint(found, layout)}; expected {layout.describe()}"
        )
    out = {}
    for member in wanted:
        where = str(folder / member)
        with open(folder / member, "rb") as f:
            out[member] = (where, _unpickle(f, where))
    return out


def _read_archive(path: Path, layout: _Layout, wanted) -> dict[str, tuple[str, object]]:
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise DataError(
            f"CIFAR path {path} is a file but not a readable tar archive ({exc}); "
            f"expected {layout.describe()}"
        ) from exc
    out, tops = {}, set()
    with tar:
        try:
            # One pass in archive order: a gzip stream is slow to seek backwards in.
            for info in tar:
                parts = Path(info.name).parts
                parts = parts[1:] if parts[:1] == (".",) else parts
                tops.update(parts[:1])
                if len(parts) != 2 or parts[0] != layout.folder or parts[1] not in wanted:
                    continue
                where = f"{path}:{info.name}"
                if not info.isfile():
                    raise DataError(f"{where} is not a regular file; expected a pickled batch")
                out[parts[1]] = (where, _unpickle(tar.extractfile(info), where))
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise DataError(f"cannot read the archive {path} ({exc})") from exc
    missing = [m for m in wanted if m not in out]
    if missing:
        raise DataError(
            f"archive {path} lacks {', '.join(f'{layout.folder}/{m}' for m in missing)} "
            f"(its top-level entries: {', '.join(sorted(tops)) or 'none'})"
            f"{_other_layout_hint(sorted(tops), layout)}; expected {layout.describe()}"
        )
    return out


def _other_layout_hint(names, layout: _Layout) -> str:
    """A hint when the files are the other CIFAR's."""
    for key, other in LAYOUTS.items():
        if other is not layout and (other.folder in names or other.meta in names):
            return f"; this looks like {other.title}: use data.dataset={key!r}"
    return ""


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The globals a pickled NumPy array names, under NumPy 1's and NumPy 2's module names."""
    found = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # Python 3 bytes at protocol 2
    }
    # Taken from this NumPy's own reductions, never imported by a name read from a file.
    reducers = {
        ("multiarray", "_reconstruct"): np.empty(0).__reduce__()[0],
        ("multiarray", "scalar"): np.uint8(0).__reduce__()[0],
        ("numeric", "_frombuffer"): np.empty(0).__reduce_ex__(5)[0],
    }
    for core in ("numpy.core", "numpy._core"):
        for (module, name), fn in reducers.items():
            found[(f"{core}.{module}", name)] = fn
    return found


class _ArraysOnly(pickle.Unpickler):
    """Builds dicts, lists, bytes, numbers and NumPy arrays, and refuses every other global.

    The original batches were written by Python 2 with NumPy 1
    (`numpy.core.multiarray._reconstruct`); NumPy 2 and Python 3 pickles
    name `numpy._core` and `_codecs.encode`.
    """

    _ALLOWED = _numpy_globals()

    def find_class(self, module, name):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to load the global {module}.{name}: a CIFAR batch holds only dicts, "
                "lists, bytes, numbers and NumPy arrays"
            ) from None


def _unpickle(f, where: str):
    try:
        # encoding="bytes": the Python 2 strings of the original files stay bytes.
        return _ArraysOnly(f, encoding="bytes").load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        KeyError,
        IndexError,
        OverflowError,
    ) as exc:
        raise DataError(f"cannot unpickle {where} ({exc}); expected a CIFAR python batch") from exc


# -- checking and assembling -------------------------------------------------------------------


def _class_names(item, layout: _Layout) -> tuple[str, ...]:
    where, meta = item
    key = layout.names_key
    names = meta.get(key) if isinstance(meta, dict) else None
    if not isinstance(names, list | tuple) or len(names) != layout.num_classes:
        got = f"keys {_keys(meta)}" if isinstance(meta, dict) else f"a {type(meta).__name__}"
        raise DataError(
            f"{where}: expected a dict whose {key!r} lists the {layout.num_classes} class "
            f"names, got {got}"
        )
    decoded = []
    for n in names:
        if not isinstance(n, bytes | str):
            raise DataError(f"{where}: class names must be strings, got {type(n).__name__}")
        decoded.append(n.decode("utf-8") if isinstance(n, bytes) else n)
    return tuple(decoded)


def _keys(d: dict) -> str:
    return ", ".join(sorted(repr(k) for k in d)) or "none"


def _batch_arrays(item, layout: _Layout) -> tuple[np.ndarray, np.ndarray]:
    """(data (N, 3072) uint8, labels (N,) int32) of one batch file, checked."""
    where, batch = item
    if not isinstance(batch, dict):
        raise DataError(f"{where}: expected a pickled dict, got a {type(batch).__name__}")
    for key in (b"data", layout.label_key):
        if key not in batch:
            raise DataError(f"{where}: no {key!r} entry (found {_keys(batch)})")
    data = batch[b"data"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2) or (
        data.shape[1] != 3 * 32 * 32
    ):
        if isinstance(data, np.ndarray):
            got = f"a {data.dtype} array of shape {data.shape}"
        else:
            got = f"a {type(data).__name__}"
        raise DataError(
            f"{where}: b'data' is {got}; expected a uint8 array of shape (N, 3072), one "
            "32x32 image per row as planes R, G, B, each row-major"
        )
    labels = batch[layout.label_key]
    y = np.asarray(labels) if isinstance(labels, list | tuple | np.ndarray) else None
    if y is None or y.dtype.kind not in "iu" or y.shape != (data.shape[0],):
        got = f"a {type(labels).__name__}" if y is None else f"{y.dtype} of shape {y.shape}"
        raise DataError(
            f"{where}: {layout.label_key!r} is {got}; expected {data.shape[0]} integer "
            "labels, one per image of b'data'"
        )
    if y.size and (y.min() < 0 or y.max() >= layout.num_classes):
        raise DataError(
            f"{where}: labels lie in [{y.min()}, {y.max()}]; expected 0..{layout.num_classes - 1}"
        )
    return data, y.astype(np.int32)


def _assemble(items, layout: _Layout, max_examples: int) -> tuple[np.ndarray, np.ndarray]:
    """The batches' images as one (N, 32, 32, 3) uint8 array, filled in place, and labels."""
    arrays = [_batch_arrays(item, layout) for item in items]
    n = sum(d.shape[0] for d, _ in arrays)
    if max_examples:
        n = min(n, max_examples)
    x = np.empty((n, *IMAGE_SHAPE), np.uint8)
    y = np.empty((n,), np.int32)
    start = 0
    for data, labels in arrays:
        take = min(data.shape[0], n - start)
        # A row is 3 planes of 32 rows of 32 pixels: (N, C, H, W), then channels last.
        x[start : start + take] = data[:take].reshape(take, 3, 32, 32).transpose(0, 2, 3, 1)
        y[start : start + take] = labels[:take]
        start += take
    return x, y
