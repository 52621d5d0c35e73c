"""Parity of our DiT with diffusers' SanaTransformer2DModel on random weights (fp32)."""

import jax
import numpy as np
import pytest

from sana_jax.models import dit
from sana_jax.models.dit_config import DiTConfig
from sana_jax.weights import dit as dit_weights
from tests import dit_reference as ref

# Width, heads, cross heads, caption width, caption length and latent h/w all differ.
GEOMETRIES = {
  "plain": dict(
    cfg=DiTConfig(
      in_channels=5,
      out_channels=5,
      hidden_size=48,
      depth=2,
      self_head_dim=8,
      cross_heads=4,
      cross_head_dim=10,
      caption_channels=20,
      sample_size=9,
    ),
    latent=(5, 9),
    caption_len=7,
  ),
  "qknorm_patch2": dict(
    cfg=DiTConfig(
      in_channels=6,
      out_channels=6,
      patch_size=2,
      hidden_size=64,
      depth=3,
      self_head_dim=16,
      cross_heads=3,
      cross_head_dim=12,
      caption_channels=28,
      sample_size=7,
      qk_norm=True,
      cross_norm=True,
    ),
    latent=(10, 14),
    caption_len=11,
  ),
  "qknorm_pe": dict(
    cfg=DiTConfig(
      in_channels=3,
      out_channels=3,
      hidden_size=72,
      depth=2,
      self_head_dim=12,
      cross_heads=5,
      cross_head_dim=8,
      caption_channels=33,
      sample_size=6,
      qk_norm=True,
      cross_norm=True,
      use_pe=True,
      pe_interpolation=2.0,
    ),
    latent=(7, 4),
    caption_len=13,
  ),
}


def _inputs(cfg, latent, caption_len, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, *latent, cfg.in_channels)).astype(np.float32)
  y = rng.standard_normal((2, caption_len, cfg.caption_channels)).astype(np.float32)
  mask = np.ones((2, caption_len), np.int32)
  mask[0, caption_len - 3 :] = 0  # first caption padded, second full
  t = np.array([999.0, 37.0], np.float32)  # integer timesteps: flooring is moot
  return x, t, y, mask


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_matches_diffusers(name):
  g = GEOMETRIES[name]
  cfg = g["cfg"].diffusers_compatible()
  torch_model = ref.diffusers_model(cfg, seed=len(name))
  params = dit_weights.diffusers_to_params(ref.state_dict_numpy(torch_model), cfg)
  x, t, y, mask = _inputs(cfg, g["latent"], g["caption_len"])
  ours = jax.jit(dit.SanaDiT(cfg).apply)({"params": params}, x, t, y, mask)
  theirs = ref.run_diffusers(torch_model, x, t, y, mask)
  assert ours.shape == theirs.shape
  assert ref.rel_err(ours, theirs) <= 1e-5


def test_padding_is_ignored():
  """Changing padded caption tokens does not change the output; changing a kept one does."""
  g = GEOMETRIES["plain"]
  cfg = g["cfg"]
  params = dit.init_params(cfg, jax.random.key(1))
  x, t, y, mask = _inputs(cfg, g["latent"], g["caption_len"])
  apply = jax.jit(dit.SanaDiT(cfg).apply)
  base = np.asarray(apply({"params": params}, x, t, y, mask))
  y2 = y.copy()
  y2[0, -3:] += 5.0  # padded positions of sample 0
  np.testing.assert_array_equal(base, apply({"params": params}, x, t, y2, mask))
  y3 = y.copy()
  y3[0, 0] += 5.0
  assert not np.allclose(base[0], apply({"params": params}, x, t, y3, mask)[0])


