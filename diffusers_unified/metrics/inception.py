"""FID, Inception Score and KID as their reference code computes them, and the Inception features.

Formulas (on the host, in float64):

- FID (Heusel et al. 2017): ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) of
  the pool3 features' means and covariances (`np.cov`, rows are examples),
  as pytorch-fid's `calculate_frechet_distance`. pytorch-fid takes scipy's
  general `sqrtm(S_1 S_2)`; only its trace enters FID, and it is the sum of
  the square roots of the eigenvalues of the symmetric PSD matrix
  S_1^(1/2) S_2 S_1^(1/2), which is what we compute (TF-GAN's
  `trace_sqrt_product` does the same with SVDs). Eigenvalues below
  d * eps * the largest (roundoff, for rank-deficient covariances such as
  those of fewer than 2048 samples) count as zero: their square roots would
  add ~1e-8 each. pytorch-fid adds 1e-6 to both diagonals when its `sqrtm`
  returns non-finite values; the symmetric form never does on finite PSD
  input, so no offset is added.
- Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))) with
  p(y|x) the softmax of all 1008 logits (no class is dropped, as in both
  references) and p(y) its mean over the split; the images are cut into
  `splits` consecutive parts [i n / splits, (i + 1) n / splits) and the mean
  and standard deviation (ddof 0) of the per-part scores reported, as the
  improved-GAN code does with splits=10. TF-GAN's
  `classifier_score_from_logits`, which the score SDE code reports, is the
  one-part score: `splits=1`.
- KID (Binkowski et al. 2018): the unbiased MMD^2 with the kernel
  k(a, b) = (a.b / d + 1)^3 -- within-set means leave out the diagonal,
  the cross mean keeps all m^2 pairs -- averaged over `num_subsets` random
  subsets of m = min(subset_size, n_a, n_b) examples of each set drawn
  without replacement; mean and standard deviation (ddof 0) over subsets.
  This is Binkowski et al.'s `polynomial_mmd_averages` with the defaults of
  clean-fid's and StyleGAN2-ADA's `kernel_distance` (100 subsets of 1000).
  TF-GAN (and so the score SDE code) instead splits the sets into disjoint
  blocks of at most 1024 and reports the standard error of the block mean:
  the same estimator of the same quantity, another split.

Statistics files use pytorch-fid's `.npz` layout (`mu`, `sigma`), so either
tool reads the other's; the score SDE code's reference files, which hold
the raw features under `pool_3`, are read too.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from diffusers_unified.errors import ConfigError, DataError
from diffusers_unified.nets.inception import InceptionV3, load_inception_params
from diffusers_unified.typing import Array

_EPS = np.finfo(np.float64).eps


def _features64(features, name: str) -> np.ndarray:
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise DataError(f"{name}: expected features of shape (n >= 2, d), got {f.shape}")
    if not np.all(np.isfinite(f)):
        raise DataError(f"{name}: features contain NaN or infinity")
    return f


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of features (n, d) in float64, as pytorch-fid (`np.cov`, ddof 1)."""
    f = _features64(features, "statistics")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _psd_eigenvalues(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with roundoff below d * eps * max set to zero."""
    return np.where(w > len(w) * _EPS * max(w.max(initial=0.0), 0.0), w, 0.0)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr (S_1 S_2)^(1/2): the sum of sqrt(eigenvalues of S_1^(1/2) S_2 S_1^(1/2)), S_i PSD."""
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(_psd_eigenvalues(w))) @ v.T
    middle = root1 @ sigma2 @ root1
    middle = (middle + middle.T) / 2  # symmetric up to roundoff; eigvalsh reads one triangle
    return float(np.sum(np.sqrt(_psd_eigenvalues(np.linalg.eigvalsh(middle)))))


def fid_from_statistics(mu1, sigma1, mu2, sigma2) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    s1, s2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise DataError(
            f"FID statistics disagree: means {mu1.shape} and {mu2.shape}, covariances "
            f"{s1.shape} and {s2.shape}; expected (d,) and (d, d) for one d"
        )
    for name, a in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not np.all(np.isfinite(a)):
            raise DataError(f"FID statistics: {name} contains NaN or infinity")
    diff = mu1 - mu2
    tr_root = trace_sqrt_product(s1, s2)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_root)


