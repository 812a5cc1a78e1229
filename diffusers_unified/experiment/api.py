"""`diffusers_unified.load(workdir)`: a trained work directory as a Python object.

    import jax
    import diffusers_unified

    model = diffusers_unified.load("runs/vp")          # the newest committed checkpoint
    out = model.sample(jax.random.PRNGKey(0), 16, sampler="ode", ode_method="rk4", num_steps=20)
    ll = model.log_likelihood(jax.random.PRNGKey(1), out.samples)

Built on the launcher's own pieces (`experiment.run`: `build_run` from the
work directory's config.json, `restore` of a committed checkpoint), so a
model loaded here samples exactly as `--mode=sample` would with the same
settings. Arrays are in model units (the network's input space: images in
[-1, 1] or [0, 1] as `data.centered` says); `model.scaling` converts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import ml_collections

from diffusers_unified import likelihood
from diffusers_unified.errors import CheckpointError, ConfigError
from diffusers_unified.experiment import config as config_lib
from diffusers_unified.experiment import run as run_lib
from diffusers_unified.experiment.workdir import Workdir

# The eval section's keys that ode_log_likelihood takes, by their names there.
_LIKELIHOOD_KEYS = {
    "divergence": "divergence",
    "probe": "probe",
    "num_probes": "num_probes",
    "ode_method": "method",
    "rtol": "rtol",
    "atol": "atol",
    "num_steps": "num_steps",
    "t_min": "t_min",
}


def load(workdir: str, checkpoint: str | int = "latest") -> Model:
    """The model trained in `workdir`, at its newest committed checkpoint (or step `checkpoint`).

    Raises ConfigError if `workdir` holds no config.json, CheckpointError if
    it holds no committed checkpoint (or not the one asked for).
    """
    wd = Workdir(workdir)
    saved = wd.saved_config()
    if saved is None:
        raise ConfigError(
            f"{wd.path} is not a work directory (no config.json): train one first with "
            "`diffusers-unified --mode=train --workdir=...`"
        )
    config = config_lib.fill_missing(saved, wd.config_path)
    config.distributed.enabled = False  # a Python session is one process
    config_lib.check_against_schema(config, source=wd.config_path)
    config_lib.check_values(config, jax.device_count())
    if config.training.task != "score":
        raise ConfigError(
            f"{wd.path} holds a classifier (training.task={config.training.task!r}), not a "
            "score model"
        )
    run = run_lib.build_run(config)
    step, state = run_lib.restore(run, wd, str(checkpoint))
    return Model(run=run, state=state, step=step, workdir=wd.path)


@dataclasses.dataclass
class Model:
    """A trained score model: its config, process, network and parameters."""

    run: run_lib.Run
    state: object  # TrainState: params, ema_params, opt_state, step, key
    step: int
    workdir: str
    _compiled: dict = dataclasses.field(default_factory=dict, repr=False)  # jitted, by settings

    @property
    def config(self) -> ml_collections.ConfigDict:
        return self.run.config

    @property
    def process(self):
        return self.run.process

    @property
    def scaling(self):
        """The data's scaling: `to_model` / `from_model` between stored data and model units."""
        return self.run.dataset.scaling

    @property
    def data_shape(self) -> tuple[int, ...]:
        return self.run.data_shape

    def params(self, which="ema"):
        """The parameters: "ema" (what sampling and eval use), "raw", or a pytree as it is."""
        if isinstance(which, str):
            if which not in ("ema", "raw"):
                raise ConfigError(f"params={which!r}: expected 'ema', 'raw' or a parameter tree")
            return self.state.ema_params if which == "ema" else self.state.params
        return which

    def score_fn(self, params="ema", y=None):
        """`score_fn(x, t)` of the network (`params`: "ema", "raw" or a tree), labels `y`."""
        return self.run.score_fn(self.params(params), y)

    def sample(self, key, n: int, sampler: str = "ode", *, params="ema", y=None, **options):
        """`n` samples: a `SamplerOutput` (samples in model units, and the NFE).

        `sampler` is a `sampling.method` name (ancestral, ddim, ald, pc, ode,
        dpm_solver, edm_heun, edm_stochastic); `options` are keys of the
        config's sampling section (`num_steps=20`, `ode_method="rk4"`,
        `predictor="reverse_diffusion"`, ...), checked as the launcher checks
        them; the rest come from the work directory's config. A
        class-conditional model takes labels `y` (default: the config's
        sampling.class_label, or classes in turn).
        """
        settings = ("sample", sampler, json.dumps(options, sort_keys=True, default=list), n)
        if settings not in self._compiled:
            run = self._run_for(sampler, options)
            sample = jax.jit(lambda key, params, y: run.sample(key, params, n, y))
            self._compiled[settings] = run, sample
        run, sample = self._compiled[settings]
        return sample(key, self.params(params), run.labels(0, n) if y is None else y)

    def log_likelihood(self, key, x, *, params="ema", y=None, **options):
        """log p(x) per example by the probability-flow ODE: a `LikelihoodOutput`.

        `x` in model units (for quantised data, add the dequantisation noise
        first: `scaling.to_model(stored, key)`). `options` are keys of the
        config's eval section (divergence, probe, num_probes, ode_method,
        rtol, atol, num_steps, t_min) or `bpd_offset` (default: the data's,
        7 for centred 8-bit images), overriding the work directory's config.
        """
        e = self.config.eval
        kwargs = {name: e[key] for key, name in _LIKELIHOOD_KEYS.items()}
        kwargs["bpd_offset"] = self.scaling.bpd_offset
        for key_, value in options.items():
            if key_ == "bpd_offset":
                kwargs["bpd_offset"] = value
            elif key_ in _LIKELIHOOD_KEYS:
                kwargs[_LIKELIHOOD_KEYS[key_]] = value
            else:
                valid = [*_LIKELIHOOD_KEYS, "bpd_offset"]
                raise ConfigError(
                    f"log_likelihood option {key_!r} is not one of {', '.join(valid)}."
                    f"{config_lib.did_you_mean(key_, valid)}"
                )
        settings = ("log_likelihood", json.dumps(kwargs, sort_keys=True))
        if settings not in self._compiled:
            fn = functools.partial(likelihood.ode_log_likelihood, **kwargs)
            run = self.run
            self._compiled[settings] = jax.jit(
                lambda key, params, x, y: fn(key, run.score_fn(params, y), run.process, x)
            )
        try:
            return self._compiled[settings](key, self.params(params), x, y)
        except ValueError as err:  # an option's value the solver does not take
            raise ConfigError(f"log_likelihood: {err}") from err

    def _run_for(self, sampler: str, options: dict) -> run_lib.Run:
        """The run with sampling.method = `sampler` and `options`, checked and built."""
        config = ml_collections.ConfigDict(self.config.to_dict())
        config.sampling.method = sampler
        for key, value in options.items():
            if key not in config.sampling:
                raise ConfigError(
                    f"sampling option {key!r} is not a key of the sampling section."
                    f"{config_lib.did_you_mean(key, list(config.sampling))}"
                )
            config.sampling[key] = tuple(value) if isinstance(value, list) else value
        config_lib.check_against_schema(config, source="sample() options")
        config_lib.check_values(config)
        resolved = run_lib.resolve_auto(config, self.run.dataset)
        run = dataclasses.replace(self.run, config=config, sampler=run_lib.build_sampler(resolved))
        run_lib.check_sampler(run)
        return run

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Model({os.path.basename(self.workdir)!r}, step {self.step}: {c.process.name} "
            f"process, {c.model.name} network predicting {c.model.parametrization}, data "
            f"{self.data_shape})"
        )


__all__ = ["CheckpointError", "ConfigError", "Model", "load"]
