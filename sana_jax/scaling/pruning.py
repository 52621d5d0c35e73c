"""Block importance and depth pruning on SanaDiT parameter trees (REFERENCE.md section 8).

Block importance (paper section 2.4):

    BI_i = 1 - E_{caption, t, noise} [ mean over tokens of cos(X_i, X_{i+1}) ]

with X_i the input of block i (X_{i+1} its output). It comes out of one scanned forward:
`SanaDiT(cfg, return_block_cosine=True)` returns the per-block token-mean cosine (L, B)
without keeping any block's activations.

Calibration inputs. Flow matching feeds the model x_t = (1 - s) x0 + s eps at model time
t = 1000 s. Each calibration sample is (caption n, timestep t_j, noise draw d):
  * eps ~ N(0, 1), drawn from fold_in(fold_in(key, d), n): the same eps for every timestep
    (common random numbers) and independent of the batch size;
  * x0 = the given latents[n] (e.g. DC-AE latents of real images, already scaled), or, when
    no latents are given, a second independent N(0, 1) draw from the same key: without images
    the model sees pure Gaussian noise with the variance an x_t of unit-variance latents
    has at that timestep ((1 - s)^2 + s^2), which is what "pure noise at the timestep" means
    here. Latents of real images, when available, put x_t on the training distribution.
The expectation is the plain mean over all N_captions x N_timesteps x N_draws samples.

Pruning keeps a subset of blocks: `jnp.take` on axis 0 of every leaf under params['blocks'],
config depth updated. `select_blocks` keeps the most important ones (in their original
order); `keep_blocks` takes explicit indices (run in the order given).
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sana_jax.models import dit
from sana_jax.models.dit_config import DiTConfig

DEFAULT_TIMESTEPS = (100, 300, 500, 700, 900)


# ----------------------------------------------------------------------------- importance


@functools.lru_cache(maxsize=16)
def _cosine_fn(cfg: DiTConfig):
  model = dit.SanaDiT(cfg, return_block_cosine=True)

  @jax.jit
  def fn(params, latents, timestep, caption, mask):
    _, cos = model.apply({"params": params}, latents, timestep, caption, mask)
    return cos

  return fn


def block_cosine(params: Mapping, cfg: DiTConfig, latents, timestep, caption, mask) -> jax.Array:
  """Per-block token-mean cos(X_i, X_{i+1}) of one forward.

  latents (B, H, W, in_ch), timestep (B,) or scalar (model time, 0..1000), caption
  (B, Ly, Cy), mask (B, Ly) -> (L, B) float32.
  """
  cfg = DiTConfig.coerce(cfg)
  b = np.shape(latents)[0]
  t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (b,))
  return _cosine_fn(cfg)(
    params,
    jnp.asarray(latents, jnp.float32),
    t,
    jnp.asarray(caption, jnp.float32),
    jnp.asarray(mask),
  )


def calibration_noise(
  key: jax.Array, draw: int, index: int, shape: tuple
) -> tuple[jax.Array, jax.Array]:
  """(eps, x0_standin) for caption `index`, noise draw `draw`; each of `shape`, N(0, 1)."""
  k = jax.random.fold_in(jax.random.fold_in(key, draw), index)
  k_eps, k_x0 = jax.random.split(k)
  return (jax.random.normal(k_eps, shape, jnp.float32), jax.random.normal(k_x0, shape, jnp.float32))


def noisy_latents(x0: jax.Array, eps: jax.Array, timestep) -> jax.Array:
  """x_t = (1 - s) x0 + s eps with s = timestep / 1000; timestep scalar or (B,)."""
  s = jnp.asarray(timestep, jnp.float32) / 1000.0
  s = jnp.reshape(s, (-1,) + (1,) * (x0.ndim - 1)) if s.ndim else s
  return (1.0 - s) * x0 + s * eps


def _check_calibration(cfg, captions, masks, latents, latent_size):
  captions, masks = np.asarray(captions), np.asarray(masks)
  if captions.ndim != 3 or captions.shape[-1] != cfg.caption_channels:
    raise ValueError(f"captions must be (N, L, {cfg.caption_channels}), got {captions.shape}")
  if masks.shape != captions.shape[:2]:
    raise ValueError(f"masks must be {captions.shape[:2]} (captions' N, L), got {masks.shape}")
  if captions.shape[0] < 1:
    raise ValueError("need at least one calibration caption")
  if latents is not None:
    latents = np.asarray(latents, np.float32)
    if (
      latents.ndim != 4
      or latents.shape[0] != captions.shape[0]
      or latents.shape[-1] != cfg.in_channels
    ):
      raise ValueError(
        f"latents must be (N={captions.shape[0]}, H, W, {cfg.in_channels}) "
        f"paired with the captions, got {latents.shape}"
      )
    shape = latents.shape[1:]
  else:
    h, w = (latent_size, latent_size) if isinstance(latent_size, int) else tuple(latent_size)
    shape = (h, w, cfg.in_channels)
  return captions, masks, latents, shape


def block_importance(
  params: Mapping,
  cfg: DiTConfig,
  captions,
  masks,
  *,
  key: jax.Array,
  timesteps: Sequence[float] = DEFAULT_TIMESTEPS,
  num_draws: int = 1,
  latents=None,
  latent_size: int | tuple | None = None,
  batch_size: int = 8,
  progress: Callable[[int], None] | None = None,
) -> np.ndarray:
  """BI_i = 1 - mean over (caption, timestep, draw, token) of cos(X_i, X_{i+1}).

  captions (N, Ly, Cy) float, masks (N, Ly): calibration caption embeddings.
  key: PRNG key of the noise (see the module docstring for the exact scheme).
  timesteps: model times in [0, 1000]. num_draws: noise draws per (caption, timestep).
  latents: optional clean latents x0 (N, H, W, in_ch) paired with the captions; without
    them x0 is a standard-normal stand-in of size latent_size (default cfg.sample_size).
  batch_size: captions per forward (the result does not depend on it).
  progress: called with the number of samples done after each forward (e.g. tqdm.update).
  Returns (L,) float64 numpy.
  """
  cfg = DiTConfig.coerce(cfg)
  timesteps = [float(t) for t in np.atleast_1d(np.asarray(timesteps, np.float64))]
  if not timesteps or any(not 0 <= t <= 1000 for t in timesteps):
    raise ValueError(
      f"timesteps must be a non-empty list of model times in [0, 1000], got {timesteps}"
    )
  if num_draws < 1 or batch_size < 1:
    raise ValueError(f"num_draws and batch_size must be >= 1, got {num_draws}, {batch_size}")
  captions, masks, latents, shape = _check_calibration(
    cfg, captions, masks, latents, cfg.sample_size if latent_size is None else latent_size
  )
  n = captions.shape[0]
  total = np.zeros(cfg.depth, np.float64)
  count = 0
  for d in range(num_draws):
    for start in range(0, n, batch_size):
      idx = range(start, min(start + batch_size, n))
      noise = [calibration_noise(key, d, i, shape) for i in idx]
      eps = jnp.stack([e for e, _ in noise])
      x0 = (
        jnp.asarray(latents[start : start + len(idx)])
        if latents is not None
        else jnp.stack([z for _, z in noise])
      )
      cap, msk = captions[start : start + len(idx)], masks[start : start + len(idx)]
      for t in timesteps:
        cos = block_cosine(params, cfg, noisy_latents(x0, eps, t), t, cap, msk)
        total += np.asarray(cos, np.float64).sum(axis=1)
        count += len(idx)
        if progress is not None:
          progress(len(idx))
  return 1.0 - total / count


def num_samples(num_captions: int, timesteps: Sequence[float], num_draws: int) -> int:
  """Forward samples block_importance runs (for a progress bar's total)."""
  return num_captions * len(list(np.atleast_1d(timesteps))) * num_draws


# -------------------------------------------------------------------------------- pruning


def select_blocks(importance, depth: int) -> list[int]:
  """Indices (ascending) of the `depth` most important blocks; ties keep earlier blocks."""
  importance = np.asarray(importance, np.float64)
  if importance.ndim != 1:
    raise ValueError(f"importance must be 1-D (one score per block), got {importance.shape}")
  n = importance.shape[0]
  if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or not 1 <= depth <= n:
    raise ValueError(f"pruned depth must be an int in 1..{n} (blocks that exist), got {depth!r}")
  if not np.all(np.isfinite(importance)):
    raise ValueError(f"importance has non-finite values: {importance}")
  order = np.argsort(-importance, kind="stable")  # most important first, ties by index
  return sorted(int(i) for i in order[:depth])


def check_indices(indices, depth: int) -> list[int]:
  """Validates explicit block indices against a model of `depth` blocks."""
  if isinstance(indices, (str, bytes)) or not hasattr(indices, "__iter__"):
    raise ValueError(f"block indices must be a sequence of integers, got {indices!r}")
  if isinstance(indices, (np.ndarray, jax.Array)):
    indices = list(np.asarray(indices).reshape(-1))
  indices = list(indices)
  if any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) for i in indices):
    raise ValueError(f"block indices must be integers, got {indices!r}")
  idx = [int(i) for i in indices]
  if not idx:
    raise ValueError("cannot prune to 0 blocks: give at least one block index")
  bad = [i for i in idx if not 0 <= i < depth]
  if bad:
    raise ValueError(f"block indices {bad} out of range: the model has blocks 0..{depth - 1}")
  dup = sorted({i for i in idx if idx.count(i) > 1})
  if dup:
    raise ValueError(f"block indices repeated: {dup} (pruning keeps each block at most once)")
  return idx


