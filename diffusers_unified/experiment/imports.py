"""`diffusers-unified-convert`: weights trained elsewhere in, as files this package runs.

    diffusers-unified-convert inception --weights=pt_inception-2015-12-05-6726825d.pth --out=F
    diffusers-unified-convert diffusers --model=DIR --workdir=W [--scheduler=DIR]
    diffusers-unified-convert score_sde --checkpoint=FILE --config=FILE --workdir=W

`inception` writes the FID Inception-v3's weights (`eval.inception_weights`)
from pytorch-fid's file (torch is needed for this one read). `diffusers` and
`score_sde` write a work directory of this package: its config.json (the
process, network, parametrization and sampler of the source, derived from
configs/default.py and checked like any config) and a committed checkpoint
(step 0 for diffusers, the source's step for score SDE) whose parameters and
EMA parameters are the imported weights. Afterwards `--mode=sample` and
`--mode=eval` run on it with any sampler (`--config.sampling.*`), and
`diffusers_unified.load(workdir)` opens it from Python.

- diffusers: a `UNet2DModel` directory (`config.json` and
  `diffusion_pytorch_model.safetensors`, read with safetensors' NumPy API)
  and its DDPM / DDIM `scheduler_config.json` (`--scheduler`, default the
  model directory, its parent or its `scheduler/` subfolder): a DDPM
  process with the scheduler's betas, the network conditioned on the
  timestep index, eps / x0 / v as the scheduler predicts, ancestral
  sampling with its variance and clipping.
- score SDE: a checkpoint file of the score SDE code (flax msgpack; the EMA
  parameters unless `--which=params`) and its config (the `.py` file, with
  the score SDE repository's `configs/` package beside it, or a `.json` of
  `config.to_dict()`): its SDE (VP, sub-VP, VE; DDPM for the discrete VP),
  NCSN++ / DDPM++ or NCSNv2 network, and predictor-corrector settings
  (the discrete VP and VE, `training.continuous = False`, are this package's
  DDPM and NCSN processes).

The data section is "none" (the image shape only, enough to sample) unless
`--dataset` / `--data_path` name the data to evaluate against. The work
directory is written under a temporary name and renamed into place, so it
exists whole or not at all. Exit codes as the launcher's: 2 usage or config
error, 5 missing or mismatched weights, 1 anything else.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys

from diffusers_unified.errors import CheckpointError, ConfigError, DiffusersUnifiedError
from diffusers_unified.experiment import config as config_lib

logger = logging.getLogger("diffusers_unified")


# -- diffusers ------------------------------------------------------------------------------------


def diffusers_config(unet: dict, scheduler: dict, image_size: int, channels: int):
    """This package's config for a converted diffusers UNet2DModel and its scheduler."""
    if scheduler["beta_schedule"] is None:
        raise ConfigError(
            "the scheduler's betas (beta_schedule scaled_linear, sigmoid or trained_betas) are "
            "not a DDPM schedule this package's process has (linear or squaredcos_cap_v2)"
        )
    config = config_lib.default_config()
    p = config.process
    p.name, p.num_scales = "ddpm", scheduler["num_train_timesteps"]
    p.schedule = scheduler["beta_schedule"]
    p.beta_start, p.beta_end = scheduler["beta_start"], scheduler["beta_end"]
    p.conditioning = "index"  # diffusers' networks take the timestep 0 .. N - 1
    m = config.model
    m.name, m.parametrization = "unet", scheduler["parametrization"]
    m.nf, m.ch_mult, m.num_res_blocks = unet["ch"], tuple(unet["ch_mult"]), unet["num_res_blocks"]
    m.attn_resolutions, m.dropout = tuple(unet["attn_resolutions"]), unet["dropout"]
    m.resamp_with_conv, m.embedding = unet["resamp_with_conv"], unet["embedding"]
    m.skip_rescale, m.up_attention = unet["skip_rescale"], unet["up_attention"]
    m.num_groups, m.norm_eps = unet["num_groups"], unet["norm_eps"]
    config.training.loss = "ddpm"
    s = config.sampling
    s.method, s.variance, s.clip_x0 = "ancestral", scheduler["variance"], scheduler["clip_x0"]
    _image_data(config, image_size, channels, centered=True)
    return config


