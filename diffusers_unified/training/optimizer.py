"""The optimiser: one optax chain built from explicit settings."""

from __future__ import annotations

import optax

OPTIMIZERS = ("adam", "adamw")


def make_optimizer(
    name: str = "adam",
    lr: float = 2e-4,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    warmup: int = 0,
    grad_clip: float | None = 1.0,
) -> optax.GradientTransformation:
    """Global-norm clipping, then Adam or AdamW, with a linear learning-rate warmup.

    The score SDE reference code's recipe (Adam, lr 2e-4, warmup 5000 steps,
    clipping at 1); `grad_clip` None or <= 0 disables clipping, `warmup` 0
    disables the warmup.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    schedule = optax.linear_schedule(0.0, lr, warmup) if warmup > 0 else lr
    if name == "adam":
        core = optax.adam(schedule, b1=beta1, b2=beta2, eps=eps)
    else:
        core = optax.adamw(schedule, b1=beta1, b2=beta2, eps=eps, weight_decay=weight_decay)
    if grad_clip is None or grad_clip <= 0:
        return core
    return optax.chain(optax.clip_by_global_norm(grad_clip), core)
