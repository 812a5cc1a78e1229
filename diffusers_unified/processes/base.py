"""What every noising process shares.

Every process of this package is a linear SDE `dx = f(t) x dt + g(t) dw`
whose marginals are Gaussian,

    x_t = alpha(t) x_0 + sigma(t) eps,    eps ~ N(0, I),

so a process is fully described by `alpha_sigma(t)` and `coefficients(t) ->
(f(t), g(t)^2)`, and the two are tied by

    d log alpha / dt = f,    d sigma^2 / dt = 2 f sigma^2 + g^2.

Everything else (the score SDE reference code's `sde`, `marginal_prob`,
`prior_sampling`, `prior_logp`, `discretize`) follows here, once, from those
two methods. Processes are frozen dataclasses registered as static pytrees:
they can be passed to `jax.jit` functions and hashed as part of the cache key.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from diffusers_unified.typing import Array, PRNGKey, ScoreFn

# By default networks are conditioned on NOISE_COND_SCALE * t: DDPM's step
# index when N = 1000, and the score SDE code's convention for VP networks.
# Using it for every process keeps networks interchangeable between
# formulations; for VE processes it is an affine function of log sigma, the
# quantity NCSN++ embeds. `Process.conditioning` selects the others.
NOISE_COND_SCALE = 999.0

# What `Process.noise_cond(t)` returns, by `conditioning`:
CONDITIONING_MEANINGS = {
    "time": "999 t / T (the default)",
    "sigma": "sigma(t), what the score SDE code's VE networks take (NCSN++ embeds its log)",
    "index": "(N - 1) t / T, the level index that DDPM's and diffusers' networks take "
    "(discrete processes only; equal to 'time' when N = 1000)",
}


def process_dataclass(cls):
    """Makes `cls` a frozen, hashable dataclass that JAX treats as a static pytree."""
    return jax.tree_util.register_static(dataclasses.dataclass(frozen=True)(cls))


def batch_broadcast(a: Array, x: Array) -> Array:
    """Reshapes a per-example array of shape `(batch,)` (or a scalar) to broadcast against x."""
    a = jnp.asarray(a)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def transition(alpha_s: Array, sigma_s: Array, alpha_t: Array, sigma_t: Array):
    """The Gaussian kernel from time s to a later time t: `x_t = a x_s + sqrt(var) z`.

    With a = alpha_t / alpha_s and var = sigma_t^2 - a^2 sigma_s^2. For DDPM
    levels i - 1 -> i this is (sqrt(1 - beta_i), beta_i); for NCSN levels it is
    (1, sigma_i^2 - sigma_{i-1}^2). Pass (alpha_s, sigma_s) = (1, 0) for clean
    data.
    """
    a = alpha_t / alpha_s
    return a, jnp.maximum(sigma_t**2 - (a * sigma_s) ** 2, 0.0)


class Process:
    """Base class of the Gaussian-marginal noising processes.

    Subclasses set `N` (the default number of discretization levels), `t_min`
    (where samplers stop) and `prior_std`, and implement `alpha_sigma` and
    `coefficients`. Each also has a static field `conditioning` (see
    `noise_cond`) and a class attribute `ancestral_variance`: the reverse
    variance, "small" or "large", of the reference code's ancestral sampler
    for that process (see `samplers.Ancestral`).
    """

    T: float = 1.0
    N: int
    t_min: float
    conditioning: str  # a dataclass field of every subclass, "time" by default
    ancestral_variance: ClassVar[str] = "small"
    # The `conditioning` values this kind of process accepts.
    CONDITIONINGS: ClassVar[tuple[str, ...]] = ("time", "sigma")

    # -- what a subclass defines -------------------------------------------
    def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
        """(alpha(t), sigma(t)), each shaped like t."""
        raise NotImplementedError

    def coefficients(self, t: Array) -> tuple[Array, Array]:
        """(f(t), g(t)^2) of the SDE dx = f(t) x dt + g(t) dw, each shaped like t."""
        raise NotImplementedError

    @property
    def prior_std(self) -> float:
        raise NotImplementedError

    # -- the score SDE reference interface ---------------------------------
    def sde(self, x: Array, t: Array) -> tuple[Array, Array]:
        """Drift f(t) x (shaped like x) and diffusion g(t) (shaped like t)."""
        f, g2 = self.coefficients(t)
        return batch_broadcast(f, x) * x, jnp.sqrt(g2)

    def marginal_prob(self, x0: Array, t: Array) -> tuple[Array, Array]:
        """Mean alpha(t) x0 (shaped like x0) and std sigma(t) (shaped like t) of p(x_t | x_0)."""
        alpha, sigma = self.alpha_sigma(t)
        return batch_broadcast(alpha, x0) * x0, sigma

    def prior_sampling(self, key: PRNGKey, shape) -> Array:
        return self.prior_std * jax.random.normal(key, shape)

    def prior_logp(self, z: Array) -> Array:
        """Log density of the prior N(0, prior_std^2 I), one value per example."""
        dim = math.prod(z.shape[1:])
        sq = jnp.sum(jnp.reshape(z, (z.shape[0], -1)) ** 2, axis=-1)
        return -0.5 * dim * math.log(2 * math.pi * self.prior_std**2) - sq / (2 * self.prior_std**2)

    def discretize(self, x: Array, t: Array, dt: float | None = None) -> tuple[Array, Array]:
        """One forward step ending at t, as `x_t = x_s + f + G z` with s = t - dt.

        Returns (f, G) with G shaped like t. The step is the exact Gaussian
        kernel of the process (which for DDPM and NCSN levels is their Markov
        chain, as in the score SDE reference code); a step that would start
        before time 0 starts from clean data.
        """
        a, var = self.step_transition(t, dt)
        return (batch_broadcast(a, x) - 1.0) * x, jnp.sqrt(var)

    def step_transition(self, t: Array, dt: float | None = None) -> tuple[Array, Array]:
        """`transition` over the step that `discretize` takes to reach t: (a, var)."""
        return transition(*self._previous_alpha_sigma(t, dt), *self.alpha_sigma(t))

    def noise_cond(self, t: Array) -> Array:
        """What a network is conditioned on at time t, by `self.conditioning`.

        "time": 999 t / T (NOISE_COND_SCALE; the default); "sigma": sigma(t);
        "index": (N - 1) t / T, the fractional level index (discrete processes).
        """
        t = jnp.asarray(t)
        if self.conditioning == "sigma":
            return self.alpha_sigma(t)[1]
        if self.conditioning == "index":
            return (self.N - 1) * t / self.T
        return NOISE_COND_SCALE * t / self.T

    def _check_conditioning(self) -> None:
        if self.conditioning not in self.CONDITIONINGS:
            valid = "; ".join(f"{k!r}: {CONDITIONING_MEANINGS[k]}" for k in self.CONDITIONINGS)
            raise ValueError(
                f"unknown conditioning {self.conditioning!r} for {type(self).__name__}; "
                f"valid: {valid}"
            )

    def sampling_grid(self, num_steps: int | None = None) -> np.ndarray:
        """`num_steps` times, descending from T to t_min, where samplers evaluate the score."""
        num_steps = self.N if num_steps is None else num_steps
        _check_num_steps(num_steps)
        return np.linspace(self.T, self.t_min, num_steps)

    # -- helpers -----------------------------------------------------------
    def _previous_alpha_sigma(self, t: Array, dt: float | None) -> tuple[Array, Array]:
        s = jnp.asarray(t) - (self.T / self.N if dt is None else dt)
        alpha, sigma = self.alpha_sigma(jnp.maximum(s, 0.0))
        clean = s < 0.0
        return jnp.where(clean, 1.0, alpha), jnp.where(clean, 0.0, sigma)


class DiscreteProcess(Process):
    """A process defined by N noise levels; level i sits at time t_i = i / (N - 1).

    Subclasses implement `levels()`, the (alpha_i, sigma_i) of each level in
    float64 NumPy. Level -1 is clean data (alpha 1, sigma 0), so that the
    forward Markov chain starts from the data and the last reverse step ends on
    it. Between levels `alpha_sigma` interpolates (each subclass says how),
    which gives the process a continuous-time extension: a network trained on
    the levels can be sampled with the continuous samplers, as in the score SDE
    paper.
    """

    t_min: float = 0.0
    CONDITIONINGS = ("time", "sigma", "index")

    def levels(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    @property
    def times(self) -> np.ndarray:
        """t_i = i / (N - 1) for the levels i = 0 .. N - 1 (least noisy first)."""
        return np.linspace(0.0, self.T, self.N)

    def index(self, t: Array) -> Array:
        """The level nearest to time t (an int32 array shaped like t)."""
        i = jnp.round(jnp.asarray(t) / self.T * (self.N - 1))
        return jnp.clip(i, 0, self.N - 1).astype(jnp.int32)

    def time(self, index: Array) -> Array:
        """The time of level `index` (inverse of `index`)."""
        return jnp.asarray(index, jnp.float32) / (self.N - 1) * self.T

    def sampling_grid(self, num_steps: int | None = None) -> np.ndarray:
        """`num_steps` of the N levels, evenly spaced and including the first and last."""
        num_steps = self.N if num_steps is None else num_steps
        _check_num_steps(num_steps)
        if num_steps > self.N:
            raise ValueError(
                f"{type(self).__name__} has N={self.N} noise levels; a sampler on its grid can "
                f"take at most {self.N} steps, got num_steps={num_steps}"
            )
        idx = np.round(np.linspace(self.N - 1, 0, num_steps)).astype(np.int64)
        return self.times[idx]

    def _previous_alpha_sigma(self, t: Array, dt: float | None) -> tuple[Array, Array]:
        if dt is not None:
            return super()._previous_alpha_sigma(t, dt)
        alphas, sigmas = self.levels()
        alphas = jnp.asarray(np.concatenate([[1.0], alphas]), jnp.float32)
        sigmas = jnp.asarray(np.concatenate([[0.0], sigmas]), jnp.float32)
        i = self.index(t)  # level i - 1 is entry i of the padded tables
        return alphas[i], sigmas[i]


def reverse_sde(
    process: Process, score_fn: ScoreFn, probability_flow: bool = False
) -> Callable[[Array, Array], tuple[Array, Array]]:
    """The reverse-time SDE, or the probability-flow ODE, of a process (Song et al. 2021).

    Returns `(x, t) -> (drift, diffusion)` of

        dx = [f(x, t) - c g(t)^2 score(x, t)] dt + (1 - c) g(t) dw_bar,

    run backwards in time, with c = 1 for the reverse SDE (eq. 6) and c = 1/2
    with no noise for the probability-flow ODE (eq. 13).
    """

    def drift_diffusion(x: Array, t: Array) -> tuple[Array, Array]:
        drift, diffusion = process.sde(x, t)
        c = 0.5 if probability_flow else 1.0
        drift = drift - c * batch_broadcast(diffusion**2, x) * score_fn(x, t)
        return drift, (jnp.zeros_like(diffusion) if probability_flow else diffusion)

    return drift_diffusion


def _check_num_steps(num_steps: int) -> None:
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
