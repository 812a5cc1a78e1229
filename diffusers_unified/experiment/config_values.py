"""The config's values: valid names, signs and ranges, and the rules that tie keys together.

`check(values)` runs on a config's flat {dotted key: value} dict (see
`config.check_values`) before JAX is imported, and raises a `ConfigError`
(exit code 2) that names the key, the rule and the value given.
"""

from __future__ import annotations

from diffusers_unified.errors import ConfigError
from diffusers_unified.experiment import kinds

# Valid values. Keys that name a kind take the names of its table in `kinds`; the
# others take a library module's option list, spelled here because these checks run
# before JAX (and so the library) is imported; tests/test_kinds.py checks that each
# list equals the library's.
CHOICES = {
    "data.dataset": tuple(kinds.DATASETS),
    "process.name": tuple(kinds.PROCESSES),
    "process.schedule": ("linear", "cosine"),  # processes.DDPM.SCHEDULES
    "model.name": tuple(kinds.NETS),
    "model.parametrization": ("eps", "x0", "score", "v"),  # parametrization.PARAMETRIZATIONS
    "model.embedding": ("sinusoidal", "fourier"),  # nets.EMBEDDINGS
    "model.dtype": ("float32", "bfloat16", "float16"),  # nets.layerspp.DTYPES
    "model.resblock_type": ("ddpm", "biggan"),  # nets.ncsnpp.RESBLOCK_TYPES
    "model.progressive": ("none", "output_skip", "residual"),  # nets.ncsnpp.PROGRESSIVE
    "model.progressive_input": ("none", "input_skip", "residual"),
    "model.progressive_combine": ("sum", "cat"),  # nets.ncsnpp.COMBINE
    "model.refinenet": ("ncsnv2", "ncsnv2_deeper", "ncsnv2_deepest"),  # nets.ARCHITECTURES
    "model.up_attention": ("per_level", "per_block"),  # nets.unet.UP_ATTENTION
    "training.loss": tuple(kinds.LOSSES),
    "training.task": ("score", "classifier"),
    "training.weighting": ("sigma2", "likelihood"),  # losses.WEIGHTINGS
    "training.reduce": ("mean", "sum"),  # losses.REDUCTIONS
    "optim.optimizer": ("adam", "adamw"),  # training.optimizer.OPTIMIZERS
    "sampling.method": tuple(kinds.SAMPLERS),
    "sampling.predictor": tuple(kinds.PREDICTORS),
    "sampling.corrector": tuple(kinds.CORRECTORS),
    "sampling.variance": ("reference", "small", "large"),  # samplers.pc.VARIANCES + reference
    "process.conditioning": ("auto", "time", "sigma", "index"),
    "sampling.ode_method": ("euler", "heun", "rk4", "dopri5", "tsit5"),  # samplers.ode.METHODS
    "sampling.edm_scaling": ("none", "vp"),  # samplers.fast.EDM_SCALINGS
    "eval.likelihood": ("ode", "bound", "all", "none"),
    "eval.divergence": ("exact", "hutchinson"),  # likelihood.DIVERGENCES
    "eval.probe": ("rademacher", "gaussian"),  # likelihood.PROBES
    "eval.ode_method": ("euler", "heun", "rk4", "dopri5", "tsit5"),  # samplers.ode.METHODS
    "eval.fid_split": ("train", "test"),
    "data.resample": ("bicubic", "bilinear", "lanczos", "box", "nearest"),  # data.pixels.RESAMPLE
}
# The library's option list each of those keys must equal (module, attribute).
LIBRARY_CHOICES = {
    "process.schedule": ("processes", "DDPM.SCHEDULES"),
    "model.parametrization": ("parametrization", "PARAMETRIZATIONS"),
    "model.embedding": ("nets", "EMBEDDINGS"),
    "model.dtype": ("nets.layerspp", "DTYPES"),
    "model.resblock_type": ("nets.ncsnpp", "RESBLOCK_TYPES"),
    "model.progressive": ("nets.ncsnpp", "PROGRESSIVE"),
    "model.progressive_input": ("nets.ncsnpp", "PROGRESSIVE_INPUT"),
    "model.progressive_combine": ("nets.ncsnpp", "COMBINE"),
    "model.refinenet": ("nets", "ARCHITECTURES"),
    "model.up_attention": ("nets.unet", "UP_ATTENTION"),
    "data.resample": ("data.pixels", "RESAMPLE"),
    "training.weighting": ("losses", "WEIGHTINGS"),
    "training.reduce": ("losses", "REDUCTIONS"),
    "optim.optimizer": ("training.optimizer", "OPTIMIZERS"),
    "sampling.ode_method": ("samplers.ode", "METHODS"),
    "sampling.edm_scaling": ("samplers.fast", "EDM_SCALINGS"),
    "eval.divergence": ("likelihood", "DIVERGENCES"),
    "eval.probe": ("likelihood", "PROBES"),
    "eval.ode_method": ("samplers.ode", "METHODS"),
}
POSITIVE_INTS = (
    "data.num_train",
    "data.num_test",
    "data.image_size",
    "process.num_scales",
    "training.batch_size",
    "training.n_iters",
    "training.log_freq",
    "training.checkpoint_freq",
    "training.keep",
    "sampling.n_steps_each",
    "sampling.num_samples",
    "sampling.batch_size",
    "eval.num_samples",
    "eval.num_likelihood",
    "eval.likelihood_batch",
    "eval.num_probes",
    "eval.num_steps",
    "eval.inception_batch",
    "model.num_groups",
    "eval.kid_reference",
    "eval.is_splits",
    "distributed.num_processes",
)
NON_NEGATIVE_INTS = (
    "data.validate_batches",
    "data.crop_size",
    "data.max_examples",
    "training.snapshot_freq",
    "training.eval_freq",
    "optim.warmup",
    "optim.skip_nonfinite",
    "sampling.num_steps",
    "distributed.process_id",
)
POSITIVE_FLOATS = (
    "model.fourier_scale",
    "model.norm_eps",
    "process.beta_max",
    "process.sigma_min",
    "process.sigma_max",
    "process.beta_start",
    "process.beta_end",
    "training.t_min",
    "optim.lr",
    "optim.eps",
    "sampling.snr",
    "sampling.edm_s_noise",
    "sampling.edm_s_tmax",
    "sampling.step_size",
    "sampling.rtol",
    "sampling.atol",
    "eval.rtol",
    "eval.t_min",
    "eval.atol",
)
UNIT_INTERVAL = (
    "model.ema_rate",
    "model.dropout",
    "optim.beta1",
    "optim.beta2",
    "sampling.eta",
    "training.label_dropout",
)
# Noise-scale keys that may say AUTO (0): the launcher then computes them from the
# training data with NCSNv2's techniques 1, 2 and 4 (`diffusers_unified.noise_scales`),
# for the variance-exploding processes.
AUTO = 0
AUTO_KEYS = ("process.sigma_max", "process.num_scales", "sampling.step_size")


