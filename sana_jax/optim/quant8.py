"""8-bit min-max block codec for optimizer state (CAME-8bit's first moment).

A tensor is cut into rectangular tiles: ``tile`` gives the tile extent along every axis
and must divide it. Leading axes with tile 1 (a stacked layer axis, or the batch of
matrices of a factored parameter) mean a block never crosses a matrix, so the state of
one layer is a slice of the state along that axis. Each block stores

    q     = round((x - min) / scale)   uint8, same shape as x
    min   = block minimum              fp32 or bf16, shape x.shape // tile (per axis)
    scale = (max - min) / 255          same dtype and shape as min

and decodes as ``q * scale + min`` (SANA-1.5 paper, eq. 1). A constant block has scale 0;
it encodes to q = 0 and decodes exactly to its value (no division by zero, no NaN).

Round-trip error is at most half a quantisation step, scale / 2, per element (plus float
rounding of the decode, below one ulp of the decoded value).

Tiles come from :func:`block_shape`: as close to ``block_size`` elements as the divisors
of the dimensions allow, and, where a dimension is divisible by ``align``, with a block
count along it that is a multiple of ``align``, so blocks stay inside one shard when that
axis is split over ``align`` devices (min/max are shard-local and min/scale shard like x).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "QuantizedArray",
  "block_shape",
  "quantize",
  "quantize_recomputed",
  "dequantize",
  "zeros",
  "nbytes",
]

_LEVELS = 255.0


class QuantizedArray(NamedTuple):
  """An fp32 tensor stored as uint8 codes with a per-block min and scale."""

  q: jax.Array  # uint8, the tensor's shape
  minimum: jax.Array  # fp32 or bf16, shape // tile
  scale: jax.Array  # same dtype, shape // tile

  @property
  def shape(self):
    return self.q.shape

  @property
  def tile(self) -> tuple[int, ...]:
    return tuple(s // n for s, n in zip(self.q.shape, self.minimum.shape))


def _divisors(n: int) -> list[int]:
  small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
  return sorted(set(small + [n // d for d in small]))


@functools.lru_cache(maxsize=None)
def block_shape(shape: tuple[int, ...], block_size: int, align: int = 8) -> tuple[int, ...]:
  """Tile for a tensor of ``shape`` (all of it one matrix): t_i | shape_i, prod(t) close
  to ``block_size``.

  Preference order: for every dimension divisible by ``align``, a block count along it
  that is a multiple of ``align`` (blocks stay shard-local when that axis is sharded over
  ``align`` devices); then a block of at most 2 * block_size; then the size nearest to
  ``block_size`` in log scale; then wider tiles along the last axes (contiguous memory).
  """
  shape = tuple(int(d) for d in shape)
  if not shape or min(shape) < 1:
    raise ValueError(f"block_shape needs a non-empty positive shape, got {shape}")
  if block_size < 1 or align < 1:
    raise ValueError(f"block_size and align must be >= 1, got {block_size}, {align}")
  best, best_key = None, None
  for tile in itertools.product(*(_divisors(d) for d in shape)):
    n = math.prod(tile)
    ok = sum((d % align != 0) or ((d // t) % align == 0) for d, t in zip(shape, tile))
    key = (ok, n <= 2 * block_size, -abs(math.log2(n / block_size)), tile[::-1])
    if best_key is None or key > best_key:
      best, best_key = tile, key
  return best


def _check_tile(shape, tile):
  if len(tile) != len(shape) or any(t < 1 or s % t for s, t in zip(shape, tile)):
    raise ValueError(f"tile {tuple(tile)} does not tile the shape {tuple(shape)}")


def _split(shape, tile):
  """(n0, t0, n1, t1, ...) split of a shape and the positions of the tile axes."""
  split = tuple(x for s, t in zip(shape, tile) for x in (s // t, t))
  return split, tuple(range(1, 2 * len(shape), 2))


def _expand(a):
  """(n0, n1, ...) -> (n0, 1, n1, 1, ...) for broadcasting against the split tensor."""
  return a.reshape(tuple(x for n in a.shape for x in (n, 1)))


def quantize(x: jax.Array, tile: tuple[int, ...], meta_dtype=jnp.float32) -> QuantizedArray:
  """Encode x (any float dtype; computed in fp32) with blocks of extent ``tile``.

  ``meta_dtype`` (fp32 or bf16) stores min and scale. With bf16 (half the metadata) the
  min is rounded down and the scale up, so the 255 levels still cover [min, max]: the
  error stays at most half of the stored step, which is at most about 1% wider than the
  fp32 step for a block whose range spans zero (a constant block that bf16 cannot
  represent exactly then decodes within half a tiny step instead of exactly).
  """
  return quantize_recomputed(lambda: x, tile, meta_dtype)


def _round_bf16(x: jax.Array, up: bool) -> jax.Array:
  """fp32 -> the bf16 value next to x towards +inf (up) or -inf (not up), exactly."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  high = bits & jnp.uint32(0xFFFF0000)
  inexact = (bits & jnp.uint32(0xFFFF)) != 0
  negative = (bits >> 31) == 1
  away = inexact & (negative != up)  # the truncation went the wrong way: one ulp further out
  high = jnp.where(away, high + jnp.uint32(0x10000), high)
  return jax.lax.bitcast_convert_type(high, jnp.float32).astype(jnp.bfloat16)


