"""This package against its peers, side by side in one run: diffusers' PyTorch scheduler loops
and the score SDE code's SciPy host loop.

Rows (every pair timed in the same process, interleaved, best of several rounds):

* DDPM ancestral sampling over 1000 levels and DDIM over 50, with the benchmark
  MLP (2 + 128 -> 3 x 256 -> 2) at batch 4096 and a small MLP (2 + 32 -> 64 ->
  64 -> 2) at batch 512: `samplers.ancestral` / `samplers.ddim` against
  diffusers' `DDPMScheduler` (fixed_large variance, as the package's DDPM
  default) / `DDIMScheduler` loop around the same MLP written in PyTorch,
  with the same weights (copied from the Flax parameters, checked to give
  the same outputs) and batch;
* one training update of the benchmark MLP at batch 4096 (eps loss, Adam):
  the package's real train chunk (`experiment.train.make_train_chunk`, as
  experiments/train_throughput.py times it) against a PyTorch loop;
* the probability-flow ODE of the VP SDE with the small MLP at batch 128 and
  1024, at rtol = atol = 1e-5: a sample (from T to t_min, no denoising) and
  the log-likelihood (Hutchinson, one Rademacher probe, from 1e-5 to T), by
  the package's jitted diffrax Dopri5 against SciPy's RK45 host loop calling
  one jitted right-hand side, as the score SDE code's `get_ode_sampler` and
  `get_likelihood_fn` do. The likelihood rows also give the answers' largest
  difference (nats), and at batch 1024 the adaptive solve's time per
  evaluation against the same augmented field's inside a fixed-step scan
  (RK4, 100 steps).

"what the hardware allows" is the network's FLOPs (as in
experiments/sampler_overhead.py; a train update counted as 3 forwards with
the embedding per example) over the float32 matmul peak measured in the same
run. The PyTorch rows need `torch` and `diffusers` (the `bench` extra); when
they do not import, the script says so, leaves those rows out and still runs
the SciPy rows. Writes results/peer_comparison.{csv,md} with the load
average; the last line is a JSON object. Run it on an idle machine, e.g. in
the reference environment:

    PYTHONPATH=. /work/venv-ref/bin/python experiments/peer_comparison.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusers_unified import likelihood, samplers
from diffusers_unified.nets import MLP, NetApply
from diffusers_unified.parametrization import make_score_fn
from diffusers_unified.processes import DDPM, VPSDE
from diffusers_unified.samplers.ode import ode_drift

from common import Checks, final_json, interleaved_best, load_average, matmul, write_table

SMALL, LARGE = ((64, 64), 32), ((256, 256, 256), 128)  # (hidden, emb_dim)
PEAK_N = 4096
TOL = 1e-5


def forward_flops(hidden, emb_dim, batch, per_example_embedding=False):
    """Matmul FLOPs of one MLP forward (a shared noise level is embedded once per call)."""
    widths = (2, *hidden, 2)
    layers = sum(a * b for a, b in zip(widths[:-1], widths[1:], strict=True))
    emb = emb_dim * hidden[0]
    return 2 * batch * (layers + (emb if per_example_embedding else 0)) + (
        0 if per_example_embedding else 2 * emb
    )


def matmul_peak(rounds: int) -> float:
    call, flops = matmul(PEAK_N)
    return flops / interleaved_best({"peak": call}, 3 * rounds)["peak"]


# -- PyTorch ---------------------------------------------------------------------------


def torch_available() -> str | None:
    """None if torch and diffusers import, else why not."""
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError as err:
        return str(err)
    return None


def torch_mlp(params, hidden, emb_dim):
    """The package's MLP in PyTorch (split first layer, sinusoidal embedding), same weights."""
    import torch

    class TorchMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.in_x = torch.nn.Linear(2, hidden[0])
            self.in_emb = torch.nn.Linear(emb_dim, hidden[0], bias=False)
            self.hidden = torch.nn.ModuleList(
                torch.nn.Linear(a, b) for a, b in zip(hidden[:-1], hidden[1:], strict=True)
            )
            self.out = torch.nn.Linear(hidden[-1], 2)
            half = emb_dim // 2
            freqs = np.exp(-np.log(10000.0) / (half - 1) * np.arange(half)).astype(np.float32)
            self.register_buffer("freqs", torch.from_numpy(freqs))

        def forward(self, x, cond):
            arg = cond.float()[..., None] * self.freqs
            e = torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)
            h = torch.nn.functional.silu(self.in_x(x) + self.in_emb(e))
            for layer in self.hidden:
                h = torch.nn.functional.silu(layer(h))
            return self.out(h)

    model = TorchMLP()
    names = ["in_x", "in_emb", *(f"hidden_{i}" for i in range(1, len(hidden))), "out"]
    modules = [model.in_x, model.in_emb, *model.hidden, model.out]
    with torch.no_grad():
        for name, module in zip(names, modules, strict=True):
            module.weight.copy_(torch.from_numpy(np.asarray(params[name]["kernel"]).T.copy()))
            if module.bias is not None:
                module.bias.copy_(torch.from_numpy(np.array(params[name]["bias"])))
    return model