def auto_keys(values: dict) -> list[str]:
    """The AUTO_KEYS that the config's flat values leave to be computed from the data."""
    return [key for key in AUTO_KEYS if values[key] == AUTO]


def check(values: dict, device_count: int | None = None) -> None:
    """Names, signs, ranges and the rules that tie keys together, on a config's flat values."""
    auto = auto_keys(values)
    for key, valid in CHOICES.items():
        if values[key] not in valid:
            raise ConfigError(f"{key}={values[key]!r} is not one of: {', '.join(valid)}")
    process = kinds.PROCESSES[values["process.name"]]
    if auto and not process.auto_noise_scales:
        able = sorted(name for name, kind in kinds.PROCESSES.items() if kind.auto_noise_scales)
        raise ConfigError(
            f"{', '.join(f'{k}=0' for k in auto)} (auto: NCSNv2's noise scales from the data) "
            f"needs process.name in {', '.join(able)}, got {values['process.name']!r}"
        )
    for key in POSITIVE_INTS:
        if values[key] <= 0 and key not in auto:
            raise ConfigError(f"{key}={values[key]} must be a positive integer")
    for key in NON_NEGATIVE_INTS:
        if values[key] < 0:
            raise ConfigError(f"{key}={values[key]} must be >= 0")
    for key in POSITIVE_FLOATS:
        if not values[key] > 0 and key not in auto:
            raise ConfigError(f"{key}={values[key]} must be > 0")
    for key in UNIT_INTERVAL:
        if not 0.0 <= values[key] <= 1.0 or (key == "model.ema_rate" and values[key] == 1.0):
            raise ConfigError(f"{key}={values[key]} must be in [0, 1)")
    if values["process.beta_min"] < 0 or values["process.beta_min"] >= values["process.beta_max"]:
        raise ConfigError(
            f"process.beta_min={values['process.beta_min']} must be in [0, process.beta_max="
            f"{values['process.beta_max']})"
        )
    if (
        values["process.sigma_min"] >= values["process.sigma_max"]
        and "process.sigma_max" not in auto
    ):
        raise ConfigError(
            f"process.sigma_min={values['process.sigma_min']} must be below process.sigma_max="
            f"{values['process.sigma_max']}"
        )
    if values["eval.likelihood"] == "bound" and not process.variational_bound:
        raise ConfigError(
            f"eval.likelihood='bound' is DDPM's variational bound, but process.name="
            f"{values['process.name']!r}; use 'ode' (any process) or 'all'"
        )
    _check_conditioning(values)
    _check_task(values)
    net = kinds.NETS[values["model.name"]]
    if values["model.dtype"] != "float32" and not net.mixed_precision:
        able = sorted(name for name, kind in kinds.NETS.items() if kind.mixed_precision)
        raise ConfigError(
            f"model.dtype={values['model.dtype']!r} needs a network with mixed precision "
            f"(model.name in {', '.join(able)}); model.name={values['model.name']!r} "
            "computes in float32"
        )
    if values["model.init_scale"] < 0:
        raise ConfigError(f"model.init_scale={values['model.init_scale']} must be >= 0")
    if kinds.DATASETS[values["data.dataset"]].needs_path and not values["data.path"]:
        raise ConfigError(f"data.dataset={values['data.dataset']!r} needs data.path")
    if values["data.num_channels"] not in (1, 3):
        raise ConfigError(f"data.num_channels={values['data.num_channels']} must be 1 or 3")
    if values["distributed.process_id"] >= values["distributed.num_processes"]:
        raise ConfigError(
            f"distributed.process_id={values['distributed.process_id']} must be below "
            f"distributed.num_processes={values['distributed.num_processes']}"
        )
    k = values["training.n_jitted_steps"]
    for key in (
        "training.n_iters",
        "training.log_freq",
        "training.checkpoint_freq",
        "training.snapshot_freq",
    ):
        if values[key] % k:
            raise ConfigError(
                f"{key}={values[key]} must be a multiple of training.n_jitted_steps={k}: "
                "updates run in compiled chunks of that many, and logs, checkpoints and "
                "snapshots happen between chunks"
            )
    # (sampling.batch_size is per device: every device draws whole shards of samples)
    key = "training.batch_size"
    if device_count and values[key] % device_count:
        raise ConfigError(
            f"{key}={values[key]} must be divisible by device count {device_count} "
            f"(per-device batch would be {values[key] / device_count:g})"
        )


