"""8-bit min-max block codec for optimizer state (CAME-8bit's first moment).

A tensor of shape (..., a, b) is cut into tiles of (ta, tb) elements with ta | a and
tb | b, so a block never crosses a matrix: leading axes (a stacked layer axis) index
independent matrices and the state of one layer is a slice of the state along that axis.
Each block stores

    q     = round((x - min) / scale)   uint8, same shape as x
    min   = block minimum              fp32, shape (..., a // ta, b // tb)
    scale = (max - min) / 255          fp32, same shape as min

and decodes as ``q * scale + min`` (SANA-1.5 paper, eq. 1). A constant block has scale 0;
it encodes to q = 0 and decodes exactly to its value (no division by zero, no NaN).

Round-trip error is at most half a quantisation step, scale / 2, per element (plus float
rounding of the decode, below one ulp of the decoded value).

Tiles are chosen by :func:`block_shape`: as close to ``block_size`` elements as the divisors
of (a, b) allow, and, where possible, with block counts along both axes that are multiples
of ``align`` so that blocks stay inside one shard when either axis is sharded over ``align``
devices (min/max are then shard-local, and min/scale shard like the tensor).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["QuantizedArray", "block_shape", "quantize", "dequantize", "nbytes"]

_LEVELS = 255.0


class QuantizedArray(NamedTuple):
  """An fp32 tensor (..., a, b) stored as uint8 codes with a per-block min and scale."""

  q: jax.Array  # uint8, (..., a, b)
  minimum: jax.Array  # fp32, (..., a // ta, b // tb)
  scale: jax.Array  # fp32, (..., a // ta, b // tb)

  @property
  def shape(self):
    return self.q.shape


def _divisors(n: int) -> list[int]:
  small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
  return sorted(set(small + [n // d for d in small]))


@functools.lru_cache(maxsize=None)
def block_shape(a: int, b: int, block_size: int, align: int = 8) -> tuple[int, int]:
  """Tile (ta, tb) for an (a, b) matrix: ta | a, tb | b, ta * tb close to block_size.

  Preference order: block counts a // ta and b // tb multiples of ``align`` (so blocks stay
  shard-local when that axis is split over ``align`` devices), then the tile size nearest to
  ``block_size`` in log scale without exceeding 2 * block_size where avoidable, then wider
  tiles (contiguous memory along the last axis).
  """
  if a < 1 or b < 1:
    raise ValueError(f"block_shape needs a positive matrix shape, got ({a}, {b})")
  if block_size < 1 or align < 1:
    raise ValueError(f"block_size and align must be >= 1, got {block_size}, {align}")
  best, best_key = None, None
  for ta in _divisors(a):
    for tb in _divisors(b):
      n = ta * tb
      key = (
          (a // ta) % align == 0,
          (b // tb) % align == 0,
          n <= 2 * block_size,
          -abs(math.log2(n / block_size)),
          tb,
      )
      if best_key is None or key > best_key:
        best, best_key = (ta, tb), key
  return best


def _tiles(x: jax.Array, na: int, nb: int) -> jax.Array:
  *lead, a, b = x.shape
  return x.reshape(*lead, na, a // na, nb, b // nb)


def quantize(x: jax.Array, block: tuple[int, int]) -> QuantizedArray:
  """Encode x (..., a, b) (any float dtype, computed in fp32) with (ta, tb) blocks."""
  if x.ndim < 2:
    raise ValueError(f"quantize needs a tensor of rank >= 2 (..., a, b), got shape {x.shape}")
  ta, tb = block
  a, b = x.shape[-2:]
  if a % ta or b % tb:
    raise ValueError(f"block {block} does not tile the matrix shape {(a, b)}")
  na, nb = a // ta, b // tb
  t = _tiles(x.astype(jnp.float32), na, nb)  # (..., na, ta, nb, tb)
  mn = jnp.min(t, axis=(-3, -1))  # (..., na, nb)
  mx = jnp.max(t, axis=(-3, -1))
  scale = (mx - mn) / _LEVELS
  safe = jnp.where(scale > 0, scale, 1.0)
  code = (t - mn[..., :, None, :, None]) / safe[..., :, None, :, None]
  q = jnp.clip(jnp.round(code), 0, _LEVELS).astype(jnp.uint8)
  return QuantizedArray(q.reshape(x.shape), mn, scale)


def dequantize(qa: QuantizedArray) -> jax.Array:
  """Decode to fp32: q * scale + min, blockwise."""
  na, nb = qa.minimum.shape[-2:]
  t = _tiles(qa.q, na, nb).astype(jnp.float32)
  x = t * qa.scale[..., :, None, :, None] + qa.minimum[..., :, None, :, None]
  return x.reshape(qa.q.shape)


def nbytes(shape: tuple[int, ...], block: tuple[int, int]) -> int:
  """Bytes of a QuantizedArray of this shape and block: 1 B/element + 8 B/block."""
  n = math.prod(shape)
  return n + 8 * (n // (block[0] * block[1]))
