"""CelebA 64x64 config: the score SDE paper's NCSN++ (see ../formulations.py)."""