def _check_task(values: dict) -> None:
    """Classifier training and guidance, importance sampling, EDM's churn: keys that go together."""
    if values["training.importance_sampling"] and not (
        values["training.loss"] == "dsm" and values["training.weighting"] == "likelihood"
    ):
        raise ConfigError(
            "training.importance_sampling=True draws t for the likelihood weighting: it needs "
            f"training.loss='dsm' and training.weighting='likelihood', got "
            f"{values['training.loss']!r} and {values['training.weighting']!r}"
        )
    if values["training.task"] == "classifier":
        net = kinds.NETS[values["model.name"]]
        if net.classifier is None:
            able = sorted(name for name, kind in kinds.NETS.items() if kind.classifier)
            raise ConfigError(
                f"training.task='classifier' needs model.name in {', '.join(able)} (an MLP "
                f"or a ResNet classifier), got {values['model.name']!r}"
            )
        if values["model.class_conditional"]:
            raise ConfigError(
                "training.task='classifier' trains p_t(y | x): model.class_conditional must be "
                "False"
            )
    if values["sampling.edm_s_churn"] < 0 or values["sampling.edm_s_tmin"] < 0:
        raise ConfigError("sampling.edm_s_churn and sampling.edm_s_tmin must be >= 0")
    if values["sampling.classifier_workdir"] and values["model.class_conditional"]:
        raise ConfigError(
            "sampling.classifier_workdir guides an unconditional score model with a "
            "classifier; model.class_conditional=True models use sampling.guidance_weight"
        )
    if values["sampling.classifier_workdir"] and values["sampling.classifier_scale"] < 0:
        raise ConfigError(
            f"sampling.classifier_scale={values['sampling.classifier_scale']} must be >= 0"
        )


def _check_conditioning(values: dict) -> None:
    """Label dropout and guidance need a class-conditional model (and guidance, dropout)."""
    conditional = values["model.class_conditional"]
    dropout, w = values["training.label_dropout"], values["sampling.guidance_weight"]
    if dropout > 0 and not conditional:
        raise ConfigError(
            f"training.label_dropout={dropout} needs model.class_conditional=True "
            "(it drops labels the model is conditioned on)"
        )
    if w < 0:
        raise ConfigError(f"sampling.guidance_weight={w} must be >= 0 (0 = no guidance)")
    if w > 0 and not (conditional and dropout > 0):
        raise ConfigError(
            f"sampling.guidance_weight={w} needs model.class_conditional=True and "
            "training.label_dropout > 0: guidance uses the unconditional score that the "
            "null label learns only under label dropout"
        )
    if values["sampling.class_label"] < -1:
        raise ConfigError(
            f"sampling.class_label={values['sampling.class_label']} must be -1 (classes in "
            "turn) or a label >= 0"
        )
    if values["sampling.class_label"] >= 0 and not (
        conditional or values["sampling.classifier_workdir"]
    ):
        raise ConfigError(
            f"sampling.class_label={values['sampling.class_label']} needs "
            "model.class_conditional=True or a guiding classifier (sampling.classifier_workdir)"
        )
