"""Sample-quality metrics on arrays."""

from diffusers_unified.metrics.sample import sliced_wasserstein

__all__ = ["sliced_wasserstein"]
