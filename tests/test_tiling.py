"""Tiled DC-AE decoding/encoding against untiled runs of the same (small, random) model.

Config: f8, ResBlock + EfficientViT stages, receptive field 8.75 latent pixels (decoder),
9.6 (encoder). Latent 40 x 56 (320 x 448 px image), tiles of 28 or 16 latent pixels.
Bounds reached (max |tiled - untiled| / max |untiled|):
  global attention sums + margin >= receptive field: ~6e-7 (rounding), asserted <= 1e-5;
  cheap settings (tile 16, overlap 8, margin 2): ~2.4e-2 max, ~5e-3 mean; asserted 5e-2 / 1e-2;
  without global sums the error is ~50%: attention in the decoder is global.
Seam score = largest mean |jump of the error| across a column/row where a tile starts or
ends, over the median jump: ~1.06 blended; ~6 for hard-cut tiles (negative control).
"""

import numpy as np
import pytest

from sana_jax.models import autoencoder as ae
from sana_jax.models import tiling

CFG = ae.DCAEConfig(
  in_channels=3,
  latent_channels=8,
  attention_head_dim=12,
  encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
  decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
  encoder_block_out_channels=(12, 24, 48, 96),
  decoder_block_out_channels=(12, 24, 48, 96),
  encoder_layers_per_block=(1, 1, 2, 1),
  decoder_layers_per_block=(1, 2, 1, 2),
  encoder_qkv_multiscales=((), (), (3, 5), (5,)),
  decoder_qkv_multiscales=((), (), (5,), (3,)),
  upsample_block_type="interpolate",
  downsample_block_type="Conv",
  scaling_factor=0.7,
)
GRID = (40, 56)


@pytest.fixture(scope="module")
def model():
  params = ae.init_params(CFG, 0)
  z = np.random.RandomState(0).randn(1, *GRID, 8).astype(np.float32)
  return params, z, np.asarray(ae.decode(CFG, params, z))


def _rel(a, b):
  d = np.abs(a - b)
  return float(d.max() / np.abs(b).max()), float(d.mean() / np.abs(b).mean())


def _seam_score(err, starts_y, starts_x, tile, f):
  jx = np.abs(np.diff(err, axis=2)).mean(axis=(0, 1, 3))
  jy = np.abs(np.diff(err, axis=1)).mean(axis=(0, 2, 3))
  bx = sorted({s * f for s in starts_x[1:]} | {(s + tile) * f for s in starts_x[:-1]})
  by = sorted({s * f for s in starts_y[1:]} | {(s + tile) * f for s in starts_y[:-1]})
  return max(
    jx[[b - 1 for b in bx]].max() / np.median(jx), jy[[b - 1 for b in by]].max() / np.median(jy)
  )


def test_geometry():
  for size, tile, overlap in [(40, 16, 8), (56, 28, 20), (100, 32, 8), (7, 16, 4), (33, 32, 1)]:
    starts = tiling.tile_starts(size, tile, overlap)
    t = min(tile, size)
    assert starts[0] == 0 and starts[-1] + t == size
    assert all(b - a <= t - overlap for a, b in zip(starts, starts[1:]))
    cores = tiling.core_bounds(starts, tile, size)
    assert cores[0][0] == 0 and cores[-1][1] == size
    assert all(c[1] == d[0] for c, d in zip(cores, cores[1:]))
    assert all(s <= lo < hi <= s + t for s, (lo, hi) in zip(starts, cores))
    margin = (min([a + t - b for a, b in zip(starts, starts[1:])] or [99]) - 1) // 2
    for m in sorted({0, margin}):
      total = np.zeros(size * 4)
      for s, w in zip(starts, tiling.blend_weights(starts, tile, size, 4, m)):
        total[s * 4 : (s + t) * 4] += w
        if s > 0 and m:
          assert np.all(w[: m * 4] == 0)
      if overlap * 2 <= t:  # at most two tiles overlap: the weights are a partition of unity
        np.testing.assert_allclose(total, 1.0, rtol=1e-12)
  with pytest.raises(ValueError, match="overlap"):
    tiling.tile_starts(40, 16, 16)
  with pytest.raises(ValueError, match="exceed 2 \\* margin"):
    tiling.blend_weights(tiling.tile_starts(40, 16, 8), 16, 40, 1, margin=4)


