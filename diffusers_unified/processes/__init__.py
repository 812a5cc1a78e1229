"""Noising processes: the VP, sub-VP and VE SDEs, and DDPM and NCSN as their discrete members."""

from diffusers_unified.processes.base import (
    NOISE_COND_SCALE,
    DiscreteProcess,
    Process,
    batch_broadcast,
    reverse_sde,
    transition,
)
from diffusers_unified.processes.ve import NCSN, VESDE
from diffusers_unified.processes.vp import DDPM, VPSDE, SubVPSDE

__all__ = [
    "DDPM",
    "NCSN",
    "NOISE_COND_SCALE",
    "VESDE",
    "VPSDE",
    "DiscreteProcess",
    "Process",
    "SubVPSDE",
    "batch_broadcast",
    "reverse_sde",
    "transition",
]