def import_diffusers(model_dir: str, workdir: str, scheduler_dir: str | None = None, **data):
    from diffusers_unified.convert import diffusers as conv

    unet, params = conv.load_unet2d(model_dir)
    if scheduler_dir is None:
        candidates = [model_dir, os.path.dirname(os.path.normpath(model_dir))]
        scheduler_dir = next(
            (c for c in candidates if _has_scheduler(c)), model_dir
        )  # a pipeline directory holds unet/ and scheduler/ side by side
    scheduler = conv.load_ddpm_scheduler(scheduler_dir)
    options = conv.read_config(os.path.join(model_dir, conv.CONFIG))
    size = options.get("sample_size", 32)
    size = size[0] if isinstance(size, list | tuple) else size
    config = diffusers_config(unet, scheduler, int(size), int(options.get("in_channels", 3)))
    _with_data(config, **data)
    source = {"format": "diffusers", "model": os.path.abspath(model_dir)}
    return write_workdir(workdir, config, params, step=0, source=source)


def _has_scheduler(directory: str) -> bool:
    from diffusers_unified.convert.diffusers import SCHEDULER_CONFIG

    return any(
        os.path.isfile(os.path.join(directory, *parts, SCHEDULER_CONFIG))
        for parts in ((), ("scheduler",))
    )


# -- score SDE ------------------------------------------------------------------------------------

_PREDICTORS = {
    "euler_maruyama": "euler_maruyama",
    "reverse_diffusion": "reverse_diffusion",
    "ancestral_sampling": "ancestral",
    "none": "none",
}
_CORRECTORS = {"langevin": "langevin", "ald": "ald", "none": "none"}


