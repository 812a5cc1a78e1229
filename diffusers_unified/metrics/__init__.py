"""Sample-quality metrics: distances between sample sets, and FID / IS / KID on Inception features.

`metrics.sample` compares sets directly (sliced Wasserstein, MMD, energy
distance, exact log-densities and mode coverage for mixtures, and Frechet and
kernel distances on a fixed random embedding, a stand-in labelled `_rf`);
`metrics.inception` computes FID, Inception Score and KID as the papers do,
on the features of the FID Inception-v3 (`nets.InceptionV3`).
"""

from diffusers_unified.metrics.inception import (
    InceptionFeatures,
    fid_from_statistics,
    inception_score,
    kid,
    load_statistics,
    save_statistics,
    statistics,
    to_inception_input,
)
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
    "InceptionFeatures",
    "energy_distance",
    "fid_from_statistics",
    "frechet_distance",
    "inception_score",
    "kernel_inception_distance",
    "kid",
    "load_statistics",
    "mean_log_density",
    "mmd",
    "mode_coverage",
    "random_features",
    "save_statistics",
    "sliced_wasserstein",
    "statistics",
    "to_inception_input",
]
