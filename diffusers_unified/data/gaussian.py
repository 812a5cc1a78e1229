"""Gaussian mixtures with exact perturbed scores, densities and samples: the test oracle.

If x_0 ~ sum_k w_k N(mu_k, S_k) then x_t = alpha x_0 + sigma eps is again a
mixture, sum_k w_k N(alpha mu_k, alpha^2 S_k + sigma^2 I), for any (alpha,
sigma). Each S_k is diagonalised once (S_k = U_k diag(lam_k) U_k^T), so the
perturbed covariance has eigenvalues alpha^2 lam_k + sigma^2 in the same
basis, and its score, log density and inverse cost O(d^2) per component.

Use `mixture.score_fn(process)` as an exact score function for any sampler,
`mixture.sample` for exact samples, and `mixture.log_prob` for exact densities.
Read as a labelled data set (class k = component k), `mixture.score_fn(process,
y=labels)` is the exact class-conditional score: each example's component's,
and `mixture.logits_fn(process)` the exact noise-conditional classifier
log p_t(k | x_t) (the components' responsibilities), whose gradient turns the
marginal score into the conditional one (classifier guidance).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from diffusers_unified.typing import Array, PRNGKey


class GaussianMixture(struct.PyTreeNode):
    """A mixture of K Gaussians in d dimensions. Build it with `GaussianMixture.create`."""

    weights: Array  # (K,)
    means: Array  # (K, d)
    eigvals: Array  # (K, d), eigenvalues of each covariance
    eigvecs: Array  # (K, d, d), columns are eigenvectors

    @classmethod
    def create(cls, weights, means, covs=None, stds=None) -> GaussianMixture:
        """weights (K,), means (K, d), and either covs (K, d, d) or isotropic stds (K,)."""
        means = np.asarray(means, np.float64)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, d), got {means.shape}")
        k, d = means.shape
        weights = np.asarray(weights, np.float64)
        if weights.shape != (k,) or np.any(weights <= 0):
            raise ValueError(f"weights must be {k} positive numbers, got {weights}")
        if (covs is None) == (stds is None):
            raise ValueError("give exactly one of covs (K, d, d) and stds (K,)")
        if covs is None:
            covs = np.asarray(stds, np.float64)[:, None, None] ** 2 * np.eye(d)
        covs = np.asarray(covs, np.float64)
        if covs.shape != (k, d, d):
            raise ValueError(f"covs must have shape {(k, d, d)}, got {covs.shape}")
        eigvals, eigvecs = np.linalg.eigh(covs)
        if np.any(eigvals <= 0):
            raise ValueError("every covariance must be positive definite")
        # The default float type: float32, or float64 under jax.enable_x64.
        arr = lambda a: jnp.asarray(a, jnp.result_type(float))
        return cls(arr(weights / weights.sum()), arr(means), arr(eigvals), arr(eigvecs))

    @classmethod
    def gaussian(cls, mean, cov) -> GaussianMixture:
        """A single Gaussian N(mean, cov)."""
        mean = np.asarray(mean, np.float64)
        return cls.create([1.0], mean[None], covs=np.asarray(cov, np.float64)[None])

    # -- shape and moments ---------------------------------------------------
    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def covs(self) -> Array:
        return jnp.einsum("kij,kj,klj->kil", self.eigvecs, self.eigvals, self.eigvecs)

    def mean(self) -> Array:
        return self.weights @ self.means

    def covariance(self) -> Array:
        """Covariance of the whole mixture (law of total covariance)."""
        centred = self.means - self.mean()
        between = jnp.einsum("k,ki,kj->ij", self.weights, centred, centred)
        return jnp.einsum("k,kij->ij", self.weights, self.covs) + between

    # -- sampling -------------------------------------------------------------
    def sample(self, key: PRNGKey, n: int, alpha=1.0, sigma=0.0) -> tuple[Array, Array]:
        """n exact samples of x_t = alpha x_0 + sigma eps, with their component labels."""
        key_k, key_x, key_e = jax.random.split(key, 3)
        labels = jax.random.categorical(key_k, jnp.log(self.weights), shape=(n,))
        z = jax.random.normal(key_x, (n, self.dim))
        x0 = self.means[labels] + jnp.einsum(
            "nij,nj->ni", self.eigvecs[labels], jnp.sqrt(self.eigvals[labels]) * z
        )
        return alpha * x0 + sigma * jax.random.normal(key_e, x0.shape), labels

    # -- densities and scores of the perturbed mixture --------------------------
    def _stacked_eigvecs(self) -> Array:
        """All eigenbases side by side, (d, K d): column k d + j is U_k[:, j]."""
        k, d = self.means.shape
        return jnp.transpose(self.eigvecs, (1, 0, 2)).reshape(d, k * d)

    def _components(self, x: Array, alpha, sigma):
        """log w_k N_k(x) (K, n), and the whitened residuals y / var (K, d, n).

        y_k = U_k^T (x - alpha mu_k) for all k comes from one (K d, d) x (d, n)
        matrix product. The batch is the last axis, so the elementwise work
        runs along it: 1.6x faster on CPU than with the small K and d axes
        last, and far faster than per-component einsums.
        """
        k, d = self.means.shape
        alpha = jnp.reshape(jnp.asarray(alpha), (1, 1, -1))
        sigma = jnp.reshape(jnp.asarray(sigma), (1, 1, -1))
        var = alpha**2 * self.eigvals[..., None] + sigma**2  # (K, d, n or 1)
        projected_means = jnp.einsum("kij,ki->kj", self.eigvecs, self.means)[..., None]
        y = (self._stacked_eigvecs().T @ x.T).reshape(k, d, -1) - alpha * projected_means
        log_n = -0.5 * (
            jnp.sum(y * y / var, axis=1) + jnp.sum(jnp.log(var), axis=1) + d * math.log(2 * math.pi)
        )
        return log_n + jnp.log(self.weights)[:, None], y / var

    def log_prob(self, x: Array, alpha=1.0, sigma=0.0) -> Array:
        """log p_t(x) for each row of x (n, d); alpha, sigma scalars or shaped (n,)."""
        log_joint, _ = self._components(x, alpha, sigma)
        return jax.nn.logsumexp(log_joint, axis=0)

    def score(self, x: Array, alpha=1.0, sigma=0.0) -> Array:
        """grad_x log p_t(x) for each row of x (n, d)."""
        log_joint, whitened = self._components(x, alpha, sigma)
        resp = jax.nn.softmax(log_joint, axis=0)
        # -sum_k resp_k U_k (y_k / var_k), again as one matrix product.
        k, d = self.means.shape
        weighted = (resp[:, None] * whitened).reshape(k * d, -1)
        return -(self._stacked_eigvecs() @ weighted).T

    def component_score(self, x: Array, labels: Array, alpha=1.0, sigma=0.0) -> Array:
        """grad_x log N(x; alpha mu_k, alpha^2 S_k + sigma^2 I) with k = labels (n,) per row."""
        _, whitened = self._components(x, alpha, sigma)
        mine = jnp.take_along_axis(whitened, labels[None, None, :], axis=0)[0]  # (d, n)
        return -jnp.einsum("nij,jn->ni", self.eigvecs[labels], mine)

    def responsibilities(self, x: Array, alpha=1.0, sigma=0.0) -> Array:
        """p(component k | x_t = x), shaped (n, K)."""
        log_joint, _ = self._components(x, alpha, sigma)
        return jax.nn.softmax(log_joint, axis=0).T

    def log_posterior(self, x: Array, alpha=1.0, sigma=0.0) -> Array:
        """log p(component k | x_t = x), shaped (n, K): the exact class posterior at time t."""
        log_joint, _ = self._components(x, alpha, sigma)
        return jax.nn.log_softmax(log_joint, axis=0).T

    def classify(self, x: Array) -> Array:
        """The most probable component of each clean sample (n,)."""
        return jnp.argmax(self.responsibilities(x), axis=-1)

    def score_fn(self, process, y: Array | None = None) -> ExactScore:
        """The exact score of this mixture under `process`, as a sampler's score function.

        With labels `y` (batch,), the class-conditional score of component y[i]
        for example i.
        """
        return ExactScore(self, None if y is None else jnp.asarray(y, jnp.int32), process)

    def logits_fn(self, process) -> ExactLogits:
        """The exact class posterior log p_t(k | x) under `process`, as a classifier's logits."""
        return ExactLogits(self, process)


