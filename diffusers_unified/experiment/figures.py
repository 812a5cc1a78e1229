"""Pictures of samples: a scatter plot for vector data, a PNG grid for images."""

from __future__ import annotations

import math
import os

import numpy as np

from diffusers_unified.experiment.workdir import atomic_write


def image_grid(pixels: np.ndarray, columns: int | None = None) -> np.ndarray:
    """uint8 images (n, h, w, c) tiled into one (rows h + pad, cols w + pad, c) image."""
    n, h, w, c = pixels.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = (
            pixels[i]
        )
    return grid


def save_image_grid(path: str, pixels: np.ndarray, scale: int = 4) -> None:
    from PIL import Image

    grid = image_grid(pixels[:256])
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    image = image.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    image.save(tmp)
    os.replace(tmp, path)


def save_pngs(directory: str, pixels: np.ndarray) -> None:
    """uint8 images (n, h, w, c) as directory/000000.png ...: for outside tools (FID, viewers).

    Written into a temporary directory renamed into place, so `directory`
    appears complete or not at all.
    """
    from PIL import Image

    tmp = f"{directory}.tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    for i, image in enumerate(pixels):
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
            os.path.join(tmp, f"{i:06d}.png")
        )
    if os.path.exists(directory):
        import shutil

        shutil.rmtree(directory)
    os.replace(tmp, directory)


def save_scatter(
    path: str, samples: np.ndarray, reference: np.ndarray | None = None, title: str = ""
) -> None:
    """The first two coordinates of samples (and of reference data, in grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    if reference is not None:
        ax.scatter(reference[:, 0], reference[:, 1], s=1, c="0.75", label="data")
    ax.scatter(samples[:, 0], samples[:, 1], s=1, label="samples")
    lim = float(np.percentile(np.abs(reference if reference is not None else samples), 99.5))
    ax.set(xlim=(-1.2 * lim, 1.2 * lim), ylim=(-1.2 * lim, 1.2 * lim), aspect="equal", title=title)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def save_samples_figure(path: str, samples: np.ndarray, scaling, reference=None, title=""):
    """A grid for images (bounded data), a scatter plot for vectors."""
    if scaling.bounded and samples.ndim == 4:
        save_image_grid(path, scaling.to_uint8(samples))
    else:
        flat = samples.reshape(samples.shape[0], -1)
        ref = None if reference is None else reference.reshape(reference.shape[0], -1)
        save_scatter(path, flat, ref, title)


def save_npz(path: str, **arrays) -> None:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write(path, buffer.getvalue())
