"""One table of names per kind: process, network, loss, predictor, corrector, sampler, dataset.

Each table maps a config name to a row that builds the object from its
config section and carries the properties that other code asks about the
kind (does this process have DDPM's variational bound? does this network
take images?), so that no module compares names. The config schema's valid
values come from these tables (`config.CHOICES`), so a name exists once:
adding a sampler, a network or a dataset is one row here plus its module
(docs/architecture.md).

The config checks read these tables before JAX is imported (a bad config
fails in a fraction of a second, without initialising a backend), so the
library modules are imported by the builders, on first use (`_lib`).

The module is a little over 400 lines on purpose: seven short tables and the
builders of their rows, kept in one file so that a kind's name, builder and
properties are read in one place.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable


def _lib(module: str):
    """The library module `diffusers_unified.<module>`, imported when a builder runs."""
    return importlib.import_module(f"diffusers_unified.{module}")


# -- processes -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProcessKind:
    build: Callable  # the config's `process` section -> Process
    settings: tuple[str, ...]  # the keys of the `process` section it reads
    variational_bound: bool = False  # DDPM's discrete ELBO (likelihood.ddpm_bound) applies
    # Variance exploding: NCSNv2's techniques choose sigma_max, N and the Langevin step
    # size from the data when those keys are AUTO (0).
    auto_noise_scales: bool = False


PROCESSES: dict[str, ProcessKind] = {
    "vpsde": ProcessKind(
        lambda p: _lib("processes").VPSDE(beta_min=p.beta_min, beta_max=p.beta_max, N=p.num_scales),
        settings=("beta_min", "beta_max", "num_scales"),
    ),
    "subvpsde": ProcessKind(
        lambda p: _lib("processes").SubVPSDE(
            beta_min=p.beta_min, beta_max=p.beta_max, N=p.num_scales
        ),
        settings=("beta_min", "beta_max", "num_scales"),
    ),
    "vesde": ProcessKind(
        lambda p: _lib("processes").VESDE(
            sigma_min=p.sigma_min, sigma_max=p.sigma_max, N=p.num_scales
        ),
        settings=("sigma_min", "sigma_max", "num_scales"),
        auto_noise_scales=True,
    ),
    "ddpm": ProcessKind(
        lambda p: _lib("processes").DDPM(
            N=p.num_scales, schedule=p.schedule, beta_start=p.beta_start, beta_end=p.beta_end
        ),
        settings=("num_scales", "schedule", "beta_start", "beta_end"),
        variational_bound=True,
    ),
    "ncsn": ProcessKind(
        lambda p: _lib("processes").NCSN(
            sigma_min=p.sigma_min, sigma_max=p.sigma_max, N=p.num_scales
        ),
        settings=("sigma_min", "sigma_max", "num_scales"),
        auto_noise_scales=True,
    ),
}


# -- networks ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NetKind:
    # (the config's `model` section, num_classes or None, whether the data are centred)
    # -> Flax module
    build: Callable
    data: str  # the data kind it takes: "vector" or "image"
    # XLA:CPU (jaxlib 0.10) compiles the weight-gradient convolutions of an update inside
    # a `lax.scan` to naive loops (37 s against 2 s per U-Net update at batch 128), so on
    # CPU a convolutional network's updates are dispatched one compiled call each.
    convolutional: bool = False
    mixed_precision: bool = False  # takes model.dtype (activations in bfloat16 / float16)
    # training.task=classifier: (the `model` section, num_classes) -> the noise-conditional
    # classifier of this kind of data, or None if the kind has none
    classifier: Callable | None = None


def _ncsnpp(m, num_classes, centered):
    return _lib("nets").NCSNpp(
        nf=m.nf,
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions),
        dropout=m.dropout,
        resamp_with_conv=m.resamp_with_conv,
        fir=m.fir,
        fir_kernel=tuple(m.fir_kernel),
        resblock_type=m.resblock_type,
        progressive=m.progressive,
        progressive_input=m.progressive_input,
        progressive_combine=m.progressive_combine,
        skip_rescale=m.skip_rescale,
        embedding_type={"sinusoidal": "positional", "fourier": "fourier"}[m.embedding],
        fourier_scale=m.fourier_scale,
        init_scale=m.init_scale,
        conditional=m.noise_conditional,
        scale_by_sigma=m.scale_by_sigma,
        centered=centered,
        num_classes=num_classes,
        dtype=m.dtype,
    )


def _refinenet(m, num_classes, centered):
    nets = _lib("nets")
    return nets.RefineNet(
        ngf=m.nf,
        scale_by_sigma=m.scale_by_sigma,
        centered=centered,
        dtype=m.dtype,
        **nets.refinenet_kwargs(m.refinenet, score_sde_port=m.score_sde_port),
    )


NETS: dict[str, NetKind] = {
    "mlp": NetKind(
        lambda m, num_classes, centered: _lib("nets").MLP(
            hidden=tuple(m.hidden),
            emb_dim=m.emb_dim,
            embedding=m.embedding,
            num_classes=num_classes,
        ),
        data="vector",
        classifier=lambda m, num_classes: _lib("nets").MLPClassifier(
            num_classes=num_classes,
            hidden=tuple(m.hidden),
            emb_dim=m.emb_dim,
            embedding=m.embedding,
            fourier_scale=m.fourier_scale,
        ),
    ),
    "unet": NetKind(
        lambda m, num_classes, centered: _lib("nets").UNet(
            ch=m.nf,
            ch_mult=tuple(m.ch_mult),
            num_res_blocks=m.num_res_blocks,
            attn_resolutions=tuple(m.attn_resolutions),
            dropout=m.dropout,
            resamp_with_conv=m.resamp_with_conv,
            embedding=m.embedding,
            fourier_scale=m.fourier_scale,
            skip_rescale=m.skip_rescale,
            up_attention=m.up_attention,
            num_groups=m.num_groups,
            norm_eps=m.norm_eps,
            num_classes=num_classes,
            dtype=m.dtype,
        ),
        data="image",
        convolutional=True,
        mixed_precision=True,
        classifier=lambda m, num_classes: _lib("nets").ResNetClassifier(
            num_classes=num_classes,
            ch=m.nf,
            ch_mult=tuple(m.ch_mult),
            num_res_blocks=m.num_res_blocks,
            dropout=m.dropout,
            embedding=m.embedding,
            fourier_scale=m.fourier_scale,
            num_groups=m.num_groups,
        ),
    ),
    "ncsnpp": NetKind(_ncsnpp, data="image", convolutional=True, mixed_precision=True),
    # NCSNv2 (Song and Ermon 2020): unconditional but for the division by sigma; no labels.
    "refinenet": NetKind(_refinenet, data="image", convolutional=True, mixed_precision=True),
}


# -- losses --------------------------------------------------------------------------------------

# (the `training` section, process, network apply function, parametrization) -> LossFn
LOSSES: dict[str, Callable] = {
    "ddpm": lambda t, proc, net, param: _lib("losses").ddpm_loss(proc, net, param, t.reduce),
    "ncsn": lambda t, proc, net, param: _lib("losses").ncsn_loss(proc, net, param, t.reduce),
    "dsm": lambda t, proc, net, param: _lib("losses").dsm_loss(
        proc,
        net,
        param,
        t.weighting,
        t.reduce,
        t.t_min,
        importance_sampling=t.importance_sampling,
    ),
    "ssm": lambda t, proc, net, param: _lib("losses").sliced_score_matching_loss(
        proc, net, param, t_min=t.t_min
    ),
}


# -- samplers ------------------------------------------------------------------------------------


def variance(sampling) -> str | None:
    """sampling.variance as the samplers take it: None for each process's reference choice."""
    return None if sampling.variance == "reference" else sampling.variance


