"""Data: toy 2-D sets, Gaussian mixtures with exact scores, digits, `.npz`, image folders, CIFAR.

Every source is embedded or a user file; nothing is downloaded. Builders
(`vectors`, `images`, `folders`, `cifar`, and `external` for TFDS and Hugging Face
`datasets`, optional libraries imported only when used) return an
in-memory `Dataset` (`dataset`), whose `Scaling` (`scaling`) says how
stored values become model inputs; `Dataset.device_arrays()` puts a split
on the device once, `batch(arrays, seed, step, batch_size)` draws the
batch of a step as a pure function of (seed, step) (`batching`), and
`validate_batch` turns bad data into a `DataError` that names what is
wrong (`validation`).
"""

from diffusers_unified.data.batching import (
    Batcher,
    batch,
    batch_indices,
    dequantize_key,
    epoch_permutation,
    eval_batches,
    flip_key,
    to_model_batch,
)
from diffusers_unified.data.cifar import cifar_dataset
from diffusers_unified.data.dataset import DataArrays, Dataset, split_indices
from diffusers_unified.data.external import hf_dataset, tfds_dataset
from diffusers_unified.data.folders import image_folder_dataset
from diffusers_unified.data.gaussian import ExactScore, GaussianMixture, example_mixture
from diffusers_unified.data.images import (
    array_dataset,
    digits_dataset,
    npz_dataset,
    shape_only_dataset,
)
from diffusers_unified.data.scaling import Scaling
from diffusers_unified.data.toy import (
    TOY_NAMES,
    TOY_NUM_CLASSES,
    eight_gaussians_mixture,
    sample_toy,
    sample_toy_with_labels,
)
from diffusers_unified.data.validation import KINDS, validate_batch
from diffusers_unified.data.vectors import exact_mixture, toy_dataset

__all__ = [
    "KINDS",
    "TOY_NAMES",
    "TOY_NUM_CLASSES",
    "Batcher",
    "DataArrays",
    "Dataset",
    "ExactScore",
    "GaussianMixture",
    "Scaling",
    "array_dataset",
    "batch",
    "batch_indices",
    "cifar_dataset",
    "dequantize_key",
    "digits_dataset",
    "eight_gaussians_mixture",
    "epoch_permutation",
    "eval_batches",
    "exact_mixture",
    "flip_key",
    "example_mixture",
    "hf_dataset",
    "image_folder_dataset",
    "npz_dataset",
    "sample_toy",
    "sample_toy_with_labels",
    "shape_only_dataset",
    "split_indices",
    "tfds_dataset",
    "to_model_batch",
    "toy_dataset",
    "validate_batch",
]
