"""Objects from config sections, through explicit `{name: constructor}` tables.

The tables are the only place where a config name meets a class or function;
`config.CHOICES` lists the same names, and a test checks that both agree.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import ml_collections

from diffusers_unified import losses, noise_scales, samplers
from diffusers_unified.data import datasets
from diffusers_unified.errors import ConfigError
from diffusers_unified.experiment import config as config_lib
from diffusers_unified.nets import MLP, NetApply, UNet
from diffusers_unified.processes import DDPM, NCSN, VESDE, VPSDE, Process, SubVPSDE

PROCESSES: dict[str, Callable] = {
    "vpsde": lambda p: VPSDE(beta_min=p.beta_min, beta_max=p.beta_max, N=p.num_scales),
    "subvpsde": lambda p: SubVPSDE(beta_min=p.beta_min, beta_max=p.beta_max, N=p.num_scales),
    "vesde": lambda p: VESDE(sigma_min=p.sigma_min, sigma_max=p.sigma_max, N=p.num_scales),
    "ddpm": lambda p: DDPM(
        N=p.num_scales, schedule=p.schedule, beta_start=p.beta_start, beta_end=p.beta_end
    ),
    "ncsn": lambda p: NCSN(sigma_min=p.sigma_min, sigma_max=p.sigma_max, N=p.num_scales),
}


logger = logging.getLogger("diffusers_unified")


def process(config, ds: datasets.Dataset | None = None) -> Process:
    """The config's process; AUTO noise scales come from `ds` (loaded if not given)."""
    config = resolve_auto(config, ds)
    try:
        return PROCESSES[config.process.name](config.process)
    except ValueError as e:
        raise ConfigError(f"process section: {e}") from e


_AUTO_CACHE: dict[tuple, noise_scales.NoiseScales] = {}


def resolve_auto(config, ds: datasets.Dataset | None = None):
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
        x, _ = (dataset(config) if ds is None else ds).model_data("train")
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


DATASETS: dict[str, Callable] = {
    "toy": lambda d, seed: datasets.toy_dataset(d.name, d.num_train, d.num_test, seed),
    "gmm": lambda d, seed: datasets.toy_dataset("gmm", d.num_train, d.num_test, seed),
    "digits": lambda d, seed: datasets.digits_dataset(
        centered=d.centered, test_size=d.num_test, seed=seed
    ),
    "npz": lambda d, seed: datasets.npz_dataset(
        d.path, centered=d.centered, test_size=d.num_test, seed=seed
    ),
    "image_folder": lambda d, seed: datasets.image_folder_dataset(
        d.path,
        d.image_size,
        num_channels=d.num_channels,
        centered=d.centered,
        test_size=d.num_test,
        seed=seed,
    ),
}


def dataset(config) -> datasets.Dataset:
    return DATASETS[config.data.dataset](config.data, config.seed)


def expected_data_shape(config, ds: datasets.Dataset) -> tuple[tuple[int, ...], str]:
    """The per-example shape the config asks for, and the keys that say so."""
    if ds.kind == "image":
        d = config.data
        return (d.image_size, d.image_size, d.num_channels), (
            f"data.image_size={d.image_size}, data.num_channels={d.num_channels}"
        )
    return ds.data_shape, f"data.dataset={config.data.dataset!r}"


NETS: dict[str, Callable] = {
    "mlp": lambda m, num_classes: MLP(
        hidden=tuple(m.hidden), emb_dim=m.emb_dim, embedding=m.embedding, num_classes=num_classes
    ),
    "unet": lambda m, num_classes: UNet(
        ch=m.nf,
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions),
        dropout=m.dropout,
        resamp_with_conv=m.resamp_with_conv,
        embedding=m.embedding,
        skip_rescale=m.skip_rescale,
        num_classes=num_classes,
    ),
}


def num_classes(config, ds: datasets.Dataset) -> int | None:
    if not config.model.class_conditional:
        return None
    if ds.num_classes is None:
        raise ConfigError(f"model.class_conditional=True, but dataset {ds.name!r} has no labels")
    return ds.num_classes