def read_score_sde_config(path: str) -> dict:
    """A score SDE config as a plain dict: a `.json` of it, or the `.py` file itself.

    The `.py` files import `configs.default_*_configs` from the score SDE
    repository: its root (the parent of `configs/`) is put first on the path
    while the file loads.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"score SDE config {path} does not exist")
    if path.endswith(".json"):
        with open(path) as f:
            return json.load(f)
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if os.path.basename(os.path.dirname(os.path.dirname(path))) == "configs":  # configs/ve/x.py
        root = os.path.dirname(root)
    saved = {k: v for k, v in sys.modules.items() if k == "configs" or k.startswith("configs.")}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, root)
    try:
        spec = importlib.util.spec_from_file_location("_score_sde_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config().to_dict()
    except Exception as e:  # noqa: BLE001  any error in the reference's file is a config error
        raise ConfigError(
            f"score SDE config {path} failed to load ({type(e).__name__}: {e}); pass the file "
            "inside the score SDE repository's configs/ folder, or a .json of config.to_dict()"
        ) from e
    finally:
        sys.path.remove(root)
        for k in [k for k in sys.modules if k == "configs" or k.startswith("configs.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def score_sde_config(reference: dict):
    """This package's config for a score SDE config (a plain dict)."""
    from diffusers_unified.convert.score_sde import module_kwargs_from_score_sde_config

    ref_model, ref_data = reference["model"], reference["data"]
    training, sampling = reference.get("training", {}), reference.get("sampling", {})
    centered = bool(ref_data.get("centered", False))
    kwargs = module_kwargs_from_score_sde_config(ref_model, centered=centered)
    config = config_lib.default_config()
    m, p = config.model, config.process
    if ref_model["name"] == "ncsnpp":
        if kwargs.get("act", "swish") != "swish":
            raise ConfigError(f"model.nonlinearity={kwargs['act']!r}: only swish is configurable")
        m.name = "ncsnpp"
        for key in ("nf", "num_res_blocks", "dropout", "resamp_with_conv", "fir"):
            m[key] = kwargs[key]
        for key in ("ch_mult", "attn_resolutions", "fir_kernel"):
            m[key] = tuple(kwargs[key])
        for key in ("resblock_type", "progressive", "progressive_input", "progressive_combine"):
            m[key] = kwargs[key]
        m.skip_rescale, m.init_scale = kwargs["skip_rescale"], float(kwargs["init_scale"])
        m.embedding = {"positional": "sinusoidal", "fourier": "fourier"}[kwargs["embedding_type"]]
        m.fourier_scale = float(kwargs.get("fourier_scale", m.fourier_scale))
        m.noise_conditional, m.scale_by_sigma = kwargs["conditional"], kwargs["scale_by_sigma"]
    else:
        if (
            kwargs.get("act", "elu") != "elu"
            or kwargs.get("interpolation", "bilinear") != "bilinear"
        ):
            raise ConfigError("NCSNv2: only ELU and bilinear interpolation are configurable")
        from diffusers_unified.convert.score_sde import _NCSNV2_ARCHITECTURES

        m.name, m.nf = "refinenet", kwargs["ngf"]
        m.refinenet = _NCSNV2_ARCHITECTURES[ref_model["name"]]
        m.score_sde_port, m.scale_by_sigma = True, kwargs["scale_by_sigma"]
    m.ema_rate = float(ref_model.get("ema_rate", m.ema_rate))
    sde, continuous = training.get("sde", "vpsde"), training.get("continuous", True)
    n = int(ref_model.get("num_scales", 1000))
    if sde in ("vpsde", "subvpsde"):
        beta_min, beta_max = float(ref_model["beta_min"]), float(ref_model["beta_max"])
        if sde == "vpsde" and not continuous:  # the score SDE code's discrete VP is DDPM
            p.name, p.num_scales, p.schedule = "ddpm", n, "linear"
            p.beta_start, p.beta_end, p.conditioning = beta_min / n, beta_max / n, "index"
        else:
            p.name, p.beta_min, p.beta_max, p.num_scales = sde, beta_min, beta_max, n
            p.conditioning = "time"
        m.parametrization = "eps"  # its VP score is -model / std
    elif sde == "vesde":  # SMLD: the discrete VE, NCSN, when not continuous
        p.name, p.num_scales = ("vesde" if continuous else "ncsn"), n
        p.sigma_min, p.sigma_max = float(ref_model["sigma_min"]), float(ref_model["sigma_max"])
        p.conditioning = "sigma"  # its VE networks are fed sigma (a table lookup when discrete)
        m.parametrization = "score"  # its VE networks predict the score (divided by sigma)
    else:
        raise ConfigError(f"training.sde={sde!r}; valid: vpsde, subvpsde, vesde")
    s = config.sampling
    if sampling.get("method", "pc") == "ode" or sampling.get("probability_flow", False):
        s.method = "ode"
    else:
        s.method = "pc"
        s.predictor = _PREDICTORS.get(sampling.get("predictor", "euler_maruyama"), "none")
        s.corrector = _CORRECTORS.get(sampling.get("corrector", "none"), "none")
    s.snr = float(sampling.get("snr", s.snr))
    s.n_steps_each = int(sampling.get("n_steps_each", s.n_steps_each))
    s.denoise = bool(sampling.get("noise_removal", True))
    size, channels = int(ref_data["image_size"]), int(ref_data.get("num_channels", 3))
    _image_data(config, size, channels, centered=centered)
    return config


def import_score_sde(checkpoint: str, reference_config: str, workdir: str, which="ema", **data):
    from diffusers_unified.convert.score_sde import (
        load_score_sde_checkpoint,
        module_from_score_sde_config,
        score_sde_step,
    )

    reference = read_score_sde_config(reference_config)
    config = score_sde_config(reference)
    _with_data(config, **data)
    params = load_score_sde_checkpoint(checkpoint, reference, which)
    step = score_sde_step(checkpoint)
    expected = module_from_score_sde_config(reference)
    source = {"format": "score_sde", "checkpoint": os.path.abspath(checkpoint), "which": which}
    return write_workdir(workdir, config, params, step=step, source=source, module=expected)


# -- common ------------------------------------------------------------------------------------


def _image_data(config, size: int, channels: int, *, centered: bool) -> None:
    d = config.data
    d.dataset, d.image_size, d.num_channels, d.centered = "none", size, channels, centered
    config.sampling.num_samples = config.sampling.batch_size = 64
    config.eval.num_samples = 64


def _with_data(config, dataset: str = "none", data_path: str = "") -> None:
    config.data.dataset, config.data.path = dataset, data_path


