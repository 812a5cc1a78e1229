"""The Inception-v3 network of FID (the TF graph `inception-2015-12-05`), for metrics only.

This is the network that TTUR's FID code, TF-GAN and the score SDE code run
(as a TF graph or TF-Hub module) and that pytorch-fid rebuilds in PyTorch as
`fid_inception_v3`: torchvision's Inception-v3 (Szegedy et al. 2016,
"Rethinking the Inception architecture") with 1008 classes, no auxiliary head,
and four blocks patched to match the graph. We follow pytorch-fid's
`inception.py` (and torchvision's `inception.py` for the blocks it leaves
alone) layer for layer, so its weight file converts one to one
(`diffusers_unified.convert.inception`):

- every convolution is conv (no bias) -> batch norm in inference mode with
  the stored statistics, eps 1e-3 as in the TF graph -> ReLU (torchvision's
  `BasicConv2d`);
- `Mixed_5b/c/d` (`FIDInceptionA`), `Mixed_6b..e` (`FIDInceptionC`) and
  `Mixed_7b` (`FIDInceptionE_1`) average-pool their pool branch over the
  in-image pixels only (3x3, stride 1, TF "SAME": torch's padding 1 with
  count_include_pad=False); `Mixed_7c` (`FIDInceptionE_2`) max-pools there
  instead, as the TF graph does;
- padding is written out per layer: torch's symmetric zero padding, which
  equals TF "SAME" for every stride-1 layer here (odd kernels), and no
  padding where the graph says "VALID" (all stride-2 layers and pools);
- the input, NHWC in [0, 1], is resized to 299 x 299 bilinearly with half-pixel
  centres and no antialiasing (torch's `F.interpolate(mode="bilinear",
  align_corners=False)`, whose `antialias` defaults to False, so a large
  image is point-sampled, not low-passed) and mapped to [-1, 1] by 2 x - 1;
- outputs: pool3, the 2048 channel means of `Mixed_7c` (FID's features), and
  the 1008 logits of `fc` (`softmax/logits` of the graph; IS takes their
  softmax).

Two departures of pytorch-fid from the TF graph, kept here because the
weights and the tests follow pytorch-fid: the graph maps pixels v in 0..255
by (v - 128) / 128, onto [-1, 127/128], where pytorch-fid takes 2 v / 255 - 1
(the two differ by v / 32640, at most 1/128), and the graph's own resize
(TF1 `ResizeBilinear`, used when a non-299 image is fed to TTUR's FID) has
no half-pixel centres.

`output_bias=False` drops the `fc` bias from the logits: the improved-GAN
Inception Score code (Salimans et al. 2016, `inception_score/model.py`)
multiplies pool3 by the `softmax/logits` weights alone, and StyleGAN2-ADA's
`no_output_bias=True` copies that; the default keeps the bias (the graph's
own `softmax/logits`).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffusers_unified.errors import CheckpointError, DataError
from diffusers_unified.typing import Array

BN_EPS = 1e-3  # the TF graph's batch-norm epsilon (torchvision's BasicConv2d uses the same)
INPUT_SIZE = 299
NUM_FEATURES = 2048
NUM_LOGITS = 1008  # 1000 ImageNet classes, a background class and 7 unused outputs


class ConvBN(nn.Module):
    """torchvision's `BasicConv2d`: conv without bias, inference batch norm, ReLU.

    `padding` is the symmetric zero padding (rows, columns) as torch writes it.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel_size,
            strides=(self.strides, self.strides),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            dtype=self.dtype,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, dtype=self.dtype, name="bn")(x)
        return nn.relu(x)


def _avg_pool_same(x: Array) -> Array:
    # count_include_pad=False: the mean over in-image pixels, as TF's "SAME" average pool.
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_same(x: Array) -> Array:
    return nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))  # pads with -inf