# the `sampling` section -> a predictor / corrector of the predictor-corrector sampler
PREDICTORS: dict[str, Callable] = {
    "none": lambda s: _lib("samplers").NoPredictor(),
    "euler_maruyama": lambda s: _lib("samplers").EulerMaruyama(),
    "reverse_diffusion": lambda s: _lib("samplers").ReverseDiffusion(),
    "ancestral": lambda s: _lib("samplers").Ancestral(variance(s), s.clip_x0),
    "ddim": lambda s: _lib("samplers").DDIM(s.eta, s.clip_x0),
}
CORRECTORS: dict[str, Callable] = {
    "none": lambda s: _lib("samplers").NoCorrector(),
    "langevin": lambda s: _lib("samplers").Langevin(s.snr, s.n_steps_each),
    "ald": lambda s: _lib("samplers").AnnealedLangevin(s.snr, s.n_steps_each),
}


@dataclasses.dataclass(frozen=True)
class SamplerKind:
    # (the `sampling` section, num_steps or None) -> (key, score_fn, process, shape) -> output
    build: Callable
    # A short description of the configured sampler, for tables and figure titles.
    describe: Callable = lambda s: s.method


SAMPLERS: dict[str, SamplerKind] = {
    "ancestral": SamplerKind(
        lambda s, n: functools.partial(
            _lib("samplers").ancestral, num_steps=n, variance=variance(s), clip_x0=s.clip_x0
        )
    ),
    "ddim": SamplerKind(
        lambda s, n: functools.partial(
            _lib("samplers").ddim, num_steps=n, eta=s.eta, clip_x0=s.clip_x0
        )
    ),
    "ald": SamplerKind(
        lambda s, n: functools.partial(
            _lib("samplers").annealed_langevin,
            num_steps=n,
            step_size=s.step_size,
            n_steps_each=s.n_steps_each,
            denoise=s.denoise,
        )
    ),
    "pc": SamplerKind(
        lambda s, n: functools.partial(
            _lib("samplers").predictor_corrector,
            predictor=PREDICTORS[s.predictor](s),
            corrector=CORRECTORS[s.corrector](s),
            num_steps=n,
            denoise=s.denoise,
        ),
        describe=lambda s: f"pc ({s.predictor} + {s.corrector})",
    ),
    "ode": SamplerKind(
        lambda s, n: functools.partial(
            _lib("samplers").probability_flow,
            method=s.ode_method,
            num_steps=n,
            rtol=s.rtol,
            atol=s.atol,
            denoise=s.denoise,
        ),
        describe=lambda s: f"ode ({s.ode_method})",
    ),
    # num_steps 0 gives their papers' defaults: 20 grid points, 18 levels (35 NFE).
    "dpm_solver": SamplerKind(
        lambda s, n: functools.partial(_lib("samplers").dpm_solver, num_steps=n, denoise=s.denoise)
    ),
    "edm_stochastic": SamplerKind(
        lambda s, n: functools.partial(
            _lib("samplers").edm_stochastic,
            **({} if n is None else {"num_steps": n}),
            S_churn=s.edm_s_churn,
            S_tmin=s.edm_s_tmin,
            S_tmax=s.edm_s_tmax,
            S_noise=s.edm_s_noise,
            scaling=s.edm_scaling,
        ),
        describe=lambda s: f"edm_stochastic (S_churn {s.edm_s_churn:g})",
    ),
    "edm_heun": SamplerKind(
        lambda s, n: functools.partial(
            _lib("samplers").edm_heun, num_steps=n, scaling=s.edm_scaling
        ),
        describe=lambda s: (
            f"edm_heun ({s.edm_scaling} scaling)" if s.edm_scaling != "none" else "edm_heun"
        ),
    ),
}


