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
