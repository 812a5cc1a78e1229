"""Processes: closed-form marginals against simulation, and the identities that tie them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusers_unified.processes import DDPM, NCSN, VESDE, VPSDE, SubVPSDE, transition

M, S0 = 0.7, 0.5  # Gaussian data N(M, S0^2)
N_PATHS = 100_000
CONTINUOUS = [VPSDE(), SubVPSDE(), VESDE()]
ALL = [*CONTINUOUS, DDPM(), DDPM(schedule="cosine"), NCSN(), NCSN(sigma_max=50.0, N=232)]
ids = lambda p: f"{type(p).__name__}" + (f"-{p.schedule}" if hasattr(p, "schedule") else "")


def assert_gaussian_moments(x, mean, std, extra_rel=0.0):
    """Sample mean and std of x within 4 standard errors (plus extra_rel of std for bias)."""
    n = x.size
    tol_mean = 4 * std / np.sqrt(n) + extra_rel * std
    tol_std = 4 * std / np.sqrt(2 * n) + extra_rel * std
    assert abs(float(x.mean()) - mean) < tol_mean, (float(x.mean()), mean, tol_mean)
    assert abs(float(x.std()) - std) < tol_std, (float(x.std()), std, tol_std)


@pytest.mark.parametrize("process", CONTINUOUS, ids=ids)
def test_marginal_prob_matches_euler_maruyama_simulation(process):
    # Euler-Maruyama with 4000 steps has weak error O(dt) on these linear SDEs:
    # about 1e-3 relative here, well inside the 4-standard-error band below
    # (about 9e-3 relative to the std for 1e5 paths) plus a 0.2% allowance.
    n_steps, t_end = 4000, 1.0
    key_0, key_z, key_w = jax.random.split(jax.random.PRNGKey(0), 3)
    x0 = M + S0 * jax.random.normal(key_0, (N_PATHS,))
    mean0, std0 = process.marginal_prob(x0, jnp.zeros(N_PATHS))
    x = mean0 + std0 * jax.random.normal(key_z, (N_PATHS,))  # the marginal at t = 0
    ts = np.linspace(0.0, t_end, n_steps + 1)
    checkpoints = {1000: 0.25, 2000: 0.5, 4000: 1.0}

    def step(x, inp):
        t, dt, k = inp
        drift, diffusion = process.sde(x, jnp.full(x.shape, t))
        return x + drift * dt + diffusion * jnp.sqrt(dt) * jax.random.normal(k, x.shape), None

    keys = jax.random.split(key_w, n_steps)
    states, start = {}, 0
    for i in checkpoints:  # one scan per stretch: the whole path would be 3.2 GB
        x, _ = jax.lax.scan(step, x, (ts[start:i], np.diff(ts)[start:i], keys[start:i]))
        states[i], start = x, i
    for i, t in checkpoints.items():
        alpha, sigma = (float(a) for a in process.alpha_sigma(jnp.float32(t)))
        std = np.sqrt(alpha**2 * S0**2 + sigma**2)
        assert_gaussian_moments(states[i], alpha * M, std, extra_rel=2e-3)


@pytest.mark.parametrize("process", [DDPM(), DDPM(schedule="cosine")], ids=ids)
def test_ddpm_marginals_match_its_markov_chain(process):
    betas = process.betas()
    x = M + S0 * jax.random.normal(jax.random.PRNGKey(0), (N_PATHS,))
    keys = jax.random.split(jax.random.PRNGKey(1), process.N)
    for i in range(process.N):
        z = jax.random.normal(keys[i], x.shape)
        x = np.sqrt(1 - betas[i]) * x + np.sqrt(betas[i]) * z
        if i in (0, 99, 499, process.N - 1):
            alpha, sigma = (float(a) for a in process.alpha_sigma(process.time(i)))
            assert_gaussian_moments(x, alpha * M, np.sqrt(alpha**2 * S0**2 + sigma**2))


def test_ncsn_marginals_match_its_markov_chain():
    process = NCSN()
    sigmas = np.concatenate([[0.0], process.sigmas])
    x = M + S0 * jax.random.normal(jax.random.PRNGKey(0), (N_PATHS,))
    for i in range(process.N):
        z = jax.random.normal(jax.random.PRNGKey(i + 1), x.shape)
        x = x + np.sqrt(sigmas[i + 1] ** 2 - sigmas[i] ** 2) * z
        _, sigma = process.marginal_prob(jnp.zeros(1), process.time(i))
        assert_gaussian_moments(x, M, float(np.sqrt(S0**2 + sigma[()] ** 2)))


@pytest.mark.parametrize("process", ALL, ids=ids)
def test_coefficients_are_the_derivatives_of_the_marginals(process):
    """d log alpha/dt = f and d sigma^2/dt = 2 f sigma^2 + g^2, checked with autodiff."""
    # Between levels for the discrete processes (their beta(t) jumps at levels).
    ts = jnp.asarray(np.linspace(0.05, 0.95, 37) + 0.3 / max(process.N, 1000))
    log_alpha = lambda t: jnp.log(process.alpha_sigma(t)[0])
    var = lambda t: process.alpha_sigma(t)[1] ** 2
    f, g2 = process.coefficients(ts)
    _, sigma = process.alpha_sigma(ts)
    np.testing.assert_allclose(jax.vmap(jax.grad(log_alpha))(ts), f, rtol=2e-3, atol=1e-5)
    np.testing.assert_allclose(
        jax.vmap(jax.grad(var))(ts), 2 * f * sigma**2 + g2, rtol=2e-3, atol=1e-5
    )


def test_subvp_std_has_no_square_root_and_is_below_vp():
    t = jnp.linspace(0.01, 1.0, 50)
    alpha, sigma = SubVPSDE().alpha_sigma(t)
    np.testing.assert_allclose(sigma, 1 - alpha**2, rtol=1e-5)
    assert jnp.all(sigma <= VPSDE().alpha_sigma(t)[1])


def test_ddpm_linear_schedule_is_the_vp_discretisation():
    vp, ddpm = VPSDE(), DDPM()
    t = ddpm.times
    np.testing.assert_allclose(ddpm.betas(), vp.beta(t) / vp.N, rtol=1e-12)
    # Its levels follow the continuous VP marginals: the chain's sum of betas is
    # a Riemann sum of int beta with spacing 1/(N-1), so alpha differs by O(1/N),
    # at most 1.6e-3 here.
    np.testing.assert_allclose(ddpm.levels()[0], vp.alpha_sigma(t)[0], rtol=0, atol=2e-3)


@pytest.mark.parametrize("process", [DDPM(), NCSN(), DDPM(schedule="cosine")], ids=ids)
def test_discrete_levels_and_discretize_follow_the_chain(process):
    alphas, sigmas = process.levels()
    t = jnp.asarray(process.times, jnp.float32)
    a, s = process.alpha_sigma(t)
    np.testing.assert_allclose(a, alphas, rtol=1e-5)
    np.testing.assert_allclose(s, sigmas, rtol=1e-4)
    assert np.all(np.asarray(process.index(t)) == np.arange(process.N))
    x = jnp.ones((process.N, 3))
    f, big_g = process.discretize(x, t)
    prev_a = np.concatenate([[1.0], alphas[:-1]])
    prev_s = np.concatenate([[0.0], sigmas[:-1]])
    a_step = alphas / prev_a
    np.testing.assert_allclose(f[:, 0], a_step - 1, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(big_g**2, sigmas**2 - a_step**2 * prev_s**2, rtol=2e-3, atol=1e-7)
    if isinstance(process, DDPM):
        np.testing.assert_allclose(big_g**2, process.betas(), rtol=2e-3)


@pytest.mark.parametrize("process", CONTINUOUS, ids=ids)
def test_continuous_discretize_is_the_exact_kernel(process):
    t = jnp.asarray([0.3, 0.7])
    f, big_g = process.discretize(jnp.ones((2, 1)), t, dt=0.01)
    a, var = transition(*process.alpha_sigma(t - 0.01), *process.alpha_sigma(t))
    np.testing.assert_allclose(f[:, 0], a - 1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(big_g, np.sqrt(var), rtol=1e-5)


@pytest.mark.parametrize("process", ALL, ids=ids)
def test_prior(process):
    z = process.prior_sampling(jax.random.PRNGKey(0), (50_000, 4))
    assert abs(float(z.std()) / process.prior_std - 1) < 4 / np.sqrt(2 * z.size)
    expected = np.sum(
        -0.5 * np.log(2 * np.pi * process.prior_std**2) - z**2 / (2 * process.prior_std**2),
        axis=1,
    )
    np.testing.assert_allclose(process.prior_logp(z), expected, rtol=1e-5)
    # The prior is the marginal at T (up to the data, which sigma(T) swamps).
    assert abs(float(process.alpha_sigma(process.T)[1]) / process.prior_std - 1) < 1e-3


def test_noise_cond_and_grids():
    for process in ALL:
        grid = process.sampling_grid()
        assert grid[0] == process.T and np.isclose(grid[-1], process.t_min)
        assert np.all(np.diff(grid) < 0) and len(grid) == process.N
    assert float(VPSDE().noise_cond(1.0)) == 999.0
    np.testing.assert_allclose(
        DDPM().noise_cond(DDPM().time(jnp.arange(1000))), np.arange(1000), rtol=1e-6, atol=1e-4
    )
    assert len(NCSN().sampling_grid(4)) == 4


def test_bad_parameters_say_what_was_expected():
    with pytest.raises(ValueError, match="beta_min < beta_max"):
        VPSDE(beta_min=1.0, beta_max=0.5)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        VESDE(sigma_min=2.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="valid: linear, cosine"):
        DDPM(schedule="quadratic")
    with pytest.raises(ValueError, match="at most 10 steps"):
        NCSN().sampling_grid(11)


# -- what a network is conditioned on ----------------------------------------------------


def test_conditioning_kinds_follow_their_definitions():
    """ "time": 999 t / T; "sigma": sigma(t) from each paper's formula; "index": (N - 1) t / T."""
    t = np.linspace(0.0, 1.0, 11)
    for process in ALL:
        np.testing.assert_allclose(process.noise_cond(t), 999.0 * t, rtol=1e-6)
    vp_sigma = np.sqrt(1 - np.exp(-(0.1 * t + 0.5 * t**2 * (20.0 - 0.1))))  # eq. 33
    np.testing.assert_allclose(VPSDE(conditioning="sigma").noise_cond(t), vp_sigma, rtol=1e-5)
    ve_sigma = 0.01 * (50.0 / 0.01) ** t  # eq. 31
    np.testing.assert_allclose(VESDE(conditioning="sigma").noise_cond(t), ve_sigma, rtol=1e-5)
    ncsn = NCSN(conditioning="sigma")
    np.testing.assert_allclose(ncsn.noise_cond(ncsn.times), np.geomspace(0.01, 1.0, 10), rtol=1e-5)
    ddpm = DDPM(conditioning="sigma")
    alphabar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    np.testing.assert_allclose(ddpm.noise_cond(ddpm.times), np.sqrt(1 - alphabar), rtol=1e-4)
    for process in (DDPM(conditioning="index"), NCSN(conditioning="index")):
        levels = process.noise_cond(jnp.asarray(process.times, jnp.float32))
        np.testing.assert_allclose(levels, np.arange(process.N), rtol=0, atol=1e-3)
    np.testing.assert_allclose(  # N = 1000: the level index is the default "time"
        DDPM(conditioning="index").noise_cond(t), DDPM().noise_cond(t), rtol=1e-6
    )


def test_conditioning_is_static_and_validated():
    """Processes stay hashable, and jit sees two conditionings as two static values."""
    cond = jax.jit(lambda process, t: process.noise_cond(t), static_argnums=0)
    t = jnp.asarray([0.5])
    assert float(cond(NCSN(N=11), t)[0]) == pytest.approx(499.5)
    assert float(cond(NCSN(N=11, conditioning="index"), t)[0]) == pytest.approx(5.0)
    assert hash(DDPM(conditioning="index")) != hash(DDPM())
    with pytest.raises(ValueError, match="unknown conditioning 'level' for DDPM; valid: 'time'"):
        DDPM(conditioning="level")
    with pytest.raises(ValueError, match="unknown conditioning 'index' for VESDE.*'sigma'"):
        VESDE(conditioning="index")
