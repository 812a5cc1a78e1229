"""Predictors: moves of x from time t to an earlier grid time s, for `predictor_corrector`.

Each is a frozen dataclass (a static argument of `jax.jit`) called as
`predictor(key, score_fn, process, x, t, s, noise=None) -> x` with scalar
times, and declares `nfe`, its score evaluations per call. One that adds
noise draws it from `key`, or takes the standard-normal draw `noise` (shaped
like x) when given.

Every predictor here is one linear move (`Move`): x_s = c_x x + c_score
score(x, t) + c_noise z, with, where x_0 is clipped, a term c_x0 clip(u x +
v score) added. Its coefficients depend on the grid alone, so
`predictor_corrector` asks each predictor for all of them at once
(`plan(grid)`, from `common.GridValues`, in float64) and its loop does only
the move (`step`); called directly, a predictor computes them for its one
step. A predictor written elsewhere needs only `__call__` (and `nfe`; it may
declare `adds_noise = False`): the sampler then calls it step by step.

Reference codes: the score SDE code's `sampling.py` (`EulerMaruyamaPredictor`,
`ReverseDiffusionPredictor`, `AncestralSamplingPredictor`), the DDPM code's
`diffusion_utils_2.py` (`p_sample`) and the DDIM code's
`functions/denoising.py` (`generalized_steps`). One departure is shared: a
step from t to s uses the exact Gaussian kernel of the process between those
two times (`processes.transition`); on DDPM's and NCSN's own grids these are
the reference's discrete betas and sigmas, on the SDEs' grids they differ
from the score SDE code's `discrete_betas[i] = beta(t_i) / N` by O(1/N^2).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusers_unified.samplers.common import GridValues
from diffusers_unified.typing import Array, PRNGKey


class Move(NamedTuple):
    """Coefficients of x_s = c_x x + c_score score(x, t) + c_noise z [+ c_x0 clip(u x + v score)].

    Scalars for one step, or arrays with one entry per step; a term that a
    predictor lacks is None.
    """

    x: Any = None
    score: Any = None
    noise: Any = None
    x0: Any = None  # weight of the clipped x_0 estimate
    x0_x: Any = None  # u
    x0_score: Any = None  # v


class Ends(NamedTuple):
    """A step's two ends, t (start) and s < t (end): the process's values there, and dt = s - t."""

    alpha_t: Any
    sigma_t: Any
    alpha_s: Any
    sigma_s: Any
    f_t: Any
    g2_t: Any
    dt: Any


def grid_ends(grid: GridValues) -> Ends:
    """`Ends` of every step of a grid (float64 arrays, one entry per step)."""
    return Ends(
        grid.alpha[:-1],
        grid.sigma[:-1],
        grid.alpha[1:],
        grid.sigma[1:],
        grid.f[:-1],
        grid.g2[:-1],
        grid.t[1:] - grid.t[:-1],
    )


def process_ends(process, t, s) -> Ends:
    """`Ends` of one step from t to s, from the process (jax scalars)."""
    f_t, g2_t = process.coefficients(t)
    return Ends(*process.alpha_sigma(t), *process.alpha_sigma(s), f_t, g2_t, s - t)


def _xp(a):
    """NumPy for plans (float64, before the loop), jax.numpy for a single step's scalars."""
    return np if isinstance(a, np.ndarray | float) else jnp


def _kernel(e: Ends):
    """(a, var) of the forward kernel from s to t (`processes.transition`), in e's array type."""
    xp = _xp(e.alpha_t)
    a = e.alpha_t / e.alpha_s
    return a, xp.maximum(e.sigma_t**2 - (a * e.sigma_s) ** 2, 0.0)


def move(c: Move, score_fn, x: Array, t: Array, z: Array | None) -> Array:
    """Applies a `Move` (one step's coefficients) to x at time t, with the draw z."""
    score = score_fn(x, t)
    out = 0.0
    if c.x is not None:
        out = out + c.x * x
    if c.score is not None:
        out = out + c.score * score
    if c.x0 is not None:
        out = out + c.x0 * clip_x0(c.x0_x * x + c.x0_score * score)
    if c.noise is not None:
        out = out + c.noise * z
    return out


