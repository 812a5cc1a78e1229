"""Data: toy 2-D sets, Gaussian mixtures with exact scores, digits, `.npz` files and image folders.

Every source is embedded or a user file; nothing is downloaded. Builders
return an in-memory `Dataset`; `Dataset.device_arrays()` puts a split on the
device once, `batch(arrays, seed, step, batch_size)` draws the batch of a
step as a pure function of (seed, step), and `validate_batch` turns bad data
into a `DataError` that names what is wrong.
"""

from diffusers_unified.data.datasets import (
    KINDS,
    DataArrays,
    Dataset,
    Scaling,
    array_dataset,
    batch,
    batch_indices,
    digits_dataset,
    epoch_permutation,
    eval_batches,
    exact_mixture,
    image_folder_dataset,
    npz_dataset,
    split_indices,
    toy_dataset,
    validate_batch,
)
from diffusers_unified.data.gaussian import ExactScore, GaussianMixture, example_mixture
from diffusers_unified.data.toy import (
    TOY_NAMES,
    TOY_NUM_CLASSES,
    eight_gaussians_mixture,
    sample_toy,
    sample_toy_with_labels,
)

__all__ = [
    "KINDS",
    "TOY_NAMES",
    "TOY_NUM_CLASSES",
    "DataArrays",
    "Dataset",
    "ExactScore",
    "GaussianMixture",
    "Scaling",
    "array_dataset",
    "batch",
    "batch_indices",
    "digits_dataset",
    "eight_gaussians_mixture",
    "epoch_permutation",
    "eval_batches",
    "exact_mixture",
    "example_mixture",
    "image_folder_dataset",
    "npz_dataset",
    "sample_toy",
    "sample_toy_with_labels",
    "split_indices",
    "toy_dataset",
    "validate_batch",
]
