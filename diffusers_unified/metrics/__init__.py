"""Sample-quality and likelihood metrics on arrays."""

from diffusers_unified.metrics.sample import (
    energy_distance,
    frechet_distance,
    kernel_inception_distance,
    mean_log_density,
    mmd,
    mode_coverage,
    random_features,
    sliced_wasserstein,
)

__all__ = [
    "energy_distance",
    "frechet_distance",
    "kernel_inception_distance",
    "mean_log_density",
    "mmd",
    "mode_coverage",
    "random_features",
    "sliced_wasserstein",
]
