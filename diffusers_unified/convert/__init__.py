"""Pretrained weights in: diffusers `UNet2DModel`, score SDE checkpoints, Inception-v3 (FID).

Each converter reads a local file with NumPy-only readers (safetensors' NumPy
API, flax serialization, `.npz`) and writes what this package loads; torch is
needed only to read pytorch-fid's `.pth` weights, as an optional extra.
"""