def _block_min_max(t: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """(min, max) of t over ``axes`` as one variadic reduction: one read of t, where
  jnp.min and jnp.max are a pass each (XLA:CPU fuses neither with the other). The update of
  the 7-block 0.6B tree took 0.92x the time of the two reductions (docs/came.md)."""
  init = (jnp.array(np.inf, t.dtype), jnp.array(-np.inf, t.dtype))
  pair = lambda a, b: (jnp.minimum(a[0], b[0]), jnp.maximum(a[1], b[1]))
  return jax.lax.reduce((t, t), init, pair, axes)


def quantize_recomputed(
  make: Callable[[], jax.Array], tile: tuple[int, ...], meta_dtype=jnp.float32
) -> QuantizedArray:
  """:func:`quantize` of ``make()``, calling ``make`` once for each of the two full-size
  passes (block min and max, codes), so that it can rebuild x from fresh inputs for each
  pass instead of sharing one materialised value."""
  tile = tuple(int(t) for t in tile)
  meta_dtype = jnp.dtype(meta_dtype)
  if meta_dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f"meta_dtype must be float32 or bfloat16, got {meta_dtype}")
  x = make()
  _check_tile(x.shape, tile)
  split, tile_axes = _split(x.shape, tile)
  mn, mx = _block_min_max(x.astype(jnp.float32).reshape(split), tile_axes)
  if meta_dtype == jnp.bfloat16:
    mn_s = _round_bf16(mn, up=False)
    scale_s = _round_bf16((mx - mn_s.astype(jnp.float32)) / _LEVELS, up=True)
    mn, scale = mn_s.astype(jnp.float32), scale_s.astype(jnp.float32)
  else:
    scale = (mx - mn) / _LEVELS
    mn_s, scale_s = mn, scale
  safe = jnp.where(scale > 0, scale, 1.0)
  t = make().astype(jnp.float32).reshape(split)
  code = (t - _expand(mn)) / _expand(safe)
  q = jnp.clip(jnp.round(code), 0, _LEVELS).astype(jnp.uint8)
  return QuantizedArray(q.reshape(x.shape), mn_s, scale_s)


def zeros(shape: tuple[int, ...], tile: tuple[int, ...], meta_dtype=jnp.float32) -> QuantizedArray:
  """The encoding of an all-zero tensor (what ``quantize(jnp.zeros(shape), tile)`` gives),
  built directly so nothing is computed or constant-folded."""
  shape, tile = tuple(shape), tuple(tile)
  _check_tile(shape, tile)
  grid = tuple(s // t for s, t in zip(shape, tile))
  return QuantizedArray(
    jnp.zeros(shape, jnp.uint8), jnp.zeros(grid, meta_dtype), jnp.zeros(grid, meta_dtype)
  )


def dequantize(qa: QuantizedArray) -> jax.Array:
  """Decode to fp32: q * scale + min, blockwise."""
  split, _ = _split(qa.q.shape, qa.tile)
  t = qa.q.reshape(split).astype(jnp.float32)
  scale, mn = qa.scale.astype(jnp.float32), qa.minimum.astype(jnp.float32)
  return (t * _expand(scale) + _expand(mn)).reshape(qa.q.shape)


def nbytes(shape: tuple[int, ...], tile: tuple[int, ...], meta_itemsize: int = 4) -> int:
  """Bytes of a QuantizedArray: 1 B per element + min and scale (meta_itemsize B each)
  per block."""
  n = math.prod(shape)
  return n + 2 * meta_itemsize * (n // math.prod(tile))
