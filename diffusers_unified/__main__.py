"""`python -m diffusers_unified`: the launcher (see experiment.cli)."""

from diffusers_unified.experiment.cli import run

run()