def write_workdir(workdir: str, config, params, *, step: int, source: dict, module=None) -> str:
    """A work directory holding `config` and a committed checkpoint of `params` at `step`."""
    import jax

    from diffusers_unified.experiment.run import build_network, build_run, host_copy
    from diffusers_unified.experiment.workdir import Workdir
    from diffusers_unified.training.checkpoints import CheckpointManager

    config_lib.check_against_schema(config, source="the imported config")
    config_lib.check_values(config)
    if os.path.exists(workdir) and os.listdir(workdir):
        raise ConfigError(f"--workdir {workdir} exists and is not empty; choose a new one")
    if module is not None:  # the config must build exactly the network the weights are for
        built = build_network(config, None, config.data.centered)
        if built != module:
            raise ConfigError(f"internal: the config builds {built}, not {module}")
    run = build_run(config)
    state = run.init_state()
    expected = jax.tree.map(lambda a: (a.shape, str(a.dtype)), state.params)
    found = jax.tree.map(lambda a: (a.shape, str(a.dtype)), params)
    if jax.tree.structure(expected) != jax.tree.structure(found) or expected != found:
        raise CheckpointError(
            "the converted weights do not fit the network the config builds "
            f"(expected {_summary(expected)}, found {_summary(found)})"
        )
    params = jax.tree.map(lambda a: jax.numpy.asarray(a, jax.numpy.float32), params)
    state = state.replace(params=params, ema_params=params, step=jax.numpy.asarray(step, "int32"))
    tmp = f"{os.path.abspath(workdir).rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        wd = Workdir(tmp)
        wd.create()
        wd.save_config(config)
        with CheckpointManager(wd.checkpoints) as ckpt:
            ckpt.save(step, jax.tree.map(host_copy, state), metadata={"step": step, **source})
        with open(os.path.join(tmp, "imported.json"), "w") as f:
            json.dump(source, f, indent=2)
        if os.path.isdir(workdir):
            os.rmdir(workdir)  # empty (checked above)
        os.replace(tmp, workdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return workdir


def _summary(tree) -> str:
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return f"{len(leaves)} arrays, e.g. " + ", ".join(
        f"{jax.tree_util.keystr(p)}: {v}" for p, v in leaves[:2]
    )


# -- the command ----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusers-unified-convert",
        description="Convert weights trained elsewhere into files this package runs.",
    )
    sub = parser.add_subparsers(dest="what", required=True)
    inception = sub.add_parser("inception", help="pytorch-fid's FID Inception-v3 weights")
    inception.add_argument("--weights", required=True, help="pt_inception-2015-12-05-6726825d.pth")
    inception.add_argument("--out", required=True, help="output .npz (eval.inception_weights)")
    for name, what in (("diffusers", "a diffusers UNet2DModel"), ("score_sde", "a score SDE")):
        p = sub.add_parser(name, help=f"{what} checkpoint -> a work directory")
        if name == "diffusers":
            p.add_argument("--model", required=True, help="the UNet2DModel directory")
            p.add_argument("--scheduler", default=None, help="scheduler_config.json or its dir")
        else:
            p.add_argument("--checkpoint", required=True, help="checkpoint_<n> (flax msgpack)")
            p.add_argument("--config", required=True, help="its config (.py in the repo, or .json)")
            p.add_argument("--which", default="ema", choices=("ema", "params"))
        p.add_argument("--workdir", required=True, help="the work directory to write (new)")
        p.add_argument("--dataset", default="none", help="data.dataset of the work directory")
        p.add_argument("--data_path", default="", help="data.path of the work directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # exits with 2 on a usage error
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.what == "inception":
            from diffusers_unified.convert.inception import convert_pytorch_fid_weights

            out = convert_pytorch_fid_weights(args.weights, args.out)
        else:
            data = {"dataset": args.dataset, "data_path": args.data_path}
            if args.what == "diffusers":
                out = import_diffusers(args.model, args.workdir, args.scheduler, **data)
            else:
                out = import_score_sde(
                    args.checkpoint, args.config, args.workdir, args.which, **data
                )
    except DiffusersUnifiedError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"wrote {out}")
    return 0


def run() -> None:
    """Console entry point."""
    sys.exit(main())
