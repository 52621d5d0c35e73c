"""Model growth (REFERENCE.md section 7): identity, block order, fresh-block init, bad input,
conversion of grown checkpoints."""

import functools

import jax
import numpy as np
import pytest
import torch

from sana_jax.configs import tiny
from sana_jax.models import dit
from sana_jax.models.dit_config import DiTConfig
from sana_jax.scaling import growth
from sana_jax.weights import dit as W
from tests import dit_reference as ref

CFG = DiTConfig.coerce(tiny.get_config().model)  # depth 3, every dimension different
LATENT = (6, 7)
CAPTION_LEN = 9


random_params = ref.random_params


@pytest.fixture(scope="module")
def source():
  return random_params(CFG, 0)


def _inputs(cfg, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, *LATENT, cfg.in_channels)).astype(np.float32)
  y = rng.standard_normal((2, CAPTION_LEN, cfg.caption_channels)).astype(np.float32)
  mask = np.ones((2, CAPTION_LEN), np.int32)
  mask[0, 5:] = 0
  t = np.array([640.0, 37.0], np.float32)
  return x, t, y, mask


@functools.lru_cache(maxsize=None)
def _apply(cfg):
  return jax.jit(dit.SanaDiT(cfg).apply)


def _run(cfg, params, inputs):
  return np.asarray(_apply(cfg)({"params": params}, *inputs))


def _err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def _block(params, i):
  return jax.tree_util.tree_map(lambda a: np.asarray(a[i]), params["blocks"])


