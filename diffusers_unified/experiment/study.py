"""Studies: many runs of one code path, compared in one table and one figure.

A study file defines `get_study()` returning a `Study`: a base config (from
configs/), a list of variants (each a dict of config overrides, training and
sampling keys alike, or a grid of them) and the samplers to compare. Every
variant trains through `experiment.train`, is sampled through
`experiment.sample.draw` and measured through `experiment.sample.sample_metrics`,
exactly as the launcher would; a rerun skips what is finished (a variant's
results.json is written last). Results land in <workdir>/results.csv,
results.md and a figure.

    diffusers-unified-ablate --study=experiments/studies/NAME.py --workdir=DIR
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from diffusers_unified.errors import ConfigError, DiffusersUnifiedError
from diffusers_unified.experiment import config as config_lib
from diffusers_unified.experiment import progress
from diffusers_unified.experiment.workdir import Workdir, atomic_write

logger = logging.getLogger("diffusers_unified")


@dataclasses.dataclass
class Study:
    name: str
    base: Callable[[], ml_collections.ConfigDict]
    # (name, overrides): a key -> value dict, or a function that edits a config
    variants: list[tuple[str, dict | Callable]] = dataclasses.field(default_factory=list)
    # label -> sampling overrides; {"native": {}} samples with each variant's own config
    samplers: dict[str, dict] = dataclasses.field(default_factory=lambda: {"native": {}})
    description: str = ""
    # Optional hook: (variant config, sampler label, sampler overrides) -> overrides or None to skip
    adapt_sampler: Callable | None = None
    # Held-out likelihood per variant (eval.likelihood's choices: "ode", "bound", "all"), or "none"
    likelihood: str = "none"
    # (x column, y column) of a line plot, one line per variant and sampler family (the
    # sampler label up to "/"), written to plot.png; e.g. ("nfe", "sw_over_floor")
    plot: tuple[str, str] | None = None


def grid(**axes) -> list[tuple[str, dict]]:
    """Variants for every combination of the given key -> values lists."""
    keys = list(axes)
    variants = []
    for values in itertools.product(*(axes[k] for k in keys)):
        overrides = dict(zip(keys, values, strict=True))
        name = ",".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in overrides.items())
        variants.append((name, overrides))
    return variants


def _short(value) -> str:
    return "x".join(map(str, value)) if isinstance(value, tuple | list) else str(value)


def apply_overrides(config: ml_collections.ConfigDict, overrides, where: str):
    """A copy of config with `overrides` (a key -> value dict, or a config -> config function)."""
    config = ml_collections.ConfigDict(config.to_dict())
    if callable(overrides):
        config = overrides(config)
        config_lib.check_against_schema(config, source=where)
        return config
    schema = dict(config_lib.flatten(config))
    for key, value in overrides.items():
        if key not in schema:
            raise config_lib.unknown_key_error(key, schema, f" in {where}")
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    config_lib.check_against_schema(config, source=where)
    return config


def load_study(path: str) -> Study:
    module = config_lib.load_module(path)
    if not hasattr(module, "get_study"):
        raise ConfigError(f"study file {path} defines no get_study()")
    study = module.get_study()
    if not study.variants:
        raise ConfigError(f"study {study.name!r} ({path}) has no variants")
    names = [name for name, _ in study.variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"study {study.name!r} has duplicate variant names")
    return study


def variant_configs(study: Study) -> list[tuple[str, ml_collections.ConfigDict]]:
    """Every variant's config, checked before anything runs."""
    out = []
    for name, overrides in study.variants:
        config = apply_overrides(study.base(), overrides, f"study {study.name!r}, variant {name!r}")
        config_lib.check_values(config, jax.device_count())
        out.append((name, config))
    return out


