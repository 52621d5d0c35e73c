"""Tiled DC-AE decoding and encoding with blended overlaps, for images too large to run whole.

Tiles. The latent grid (h, w) is covered by equal tiles of `tile` latent pixels per side
(one shape, so one compilation per program) whose starts are spread evenly from 0 to
size - tile, consecutive tiles overlapping by at least `overlap`. Each tile runs through
the model alone; outputs are blended with separable weights: 0 within `margin` latent pixels
of a tile's inner edge, then complementary linear ramps across the rest of each overlap,
normalised by their sum, so no hard edge exists anywhere. Device memory is that of one
tile; the output is accumulated in host memory (numpy, fp32).

Global attention. The EfficientViT stages use ReLU linear attention, which is global: each
output token reads the sums  KV = sum_m k_m v_m^T  and  K = sum_m k_m  over all tokens. With
`global_attention=True` (default) these sums are computed for the whole image before the
final tiled pass: the latent grid is partitioned into tile cores (split at the middle of
each overlap); a pass runs every tile, each attention layer adding its sums over its core
tokens; the summed values are fed back as the global sums of the next pass. Layer l's sums
are exact after l passes, so `n_attention_layers` passes (9 for the f32c32 decoder) make all
of them exact. Passes only return the sums, so XLA drops everything after the last attention
layer: each pass costs the low-resolution part of the network only.

Exactness. With global sums, the rest of the network is convolutional; a value computed at
distance >= its receptive field `R` (in latent pixels, `receptive_field(config, side)`) from
a tile's inner edge equals the untiled value. So with margin >= R and overlap >= 2R + 1
tiled == untiled up to rounding (tests/test_tiling.py); smaller overlaps trade exactness for
speed, with errors confined to the overlaps and no seam (measured in docs/autoencoder.md).

  decode_tiled(config, params, latents, tile=32, overlap=8, margin=2)  # latent pixels
  encode_tiled(config, params, images, tile=1024, overlap=256, margin=64)  # image pixels
  exact_settings(config, "decoder")  # (margin, overlap) for tiled == untiled
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
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


def core_bounds(starts: list[int], tile: int, size: int) -> list[tuple[int, int]]:
  """A partition of [0, size) into one core per tile, split at the middle of each overlap."""
  tile = min(tile, size)
  cuts = [0] + [(starts[t + 1] + starts[t] + tile) // 2 for t in range(len(starts) - 1)] + [size]
  return [(cuts[t], cuts[t + 1]) for t in range(len(starts))]


def blend_weights(
  starts: list[int], tile: int, size: int, scale: int, margin: int = 0
) -> list[np.ndarray]:
  """Per-tile 1-D weights (tile*scale output pixels): 0 within margin*scale of an inner
  edge, complementary linear ramps over the rest of each overlap, 1 elsewhere."""
  tile = min(tile, size)
  out = []
  for t, s in enumerate(starts):
    w = np.ones(tile * scale, np.float64)
    for side in ("left", "right"):
      nb = t - 1 if side == "left" else t + 1
      if nb < 0 or nb >= len(starts):
        continue
      ov = (starts[t - 1] + tile - s) if side == "left" else (s + tile - starts[t + 1])
      if ov <= 0:
        continue
      if ov <= 2 * margin:
        raise ValueError(f"overlap {ov} between tiles must exceed 2 * margin ({2 * margin}).")
      dead, ramp = margin * scale, (ov - 2 * margin) * scale
      r = np.concatenate([np.zeros(dead), (np.arange(ramp) + 0.5) / ramp, np.ones(dead)])
      if side == "left":
        w[: ov * scale] = np.minimum(w[: ov * scale], r)
      else:
        w[tile * scale - ov * scale :] = np.minimum(w[tile * scale - ov * scale :], r[::-1])
    out.append(w)
  return out


def receptive_field(config: ae.DCAEConfig, side: str = "decoder") -> float:
  """Half-width (latent pixels) of the region one output value depends on through convs,
  with attention sums taken as given; `side` 'decoder' or 'encoder'."""

  def block(kind, ms):
    return 2.0 if kind == "ResBlock" else 1.0 + max([k // 2 for k in ms] or [0])

  if side == "decoder":
    ch, layers = config.decoder_block_out_channels, config.decoder_layers_per_block
    interp = config.upsample_block_type == "interpolate"
    r, rf = 1.0, 1.0  # r: output pixels per latent pixel
    for i in reversed(range(len(ch))):
      if i < len(ch) - 1 and layers[i] > 0:
        rf += 1.0 / (2 * r) if interp else 1.0 / r
        r *= 2
      rf += layers[i] * block(config.decoder_block_types[i], config.decoder_qkv_multiscales[i]) / r
    return rf + (1.0 / r if layers[0] > 0 else (1.0 / (2 * r) if interp else 1.0 / r))
  ch, layers = config.encoder_block_out_channels, config.encoder_layers_per_block
  r = float(config.spatial_compression_ratio)  # input pixels per latent pixel
  rf = 1.0 / r
  if layers[0] == 0:
    r /= 2
  for i in range(len(ch)):
    rf += layers[i] * block(config.encoder_block_types[i], config.encoder_qkv_multiscales[i]) / r
    if i < len(ch) - 1 and layers[i] > 0:
      rf += 1.0 / r + 1.0 / r  # conv + the 2x2 grouping
      r /= 2
  return rf + 1.0


def exact_settings(config: ae.DCAEConfig, side: str = "decoder") -> tuple[int, int]:
  """(margin, overlap) in latent pixels that make tiled == untiled up to rounding (with
  global_attention); tiles must be larger than the overlap. Multiply by f for encode."""
  margin = math.ceil(receptive_field(config, side))
  return margin, 2 * margin + 2


# ----------------------------------------------------------------------------------------
# Jitted programs (cached per config and side).
# ----------------------------------------------------------------------------------------

_PROGRAMS: dict = {}


def _programs(config: ae.DCAEConfig, side: str):
  key = (config, side)
  if key not in _PROGRAMS:
    module = ae.AutoencoderDC(config)
    method = ae.AutoencoderDC.decode if side == "decoder" else ae.AutoencoderDC.encode

    def variables(params, sums):
      return {"params": params, **({"attn_global": sums} if sums is not None else {})}

    @jax.jit
    def partial_sums(params, sums, x, core_mask):
      _, state = module.apply(
        variables(params, sums), x, core_mask, method=method, mutable=["attn_partial"]
      )
      return state.get("attn_partial", {})

    @jax.jit
    def run(params, sums, x):
      return module.apply(variables(params, sums), x, method=method)

    _PROGRAMS[key] = (partial_sums, run)
  return _PROGRAMS[key]


def n_attention_layers(config: ae.DCAEConfig, side: str = "decoder") -> int:
  types = config.decoder_block_types if side == "decoder" else config.encoder_block_types
  layers = config.decoder_layers_per_block if side == "decoder" else config.encoder_layers_per_block
  return sum(n for t, n in zip(types, layers) if t == "EfficientViTBlock")


def _tiled(
  config,
  params,
  x,
  side,
  grid,
  in_unit,
  out_unit,
  out_channels,
  tile,
  overlap,
  margin,
  global_attention,
  run_fn=None,
):
  b = x.shape[0]
  gh, gw = grid
  sy, sx = tile_starts(gh, tile, overlap), tile_starts(gw, tile, overlap)
  th, tw = min(tile, gh), min(tile, gw)
  windows = [(i, j, y0, x0) for i, y0 in enumerate(sy) for j, x0 in enumerate(sx)]
  crop = lambda y0, x0: x[:, y0 * in_unit : (y0 + th) * in_unit, x0 * in_unit : (x0 + tw) * in_unit]

  sums = None
  if global_attention and n_attention_layers(config, side) > 0 and len(windows) > 1:
    partial_sums, _ = _programs(config, side)
    cy, cx = core_bounds(sy, tile, gh), core_bounds(sx, tile, gw)
    masks = {}
    for i, j, y0, x0 in windows:
      m = np.zeros((th, tw), np.float32)
      m[cy[i][0] - y0 : cy[i][1] - y0, cx[j][0] - x0 : cx[j][1] - x0] = 1.0
      masks[i, j] = jnp.asarray(m)
    for _ in range(n_attention_layers(config, side)):
      total = None
      for i, j, y0, x0 in windows:
        part = partial_sums(params, sums, jnp.asarray(crop(y0, x0)), masks[i, j])
        total = part if total is None else jax.tree_util.tree_map(jnp.add, total, part)
      sums = total

  if run_fn is None:
    _, run = _programs(config, side)
    run_fn = lambda piece: run(params, sums, jnp.asarray(piece))
  wy = blend_weights(sy, tile, gh, out_unit, margin)
  wx = blend_weights(sx, tile, gw, out_unit, margin)
  acc = np.zeros((b, gh * out_unit, gw * out_unit, out_channels), np.float32)
  norm_y, norm_x = np.zeros(gh * out_unit), np.zeros(gw * out_unit)
  for i, y0 in enumerate(sy):
    norm_y[y0 * out_unit : (y0 + th) * out_unit] += wy[i]
  for j, x0 in enumerate(sx):
    norm_x[x0 * out_unit : (x0 + tw) * out_unit] += wx[j]
  for i, j, y0, x0 in windows:
    out = np.asarray(run_fn(crop(y0, x0)), np.float32)
    w = (wy[i][:, None] * wx[j][None, :]).astype(np.float32)[None, :, :, None]
    acc[:, y0 * out_unit : (y0 + th) * out_unit, x0 * out_unit : (x0 + tw) * out_unit] += w * out
  acc /= (norm_y[:, None] * norm_x[None, :]).astype(np.float32)[None, :, :, None]
  return acc


def decode_tiled(
  config: ae.DCAEConfig,
  params,
  latents,
  tile: int = 32,
  overlap: int = 8,
  margin: int = 2,
  global_attention: bool = True,
  decode_fn: Callable | None = None,
) -> np.ndarray:
  """Scaled latents (B, h, w, latent_channels) -> images (B, h*f, w*f, in_channels), numpy.

  tile / overlap / margin in latent pixels (32 / 8 = 1024 / 256 image pixels for f32).
  `decode_fn` (scaled latent tile -> image tile) replaces the model in the final pass (and
  implies global_attention=False).
  """
  latents = np.asarray(latents, np.float32)
  ae.check_latents(config, latents.shape)
  f = config.spatial_compression_ratio
  return _tiled(
    config,
    params,
    latents,
    "decoder",
    latents.shape[1:3],
    1,
    f,
    config.in_channels,
    tile,
    overlap,
    margin,
    global_attention and decode_fn is None,
    decode_fn,
  )


def encode_tiled(
  config: ae.DCAEConfig,
  params,
  images,
  tile: int = 1024,
  overlap: int = 256,
  margin: int = 64,
  global_attention: bool = True,
  encode_fn: Callable | None = None,
) -> np.ndarray:
  """Images (B, H, W, in_channels) in [-1, 1] -> scaled latents (B, H/f, W/f, latent_channels).

  tile / overlap / margin in image pixels, multiples of f.
  """
  images = np.asarray(images, np.float32)
  ae.check_images(config, images.shape)
  f = config.spatial_compression_ratio
  if tile % f or overlap % f or margin % f:
    raise ValueError(
      f"tile ({tile}), overlap ({overlap}) and margin ({margin}) must be multiples of {f} pixels."
    )
  grid = (images.shape[1] // f, images.shape[2] // f)
  return _tiled(
    config,
    params,
    images,
    "encoder",
    grid,
    f,
    1,
    config.latent_channels,
    tile // f,
    overlap // f,
    margin // f,
    global_attention and encode_fn is None,
    encode_fn,
  )


def tile_memory_bytes(config: ae.DCAEConfig, params, latent_shape: tuple[int, int, int]) -> dict:
  """XLA's memory analysis of the jitted decode of one (B, h, w) latent (bytes)."""
  module = ae.AutoencoderDC(config)
  z = jax.ShapeDtypeStruct(tuple(latent_shape) + (config.latent_channels,), np.float32)
  compiled = (
    jax.jit(lambda p, z: module.apply({"params": p}, z, method=ae.AutoencoderDC.decode))
    .lower(params, z)
    .compile()
  )
  m = compiled.memory_analysis()
  return {
    "temp": m.temp_size_in_bytes,
    "argument": m.argument_size_in_bytes,
    "output": m.output_size_in_bytes,
  }
