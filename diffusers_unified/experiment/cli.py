"""The launcher: `diffusers-unified --config=... --workdir=... --mode=train|sample|eval|describe`.

Also `python -m diffusers_unified`. `--config` is a config file, or a shipped
config by name (`--config=cifar10/ddpm`, `--config=vpsde/toy2d`); sample and
eval may leave it out to use the work directory's config.json. Overrides use
ml_collections' syntax, `--config.training.n_iters=100`.

Exit codes (see `diffusers_unified.errors`): 0 ok; 2 usage or config error,
or a work directory another process holds; 3 non-finite loss or gradients;
4 bad data; 5 missing, corrupt or incompatible checkpoint, or a failed save;
75 pre-empted after a good checkpoint (run the same command to resume); 1
anything else.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from diffusers_unified.errors import ConfigError, DiffusersUnifiedError
from diffusers_unified.experiment import config as config_lib
from diffusers_unified.experiment import writers

logger = logging.getLogger("diffusers_unified")

MODES = ("train", "sample", "eval", "describe")
FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file (e.g. my_config.py, configs/vpsde/toy2d.py) or a shipped config's name "
    "(cifar10/ddpm); optional for sample and eval, which then use the work directory's "
    "config.json.",
    lock_config=True,
)
flags.DEFINE_string("workdir", None, "Work directory: config, logs, checkpoints, outputs.")
flags.DEFINE_enum(
    "mode",
    "train",
    MODES,
    "What to do; describe prints the config's parameter count, FLOPs, data shape, process "
    "and sampler as one JSON line (no --workdir needed).",
)
flags.DEFINE_enum(
    "resume",
    "auto",
    ["auto", "required"],
    "train: resume from the newest checkpoint if any (auto), or insist on one.",
)
flags.DEFINE_string(
    "checkpoint",
    "latest",
    "sample: 'latest' or a step. eval: also every committed checkpoint in a range, "
    "'BEGIN:END' (both included; 'BEGIN:' ends at training.n_iters), or 'all'.",
)
flags.DEFINE_float(
    "wait_for_checkpoints",
    0.0,
    "eval: wait up to this many seconds for a checkpoint that is not there yet (a training "
    "run writing it), polling; 0: a missing checkpoint is an error at once (exit 5).",
)
flags.DEFINE_bool(
    "force_unlock",
    False,
    "Take the work directory's lock even if another process holds it (only when that "
    "process is dead: a lock of a dead process on this host is broken without asking).",
)
flags.DEFINE_enum(
    "log_level",
    "info",
    ["debug", "info", "warning", "error"],
    "Messages shown on stderr (log.txt keeps info and above); above info also hides the "
    "progress bars.",
)
flags.DEFINE_bool(
    "allow_config_change", False, "Resume or sample even if model, data or process keys changed."
)
flags.DEFINE_enum(
    "on_corrupt",
    "raise",
    ["raise", "fallback"],
    "A corrupt newest checkpoint: fail (exit 5), or set it aside and use the previous.",
)
flags.DEFINE_enum(
    "validate_data",
    "first",
    ["first", "all"],
    "Check the first data.validate_batches batches, or every batch.",
)
flags.DEFINE_bool(
    "debug_nans", False, "On a non-finite loss, rerun the failing update under jax_debug_nans."
)
flags.DEFINE_bool("strict_disk", False, "Fail (exit 5) if the checkpoints may not fit on disk.")


def _config_arg(argv: list[str]) -> tuple[int, int] | None:
    """(index in argv, index of its value) of the --config flag, or None."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return i, i
        if arg == "--config" and i + 1 < len(argv):
            return i, i + 1
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """Checks the config file and overrides against the schema, then parses the flags.

    Runs before JAX is initialised and before anything is written: unknown
    keys, wrong types and bad flag values exit with code 2 and a message.
    `--config` may name a shipped config (`cifar10/ddpm`) instead of a path:
    it is replaced by the file's path before ml_collections reads it.
    """
    if any(arg in ("--help", "-h", "--helpshort") for arg in argv[1:]):
        _print_help()
    try:
        found = _config_arg(argv)
        if found is not None:
            flag, at = found
            value = argv[at].split("=", 1)[1] if flag == at else argv[at]
            # config_flags calls get_config(arg) for `--config=file.py:arg`; check that config.
            file, sep, arg = value.partition(":")
            file = config_lib.resolve_config_path(file)
            argv = list(argv)
            argv[at] = f"--config={file}{sep}{arg}" if flag == at else f"{file}{sep}{arg}"
            module = config_lib.load_module(file)
            loaded = module.get_config(arg) if sep else module.get_config()
            config_lib.check_against_schema(loaded, source=value)
            config_lib.check_overrides(argv, loaded)
        else:
            # Without --config, sample and eval start from the work directory's
            # config.json; overrides apply to it (`resolve_config`), after the flags.
            _WORKDIR_OVERRIDES[:] = [a for a in argv if a.startswith("--config.")]
            argv = [a for a in argv if not a.startswith("--config.")]
        return FLAGS(argv)
    except ConfigError as e:
        _fail(str(e), 2)
    except flags.Error as e:
        _fail(f"bad command line: {e}", 2)


