"""vpsde on the toy2d and digits presets (see ../formulations.py)."""
