"""Controllable generation by projection: inpainting and colorization (Song et al. 2021, app. I).

To sample the unknown part of x_0 given a known part y, the score SDE paper
runs any sampler of the unconditional model and, after every update that
leaves x at time t, replaces the known part of x by a fresh draw of the
forward process given the known data,

    x_known(t) = alpha(t) y + sigma(t) z,    z ~ N(0, I),

which stands in for a sample of p_t(x_known(t) | y) (appendix I.2: the score
of p_t(x_unknown(t) | y) is approximated by the joint score at
[x_unknown(t); x_known(t)] with x_known(t) such a draw). The approximation is
exact as sigma(t) -> 0 and biased at large noise, where the joint score
shrinks the unknown part towards its unconditional mean; for a Gaussian the
measured effect is in `tests/test_conditioning.py`. Colorization is the same
projection in the coordinates of an orthogonal "decoupling" transform whose
first channel is the gray level (app. I.3). The paper's third kind of
control, class-conditional sampling with a noise-conditional classifier
(sec. 5, app. I.1), changes the score rather than the samples: see
`parametrization.classifier_guided_score_fn`.

The convention every sampler follows (new samplers must follow it too), for
a projection `project` passed as the sampler option `project=`:

1. `x = project(key, x, T)` on the prior draw, at the first grid time;
2. `x = project(key, x, s)` after every update that leaves x at time s: each
   predictor step, each Langevin step of a corrector (at the corrector's t),
   each fixed ODE step, with a fresh key each time;
3. `x = project.clean(x)` on the clean output after the final denoising
   step, which puts back the known data exactly (without denoising the
   output stays at t_min, where step 2 already projected it).

Times are the scalars the sampler evaluates the score at. A projection is a
pytree (its known data and mask are traced arrays, so a new image of the
same shape reuses the compiled sampler; its process and structure are
static).
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from diffusers_unified.processes import Process, batch_broadcast
from diffusers_unified.typing import Array, PRNGKey


class Projection(Protocol):
    """`project(key, x, t) -> x` at noise time t; `project.clean(x) -> x` for clean samples."""

    def __call__(self, key: PRNGKey, x: Array, t: Array) -> Array: ...

    def clean(self, x: Array) -> Array: ...


class Inpainting(struct.PyTreeNode):
    """Holds the coordinates where `mask` is true at the forward process's draw given `known`.

    `known` (x_0 values) and `mask` broadcast against the sampler's x, shaped
    (batch, ...) or (...) for one image shared by the batch; entries of
    `known` outside the mask are ignored. With `transform`, an orthogonal
    (C, C) matrix acting on the last (channel) axis, `known` and `mask` live
    in the coordinates u = x @ transform, where the projection happens; since
    the transform is orthogonal the noise z is isotropic in both. Build with
    `inpainting` or `colorization`.
    """

    known: Array
    mask: Array
    transform: Array | None = None
    process: Process = struct.field(pytree_node=False, default=None)

    def _split(self, x: Array):
        return x if self.transform is None else x @ self.transform

    def _merge(self, u: Array):
        return u if self.transform is None else u @ self.transform.T

    def __call__(self, key: PRNGKey, x: Array, t: Array) -> Array:
        alpha, sigma = self.process.alpha_sigma(t)
        u = self._split(x)
        z = jax.random.normal(key, u.shape, u.dtype)
        known_t = batch_broadcast(alpha, u) * self.known + batch_broadcast(sigma, u) * z
        return self._merge(jnp.where(self.mask, known_t, u))

    def clean(self, x: Array) -> Array:
        return self._merge(jnp.where(self.mask, self.known, self._split(x)))


def inpainting(process: Process, known, mask) -> Inpainting:
    """Imputation of the coordinates where `mask` is false, given `known` where it is true."""
    known = jnp.asarray(known, jnp.result_type(float))
    mask = jnp.asarray(mask, bool)
    jnp.broadcast_shapes(known.shape, mask.shape)  # fails early on incompatible shapes
    return Inpainting(known=known, mask=mask, process=process)


def decoupling_matrix(num_channels: int = 3) -> np.ndarray:
    """An orthogonal (C, C) matrix whose first column is (1, ..., 1) / sqrt(C).

    x @ M has the gray level (the mean of the channels) times sqrt(C) in its
    first channel and the colour in the others. Columns j >= 1 are
    (0, ..., 0, -(C - j), 1, ..., 1) / sqrt((C - j)(C - j + 1)); for C = 3
    this is the score SDE paper's matrix (app. I.3) up to the sign of its
    last column, which does not change the sampler (only the span of the
    first column matters, the noise being isotropic).
    """
    c = num_channels
    m = np.zeros((c, c))
    m[:, 0] = 1.0 / np.sqrt(c)
    for j in range(1, c):
        m[j - 1, j] = -(c - j)
        m[j:, j] = 1.0
        m[:, j] /= np.sqrt((c - j) * (c - j + 1))
    return m


def colorization(process: Process, gray, num_channels: int = 3) -> Inpainting:
    """Colorization of a gray image `gray`, shaped like x without its channel axis.

    The known subspace is "the mean of the channels equals gray": the first
    channel of x @ decoupling_matrix, which must equal sqrt(C) gray.
    """
    dtype = jnp.result_type(float)
    gray = jnp.asarray(gray, dtype)
    known = (
        jnp.zeros((*gray.shape, num_channels), dtype).at[..., 0].set(np.sqrt(num_channels) * gray)
    )
    mask = jnp.arange(num_channels) == 0
    return Inpainting(
        known=known,
        mask=mask,
        transform=jnp.asarray(decoupling_matrix(num_channels), dtype),
        process=process,
    )
