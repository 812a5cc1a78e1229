"""CIFAR-10 configs: the DDPM, NCSNv2 and score SDE papers' models (see ../formulations.py)."""