def torch_sampler_loops(model, shape, ddim_steps=50):
    """diffusers' DDPM (1000 steps) and DDIM loops around `model`, as zero-argument callables."""
    import torch
    from diffusers import DDIMScheduler, DDPMScheduler

    ddpm = DDPMScheduler(variance_type="fixed_large", clip_sample=False)
    ddpm.set_timesteps(1000)
    ddim = DDIMScheduler(clip_sample=False)
    ddim.set_timesteps(ddim_steps)
    generator = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def run(scheduler):
        x = torch.randn(shape, generator=generator)
        for t in scheduler.timesteps:
            eps = model(x, t)
            kwargs = {"generator": generator} if scheduler is ddpm else {}
            x = scheduler.step(eps, t, x, **kwargs).prev_sample
        return x

    return functools.partial(run, ddpm), functools.partial(run, ddim)


def torch_train_update(model, batch, updates: int):
    """`updates` Adam updates of the eps loss on the VP SDE, in PyTorch (one callable)."""
    import torch

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x0 = torch.randn(batch, 2)

    def run():
        for _ in range(updates):
            t = torch.rand(batch) * (1 - 1e-5) + 1e-5
            log_alpha = -0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1
            alpha = torch.exp(log_alpha)[:, None]
            sigma = torch.sqrt(1.0 - alpha**2)
            eps = torch.randn_like(x0)
            loss = torch.mean((model(alpha * x0 + sigma * eps, 999.0 * t) - eps) ** 2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return loss.item()

    return run


# -- the package -------------------------------------------------------------------------


def net_and_params(hidden, emb_dim):
    net = NetApply(MLP(hidden=hidden, emb_dim=emb_dim))
    return net, net.init(jax.random.PRNGKey(0), (1, 2))


def package_sampler_runs(net, params, shape):
    """DDPM-1000 ancestral sampling and DDIM-50 on DDPM's levels, as zero-argument callables."""
    process = DDPM()
    score_fn = make_score_fn(process, net, params, "eps")
    key = jax.random.PRNGKey(0)
    ddpm = lambda: samplers.ancestral(key, score_fn, process, shape)
    ddim = lambda: samplers.ddim(key, score_fn, process, shape, num_steps=50)
    return ddpm, ddim


def package_train_update():
    """The real train chunk of experiments/train_throughput.py (toy2d MLP, batch 4096)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train_throughput import MLP_BATCH, MLP_CONFIG, _chunk_runner

    _, run, k, _ = _chunk_runner(MLP_CONFIG, MLP_BATCH)
    return lambda: run(1) * k, k  # one chunk of k updates


# -- SciPy host loops (the score SDE code's likelihood and ODE sampler) -----------------


def scipy_flow_sample(process, score_fn, z):
    """The probability-flow ODE from T to t_min by SciPy's RK45 (returns x, NFE)."""
    from scipy.integrate import solve_ivp

    drift = jax.jit(ode_drift(process, score_fn))
    shape = z.shape

    def rhs(t, y):
        x = jnp.asarray(y.reshape(shape), jnp.float32)
        return np.asarray(drift(x, jnp.float32(t)), np.float64).ravel()

    y0 = np.asarray(z, np.float64).ravel()
    solution = solve_ivp(rhs, (process.T, process.t_min), y0, rtol=TOL, atol=TOL, method="RK45")
    return solution.y[:, -1].reshape(shape), solution.nfev


def scipy_likelihood(process, score_fn, x, probe, t_min=1e-5):
    """log p(x) by the probability-flow ODE with SciPy's RK45 (returns logp, NFE)."""
    from scipy.integrate import solve_ivp

    drift = ode_drift(process, score_fn)

    @jax.jit
    def field(x, t):
        dx, jvp = jax.jvp(lambda y: drift(y, t), (x,), (probe,))
        return dx, jnp.sum((probe * jvp).reshape(x.shape[0], -1), axis=-1)

    shape, batch = x.shape, x.shape[0]

    def rhs(t, y):
        dx, div = field(jnp.asarray(y[:-batch].reshape(shape), jnp.float32), jnp.float32(t))
        return np.concatenate([np.asarray(dx, np.float64).ravel(), np.asarray(div, np.float64)])

    y0 = np.concatenate([np.asarray(x, np.float64).ravel(), np.zeros(batch)])
    solution = solve_ivp(rhs, (t_min, process.T), y0, rtol=TOL, atol=TOL, method="RK45")
    end = solution.y[:, -1]
    z = jnp.asarray(end[:-batch].reshape(shape), jnp.float32)
    return np.asarray(process.prior_logp(z), np.float64) + end[-batch:], solution.nfev


# -- the table ---------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (short rows)")
    parser.add_argument("--big_rounds", type=int, default=3, help="rounds of the long rows")
    args = parser.parse_args()
    missing = torch_available()
    if missing:
        print(
            f"torch and diffusers do not import here ({missing}): the PyTorch rows are left "
            "out (install the 'bench' extra, or run this script in an environment that has "
            "them); the SciPy rows follow."
        )
    load_start = load_average()
    peak = matmul_peak(args.rounds)
    rows, figures = [], {}

    checks = Checks()

    def add(work, peer, ours, peer_s, ours_s, hw=None, extra=""):
        ratio = peer_s / ours_s
        if hw is not None:  # neither side can beat the network's FLOPs at the matmul peak
            for side, seconds in (("ours", ours_s), (peer, peer_s)):
                checks.check(
                    seconds >= hw,
                    f"{work}: {side} took {seconds:.4g} s, under the {hw:.4g} s the peak allows",
                )
        rows.append([work, peer, round(peer_s, 4), round(ours_s, 4), round(ratio, 2), hw, extra])
        figures[work] = {"peer_s": peer_s, "ours_s": ours_s, "ratio": ratio}
        print(f"{work}: {peer} {peer_s:.4f} s, ours {ours_s:.4f} s, {ratio:.2f}x", flush=True)

    if not missing:
        import torch

        for label, (hidden, emb), batch in (("MLP", LARGE, 4096), ("small MLP", SMALL, 512)):
            net, params = net_and_params(hidden, emb)
            model = torch_mlp(params, hidden, emb)
            x = np.random.default_rng(0).normal(size=(batch, 2)).astype(np.float32)
            with torch.no_grad():
                ref = model(torch.from_numpy(x), torch.tensor(500.0)).numpy()
            got = np.asarray(net(params, jnp.asarray(x), jnp.float32(500.0)))
            assert np.allclose(ref, got, rtol=1e-4, atol=1e-4), np.abs(ref - got).max()
            torch_ddpm, torch_ddim = torch_sampler_loops(model, (batch, 2))
            ours_ddpm, ours_ddim = package_sampler_runs(net, params, (batch, 2))
            flops = forward_flops(hidden, emb, batch)
            rounds = args.big_rounds if label == "MLP" else args.rounds
            best = interleaved_best({"peer ddpm": torch_ddpm, "ours ddpm": ours_ddpm}, rounds)
            best |= interleaved_best({"peer ddim": torch_ddim, "ours ddim": ours_ddim}, 3 * rounds)
            name = f"{label} {2}+{emb} -> {' -> '.join(map(str, hidden))} -> 2, batch {batch}"
            peer = f"torch {torch.__version__} + diffusers loop"
            add(f"DDPM-1000, {name}", peer, "ancestral", best["peer ddpm"], best["ours ddpm"],
                round(1000 * flops / peak, 4))  # fmt: skip
            add(f"DDIM-50, {name}", peer, "ddim", best["peer ddim"], best["ours ddim"],
                round(50 * flops / peak, 4))  # fmt: skip

        hidden, emb = LARGE
        net, params = net_and_params(hidden, emb)
        model = torch_mlp(params, hidden, emb)
        ours_chunk, k = package_train_update()
        best = interleaved_best(
            {"peer": torch_train_update(model, 4096, k), "ours": ours_chunk}, args.rounds
        )
        train_flops = 3 * forward_flops(hidden, emb, 4096, per_example_embedding=True)
        add("train update, MLP, batch 4096 (Adam, eps loss)", f"torch {torch.__version__}",
            "train chunk", best["peer"] / k, best["ours"] / k,
            round(train_flops / peak, 4))  # fmt: skip

    # The probability-flow ODE against SciPy's host loop, small MLP.
    hidden, emb = SMALL
    net, params = net_and_params(hidden, emb)
    process = VPSDE()
    score_fn = make_score_fn(process, net, params, "eps")
    ours_lik = jax.jit(functools.partial(likelihood.ode_log_likelihood, rtol=TOL, atol=TOL))
    ours_rk4 = jax.jit(
        functools.partial(likelihood.ode_log_likelihood, method="rk4", num_steps=100)
    )
    for batch in (128, 1024):
        key = jax.random.PRNGKey(batch)
        z = process.prior_sampling(key, (batch, 2))
        x = jax.random.normal(jax.random.fold_in(key, 1), (batch, 2))
        probe = jax.random.rademacher(key, (1, batch, 2)).astype(jnp.float32)[0]
        sample = lambda k=key, b=batch: samplers.probability_flow(
            k, score_fn, process, (b, 2), rtol=TOL, atol=TOL, denoise=False
        )
        nfe_sample = int(sample().nfe)
        peer_x, peer_nfe = scipy_flow_sample(process, score_fn, z)
        best = interleaved_best(
            {"peer": lambda z=z: scipy_flow_sample(process, score_fn, z)[0], "ours": sample},
            args.rounds,
        )
        add(f"PF-ODE sample, small MLP, batch {batch}, rtol = atol = 1e-5", "SciPy RK45 loop",
            "dopri5", best["peer"], best["ours"],
            extra=f"NFE {peer_nfe} vs {nfe_sample}")  # fmt: skip
        out = ours_lik(key, score_fn, process, x)
        peer_logp, peer_nfe = scipy_likelihood(process, score_fn, x, probe)
        fns = {
            "peer": lambda x=x, p=probe: scipy_likelihood(process, score_fn, x, p)[0],
            "ours": lambda k=key, x=x: ours_lik(k, score_fn, process, x),
        }
        if batch == 1024:
            fns["rk4"] = lambda k=key, x=x: ours_rk4(k, score_fn, process, x)
        best = interleaved_best(fns, args.rounds)
        nfe = int(out.nfe)
        diff = float(np.max(np.abs(np.asarray(out.log_likelihood) - peer_logp)))
        extra = f"NFE {peer_nfe} vs {nfe}; answers within {diff:.2g} nats"
        if batch == 1024:
            fixed = ours_rk4(key, score_fn, process, x)
            per_eval = (best["ours"] / nfe) / (best["rk4"] / int(fixed.nfe))
            diff_rk4 = float(np.max(np.abs(out.log_likelihood - fixed.log_likelihood)))
            extra += (
                f"; per evaluation {best['ours'] / nfe * 1e6:.0f} us adaptive, "
                f"{best['rk4'] / int(fixed.nfe) * 1e6:.0f} us in an RK4 scan ({per_eval:.3f}x; "
                f"RK4 x 100 answers within {diff_rk4:.2g} nats)"
            )
            figures["likelihood adaptive / fixed per evaluation"] = per_eval
        add(f"PF-ODE likelihood, Hutchinson, small MLP, batch {batch}", "SciPy RK45 loop",
            "dopri5", best["peer"], best["ours"], extra=extra)  # fmt: skip

    load = max(load_start, load_average())
    write_table(
        "peer_comparison",
        ["work", "peer", "peer s", "this package s", "ratio", "hardware allows s", "notes"],
        rows,
        note=checks.stamp(
            f"Float32 matmul peak {peak / 1e9:.1f} GFLOP/s ({PEAK_N}^3, same run); 'hardware "
            "allows' = the network's FLOPs at that peak. Each pair interleaved in one process, "
            f"best of {args.rounds} rounds ({args.big_rounds} for the large MLP's DDPM-1000, "
            f"{3 * args.rounds} for DDIM-50); load average {load:.2f} (1 min, the highest "
            "seen at the start and the end). PyTorch threads: "
            + (str(__import__("torch").get_num_threads()) if not missing else "-")
            + "."
        ),
    )
    final_json(
        {
            "rows": figures,
            "matmul_peak_gflops": peak / 1e9,
            "load_average": load,
            "consistent": not checks.failures,
        }
    )
    checks.finish()


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
