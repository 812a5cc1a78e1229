"""The data set type: train and held-out arrays on the host, and how they reach the device.

A `Dataset` holds its splits in their stored form (see `scaling`), validated
when it is built (`validation`); builders live in `vectors` (toy sets,
mixtures), `images` (digits, `.npz`), `folders`, `cifar` and `external`
(TFDS, Hugging Face); batching in `batching`.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import struct

from diffusers_unified.data.gaussian import GaussianMixture
from diffusers_unified.data.scaling import Scaling
from diffusers_unified.data.validation import validate_dataset
from diffusers_unified.errors import ConfigError, DataError
from diffusers_unified.typing import Array


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Train and held-out arrays in their stored form, with what downstream code needs.

    Arrays are NumPy arrays on the host: `x_*` of shape (n, d) for vector
    data or (n, H, W, C) for images; `y_*` integer labels (n,) in
    [0, num_classes), or None. `device_arrays` puts a split on the device
    once; `batch` draws from it. Construction validates everything and raises
    `DataError` on inconsistent shapes, labels, dtypes or ranges.
    """

    name: str
    x_train: np.ndarray = dataclasses.field(repr=False)
    x_test: np.ndarray = dataclasses.field(repr=False)
    kind: str = "vector"
    scaling: Scaling = Scaling(bounded=False)
    y_train: np.ndarray | None = dataclasses.field(default=None, repr=False)
    y_test: np.ndarray | None = dataclasses.field(default=None, repr=False)
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    # The exact law of the data when it is known (toy Gaussian mixtures): evaluation
    # then reports exact log-densities and mode coverage next to the model's.
    mixture: GaussianMixture | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        validate_dataset(self)

    def __repr__(self):
        return (
            f"Dataset({self.name!r}, kind={self.kind!r}, data_shape={self.data_shape}, "
            f"num_train={self.num_train}, num_test={self.num_test}, "
            f"num_classes={self.num_classes}, scaling={self.scaling})"
        )

    @property
    def data_shape(self) -> tuple[int, ...]:
        """The shape of one example: (d,) or (H, W, C)."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.x_test.shape[0])

    @property
    def centered(self) -> bool:
        return self.scaling.centered

    @property
    def bits(self) -> int | None:
        return self.scaling.bits

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(x, y) of "train" or "test", stored form."""
        if split == "train":
            return self.x_train, self.y_train
        if split == "test":
            return self.x_test, self.y_test
        raise ValueError(f"unknown split {split!r}; valid: train, test")

    def model_data(self, split: str = "test") -> tuple[np.ndarray, np.ndarray | None]:
        """A whole split in model units (no dequantisation), as NumPy arrays."""
        x, y = self.split(split)
        return np.asarray(self.scaling.to_model(x)), y

    def device_arrays(self, split: str = "train", device=None) -> DataArrays:
        """The split as device arrays, put there once (`device`: a device or a sharding).

        Labels become int32. The result feeds `batch` and `eval_batches`.
        """
        x, y = self.split(split)
        if x.shape[0] == 0:
            raise DataError(f"dataset {self.name!r} has no {split} examples")
        y = None if y is None else np.asarray(y, np.int32)
        x, y = jax.device_put((x, y), device)
        return DataArrays(x=x, y=y, scaling=self.scaling, name=self.name)


class DataArrays(struct.PyTreeNode):
    """One split on the device: stored-form `x`, int32 labels `y` (or None), and its scaling.

    A pytree, so it can be an argument of `jax.jit` (the arrays are traced,
    not baked into the compiled code as constants).
    """

    x: Array
    y: Array | None
    scaling: Scaling = struct.field(pytree_node=False)
    name: str = struct.field(pytree_node=False, default="dataset")

    @property
    def num_examples(self) -> int:
        return int(self.x.shape[0])

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x.shape[1:])


# -- splitting ------------------------------------------------------------------------


def _num_held_out(n: int, test_size) -> int:
    """test_size: a fraction in [0, 1) of n, or a count in [0, n - 1]."""
    if isinstance(test_size, bool) or not isinstance(test_size, int | float):
        raise ConfigError(f"test_size must be a fraction or a count, got {test_size!r}")
    if isinstance(test_size, float):
        if not 0.0 <= test_size < 1.0:
            raise ConfigError(f"test_size={test_size} as a fraction must lie in [0, 1)")
        count = round(n * test_size)
    else:
        count = test_size
    if not 0 <= count <= n - 1:
        raise ConfigError(
            f"test_size={test_size} holds out {count} of {n} examples; at least one must "
            "remain for training"
        )
    return count


def split_indices(n: int, test_size, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: a seeded random split, each part in its original order."""
    num_test = _num_held_out(n, test_size)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[num_test:]), np.sort(perm[:num_test])