class ExactScore(struct.PyTreeNode):
    """score_fn(x, t) of a Gaussian mixture perturbed by a process; any x shape (batch, ...).

    With labels `y`, the score of each example's own component (class k =
    component k), i.e. grad log p_t(x | y).
    """

    mixture: GaussianMixture
    y: Array | None = None
    process: object = struct.field(pytree_node=False, default=None)

    def __call__(self, x: Array, t: Array) -> Array:
        alpha, sigma = self.process.alpha_sigma(t)
        flat = x.reshape(x.shape[0], -1)
        if self.y is None:
            return self.mixture.score(flat, alpha, sigma).reshape(x.shape)
        return self.mixture.component_score(flat, self.y, alpha, sigma).reshape(x.shape)


class ExactLogits(struct.PyTreeNode):
    """logits_fn(x, t) = log p_t(k | x) (batch, K) of a Gaussian mixture perturbed by a process."""

    mixture: GaussianMixture
    process: object = struct.field(pytree_node=False, default=None)

    def __call__(self, x: Array, t: Array) -> Array:
        alpha, sigma = self.process.alpha_sigma(t)
        return self.mixture.log_posterior(x.reshape(x.shape[0], -1), alpha, sigma)


def example_mixture(dim: int = 2, seed: int = 0) -> GaussianMixture:
    """The package's reference mixture, used by its tests, demo and benchmarks.

    In 2-D: four anisotropic components with weights 0.1 ... 0.4 whose means
    lie on a circle of radius 1.5 (standard deviations 0.25 ... 0.45, so the
    components barely overlap and the data have about unit scale, as
    standardised data would). In d > 2: eight components with random means
    at distance 1.5 from the origin and random covariances with standard
    deviations in [0.25, 0.45], drawn from `seed`.
    """
    if dim == 2:
        angles = np.deg2rad([20.0, 110.0, 200.0, 290.0])
        stds = np.array([[0.25, 0.4], [0.3, 0.45], [0.35, 0.35], [0.25, 0.3]])
        weights = [0.1, 0.2, 0.3, 0.4]
    else:
        rng = np.random.default_rng(seed)
        k = 8
        angles = None
        stds = rng.uniform(0.25, 0.45, size=(k, dim))
        weights = rng.uniform(0.5, 1.5, size=k)
    if angles is not None:
        means = 1.5 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        rot = np.stack(
            [[np.cos(angles), -np.sin(angles)], [np.sin(angles), np.cos(angles)]]
        ).transpose(2, 0, 1)
    else:
        means = rng.normal(size=(k, dim))
        means = 1.5 * means / np.linalg.norm(means, axis=1, keepdims=True)
        rot = np.linalg.qr(rng.normal(size=(k, dim, dim)))[0]
    covs = np.einsum("kij,kj,klj->kil", rot, stds**2, rot)
    return GaussianMixture.create(weights, means, covs=covs)