def _print_help() -> None:
    """Usage, this launcher's flags and the shipped configs; exit 0 (absl's --help exits 1
    and lists only the flags of `__main__`, which has none)."""
    print(__doc__)
    print("Flags:")
    print(FLAGS.module_help(__name__))
    print("\nShipped configs (--config=NAME): " + ", ".join(config_lib.shipped_configs()))
    print("All flags, absl's included: --helpfull")
    sys.exit(0)


def _fail(message: str, code: int):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _setup_logging(level: str = "info") -> None:
    from diffusers_unified.experiment import progress

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    handler.setLevel(getattr(logging, level.upper()))
    logger.handlers = [h for h in logger.handlers if h.get_name() == "du-workdir"] + [handler]
    # The logger passes info on to log.txt whatever stderr shows; debug only when asked.
    logger.setLevel(logging.DEBUG if level == "debug" else logging.INFO)
    progress.set_quiet(level not in ("debug", "info"))
    logger.propagate = False
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save at INFO


_WORKDIR_OVERRIDES: list[str] = []  # --config.a.b=value given without --config


def resolve_config(workdir: str):
    """The flag's config, or the work directory's config.json with the command line's
    `--config.a.b=value` overrides (sample and eval only)."""
    from diffusers_unified.experiment.workdir import Workdir

    if FLAGS.config is not None:
        return FLAGS.config
    if FLAGS.mode in ("train", "describe"):
        raise ConfigError(f"--mode={FLAGS.mode} needs --config=<file>")
    saved = Workdir(workdir).saved_config()
    if saved is None:
        raise ConfigError(f"no --config given and no config.json in {workdir}")
    saved = config_lib.fill_missing(saved, f"{workdir}/config.json")
    # How the training run's processes met; this run is on its own unless --config says.
    saved.distributed.enabled = False
    return config_lib.apply_overrides(saved, _WORKDIR_OVERRIDES, source=f"{workdir}/config.json")


def initialise_distributed(config) -> None:
    """Joins the other processes (jax.distributed.initialize) when the config asks."""
    d = config.distributed
    if not d.enabled:
        return
    import jax

    jax.config.update("jax_cpu_collectives_implementation", d.cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=d.coordinator_address or None,
        num_processes=d.num_processes,
        process_id=d.process_id,
    )
    if jax.process_index() != 0:
        logger.setLevel(logging.WARNING)  # process 0 reports progress; the rest only problems


def main(argv) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}", 2)
    if not FLAGS.workdir and FLAGS.mode != "describe":
        _fail("--workdir is required", 2)
    _setup_logging(FLAGS.log_level)
    try:
        config = resolve_config(FLAGS.workdir)
        config_lib.check_against_schema(config)
        config_lib.check_values(config)  # every rule but the device count's, before JAX starts
        writers.check_available(config)
        initialise_distributed(config)
        import jax

        config_lib.check_values(config, jax.device_count())
        _dispatch(config)
    except DiffusersUnifiedError as e:
        logger.error("%s", e)
        sys.exit(e.exit_code)
    except Exception:  # noqa: BLE001  anything unexpected: exit 1 with the traceback
        logger.exception("unexpected error")
        sys.exit(1)


def _dispatch(config) -> None:
    # Each mode imports only its own module: a train run needs neither the
    # likelihood code (diffrax) nor eval's metrics, about 1 s of imports.
    from diffusers_unified.experiment.workdir import Workdir

    if FLAGS.mode == "describe":
        from diffusers_unified.experiment import describe

        describe.main(config)
        return
    if FLAGS.mode == "train":
        from diffusers_unified.experiment import train

        train.train(
            config,
            FLAGS.workdir,
            resume=FLAGS.resume,
            allow_config_change=FLAGS.allow_config_change,
            on_corrupt=FLAGS.on_corrupt,
            validate_all=FLAGS.validate_data == "all",
            debug_nans=FLAGS.debug_nans,
            strict_disk=FLAGS.strict_disk,
            force_unlock=FLAGS.force_unlock,
        )
        return
    saved = Workdir(FLAGS.workdir).saved_config()
    if saved is not None and FLAGS.config is not None:
        config_lib.check_resume_compatible(saved, config, FLAGS.allow_config_change)
    common = dict(checkpoint=FLAGS.checkpoint, on_corrupt=FLAGS.on_corrupt)
    if FLAGS.mode == "sample":
        from diffusers_unified.experiment.sample import sample

        sample(config, FLAGS.workdir, force_unlock=FLAGS.force_unlock, **common)
    else:
        from diffusers_unified.experiment.evaluate import evaluate

        evaluate(
            config,
            FLAGS.workdir,
            wait=FLAGS.wait_for_checkpoints,
            force_unlock=FLAGS.force_unlock,
            **common,
        )


def run() -> None:
    """Console entry point."""
    app.run(main, flags_parser=parse_flags)