def test_floor_timestep_switch():
  cfg = GEOMETRIES["plain"]["cfg"]
  params = dit.init_params(cfg, jax.random.key(2))
  x, _, y, mask = _inputs(cfg, (5, 9), 7)
  floor = dit.SanaDiT(cfg).apply({"params": params}, x, np.array([10.7, 3.2]), y, mask)
  exact = dit.SanaDiT(cfg).apply({"params": params}, x, np.array([10.0, 3.0]), y, mask)
  np.testing.assert_array_equal(floor, exact)
  nofloor = dit.SanaDiT(cfg.replace(floor_timestep=False)).apply(
    {"params": params}, x, np.array([10.7, 3.2]), y, mask
  )
  assert not np.allclose(nofloor, exact)


def test_precomputed_caption_kv_matches():
  g = GEOMETRIES["qknorm_patch2"]
  cfg = g["cfg"]
  params = dit.init_params(cfg, jax.random.key(3))
  x, t, y, mask = _inputs(cfg, g["latent"], g["caption_len"])
  model = dit.SanaDiT(cfg)
  kv = model.apply({"params": params}, y, method=dit.SanaDiT.precompute_caption_kv)
  assert kv.shape == (cfg.depth, 2, g["caption_len"], 2, cfg.cross_inner)
  a = model.apply({"params": params}, x, t, y, mask)
  b = model.apply({"params": params}, x, t, y, mask, caption_kv=kv)
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["qknorm_patch2", "qknorm_pe"])
def test_blocks_from_their_own_buffers_match_the_scan(name):
  """apply_layers on unstack_blocks' trees computes the scanned model's velocity, with the
  caption and with precomputed caption K/V; the per-block trees are the stacked slices."""
  g = GEOMETRIES[name]
  cfg = g["cfg"]
  params = dit.init_params(cfg, jax.random.key(4))
  x, t, y, mask = _inputs(cfg, g["latent"], g["caption_len"])
  model = dit.SanaDiT(cfg)
  un = dit.unstack_blocks(params)
  assert "blocks" not in un["rest"] and len(un["layers"]) == cfg.depth
  for i, layer in enumerate(un["layers"]):
    same = jax.tree_util.tree_map(lambda a, b: np.array_equal(a[i], b), params["blocks"], layer)
    assert all(jax.tree_util.tree_leaves(same))
  want = model.apply({"params": params}, x, t, y, mask)
  got = jax.jit(dit.apply_layers, static_argnums=0)(cfg, un, x, t, y, mask)
  assert ref.rel_err(np.asarray(got), np.asarray(want)) <= 1e-6
  kv = model.apply({"params": params}, y, method=dit.SanaDiT.precompute_caption_kv)
  got_kv = dit.apply_layers(cfg, un, x, t, y, mask, caption_kv=kv)
  assert ref.rel_err(np.asarray(got_kv), np.asarray(want)) <= 1e-6


def test_caption_norm_init():
  """Released configs' y_norm_scale_factor (0.01) by default; configurable for small runs."""
  cfg = GEOMETRIES["plain"]["cfg"]
  assert cfg.caption_norm_init == 0.01
  for value in (0.01, 1.0):
    params = dit.init_params(cfg.replace(caption_norm_init=value), jax.random.key(0))
    np.testing.assert_array_equal(
      params["caption_norm"], np.full(cfg.hidden_size, value, np.float32)
    )


def test_both_forwards_refuse_inputs_they_would_misread():
  """Wrong latent channels, a size that is not a patch multiple, a mask of the wrong shape:
  the scanned and the per-block forward name the problem."""
  g = GEOMETRIES["qknorm_patch2"]
  cfg = g["cfg"]
  params = dit.init_params(cfg, jax.random.key(5))
  x, t, y, mask = _inputs(cfg, g["latent"], g["caption_len"])
  un = dit.unstack_blocks(params)
  bad = [
    ((x[..., :-1], t, y, mask), "channels"),
    ((x[:, :-1], t, y, mask), "multiple of patch_size"),
    ((x, t, y, mask[:, :-1]), "caption_mask shape"),
  ]
  for args, match in bad:
    with pytest.raises(ValueError, match=match):
      dit.SanaDiT(cfg).apply({"params": params}, *args)
    with pytest.raises(ValueError, match=match):
      dit.apply_layers(cfg, un, *args)