def run_variant(name: str, config, study: Study, root: str) -> dict:
    """Trains (or resumes) one variant, then samples and measures it with every sampler."""
    from diffusers_unified.experiment import run as run_lib
    from diffusers_unified.experiment import sample, train

    vdir = os.path.join(root, _dirname(name))
    results_path = os.path.join(vdir, "results.json")
    if os.path.exists(results_path):
        with open(results_path) as f:
            logger.info("variant %s: finished earlier, skipped", name)
            return json.load(f)
    start = time.perf_counter()
    train.train(config, vdir)
    train_seconds = time.perf_counter() - start
    wd = Workdir(vdir)
    likelihood = variant_likelihood(config, study.likelihood, wd)
    rows = []
    for label, overrides in study.samplers.items():
        if study.adapt_sampler is not None:
            overrides = study.adapt_sampler(config, label, overrides)
            if overrides is None:
                continue
        sconfig = apply_overrides(config, overrides, f"study {study.name!r}, sampler {label!r}")
        run = run_lib.build_run(sconfig)
        step, state = run_lib.restore(run, wd)
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed), sample.SAMPLE_STREAM + step)
        n = sconfig.eval.num_samples
        seconds = []  # per shard; the first one includes compiling the sampler
        x, _, nfe = sample.draw(run, state.ema_params, n, key, seconds=seconds)
        # Sampling time for n samples: from the shards after the first when there are
        # any (compile-free), else the one shard, compile included.
        steady = seconds[1:] or seconds
        seconds = float(np.mean(steady)) * len(seconds)
        metrics = sample.sample_metrics(run, x, config.seed)
        metrics.update(likelihood)
        samples_path = os.path.join(vdir, f"samples_{_dirname(label)}.npy")
        np.save(samples_path, x[:2000])
        rows.append(
            {
                "variant": name,
                "sampler": label,
                "sampler_config": run.describe_sampler(),
                "nfe": nfe,
                "sample_seconds": seconds,
                "train_seconds": train_seconds,
                "step": step,
                "samples": os.path.relpath(samples_path, root),
                # the sampler's own settings as columns (e.g. snr, num_steps), for plots
                **{k.split(".")[-1]: v for k, v in overrides.items()},
                **metrics,
            }
        )
        logger.info(
            "variant %s, sampler %s: SW/floor %.2f, NFE %d, %.1f s",
            name,
            label,
            metrics["sw_over_floor"],
            nfe,
            seconds,
        )
    result = {"variant": name, "rows": rows}
    atomic_write(results_path, json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


def variant_likelihood(config, kind: str, wd: Workdir) -> dict:
    """The held-out likelihood figures of a trained variant (as `--mode=eval` reports them)."""
    if kind == "none":
        return {}
    from diffusers_unified.experiment import evaluate
    from diffusers_unified.experiment import run as run_lib

    config = apply_overrides(config, {"eval.likelihood": kind}, "the study's likelihood")
    run = run_lib.build_run(config)
    step, state = run_lib.restore(run, wd)
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), evaluate.LIKELIHOOD_STREAM + step)
    parts = os.path.join(wd.eval, f"step_{step}_parts")
    out = {}
    for k in evaluate.likelihood_kinds(config, run):
        out.update(evaluate.held_out_likelihood(run, state.ema_params, k, key, parts))
    return out