def _flat(tree):
  return {
    "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
    for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


# ----------------------------------------------------------------------------- identity


def test_constant_keep_all_gives_source_output(source):
  inputs = _inputs(CFG)
  want = _run(CFG, source, inputs)
  grown, gcfg = growth.grow(source, CFG, 6, "constant", keep=3, key=jax.random.key(7))
  assert gcfg == CFG.replace(depth=6)
  assert _err(_run(gcfg, grown, inputs), want) <= 1e-6


def test_constant_keep_fewer_gives_source_cut(source):
  """Default keep = N - 2 = 1: the grown model equals the source cut to its first block."""
  inputs = _inputs(CFG, seed=3)
  cut = dict(source, blocks=jax.tree_util.tree_map(lambda a: a[:1], source["blocks"]))
  want = _run(CFG.replace(depth=1), cut, inputs)
  grown, gcfg = growth.grow(source, CFG, 6, key=jax.random.key(8))
  assert gcfg.depth == 6
  assert _err(_run(gcfg, grown, inputs), want) <= 1e-6
  # ... and not the full source (the dropped blocks mattered).
  assert _err(_run(CFG, source, inputs), want) > 1e-2


@pytest.mark.parametrize("strategy,depth", [("cyclic", 6), ("block_expand", 6)])
def test_zero_gated_copies_give_source_output(source, strategy, depth):
  inputs = _inputs(CFG, seed=5)
  want = _run(CFG, source, inputs)
  gated, gcfg = growth.grow(source, CFG, depth, strategy, zero_gate=True)
  assert _err(_run(gcfg, gated, inputs), want) <= 1e-6
  plain, _ = growth.grow(source, CFG, depth, strategy)  # without the gate: a different model
  assert _err(_run(gcfg, plain, inputs), want) > 1e-2


# ---------------------------------------------------------------------------- block order


def _identify(grown, gcfg, source):
  """For each grown block, the source block whose every (non-zero-gated) leaf it equals."""
  src_blocks = [_flat(_block(source, j)) for j in range(CFG.depth)]
  gated = {"/".join(p) for p in growth._ZERO_GATE}
  found = []
  for i in range(gcfg.depth):
    blk = _flat(_block(grown, i))
    matches = [
      j
      for j, sb in enumerate(src_blocks)
      if all(np.array_equal(blk[k], sb[k]) for k in sb if k not in gated)
    ]
    found.append(matches[0] if len(matches) == 1 else None)
  return found


@pytest.mark.parametrize("zero_gate", [False, True])
def test_block_order(source, zero_gate):
  gated = {"/".join(p) for p in growth._ZERO_GATE}
  # Cyclic with N' = 2 of 3 source blocks, to 7: 0 1 0 1 0 1 0; repeats from block 2 on.
  grown, gcfg = growth.grow(source, CFG, 7, "cyclic", keep=2, zero_gate=zero_gate)
  assert _identify(grown, gcfg, source) == [0, 1, 0, 1, 0, 1, 0]
  # Block replication 3 -> 9 (r = 3): 0 0 0 1 1 1 2 2 2; repeats are the 2nd and 3rd copies.
  grown2, gcfg2 = growth.grow(source, CFG, 9, "block_expand", zero_gate=zero_gate)
  assert _identify(grown2, gcfg2, source) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  lines = growth.describe(3, 9, "block_expand", zero_gate=zero_gate)
  assert lines[3] == "block 3: source block 1" and lines[4].startswith("block 4: source block 1 (")
  for g, c, first in ((grown, gcfg, {0, 1}), (grown2, gcfg2, {0, 3, 6})):
    for i in range(c.depth):
      blk = _flat(_block(g, i))
      for k in gated:
        is_zero = not np.any(blk[k])
        assert is_zero == (zero_gate and i not in first), (i, k)


def test_constant_fresh_block_init(source):
  """Fresh blocks follow the official init_constant; kept blocks and the rest are copies."""
  grown, gcfg = growth.grow(source, CFG, 20, "constant", keep=2, key=jax.random.key(3))
  src, fresh = growth.source_indices(3, 20, "constant", keep=2)
  assert list(src[:2]) == [0, 1] and not fresh[:2].any() and fresh[2:].all()
  for k in ("patch_embed", "t_block", "caption_norm", "final_linear"):
    for a, b in zip(jax.tree_util.tree_leaves(grown[k]), jax.tree_util.tree_leaves(source[k])):
      np.testing.assert_array_equal(a, b)
  for i in range(2):
    for k, v in _flat(_block(source, i)).items():
      np.testing.assert_array_equal(_flat(_block(grown, i))[k], v)
  new = {k: v[2:] for k, v in _flat(grown["blocks"]).items()}  # 18 fresh blocks
  zeros = [
    "self_attn/out/kernel",
    "self_attn/out/bias",
    "cross_attn/out/kernel",
    "cross_attn/out/bias",
    "cross_attn/q/bias",
    "cross_attn/kv/bias",
    "mlp/point/kernel",
  ]
  ones = ["self_attn/q_norm", "self_attn/k_norm", "cross_attn/q_norm", "cross_attn/k_norm"]
  std = {
    "mlp/depthwise_kernel": 0.2,
    "mlp/depthwise_bias": 0.2,
    "scale_shift_table": 0.02,
    "self_attn/qkv/kernel": 0.02,
    "cross_attn/q/kernel": 0.02,
    "cross_attn/kv/kernel": 0.02,
    "mlp/inverted/kernel": 0.02,
    "mlp/inverted/bias": 0.02,
  }
  assert set(new) == set(zeros) | set(ones) | set(std)
  for k in zeros:
    np.testing.assert_array_equal(new[k], 0.0)
  for k in ones:
    np.testing.assert_array_equal(new[k], 1.0)
  for k, s in std.items():
    v = new[k].astype(np.float64)
    # n >= 4320 draws: the sample std is within 6 % (5 sigma), the mean within 4 sigma.
    assert abs(v.std() / s - 1) < 0.06, (k, v.std())
    assert abs(v.mean()) < 4 * s / np.sqrt(v.size), (k, v.mean())
  # Different blocks get different draws; the same key gives the same tree.
  assert not np.array_equal(new["self_attn/qkv/kernel"][0], new["self_attn/qkv/kernel"][1])
  again, _ = growth.grow(source, CFG, 20, "constant", keep=2, key=jax.random.key(3))
  for a, b in zip(jax.tree_util.tree_leaves(grown), jax.tree_util.tree_leaves(again)):
    np.testing.assert_array_equal(a, b)
  other, _ = growth.grow(source, CFG, 20, "constant", keep=2, key=jax.random.key(4))
  assert not np.array_equal(
    other["blocks"]["mlp"]["depthwise_kernel"], grown["blocks"]["mlp"]["depthwise_kernel"]
  )


def test_grow_is_pure(source):
  before = _flat(source)
  growth.grow(source, CFG, 6, "block_expand", zero_gate=True)
  growth.grow(source, CFG, 5, "constant", key=jax.random.key(0))
  for k, v in _flat(source).items():
    np.testing.assert_array_equal(v, before[k])


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(depth=2, strategy="cyclic"), "target depth >= source depth, got 2 < 3"),
    (dict(depth=2, strategy="constant", keep=1, key=jax.random.key(0)), "2 < 3"),
    (dict(depth=6, strategy="expand"), "unknown growth strategy 'expand'"),
    (dict(depth=6, strategy="progressive"), "not implemented"),
    (dict(depth=7, strategy="block_expand"), "7 is not a multiple of 3"),
    (dict(depth=6, strategy="cyclic", keep=4), r"keep must be an int in 1..3"),
    (dict(depth=6, strategy="cyclic", keep=0), r"keep must be an int in 1..3"),
    (dict(depth=6, strategy="constant"), "pass key="),
    (dict(depth=6, strategy="constant", zero_gate=True, key=jax.random.key(0)), "zero_gate"),
    (dict(depth=6.0, strategy="cyclic"), "target depth must be an int"),
  ],
)
def test_bad_input(source, kwargs, match):
  with pytest.raises(ValueError, match=match):
    growth.grow(source, CFG, **kwargs)


