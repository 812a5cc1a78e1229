"""A `Run`: everything a config describes, built once, for train, sample, eval and studies.

`build_run(config)` loads the dataset once and passes it to whatever needs
it (the NCSNv2 noise scales that AUTO keys ask for, the network's label
count, the expected data shape), builds the process, network, sampler and
device mesh from the tables of `kinds`, and checks that they fit together,
so a bad combination fails before any work starts. The loss and optimiser
are built on first use: sampling a trained model never builds a loss.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffusers_unified import data, losses, noise_scales
from diffusers_unified.errors import CheckpointError, ConfigError
from diffusers_unified.experiment import config as config_lib
from diffusers_unified.experiment import kinds
from diffusers_unified.experiment.workdir import Workdir
from diffusers_unified.nets import ClassifierApply, NetApply
from diffusers_unified.parametrization import (
    classifier_guided_score_fn,
    make_logits_fn,
    make_score_fn,
)
from diffusers_unified.processes import Process
from diffusers_unified.training.checkpoints import CheckpointManager
from diffusers_unified.training.optimizer import make_optimizer
from diffusers_unified.training.state import TrainState

logger = logging.getLogger("diffusers_unified")


@dataclasses.dataclass
class Run:
    """A config's data, process, network, parametrization, sampler and devices.

    `config` is the config as given (AUTO keys still 0, as the work
    directory records it); the objects are built from the resolved one.
    """

    config: ml_collections.ConfigDict
    dataset: data.Dataset
    process: Process
    net: NetApply | ClassifierApply
    net_kind: kinds.NetKind
    sampler: object  # (key, score_fn, process, shape) -> SamplerOutput; None for a classifier
    mesh: Mesh

    @property
    def parametrization(self) -> str:
        return self.config.model.parametrization

    @property
    def data_shape(self) -> tuple[int, ...]:
        return self.dataset.data_shape

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P("data"))

    @functools.cached_property
    def optimizer(self):
        o = self.config.optim
        return make_optimizer(
            o.optimizer, o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, o.warmup, o.grad_clip
        )

    def learning_rate(self, step: int) -> float:
        """The learning rate of update `step` (1-based): optim.lr after a linear warmup.

        The optimiser's schedule (`make_optimizer`) counts updates from 0, so
        update s uses its value at s - 1.
        """
        o = self.config.optim
        return float(o.lr * min(1.0, (step - 1) / o.warmup)) if o.warmup > 0 else float(o.lr)

    @property
    def is_classifier(self) -> bool:
        """Whether the run trains a noise-conditional classifier (training.task)."""
        return self.config.training.task == "classifier"

    @property
    def uses_labels(self) -> bool:
        """Whether training batches carry labels: a class-conditional model, or a classifier."""
        return self.config.model.class_conditional or self.is_classifier

    @functools.cached_property
    def loss_fn(self):
        """The config's loss; with training.label_dropout, labels dropped to the null label."""
        t = self.config.training
        if self.is_classifier:
            return losses.classifier_loss(self.process, self.net, t.t_min)
        fn = kinds.LOSSES[t.loss](t, self.process, self.net, self.parametrization)
        null_label = getattr(self.net.module, "num_classes", None)
        if t.label_dropout > 0 and null_label is not None:
            fn = losses.with_label_dropout(fn, t.label_dropout, null_label)
        return fn

    def score_fn(self, params, y=None, guidance=None):
        return make_score_fn(self.process, self.net, params, self.parametrization, y, guidance)

    def init_state(self) -> TrainState:
        key_init, key_train = jax.random.split(jax.random.PRNGKey(self.config.seed))
        if self.is_classifier:
            params = self.net.init(key_init, (1, *self.data_shape))
        else:
            y = jnp.zeros((1,), jnp.int32) if self.config.model.class_conditional else None
            params = self.net.init(key_init, (1, *self.data_shape), y)
        return TrainState.create(params, self.optimizer, jax.random.key_data(key_train))

    def sampling_score_fn(self, params, y=None, classifier_params=None):
        """The score the sampler follows: labels `y` with classifier-free guidance
        (sampling.guidance_weight > 0), or classifier guidance with the classifier of
        sampling.classifier_workdir (`classifier_params`, see `classifier`)."""
        if self.classifier is not None:
            net, _ = self.classifier
            logits = make_logits_fn(self.process, net, classifier_params)
            scale = self.config.sampling.classifier_scale
            return classifier_guided_score_fn(self.score_fn(params), logits, y, scale)
        w = self.config.sampling.guidance_weight
        return self.score_fn(params, y, w if y is not None and w > 0 else None)

    def sample(self, key, params, n: int, y=None):
        """n samples from the config's sampler with `params` (jitted once per n)."""
        classifier_params = None if self.classifier is None else self.classifier[1]
        score_fn = self.sampling_score_fn(params, y, classifier_params)
        return self.sampler(key, score_fn, self.process, (n, *self.data_shape))

    @functools.cached_property
    def classifier(self):
        """(ClassifierApply, EMA params) of sampling.classifier_workdir, or None."""
        path = self.config.sampling.classifier_workdir
        if not path:
            return None
        wd = Workdir(path)
        config = wd.saved_config()
        if config is None or config.training.task != "classifier":
            raise ConfigError(
                f"sampling.classifier_workdir={path!r} holds no classifier (a work directory "
                "trained with training.task='classifier')"
            )
        for key in ("process", "data"):
            if config_lib.to_json(config[key]) != config_lib.to_json(self.config[key]):
                raise ConfigError(
                    f"sampling.classifier_workdir={path!r} was trained with another {key} "
                    f"section than this run's; a classifier guides the process and data it "
                    "was trained on"
                )
        run = build_run(config)
        _, state = restore(run, wd)
        return run.net, state.ema_params

    def labels(self, start: int, n: int):
        """Labels of samples start ... start + n - 1: sampling.class_label, or classes in turn.

        None for an unconditional model without classifier guidance.
        """
        if not self.config.model.class_conditional and self.classifier is None:
            return None
        k, label = self.dataset.num_classes, self.config.sampling.class_label
        if label >= k:
            raise ConfigError(
                f"sampling.class_label={label}, but dataset {self.dataset.name!r} has "
                f"{k} classes (0 ... {k - 1})"
            )
        if label >= 0:
            return jnp.full((n,), label, jnp.int32)
        return jnp.arange(start, start + n, dtype=jnp.int32) % k

    def describe_sampler(self) -> str:
        return kinds.describe_sampler(self.config.sampling)

    def expected_data_shape(self) -> tuple[tuple[int, ...], str]:
        return expected_data_shape(self.config, self.dataset)