def save_statistics(path: str, mu, sigma) -> None:
    """Write (mu, sigma) as pytorch-fid does (`np.savez_compressed(path, mu=, sigma=)`), atomically.

    The name must end in `.npz`: pytorch-fid takes a path for a statistics
    file only then.
    """
    if not str(path).endswith(".npz"):
        raise ConfigError(f"statistics file {path!r}: the name must end in .npz (as pytorch-fid's)")
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    _check_statistics(mu, sigma, path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, mu=mu, sigma=sigma)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _check_statistics(mu: np.ndarray, sigma: np.ndarray, source: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise DataError(
            f"{source}: mu has shape {mu.shape} and sigma {sigma.shape}; expected (d,) and (d, d)"
        )
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise DataError(f"{source}: statistics contain NaN or infinity")


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma), float64, from a pytorch-fid (`mu`, `sigma`) or score SDE (`pool_3`) `.npz`."""
    if not os.path.isfile(path):
        raise DataError(f"statistics file {path!r} not found")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: np.asarray(f[k]) for k in f.files}
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from e
    if "mu" in arrays and "sigma" in arrays:
        mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
    elif "pool_3" in arrays:
        mu, sigma = statistics(arrays["pool_3"])
    else:
        raise DataError(
            f"{path}: expected keys 'mu' and 'sigma' (pytorch-fid) or 'pool_3' (score SDE "
            f"features), found {sorted(arrays)}"
        )
    _check_statistics(mu, sigma, path)
    return mu, sigma


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over `splits` parts of exp(E KL(p(y|x) || p(y))), p(y|x) = softmax(logits)."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or not np.all(np.isfinite(logits)):
        raise DataError(f"inception_score: expected finite logits (n, classes), got {logits.shape}")
    n = logits.shape[0]
    if not 1 <= splits <= n:
        raise ConfigError(f"inception_score: splits must be in 1..{n} (the number of images)")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits : (i + 1) * n // splits]
        p = np.exp(part)
        # p log(p / q) -> 0 where p underflows to 0 (then q may be 0 too).
        with np.errstate(divide="ignore", invalid="ignore"):
            log_marginal = np.log(p.mean(axis=0))
            kl = np.where(p > 0, p * (part - log_marginal), 0.0).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def polynomial_mmd2(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-size sets with k(x, y) = (x.y / d + 1)^3 (Binkowski et al.)."""
    m, d = a.shape
    k_aa, k_bb, k_ab = ((p @ q.T / d + 1.0) ** 3 for p, q in ((a, a), (b, b), (a, b)))
    within = (k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
    return float(within - 2.0 * k_ab.mean())


def kid(
    features_a, features_b, subset_size: int = 1000, num_subsets: int = 100, seed: int = 0
) -> tuple[float, float]:
    """KID: (mean, std) of `polynomial_mmd2` over random subsets (module docstring).

    Subset k draws m indices of a, then m of b, each by
    `rng.choice(n, m, replace=False)` from `np.random.default_rng(seed)`.
    """
    fa, fb = _features64(features_a, "kid"), _features64(features_b, "kid")
    if fa.shape[1] != fb.shape[1]:
        raise DataError(f"kid: feature dimensions differ: {fa.shape[1]} vs {fb.shape[1]}")
    if num_subsets < 1 or subset_size < 2:
        raise ConfigError("kid: need num_subsets >= 1 and subset_size >= 2")
    m = min(subset_size, len(fa), len(fb))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        a = fa[rng.choice(len(fa), m, replace=False)]
        b = fb[rng.choice(len(fb), m, replace=False)]
        values.append(polynomial_mmd2(a, b))
    return float(np.mean(values)), float(np.std(values))


def to_inception_input(images, to_unit=None, quantize: str | None = "round") -> Array:
    """Images (n, h, w, 1 or 3) -> float32 RGB in [0, 1], as the reference pipelines see them.

    Float images are mapped to [0, 1] by `to_unit` (e.g. `Scaling.to_unit`;
    identity when None), clipped, and by default rounded to 8-bit levels, as
    writing them to PNG (`Scaling.to_uint8`) and reading them back with
    pytorch-fid (v / 255) would; `quantize="floor"` truncates as the score
    SDE code does before its Inception (`np.clip(x * 255, 0, 255).astype(uint8)`);
    None keeps the floats. uint8 images are pixels: v / 255. One grey channel
    is repeated to RGB, as PIL's `convert("RGB")` does for pytorch-fid.
    """
    if quantize not in (None, "round", "floor"):
        raise ConfigError(f"quantize must be 'round', 'floor' or None, got {quantize!r}")
    if images.dtype == jnp.uint8:
        x = images.astype(jnp.float32) / 255.0
    else:
        x = jnp.asarray(images, jnp.float32)
        x = jnp.clip(x if to_unit is None else to_unit(x), 0.0, 1.0)
        if quantize is not None:
            x = (jnp.round if quantize == "round" else jnp.floor)(x * 255.0) / 255.0
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    return x


class InceptionFeatures:
    """Pool3 features and logits of images, in fixed-size batches under one jit.

    `images` (n, h, w, 1 or 3) go through `to_inception_input(images,
    to_unit, quantize)` and `InceptionV3(output_bias, dtype)`. The last batch
    is padded with zeros to `batch_size`, so each image shape and dtype is
    compiled once.
    """

    def __init__(
        self,
        variables: dict,
        to_unit: Callable[[Array], Array] | None = None,
        *,
        batch_size: int = 200,
        quantize: str | None = "round",
        output_bias: bool = True,
        dtype=jnp.float32,
        progress: bool = False,
    ):
        if quantize not in (None, "round", "floor"):
            raise ConfigError(f"quantize must be 'round', 'floor' or None, got {quantize!r}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        self.variables, self.batch_size, self.progress = variables, batch_size, progress
        module = InceptionV3(output_bias=output_bias, dtype=dtype)
        self._run = jax.jit(lambda v, x: module.apply(v, to_inception_input(x, to_unit, quantize)))

    @classmethod
    def from_file(cls, path: str, to_unit=None, **kwargs) -> InceptionFeatures:
        """From a converted weights file (`eval.inception_weights`)."""
        return cls(load_inception_params(path), to_unit, **kwargs)

    def __call__(self, images) -> tuple[np.ndarray, np.ndarray]:
        """(pool3 (n, 2048), logits (n, 1008)) as float32 NumPy arrays."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) == 0:
            raise DataError(f"expected images (n >= 1, h, w, 1 or 3), got shape {images.shape}")
        n, bs = len(images), self.batch_size
        pools, logits = [], []
        for start in tqdm(range(0, n, bs), desc="inception", disable=not self.progress):
            batch = images[start : start + bs]
            k = len(batch)
            if k < bs:
                pad = np.zeros((bs - k, *batch.shape[1:]), batch.dtype)
                batch = np.concatenate([batch, pad])
            pool, logit = self._run(self.variables, batch)
            pools.append(np.asarray(pool[:k]))
            logits.append(np.asarray(logit[:k]))
        return np.concatenate(pools), np.concatenate(logits)