def _normal(key: PRNGKey, x: Array, noise: Array | None) -> Array:
    """A step's standard-normal draw: the given `noise`, else one drawn from `key`."""
    return jax.random.normal(key, x.shape) if noise is None else noise


class _LinearPredictor:
    """What the predictors below share: `__call__`, `plan` and `step` from `coefficients(Ends)`."""

    nfe: ClassVar[int] = 1

    @property
    def adds_noise(self) -> bool:
        return True

    def coefficients(self, process, e: Ends) -> Move:
        raise NotImplementedError

    def plan(self, process, grid: GridValues) -> Move:
        """Every step's coefficients on the grid (float64 arrays, one entry per step)."""
        return self.coefficients(process, grid_ends(grid))

    def step(self, c: Move, score_fn, x: Array, t: Array, z: Array | None) -> Array:
        """One step with planned coefficients `c` (and the draw z, if the predictor adds noise)."""
        return move(c, score_fn, x, t, z)

    def __call__(self, key, score_fn, process, x, t, s, noise=None):
        c = self.coefficients(process, process_ends(process, t, s))
        return move(c, score_fn, x, t, _normal(key, x, noise) if self.adds_noise else None)


@dataclasses.dataclass(frozen=True)
class NoPredictor:
    """Leaves x unchanged (annealed Langevin dynamics moves between levels this way)."""

    nfe: ClassVar[int] = 0
    adds_noise: ClassVar[bool] = False

    def plan(self, process, grid: GridValues) -> None:
        return None

    def step(self, c, score_fn, x, t, z):
        return x

    def __call__(self, key, score_fn, process, x, t, s, noise=None):
        return x


@dataclasses.dataclass(frozen=True)
class EulerMaruyama(_LinearPredictor):
    """One Euler-Maruyama step of the reverse SDE from t to s (Song et al. 2021, eq. 6).

    x_s = x + (f x - g^2 score) dt + g sqrt(-dt) z with dt = s - t < 0. The
    score SDE code's `EulerMaruyamaPredictor`, except that the step is
    dt = s - t, the grid's spacing, where the reference takes -1/N on a grid
    spaced (T - eps)/(N - 1) (the same for the VP SDE's defaults, 0.1 % apart
    for the VE SDE's). With `probability_flow`, one Euler step of the
    probability-flow ODE (eq. 13) instead, g^2 / 2 in place of g^2 and no
    noise, as the score SDE code's predictors allow: with a corrector, an ODE
    predictor whose marginals Langevin steps correct.
    """

    probability_flow: bool = False

    @property
    def adds_noise(self) -> bool:
        return not self.probability_flow

    def coefficients(self, process, e: Ends) -> Move:
        xp = _xp(e.dt)
        c = 0.5 if self.probability_flow else 1.0
        noise = None if self.probability_flow else xp.sqrt(e.g2_t * -e.dt)
        return Move(x=1.0 + e.f_t * e.dt, score=-c * e.g2_t * e.dt, noise=noise)


@dataclasses.dataclass(frozen=True)
class ReverseDiffusion(_LinearPredictor):
    """The reverse-diffusion predictor (Song et al. 2021, eq. 46; `ReverseDiffusionPredictor`).

    With the forward step x_t = x_s + f + G z (f = (a - 1) x, G^2 = var, see
    `processes.transition`), it steps x_s = x_t - f + G^2 score + G z. The
    reference takes (f, G) from `sde.discretize` at t's level; here they are
    the exact kernel from s to t (the same on a discrete process's grid).
    """

    def coefficients(self, process, e: Ends) -> Move:
        a, var = _kernel(e)
        return Move(x=2.0 - a, score=var, noise=_xp(var).sqrt(var))


VARIANCES = ("small", "large")


