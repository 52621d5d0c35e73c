"""A tiny latent dataset for training tests: 8 fixed examples with distinct captions."""

from __future__ import annotations

import numpy as np

from sana_jax.data import latents_tfds


def write_tiny_dataset(
  root,
  n: int = 8,
  hw=(4, 6),
  channels: int = 4,
  caption_len: int = 12,
  caption_channels: int = 20,
  seed: int = 0,
  name: str = "tiny",
) -> str:
  rng = np.random.default_rng(seed)
  latents = rng.standard_normal((n, *hw, channels)).astype(np.float32)
  captions = rng.standard_normal((n, caption_len, caption_channels)).astype(np.float32)
  lengths = rng.integers(3, caption_len + 1, n)
  masks = (np.arange(caption_len)[None] < lengths[:, None]).astype(np.int8)

  def examples():
    for i in range(n):
      yield {
        "latent": latents[i],
        "caption": captions[i],
        "caption_mask": masks[i],
        "text": f"example {i}",
      }

  return latents_tfds.write_dataset(
    examples,
    str(root),
    name,
    buckets=[hw],
    channels=channels,
    caption_len=caption_len,
    caption_channels=caption_channels,
    null_caption=rng.standard_normal((caption_len, caption_channels)).astype(np.float32),
    null_mask=np.ones(caption_len, np.int32),
  )


def compiled_update_text(update_fn, tx, tc, params) -> str:
  """The compiled text of `update_fn(state, loss, grads, tx=tx, tc=tc)` (train/update.py's
  signature) on abstract inputs for the parameter tree `params` (ShapeDtypeStructs), the
  state donated as the train step does."""
  import jax
  import jax.numpy as jnp

  from sana_jax.train import state as state_lib

  state = jax.eval_shape(lambda p: state_lib.create(p, tx), params)
  fn = jax.jit(lambda s, l, g: update_fn(s, l, g, tx=tx, tc=tc), donate_argnums=(0,))
  return fn.lower(state, jax.ShapeDtypeStruct((), jnp.float32), params).compile().as_text()


def assert_same_training(params, reference, eight_bit: bool) -> float:
  """Two runs of the same training on different meshes / process counts agree: returns the
  worst |difference| relative to the parameters' scale.

  Without 8-bit first moments (eight_bit False) the only difference is reduction order:
  within 1e-5 of the parameters' scale, and no leaf drifts relative to its own. With them
  (the default train.came_8bit_state="compact"), a last-bit difference of m may flip an
  8-bit code by one level, a whole quantisation step of that m (docs/came.md). Which codes
  flip depends on the last bits of m, so any change of rounding in the code moves it, and
  a flip in a block whose range an outlier sets moves a small value by much of its step:
  the worst difference measured after 3 to 6 steps of the tiny model was 5e-5 to 3.4e-4 of
  the scale (two processes against one: 5.8e-5, then 3.4e-4 once the clip factor went into
  CAME), so the bound is 2e-3. A flip also moves the later gradients of every value a
  little, so the share of values beyond the 1e-5 bound grows with the steps after it
  (measured: 0.001% to 0.011% after 3 steps, 0.0014% and 0.107% after 6): at most 1% may
  lie beyond it, where a sharding bug (a wrong shard, a missing reduction) moves nearly all.
  """
  import jax

  pairs = [
    (np.asarray(a, np.float64), np.asarray(b, np.float64))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference), strict=True)
  ]
  scale = max(np.max(np.abs(b)) for _, b in pairs)
  worst = max(np.max(np.abs(a - b)) for a, b in pairs) / scale
  if not eight_bit:
    assert worst <= 1e-5, worst
    for a, b in pairs:  # and no leaf drifts, even ones that started at zero
      assert np.max(np.abs(a - b)) <= 1e-4 * max(np.max(np.abs(b)), 1e-6)
    return worst
  beyond = sum(int(np.count_nonzero(np.abs(a - b) > 1e-5 * scale)) for a, b in pairs)
  share = beyond / sum(b.size for _, b in pairs)
  print(f"8-bit m: worst {worst:.2e} of the scale; {share:.4%} of the values beyond 1e-5")
  assert worst <= 2e-3, worst
  assert share <= 1e-2, share
  return worst


def eight_bit_codes(opt_state) -> dict[str, np.ndarray]:
  """{path: uint8 codes} of every 8-bit first moment in an optimizer state: a live one
  (QuantizedArray leaves) or one restored from a checkpoint (nested dicts of arrays)."""
  import jax

  flat, _ = jax.tree_util.tree_flatten_with_path(opt_state)
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat if v.dtype == np.uint8}


def code_flips(codes, reference) -> tuple[float, int]:
  """(share of differing codes, most levels any differs by) between two lists of 8-bit
  code arrays (int), pairwise."""
  flips = [
    np.abs(np.asarray(a, np.int32) - np.asarray(b, np.int32))
    for a, b in zip(codes, reference, strict=True)
  ]
  share = sum(int(np.count_nonzero(f)) for f in flips) / sum(f.size for f in flips)
  return share, max(int(f.max()) for f in flips)