def build_run(config) -> Run:
    """Builds and cross-checks every object of a run; fails before any training step."""
    ds = kinds.DATASETS[config.data.dataset].build(config.data, config.seed)
    expected, source = expected_data_shape(config, ds)
    if ds.data_shape != expected:
        data.validate_batch(
            {"x": np.zeros((1, *ds.data_shape), np.float32), "y": None},
            expected,
            None,
            name=ds.name,
            shape_source=source,
        )  # fmt: skip  (raises the shape DataError)
    resolved = resolve_auto(config, ds)
    net_kind = kinds.NETS[config.model.name]
    if net_kind.data != ds.kind:
        fits = [name for name, kind in kinds.NETS.items() if kind.data == ds.kind]
        raise ConfigError(
            f"model.name={config.model.name!r} takes {net_kind.data} data, but dataset "
            f"{ds.name!r} is {ds.kind} data (use model.name in {', '.join(fits)})"
        )
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    if config.training.task == "classifier":
        if ds.num_classes is None:
            raise ConfigError(
                f"training.task='classifier' needs labels, but dataset {ds.name!r} has none"
            )
        module = net_kind.classifier(config.model, ds.num_classes)
        process = build_process(resolved, module)
        return Run(config, ds, process, ClassifierApply(module), net_kind, None, mesh)
    module = build_network(config, num_classes(config, ds), ds.scaling.centered)
    net = NetApply(module)
    process = build_process(resolved, module)
    sampler = build_sampler(resolved)
    run = Run(config, ds, process, net, net_kind, sampler, mesh)
    check_sampler(run)
    return run


def build_network(config, num_classes: int | None, centered: bool):
    """The config's network module (labels: `num_classes`; inputs in [-1, 1] if `centered`)."""
    try:
        return kinds.NETS[config.model.name].build(config.model, num_classes, centered)
    except ValueError as e:
        raise ConfigError(f"model section: {e}") from e


def build_process(resolved, module) -> Process:
    """The (AUTO-resolved) config's process, handing `module` what it is conditioned on.

    The score SDE code's VE networks are conditioned on sigma itself (they
    embed log sigma and divide their output by sigma); every other network
    on 999 t.
    """
    try:
        process = kinds.PROCESSES[resolved.process.name].build(resolved.process)
    except ValueError as e:
        raise ConfigError(f"process section: {e}") from e
    needs = getattr(module, "noise_cond_kind", "time")
    conditioning = resolved.process.conditioning
    if conditioning == "auto":
        conditioning = needs
    elif needs == "sigma" and conditioning != "sigma":
        raise ConfigError(
            f"process.conditioning={conditioning!r}, but model.name={resolved.model.name!r} with "
            "these settings is conditioned on sigma itself (it divides its output by sigma or "
            "embeds log sigma); use process.conditioning='auto' or 'sigma'"
        )
    if conditioning != process.conditioning:
        try:
            process = dataclasses.replace(process, conditioning=conditioning)
        except ValueError as e:
            raise ConfigError(f"process.conditioning={conditioning!r}: {e}") from e
    return process