def describe_sampler(sampling) -> str:
    """The configured sampler in a few words, e.g. "pc (reverse_diffusion + langevin)"."""
    return SAMPLERS[sampling.method].describe(sampling)


# -- datasets ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetKind:
    build: Callable  # (the config's `data` section, seed) -> data.Dataset
    needs_path: bool = False  # reads the user's file or folder at data.path
    images: bool = False  # its examples are (image_size, image_size, num_channels) images


DATASETS: dict[str, DatasetKind] = {
    "toy": DatasetKind(
        lambda d, seed: _lib("data").toy_dataset(d.name, d.num_train, d.num_test, seed)
    ),
    "gmm": DatasetKind(
        lambda d, seed: _lib("data").toy_dataset("gmm", d.num_train, d.num_test, seed)
    ),
    "digits": DatasetKind(
        lambda d, seed: _lib("data").digits_dataset(
            centered=d.centered, test_size=d.num_test, seed=seed
        ),
        images=True,
    ),
    # An .npz file holds vectors or images: its shape is what the file says.
    "npz": DatasetKind(
        lambda d, seed: _lib("data").npz_dataset(
            d.path, centered=d.centered, test_size=d.num_test, seed=seed
        ),
        needs_path=True,
    ),
    "image_folder": DatasetKind(
        lambda d, seed: _lib("data").image_folder_dataset(
            d.path,
            d.image_size,
            test_size=d.num_test,
            seed=seed,
            max_examples=d.max_examples,
            progress=True,
            **_image_options(d),
        ),
        needs_path=True,
        images=True,
    ),
    # CIFAR's python batches: the official train / test split, whatever data.num_test says.
    "cifar10": DatasetKind(
        lambda d, seed: _lib("data").cifar_dataset(
            d.path, centered=d.centered, name="cifar10", max_examples=d.max_examples
        ),
        needs_path=True,
        images=True,
    ),
    "cifar100": DatasetKind(
        lambda d, seed: _lib("data").cifar_dataset(
            d.path, centered=d.centered, name="cifar100", max_examples=d.max_examples
        ),
        needs_path=True,
        images=True,
    ),
    # Optional libraries; data.path, when set, is TFDS's data_dir or the datasets cache_dir.
    "tfds": DatasetKind(
        lambda d, seed: _lib("data").tfds_dataset(
            d.tfds_name, data_dir=d.path or None, **_external_options(d, seed)
        ),
        images=True,
    ),
    "hf": DatasetKind(
        lambda d, seed: _lib("data").hf_dataset(
            d.hf_name, cache_dir=d.path or None, **_external_options(d, seed)
        ),
        images=True,
    ),
    # No data, only the config's image shape: for imported models sampled without their data.
    "none": DatasetKind(
        lambda d, seed: _lib("data").shape_only_dataset(
            d.image_size, d.num_channels, centered=d.centered
        ),
        images=True,
    ),
}


def _image_options(d) -> dict:
    """How the image builders decode, crop and resize (the `data` section's keys)."""
    return dict(
        num_channels=d.num_channels,
        centered=d.centered,
        crop_size=d.crop_size,
        resample=d.resample,
    )


def _external_options(d, seed) -> dict:
    """The options that `tfds_dataset` and `hf_dataset` share."""
    return dict(
        split_train=d.split_train,
        split_test=d.split_test,
        image_size=d.image_size,
        image_key=d.image_key,
        label_key=d.label_key,
        max_examples=d.max_examples,
        test_size=d.num_test,
        seed=seed,
        **_image_options(d),
    )