def _dirname(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=," else "_" for c in name)


def run_study(
    study: Study, workdir: str, only: list[str] | None = None, summary: bool = True
) -> list[dict]:
    configs = variant_configs(study)
    if only:
        unknown = sorted(set(only) - {n for n, _ in configs})
        if unknown:
            raise ConfigError(
                f"--only names unknown variants {unknown}; valid: "
                f"{', '.join(n for n, _ in configs)}"
            )
        configs = [(n, c) for n, c in configs if n in only]
    os.makedirs(workdir, exist_ok=True)
    if summary:
        Workdir(workdir).start_logging(f"study {study.name}", None)
    rows = []
    bar = progress.bar(len(configs), f"study {study.name}", "variant")
    for name, config in configs:
        bar.set_postfix_str(name)
        rows += run_variant(name, config, study, workdir)["rows"]
        bar.update()
    bar.close()
    if summary:
        write_results(study, rows, workdir)
    return rows


COLUMNS = (
    "variant",
    "sampler",
    "sampler_config",
    "nfe",
    "sliced_wasserstein",
    "sw_noise_floor",
    "sw_over_floor",
    "ode_nll_nats",
    "data_nll_nats",
    "ode_bpd",
    "train_seconds",
    "sample_seconds",
)


def write_results(study: Study, rows: list[dict], workdir: str) -> None:
    import csv
    import io

    columns = [c for c in COLUMNS if any(c in r for r in rows)]
    columns += sorted({k for r in rows for k in r} - set(columns) - {"samples", "step"})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(os.path.join(workdir, "results.csv"), buffer.getvalue())
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = [
        f"# {study.name}",
        "",
        study.description,
        "",
        "| " + " | ".join(columns) + " |",
        "|" + " --- |" * len(columns),
    ]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    atomic_write(os.path.join(workdir, "results.md"), "\n".join(lines) + "\n")
    figure_of_samples(rows, workdir, os.path.join(workdir, "samples.png"))
    if study.plot is not None:
        line_plot(rows, *study.plot, os.path.join(workdir, "plot.png"), study.name)
    print("\n".join(lines))


def line_plot(rows: list[dict], x: str, y: str, path: str, title: str) -> None:
    """y against x (log-log), one line per variant and sampler family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[float, float]]] = {}
    levels: dict[str, float] = {}  # rows without an x value: horizontal reference lines
    for r in rows:
        family = r["sampler"].split("/")[0]
        label = family if len({q["variant"] for q in rows}) == 1 else f"{r['variant']}, {family}"
        if r.get(x) is None:
            levels[label] = float(r[y])
        else:
            lines.setdefault(label, []).append((float(r[x]), float(r[y])))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, points in lines.items():
        points.sort()
        ax.plot(*zip(*points, strict=True), marker="o", ms=3, label=label)
    for label, level in levels.items():
        ax.axhline(level, color="black", lw=1.0, label=label)
    ax.set(xscale="log", yscale="log", xlabel=x, ylabel=y, title=title)
    if y == "sw_over_floor":
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def figure_of_samples(rows: list[dict], workdir: str, path: str) -> None:
    """One panel per (variant, sampler): a scatter plot (2-D data) or an image grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffusers_unified.experiment.figures import image_grid

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    labels = list(dict.fromkeys(r["sampler"] for r in rows))
    fig, axes = plt.subplots(
        len(labels), len(variants), squeeze=False, figsize=(2.8 * len(variants), 2.8 * len(labels))
    )
    for ax in axes.ravel():
        ax.axis("off")
    for r in rows:
        ax = axes[labels.index(r["sampler"])][variants.index(r["variant"])]
        x = np.load(os.path.join(workdir, r["samples"]))
        if x.ndim == 4:
            unit = np.clip((x[:64] + 1) / 2 if x.min() < -0.01 else x[:64], 0, 1)
            ax.imshow(image_grid(np.round(unit * 255).astype(np.uint8)).squeeze(), cmap="gray")
        else:
            ax.scatter(x[:, 0], x[:, 1], s=0.5, alpha=0.5)
            ax.set_aspect("equal")
            lim = np.percentile(np.abs(x[:, :2]), 99) * 1.2
            ax.set(xlim=(-lim, lim), ylim=(-lim, lim))
        ax.set_title(
            f"{r['variant']} / {r['sampler']}\nSW/floor {r['sw_over_floor']:.2f}, NFE {r['nfe']}",
            fontsize=7,
        )
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def run_parallel(study_path: str, study: Study, workdir: str, jobs: int, only=None) -> None:
    """Runs pending variants in up to `jobs` child processes, then writes the summary.

    A small model's update barely uses a second core (measured: 2.4 vs 3.0 ms
    per step), so independent variants in parallel finish sooner. Each child is
    this command with --only=<variant>; its output goes to <variant>/stderr.txt.
    """
    import subprocess

    names = [n for n, _ in variant_configs(study) if not only or n in only]
    os.makedirs(workdir, exist_ok=True)
    Workdir(workdir).start_logging(f"study {study.name}", None)
    pending = [
        n for n in names if not os.path.exists(os.path.join(workdir, _dirname(n), "results.json"))
    ]
    running: list[tuple[str, subprocess.Popen]] = []
    failed = []
    bar = progress.bar(len(names), f"study {study.name}", "variant", len(names) - len(pending))
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            vdir = os.path.join(workdir, _dirname(name))
            os.makedirs(vdir, exist_ok=True)
            log = open(os.path.join(vdir, "stderr.txt"), "a")  # noqa: SIM115  closed below
            cmd = [
                sys.executable,
                "-m",
                "diffusers_unified.experiment.study",
                "--study",
                study_path,
                "--workdir",
                workdir,
                "--only",
                name,
                "--no_summary",
            ]
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=log)))
            logger.info("variant %s: started (pid %d)", name, running[-1][1].pid)
        time.sleep(0.2)
        for name, proc in list(running):
            if proc.poll() is not None:
                running.remove((name, proc))
                bar.update()
                logger.info("variant %s: exit code %d", name, proc.returncode)
                if proc.returncode:
                    failed.append((name, proc.returncode))
    bar.close()
    if failed:
        name, code = failed[0]
        raise DiffusersUnifiedError(
            f"variant(s) {', '.join(n for n, _ in failed)} failed; see "
            f"{os.path.join(workdir, _dirname(name), 'stderr.txt')} (exit code {code})"
        )
    rows = []
    for name in names:
        with open(os.path.join(workdir, _dirname(name), "results.json")) as f:
            rows += json.load(f)["rows"]
    write_results(study, rows, workdir)


def _use_compilation_cache(path: str, workdir: str) -> None:
    """Turns on JAX's persistent compilation cache here and in the variants' processes.

    The variants of a study compile many of the same programs (the network's
    initialisation, the data, the metrics; every program again on a rerun).
    """
    path = (
        path or os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(workdir, ".jax_cache")
    )
    if path == "none":
        return
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path  # inherited by the variants' processes
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
    jax.config.update("jax_compilation_cache_dir", path)
    min_seconds = float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)


def main(argv=None) -> None:
    """`diffusers-unified-ablate --study=FILE --workdir=DIR [--only=a,b] [--jobs=N]`."""
    import argparse

    from diffusers_unified.experiment.cli import _setup_logging

    parser = argparse.ArgumentParser(prog="diffusers-unified-ablate", description=__doc__)
    parser.add_argument("--study", required=True, help="study file defining get_study()")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--only", default="", help="comma-separated variant names to run")
    parser.add_argument("--jobs", type=int, default=1, help="variants run at once (processes)")
    parser.add_argument(
        "--compilation_cache",
        default="",
        help="JAX's persistent compilation cache, shared by the variants' processes and reruns "
        "(default: $JAX_COMPILATION_CACHE_DIR, else <workdir>/.jax_cache; 'none': off)",
    )
    parser.add_argument("--no_summary", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _setup_logging()
    _use_compilation_cache(args.compilation_cache, args.workdir)
    only = [s for s in args.only.split(",") if s] or None
    try:
        study = load_study(args.study)
        if args.jobs > 1:
            run_parallel(args.study, study, args.workdir, args.jobs, only)
        else:
            run_study(study, args.workdir, only, summary=not args.no_summary)
    except DiffusersUnifiedError as e:
        logger.error("%s", e)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