def clip_x0(x0: Array) -> Array:
    """DDPM's `clip_denoised` and diffusers' `clip_sample`: x_0 estimates clipped to [-1, 1]."""
    return jnp.clip(x0, -1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Ancestral(_LinearPredictor):
    """Ancestral sampling from p(x_s | x_t) (Ho et al. 2020, Alg. 2, in score form).

    Mean (x_t + var score) / a, which is DDPM's 1/sqrt(alpha_t) (x_t - beta_t /
    sqrt(1 - alphabar_t) eps) (the DDPM code's `p_sample`), and on VE
    processes the score SDE code's SMLD step x + (sigma_t^2 - sigma_s^2)
    score. Variance `"small"` is the posterior variance var sigma_s^2 /
    sigma_t^2 (DDPM's beta-tilde, `fixedsmall`), `"large"` is var (DDPM's
    beta_t, `fixedlarge`). `None`, the default, is the reference's choice for
    the process, `process.ancestral_variance`: "large" on DDPM (the DDPM
    code's CIFAR-10 runs use `fixedlarge`) and on the VP SDE (the score SDE
    code's `AncestralSamplingPredictor` adds sqrt(beta) noise), "small" on
    the VE SDE and NCSN (its VE update adds the posterior variance). Ho et
    al. report the two alike in sample quality.

    `clip_x0` clips the predicted x_0 = (x_t + sigma_t^2 score) / alpha_t to
    [-1, 1] and takes the mean of q(x_s | x_t, x_0) at it, (alpha_s var x_0 +
    a sigma_s^2 x_t) / sigma_t^2, as the DDPM code's `p_sample(clip_denoised=
    True)` (its default) and diffusers' `clip_sample` do; off by default
    here, since data need not lie in [-1, 1].
    """

    variance: str | None = None
    clip_x0: bool = False

    def __post_init__(self):
        if self.variance is not None and self.variance not in VARIANCES:
            raise ValueError(
                f"unknown ancestral variance {self.variance!r}; valid: {', '.join(VARIANCES)}, "
                "or None for the reference's choice for the process"
            )

    def coefficients(self, process, e: Ends) -> Move:
        variance = process.ancestral_variance if self.variance is None else self.variance
        xp = _xp(e.alpha_t)
        a, var = _kernel(e)
        std = xp.sqrt(var * e.sigma_s**2 / e.sigma_t**2 if variance == "small" else var)
        if not self.clip_x0:
            return Move(x=1.0 / a, score=var / a, noise=std)
        return Move(
            x=a * e.sigma_s**2 / e.sigma_t**2,
            noise=std,
            x0=e.alpha_s * var / e.sigma_t**2,
            x0_x=1.0 / e.alpha_t,
            x0_score=e.sigma_t**2 / e.alpha_t,
        )


@dataclasses.dataclass(frozen=True)
class DDIM(_LinearPredictor):
    """One DDIM step (Song, Meng and Ermon 2021, eq. 12) from t to s.

    x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z with
    c = eta sqrt(sigma_s^2 / sigma_t^2 (sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2)):
    eta = 0 is deterministic, eta = 1 is ancestral sampling with the small
    variance. This is the DDIM code's `generalized_steps` update. `clip_x0`
    clips x0_hat to [-1, 1] and keeps the network's eps_hat, as diffusers'
    `DDIMScheduler(clip_sample=True)` does by default; the DDIM code does not
    clip.
    """

    eta: float = 0.0
    clip_x0: bool = False

    def __post_init__(self):
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"DDIM eta must be in [0, 1], got eta={self.eta}")

    @property
    def adds_noise(self) -> bool:
        return self.eta > 0.0

    def coefficients(self, process, e: Ends) -> Move:
        xp = _xp(e.alpha_t)
        _, var = _kernel(e)
        c = self.eta * xp.sqrt(var * e.sigma_s**2 / e.sigma_t**2)
        # x0_hat = (x + sigma_t^2 score) / alpha_t and eps_hat = -sigma_t score
        eps_weight = xp.sqrt(xp.maximum(e.sigma_s**2 - c**2, 0.0))
        noise = c if self.adds_noise else None
        if self.clip_x0:
            return Move(
                score=-eps_weight * e.sigma_t,
                noise=noise,
                x0=e.alpha_s,
                x0_x=1.0 / e.alpha_t,
                x0_score=e.sigma_t**2 / e.alpha_t,
            )
        ratio = e.alpha_s / e.alpha_t
        return Move(x=ratio, score=ratio * e.sigma_t**2 - eps_weight * e.sigma_t, noise=noise)
