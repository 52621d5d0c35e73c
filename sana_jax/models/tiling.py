"""Tiled DC-AE decoding and encoding with blended overlaps, for images too large to run whole.

The latent grid (h, w) is covered by equal tiles of `tile` x `tile` latent pixels (one shape,
so one compilation) whose starts are spread evenly from 0 to size - tile with consecutive
tiles overlapping by at least `overlap`. Each tile is run through the model alone; outputs
are blended with separable weights that ramp linearly across every overlap (complementary
ramps, normalised by their sum), so there is no hard edge anywhere. Device memory is that
of one tile; the output is accumulated in host memory (numpy, fp32).

The decoder's EfficientViT stages use global linear attention, so a tile does not see the
whole image and tiled output is not bit-identical to untiled output: the error is spread
over the image and the ramps hide the tile edges (docs/autoencoder.md gives measured bounds).

  decode_tiled(config, params, latents, tile=32, overlap=8)   # latents scaled, NHWC
  encode_tiled(config, params, images, tile=1024, overlap=256) # pixels; multiples of f
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import numpy as np

from sana_jax.models import autoencoder as ae


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
  """Starts of equal tiles covering [0, size), consecutive overlaps >= overlap.

  A single tile [0, size) when size <= tile.
  """
  if tile <= 0 or overlap < 0 or overlap >= tile:
    raise ValueError(f"need 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
  if size <= tile:
    return [0]
  n = math.ceil((size - tile) / (tile - overlap)) + 1
  return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def blend_weights(starts: list[int], tile: int, size: int, scale: int) -> list[np.ndarray]:
  """Per-tile 1-D weights (length tile*scale in output pixels) with linear ramps over the
  overlap with each neighbour; weights of neighbours sum to 1 across an overlap."""
  tile = min(tile, size)
  out = []
  for t, s in enumerate(starts):
    w = np.ones(tile * scale, np.float64)
    if t > 0:
      ov = (starts[t - 1] + tile - s) * scale
      if ov > 0:
        w[:ov] = np.minimum(w[:ov], (np.arange(ov) + 0.5) / ov)
    if t < len(starts) - 1:
      ov = (s + tile - starts[t + 1]) * scale
      if ov > 0:
        w[tile * scale - ov:] = np.minimum(w[tile * scale - ov:], 1.0 - (np.arange(ov) + 0.5) / ov)
    out.append(w)
  return out


def _tiled_apply(fn: Callable, x: np.ndarray, grid: tuple[int, int], in_unit: int, out_unit: int,
                 out_channels: int, tile: int, overlap: int) -> np.ndarray:
  """Runs fn on tiles of x. Grid units: one unit is `in_unit` input pixels and `out_unit`
  output pixels; tile/overlap are in units."""
  b = x.shape[0]
  gh, gw = grid
  sy, sx = tile_starts(gh, tile, overlap), tile_starts(gw, tile, overlap)
  th, tw = min(tile, gh), min(tile, gw)
  wy, wx = blend_weights(sy, tile, gh, out_unit), blend_weights(sx, tile, gw, out_unit)
  acc = np.zeros((b, gh * out_unit, gw * out_unit, out_channels), np.float32)
  norm_y = np.zeros(gh * out_unit)
  norm_x = np.zeros(gw * out_unit)
  for i, y0 in enumerate(sy):
    norm_y[y0 * out_unit:(y0 + th) * out_unit] += wy[i]
  for j, x0 in enumerate(sx):
    norm_x[x0 * out_unit:(x0 + tw) * out_unit] += wx[j]
  for i, y0 in enumerate(sy):
    for j, x0 in enumerate(sx):
      piece = x[:, y0 * in_unit:(y0 + th) * in_unit, x0 * in_unit:(x0 + tw) * in_unit]
      out = np.asarray(fn(piece), np.float32)
      w = (wy[i][:, None] * wx[j][None, :]).astype(np.float32)[None, :, :, None]
      acc[:, y0 * out_unit:(y0 + th) * out_unit, x0 * out_unit:(x0 + tw) * out_unit] += w * out
  acc /= (norm_y[:, None] * norm_x[None, :]).astype(np.float32)[None, :, :, None]
  return acc


def decode_tiled(config: ae.DCAEConfig, params, latents, tile: int = 32, overlap: int = 8,
                 decode_fn: Callable | None = None) -> np.ndarray:
  """Scaled latents (B, h, w, latent_channels) -> images (B, h*f, w*f, in_channels), numpy.

  tile / overlap in latent pixels (32 / 8 = 1024 / 256 image pixels for f32). `decode_fn`
  (scaled latent tile -> image tile) defaults to the jitted `autoencoder.decode`.
  """
  latents = np.asarray(latents, np.float32)
  ae.check_latents(config, latents.shape)
  f = config.spatial_compression_ratio
  fn = decode_fn or (lambda z: ae.decode(config, params, z))
  return _tiled_apply(fn, latents, latents.shape[1:3], 1, f, config.in_channels, tile, overlap)


def encode_tiled(config: ae.DCAEConfig, params, images, tile: int = 1024, overlap: int = 256,
                 encode_fn: Callable | None = None) -> np.ndarray:
  """Images (B, H, W, in_channels) in [-1, 1] -> scaled latents (B, H/f, W/f, latent_channels).

  tile / overlap in image pixels, multiples of f. `encode_fn` defaults to the jitted
  `autoencoder.encode`.
  """
  images = np.asarray(images, np.float32)
  ae.check_images(config, images.shape)
  f = config.spatial_compression_ratio
  if tile % f or overlap % f:
    raise ValueError(f"tile ({tile}) and overlap ({overlap}) must be multiples of {f} pixels.")
  fn = encode_fn or (lambda x: ae.encode(config, params, x))
  grid = (images.shape[1] // f, images.shape[2] // f)
  return _tiled_apply(fn, images, grid, f, 1, config.latent_channels, tile // f, overlap // f)


def tile_memory_bytes(config: ae.DCAEConfig, params, tile_shape: tuple[int, int, int]) -> dict:
  """XLA's memory analysis of the jitted decode of one (B, h, w) latent tile (bytes)."""
  module = ae.AutoencoderDC(config)
  z = jax.ShapeDtypeStruct(tuple(tile_shape) + (config.latent_channels,), np.float32)
  compiled = jax.jit(lambda p, z: module.apply({"params": p}, z, method=ae.AutoencoderDC.decode)
                     ).lower(params, z).compile()
  m = compiled.memory_analysis()
  return {"temp": m.temp_size_in_bytes, "argument": m.argument_size_in_bytes,
          "output": m.output_size_in_bytes}