def test_stitching_is_exact_for_a_pointwise_model(model):
  """The bookkeeping alone (crops, weights, normalisation) loses nothing."""
  params, z, _ = model
  f = CFG.spatial_compression_ratio
  fn = lambda t: np.repeat(np.repeat(np.tanh(t[..., :3] * t[..., 3:6]), f, 1), f, 2)
  ref = fn(z)
  for tile, overlap, margin in [(16, 8, 2), (16, 0, 0), (28, 20, 9)]:
    out = tiling.decode_tiled(CFG, params, z, tile, overlap, margin, decode_fn=fn)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_tiled_decode_is_exact_with_global_attention_and_margin(model):
  params, z, full = model
  margin, overlap = tiling.exact_settings(CFG, "decoder")
  assert (margin, overlap) == (9, 20)
  out = tiling.decode_tiled(CFG, params, z, tile=28, overlap=overlap, margin=margin)
  n_tiles = [len(tiling.tile_starts(g, 28, overlap)) for g in GRID]
  assert n_tiles == [3, 5]
  err_max, _ = _rel(out, full)
  print(f"exact settings: max rel err {err_max:.2e}")
  assert err_max <= 1e-5
  # Attention is global: per-tile attention sums cannot give this.
  local = tiling.decode_tiled(
    CFG, params, z, tile=28, overlap=overlap, margin=margin, global_attention=False
  )
  assert _rel(local, full)[1] > 0.1


def test_tiled_decode_cheap_settings_bound_and_no_seam(model):
  params, z, full = model
  f = CFG.spatial_compression_ratio
  sy, sx = tiling.tile_starts(GRID[0], 16, 8), tiling.tile_starts(GRID[1], 16, 8)
  out = tiling.decode_tiled(CFG, params, z, tile=16, overlap=8, margin=2)
  err_max, err_mean = _rel(out, full)
  seam = _seam_score(out - full, sy, sx, 16, f)
  print(
    f"tile 16 / overlap 8 / margin 2: max rel {err_max:.2e}, mean rel {err_mean:.2e}, "
    f"seam {seam:.2f}"
  )
  assert err_max <= 5e-2 and err_mean <= 1e-2
  assert seam <= 1.5
  # Negative control: hard-cut tiles (no overlap) show their edges in the error.
  hy, hx = tiling.tile_starts(GRID[0], 16, 0), tiling.tile_starts(GRID[1], 16, 0)
  hard = tiling.decode_tiled(CFG, params, z, tile=16, overlap=0, margin=0)
  assert _seam_score(hard - full, hy, hx, 16, f) > 3.0


def test_tiled_encode_is_exact_with_margin(model):
  params, _, _ = model
  x = np.random.RandomState(1).uniform(-1, 1, (1, 256, 320, 3)).astype(np.float32)
  full = np.asarray(ae.encode(CFG, params, x))
  margin, overlap = tiling.exact_settings(CFG, "encoder")
  f = CFG.spatial_compression_ratio
  out = tiling.encode_tiled(CFG, params, x, tile=224, overlap=overlap * f, margin=margin * f)
  assert out.shape == full.shape
  assert _rel(out, full)[0] <= 1e-5


def test_bad_inputs(model):
  params, z, _ = model
  with pytest.raises(ValueError, match=r"\(B, h, w, 8\)"):
    tiling.decode_tiled(CFG, params, z[..., :7])
  with pytest.raises(ValueError, match="multiples of 8"):
    tiling.encode_tiled(CFG, params, np.zeros((1, 100, 64, 3), np.float32))
  with pytest.raises(ValueError, match="multiples of 8 pixels"):
    tiling.encode_tiled(CFG, params, np.zeros((1, 64, 64, 3), np.float32), tile=60)
  with pytest.raises(ValueError, match="overlap"):
    tiling.decode_tiled(CFG, params, z, tile=8, overlap=8)
