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
