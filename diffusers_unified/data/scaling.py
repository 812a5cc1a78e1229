"""How stored values become model inputs, and model outputs become pixels (`Scaling`).

- vector data (toy sets, Gaussian mixtures, float `.npz` vectors) are stored
  in model units and used as they are;
- quantised data with b bits (L = 2^b levels: 8-bit images, the 4-bit
  digits) are stored as integer levels v in {0, ..., L - 1}. A batch maps
  them to [0, 1] by x = v / (L - 1), or, with uniform dequantisation, by
  x = (v + u) / L with u ~ U[0, 1)^D drawn afresh for every batch (Theis et
  al. 2016, "A note on the evaluation of generative models", sec. 3.1; the
  score SDE code's `uniform_dequantization`, which divides by 256 too). The
  dequantised values fill [0, 1]: each v owns the bin [v/L, (v+1)/L], so a
  density on them bounds the discrete likelihood of the levels (see
  `Scaling.bpd_offset`);
- float images are stored in [0, 1].

Image data (NHWC) then go to [-1, 1] by x -> 2 x - 1 when `centered`, as in
the score SDE code (`data.centered`); otherwise they stay in [0, 1].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from diffusers_unified.errors import ConfigError
from diffusers_unified.typing import Array


@dataclasses.dataclass(frozen=True)
class Scaling:
    """How stored values become model inputs, and model outputs become pixels.

    `bounded` data (images, or any quantised data) are a [0, 1] quantity,
    which the model sees in [0, 1], or in [-1, 1] when `centered`. `bits` is
    the bit depth of quantised data (None for continuous data). Unbounded
    data (vectors) are stored in model units; `centered` is ignored for
    them (and False by convention).
    """

    centered: bool = False
    bits: int | None = None
    bounded: bool = True

    def __post_init__(self):
        if self.bits is not None and not (isinstance(self.bits, int) and 1 <= self.bits <= 16):
            raise ConfigError(f"bits must be an integer in 1..16 or None, got {self.bits!r}")
        if self.bits is not None and not self.bounded:
            raise ConfigError("quantised data (bits set) are bounded: they map to [0, 1]")

    @property
    def levels(self) -> int | None:
        return None if self.bits is None else 2**self.bits

    @property
    def model_range(self) -> tuple[float, float] | None:
        """The interval the model's inputs lie in: (-1, 1), (0, 1), or None (unbounded)."""
        if not self.bounded:
            return None
        return (-1.0, 1.0) if self.centered else (0.0, 1.0)

    def to_model(self, x, key=None) -> Array:
        """Stored values -> float32 model inputs; with `key`, dequantised uniformly.

        x / (L - 1) reaches both ends of [0, 1]; (x + u) / L with u ~ U[0, 1)
        lies in x's bin [x/L, (x+1)/L] (its right end only through float32
        rounding). `key` is only meaningful for quantised data.
        """
        x = jnp.asarray(x).astype(jnp.float32)  # integer levels < 2^16 are exact in float32
        if not self.bounded:
            return x
        if self.bits is not None:
            if key is None:
                x = x / (self.levels - 1)
            else:
                # Drawn flat: a rank-1 threefry draw compiles several times faster on CPU.
                u = jax.random.uniform(key, (x.size,), jnp.float32).reshape(x.shape)
                x = (x + u) / self.levels
        elif key is not None:
            raise ValueError("dequantisation needs quantised data (bits), but bits is None")
        return 2.0 * x - 1.0 if self.centered else x

    def to_unit(self, x) -> Array:
        """Model outputs -> [0, 1] units (unclipped); unbounded data pass unchanged."""
        x = jnp.asarray(x)
        return (x + 1.0) / 2.0 if self.bounded and self.centered else x

    def to_uint8(self, x) -> np.ndarray:
        """Model outputs of bounded data -> uint8 pixels 0..255, clipped (for PNG files)."""
        if not self.bounded:
            raise ValueError("only bounded (image) data can be turned into pixels")
        unit = np.clip(np.asarray(self.to_unit(x), np.float64), 0.0, 1.0)
        return np.round(unit * 255).astype(np.uint8)

    @property
    def bpd_offset(self) -> float:
        """Add to -log2 p_model(x) / D to get bits/dim of the stored levels.

        With dequantised inputs x = a (v + u) / L + b (a = 2 when centered,
        else 1), a model density p_model(x) is the density a^D p_model(x) of
        y = (v + u) / L, and a bin has volume L^-D, so by Jensen
        log P(v) = log E_u[a^D p_model(x)] - D log L >= E_u[log p_model(x)] + D log a - D log L.
        Hence bits/dim <= E_u[-log2 p_model(x)] / D + bits - log2 a: the offset
        is 7 for centered 8-bit data, as in the score SDE code's
        `offset = 7 - inverse_scaler(-1)`. Continuous data: 0, i.e. bits/dim
        of the density in model units.
        """
        if self.bits is None:
            return 0.0
        return float(self.bits) - (1.0 if self.centered else 0.0)