def network(config, ds: datasets.Dataset) -> NetApply:
    if config.model.name == "mlp" and ds.kind != "vector":
        raise ConfigError(
            f"model.name='mlp' takes vector data; dataset {ds.name!r} is images "
            "(use model.name='unet')"
        )
    if config.model.name == "unet" and ds.kind != "image":
        raise ConfigError(
            f"model.name='unet' takes images; dataset {ds.name!r} is vectors (use model.name='mlp')"
        )
    return NetApply(NETS[config.model.name](config.model, num_classes(config, ds)))


LOSSES: dict[str, Callable] = {
    "ddpm": lambda t, proc, net, param: losses.ddpm_loss(proc, net, param, t.reduce),
    "ncsn": lambda t, proc, net, param: losses.ncsn_loss(proc, net, param, t.reduce),
    "dsm": lambda t, proc, net, param: losses.dsm_loss(
        proc, net, param, t.weighting, t.reduce, t.t_min
    ),
    "ssm": lambda t, proc, net, param: losses.sliced_score_matching_loss(
        proc, net, param, t_min=t.t_min
    ),
}


def loss(config, proc: Process, net: NetApply):
    """The config's loss; with training.label_dropout, labels dropped to the net's null label."""
    fn = LOSSES[config.training.loss](config.training, proc, net, config.model.parametrization)
    null_label = getattr(net.module, "num_classes", None)
    if config.training.label_dropout > 0 and null_label is not None:
        fn = losses.with_label_dropout(fn, config.training.label_dropout, null_label)
    return fn


PREDICTORS: dict[str, Callable] = {
    "none": lambda s: samplers.NoPredictor(),
    "euler_maruyama": lambda s: samplers.EulerMaruyama(),
    "reverse_diffusion": lambda s: samplers.ReverseDiffusion(),
    "ancestral": lambda s: samplers.Ancestral(s.variance),
    "ddim": lambda s: samplers.DDIM(s.eta),
}
CORRECTORS: dict[str, Callable] = {
    "none": lambda s: samplers.NoCorrector(),
    "langevin": lambda s: samplers.Langevin(s.snr, s.n_steps_each),
    "ald": lambda s: samplers.AnnealedLangevin(s.snr, s.n_steps_each),
}
SAMPLERS: dict[str, Callable] = {
    "ancestral": lambda s, n: functools.partial(
        samplers.ancestral, num_steps=n, variance=s.variance
    ),
    "ddim": lambda s, n: functools.partial(samplers.ddim, num_steps=n, eta=s.eta),
    "ald": lambda s, n: functools.partial(
        samplers.annealed_langevin,
        num_steps=n,
        step_size=s.step_size,
        n_steps_each=s.n_steps_each,
        denoise=s.denoise,
    ),
    "pc": lambda s, n: functools.partial(
        samplers.predictor_corrector,
        predictor=PREDICTORS[s.predictor](s),
        corrector=CORRECTORS[s.corrector](s),
        num_steps=n,
        denoise=s.denoise,
    ),
    "ode": lambda s, n: functools.partial(
        samplers.probability_flow,
        method=s.ode_method,
        num_steps=n,
        rtol=s.rtol,
        atol=s.atol,
        denoise=s.denoise,
    ),
    # num_steps 0 gives their papers' defaults: 20 grid points, 18 levels (35 NFE).
    "dpm_solver": lambda s, n: functools.partial(
        samplers.dpm_solver, num_steps=n, denoise=s.denoise
    ),
    "edm_heun": lambda s, n: functools.partial(
        samplers.edm_heun, num_steps=n, scaling=s.edm_scaling
    ),
}


def sampler(config, ds: datasets.Dataset | None = None) -> Callable:
    """`(key, score_fn, process, shape) -> SamplerOutput` with the config's options bound.

    An AUTO sampling.step_size comes from `ds` (loaded if not given), see `resolve_auto`.
    """
    s = resolve_auto(config, ds).sampling
    try:
        return SAMPLERS[s.method](s, s.num_steps or None)
    except ValueError as e:
        raise ConfigError(f"sampling section: {e}") from e


def describe_sampler(config) -> str:
    s = config.sampling
    if s.method == "pc":
        return f"pc ({s.predictor} + {s.corrector})"
    if s.method == "ode":
        return f"ode ({s.ode_method})"
    if s.method == "edm_heun" and s.edm_scaling != "none":
        return f"edm_heun ({s.edm_scaling} scaling)"
    return s.method