def keep_blocks(params: Mapping, cfg: DiTConfig, indices: Sequence[int]) -> tuple[dict, DiTConfig]:
  """Keeps exactly the blocks `indices` (run in that order): jnp.take on axis 0 of every
  params['blocks'] leaf. Returns (new params, cfg.replace(depth=len(indices)))."""
  cfg = DiTConfig.coerce(cfg)
  if "blocks" not in params:
    raise ValueError("params have no 'blocks' subtree; expected a SanaDiT parameter tree")
  depths = {int(np.shape(a)[0]) for a in jax.tree_util.tree_leaves(params["blocks"])}
  if depths != {cfg.depth}:
    raise ValueError(
      f"block leaves have leading sizes {sorted(depths)}, config depth is {cfg.depth}"
    )
  idx = jnp.asarray(check_indices(indices, cfg.depth), jnp.int32)
  new = {k: v for k, v in params.items() if k != "blocks"}
  new["blocks"] = jax.tree_util.tree_map(
    lambda a: jnp.take(jnp.asarray(a), idx, axis=0), params["blocks"]
  )
  return new, cfg.replace(depth=int(idx.shape[0]))


def prune(
  params: Mapping,
  cfg: DiTConfig,
  *,
  depth: int | None = None,
  indices: Sequence[int] | None = None,
  importance=None,
) -> tuple[dict, DiTConfig, list[int]]:
  """Prunes to `depth` blocks by importance (drop the least important), or to explicit
  `indices`. Exactly one of depth / indices. Returns (params, cfg, kept indices)."""
  cfg = DiTConfig.coerce(cfg)
  if (depth is None) == (indices is None):
    raise ValueError("give exactly one of depth= (prune by importance) or indices=")
  if depth is not None:
    if importance is None:
      raise ValueError("pruning to a depth needs the block importance (block_importance())")
    if np.shape(importance) != (cfg.depth,):
      raise ValueError(f"importance has shape {np.shape(importance)}, expected ({cfg.depth},)")
    indices = select_blocks(importance, depth)
  new, new_cfg = keep_blocks(params, cfg, indices)
  return new, new_cfg, [int(i) for i in indices]