def test_bad_input_tree_and_default_keep(source):
  with pytest.raises(ValueError, match="config depth is 4"):
    growth.grow(source, CFG.replace(depth=4), 6, "cyclic")
  with pytest.raises(ValueError, match="no 'blocks' subtree"):
    growth.grow({k: v for k, v in source.items() if k != "blocks"}, CFG, 6, "cyclic")
  two = dict(source, blocks=jax.tree_util.tree_map(lambda a: a[:2], source["blocks"]))
  with pytest.raises(ValueError, match="only 2: pass keep"):
    growth.grow(two, CFG.replace(depth=2), 4, key=jax.random.key(0))


# ----------------------------------------------------------------------------- conversion


def test_grown_checkpoint_converts(source, tmp_path):
  """Grown trees round-trip through the official and diffusers formats bit-exactly, and a
  diffusers model loaded from the grown weights computes what ours does."""
  grown, gcfg = growth.grow(source, CFG, 6, "constant", keep=2, key=jax.random.key(1))
  grown = jax.device_get(grown)
  back, _ = W.official_to_params(W.params_to_official(grown, gcfg), gcfg)
  back2 = W.diffusers_to_params(W.params_to_diffusers(grown, gcfg), gcfg)
  for tree in (back, back2):
    got = _flat(tree)
    for k, v in _flat(grown).items():
      np.testing.assert_array_equal(got[k], v)
  W.save_flax(tmp_path / "grown", grown, gcfg)
  loaded, lcfg, _ = W.load_flax(tmp_path / "grown")
  assert lcfg == gcfg

  dcfg = gcfg.diffusers_compatible()
  model = ref.diffusers_model(dcfg)
  sd = W.params_to_diffusers(loaded, dcfg)
  model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
  x, _, y, mask = _inputs(dcfg, seed=9)
  t = np.array([640.0, 37.0], np.float32)
  ours = _run(dcfg, loaded, (x, t, y, mask))
  theirs = ref.run_diffusers(model, x, t, y, mask)
  assert ref.rel_err(ours, theirs) <= 1e-5
