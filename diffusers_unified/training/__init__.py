"""Training pieces: state (with EMA), optimiser, one update, checkpoints."""

from diffusers_unified.training.checkpoints import CheckpointManager, estimate_checkpoint_bytes
from diffusers_unified.training.optimizer import make_optimizer
from diffusers_unified.training.state import TrainState
from diffusers_unified.training.step import make_train_step

__all__ = [
    "CheckpointManager",
    "TrainState",
    "estimate_checkpoint_bytes",
    "make_optimizer",
    "make_train_step",
]