def build_sampler(resolved):
    """`(key, score_fn, process, shape) -> SamplerOutput` with the config's options bound."""
    s = resolved.sampling
    try:
        return kinds.SAMPLERS[s.method].build(s, s.num_steps or None)
    except ValueError as e:
        raise ConfigError(f"sampling section: {e}") from e


def check_sampler(run: Run) -> None:
    """Traces the sampler once with a stand-in score, so a bad option fails now, not later."""
    zero_score = lambda x, t: jnp.zeros_like(x)
    try:
        jax.eval_shape(
            lambda key: run.sampler(key, zero_score, run.process, (2, *run.data_shape)),
            jax.random.PRNGKey(0),
        )
    except ValueError as e:
        raise ConfigError(f"sampling section: {e}") from e


def expected_data_shape(config, ds: data.Dataset) -> tuple[tuple[int, ...], str]:
    """The per-example shape the config asks for, and the keys that say so."""
    if ds.kind == "image":
        d = config.data
        return (d.image_size, d.image_size, d.num_channels), (
            f"data.image_size={d.image_size}, data.num_channels={d.num_channels}"
        )
    return ds.data_shape, f"data.dataset={config.data.dataset!r}"


def num_classes(config, ds: data.Dataset) -> int | None:
    if not config.model.class_conditional:
        return None
    if ds.num_classes is None:
        raise ConfigError(f"model.class_conditional=True, but dataset {ds.name!r} has no labels")
    return ds.num_classes


_AUTO_CACHE: dict[tuple, noise_scales.NoiseScales] = {}


def resolve_auto(config, ds: data.Dataset):
    """The config with its AUTO (0) noise-scale keys computed from the training data.

    process.sigma_max, process.num_scales and sampling.step_size at 0 get
    NCSNv2's techniques 1, 2 and 4 (`noise_scales.suggest_noise_scales`, on
    the training split in model units; the step size for the levels the
    sampler visits and sampling.n_steps_each steps per level, in
    annealed_langevin's convention). Deterministic, so a resumed run or a
    sample run gets the same values; computed once per data and noise
    settings. Returns `config` itself when nothing is AUTO, else a copy.
    """
    auto = config_lib.auto_keys(config)
    if not auto:
        return config
    p, s = config.process, config.sampling
    cache_key = (config_lib.to_json(config.data), config.seed, p.name, p.sigma_min, p.sigma_max,
                 p.num_scales, s.num_steps, s.n_steps_each)  # fmt: skip
    if cache_key not in _AUTO_CACHE:
        x, _ = ds.model_data("train")
        try:
            found = noise_scales.suggest_noise_scales(
                x,
                num_steps_each=s.n_steps_each,
                sigma_min=p.sigma_min,
                sigma_max=p.sigma_max or None,
                num_scales=p.num_scales or None,
                seed=config.seed,
            )
            # The step size for the levels the sampler visits (a subset when num_steps is set).
            levels = s.num_steps or found.num_scales
            gamma = (found.sigma_max / p.sigma_min) ** (1.0 / max(levels - 1, 1))
            step = noise_scales.step_size_for(gamma, p.sigma_min, s.n_steps_each)
        except ValueError as e:
            raise ConfigError(f"{', '.join(k + '=0' for k in auto)} (auto): {e}") from e
        _AUTO_CACHE[cache_key] = found._replace(step_size=step, gamma=gamma)
        logger.info(
            "NCSNv2 noise scales from %d training examples: sigma_max=%.4g, num_scales=%d, "
            "step_size=%.4g (for %d steps per level); auto keys: %s",
            len(x), found.sigma_max, found.num_scales, step, s.n_steps_each, ", ".join(auto),
        )  # fmt: skip
    found = _AUTO_CACHE[cache_key]
    resolved = ml_collections.ConfigDict(config.to_dict())
    if p.sigma_max == config_lib.AUTO:
        resolved.process.sigma_max = found.sigma_max
    if p.num_scales == config_lib.AUTO:
        resolved.process.num_scales = found.num_scales
    if s.step_size == config_lib.AUTO:
        resolved.sampling.step_size = found.step_size
    return resolved


def restore(run: Run, wd: Workdir, checkpoint: str = "latest", on_corrupt: str = "raise"):
    """(step, TrainState) of the requested committed checkpoint; exit 5 if there is none."""
    ckpt = CheckpointManager(wd.checkpoints, read_only=True)
    latest = ckpt.latest_step()
    if latest is None:
        raise CheckpointError(
            f"no committed checkpoint found in {wd.checkpoints}: sampling and evaluation need a "
            "trained model (train first with --mode=train)"
        )
    step = latest if checkpoint == "latest" else int(checkpoint)
    state, _ = ckpt.restore(step, target=run.init_state(), on_corrupt=on_corrupt)
    ckpt.close()
    return int(state.step), state


def host_copy(x):
    """A device array as a NumPy array on this host (replicated arrays: this process's copy)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)