def _max_pool_valid(x: Array) -> Array:
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
    """`FIDInceptionA` (Mixed_5b/c/d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool-1x1."""

    pool_features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = lambda *a, **k: ConvBN(*a, dtype=self.dtype, **k)
        b1 = c(64, (1, 1), name="branch1x1")(x)
        b5 = c(48, (1, 1), name="branch5x5_1")(x)
        b5 = c(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = c(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = c(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """torchvision's `InceptionB` (Mixed_6a, 35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | max pool/2."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = lambda *a, **k: ConvBN(*a, dtype=self.dtype, **k)
        b3 = c(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = c(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = c(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_valid(x)], axis=-1)


class InceptionC(nn.Module):
    """`FIDInceptionC` (Mixed_6b..e): 1x1 | factorised 7x7 | twice-factorised 7x7 | avg pool-1x1."""

    channels_7x7: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = lambda *a, **k: ConvBN(*a, dtype=self.dtype, **k)
        c7 = self.channels_7x7
        b1 = c(192, (1, 1), name="branch1x1")(x)
        b7 = c(c7, (1, 1), name="branch7x7_1")(x)
        b7 = c(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = c(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = c(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = c(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = c(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = c(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = c(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """torchvision's `InceptionD` (Mixed_7a, 17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max/2."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = lambda *a, **k: ConvBN(*a, dtype=self.dtype, **k)
        b3 = c(192, (1, 1), name="branch3x3_1")(x)
        b3 = c(320, (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = c(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = c(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = c(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_valid(x)], axis=-1)


class InceptionE(nn.Module):
    """`FIDInceptionE_1` (pool "avg", Mixed_7b) and `FIDInceptionE_2` (pool "max", Mixed_7c).

    1x1 | 1x1 then (1x3, 3x1) side by side | 1x1-3x3 then (1x3, 3x1) | pool-1x1.
    """

    pool: str = "avg"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = lambda *a, **k: ConvBN(*a, dtype=self.dtype, **k)
        b1 = c(320, (1, 1), name="branch1x1")(x)
        b3 = c(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                c(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                c(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = c(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = c(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                c(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                c(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        pooled = _avg_pool_same(x) if self.pool == "avg" else _max_pool_same(x)
        bp = c(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_bilinear(x: Array, size: tuple[int, int]) -> Array:
    """NHWC bilinear resize as torch's `F.interpolate(mode="bilinear", align_corners=False)`.

    Half-pixel centres, edge pixels repeated beyond the border, and no
    antialiasing when shrinking (torch's default `antialias=False`).
    """
    n, _, _, c = x.shape
    return jax.image.resize(x, (n, *size, c), method="bilinear", antialias=False)


class InceptionV3(nn.Module):
    """The FID Inception-v3: NHWC images in [0, 1] -> (pool3 (n, 2048), logits (n, 1008)).

    `resize_input` and `normalize_input` are pytorch-fid's options of the
    same names (both on by default, as pytorch-fid and every FID reference
    run it); `output_bias=False` gives the improved-GAN IS logits (module
    docstring). `dtype` is the computation dtype; only float32 reproduces
    the reference features. Outputs are float32.
    """

    resize_input: bool = True
    normalize_input: bool = True
    output_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise DataError(f"Inception-v3 takes NHWC RGB images (n, h, w, 3), got shape {x.shape}")
        x = jnp.asarray(x, jnp.float32)
        if self.resize_input and x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
            x = resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
        if self.normalize_input:
            x = 2.0 * x - 1.0
        if min(x.shape[1:3]) < 75:
            raise DataError(f"Inception-v3 needs at least 75 x 75 pixels, got {x.shape[1:3]}")
        x = x.astype(self.dtype)
        c = lambda *a, **k: ConvBN(*a, dtype=self.dtype, **k)
        x = c(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)  # 299 -> 149
        x = c(32, (3, 3), name="Conv2d_2a_3x3")(x)  # 147
        x = c(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_valid(x)  # 73
        x = c(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = c(192, (3, 3), name="Conv2d_4a_3x3")(x)  # 71
        x = _max_pool_valid(x)  # 35
        x = InceptionA(32, self.dtype, name="Mixed_5b")(x)
        x = InceptionA(64, self.dtype, name="Mixed_5c")(x)
        x = InceptionA(64, self.dtype, name="Mixed_5d")(x)
        x = InceptionB(self.dtype, name="Mixed_6a")(x)  # 17
        for name, c7 in (
            ("Mixed_6b", 128),
            ("Mixed_6c", 160),
            ("Mixed_6d", 160),
            ("Mixed_6e", 192),
        ):
            x = InceptionC(c7, self.dtype, name=name)(x)
        x = InceptionD(self.dtype, name="Mixed_7a")(x)  # 8
        x = InceptionE("avg", self.dtype, name="Mixed_7b")(x)
        x = InceptionE("max", self.dtype, name="Mixed_7c")(x)
        pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        return pool, Logits(self.output_bias, name="fc")(pool)


class Logits(nn.Module):
    """The `fc` layer (`softmax/logits` of the graph): pool3 @ kernel (+ bias)."""

    use_bias: bool = True

    @nn.compact
    def __call__(self, pool: Array) -> Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (pool.shape[-1], NUM_LOGITS))
        bias = self.param("bias", nn.initializers.zeros, (NUM_LOGITS,))
        logits = pool @ kernel
        return logits + bias if self.use_bias else logits


# -- the weights file -------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _expected_shapes() -> tuple[tuple[str, tuple[int, ...]], ...]:
    shapes = jax.eval_shape(
        InceptionV3(resize_input=False).init,
        jax.random.PRNGKey(0),
        jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32),
    )
    flat = traverse_util.flatten_dict(shapes, sep="/")
    return tuple((k, tuple(v.shape)) for k, v in flat.items())


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """{flat key: shape} of every array of the weights file, e.g. "params/fc/kernel": (2048, 1008).

    Keys are "<collection>/<module path>/<name>" of the Flax variables
    ("params": conv kernels HWIO, batch-norm scale and bias, fc kernel and
    bias; "batch_stats": batch-norm mean and var).
    """
    return dict(_expected_shapes())


def check_weights(arrays: dict[str, np.ndarray], source: str) -> None:
    """Raise `CheckpointError` unless `arrays` has exactly the expected keys and shapes."""
    expected = expected_shapes()
    for key, shape in expected.items():
        if key not in arrays:
            raise CheckpointError(
                f"{source}: missing key {key!r} (expected shape {shape}); "
                "convert pytorch-fid's weights with diffusers-unified-convert inception"
            )
        if tuple(arrays[key].shape) != shape:
            raise CheckpointError(
                f"{source}: key {key!r} has shape {tuple(arrays[key].shape)}, expected {shape}"
            )
    unexpected = sorted(set(arrays) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected keys {unexpected[:5]} ({len(unexpected)} in all); "
            "not a weights file of the FID Inception-v3"
        )


def load_inception_params(path: str) -> dict:
    """The Flax variables {"params": ..., "batch_stats": ...} from a converted `.npz` file.

    The file is what `convert_pytorch_fid_weights` writes: one float32 array
    per flat key of `expected_shapes()`. Raises `CheckpointError` naming the
    file, and the key with its expected and found shape, if anything differs.
    """
    if not os.path.isfile(path):
        raise CheckpointError(
            f"Inception weights file {path!r} not found; convert pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth with diffusers-unified-convert inception"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: np.asarray(f[k]) for k in f.files}
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable .npz weights file ({e})") from e
    check_weights(arrays, path)
    for key, a in arrays.items():
        if not np.issubdtype(a.dtype, np.floating) or not np.all(np.isfinite(a)):
            raise CheckpointError(f"{path}: key {key!r} is not a finite float array")
    flat = {k: jnp.asarray(a, jnp.float32) for k, a in arrays.items()}
    return traverse_util.unflatten_dict(flat, sep="/")
