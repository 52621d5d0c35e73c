"""Model growth: make a trained DiT deeper without losing what it knows (REFERENCE.md s. 7).

Every block parameter of our tree sits under params['blocks'] with a leading layer axis 0,
so growing from N to M blocks is an array operation per leaf. Three strategies, named as in
the official `ModelGrowthInitializer`:

  "constant"      partial preservation (the paper's choice): target blocks 0..N'-1 are the
                  first N' source blocks (default N' = N - 2, as the 4.8B run kept 18 of 20);
                  blocks N'..M-1 are fresh and start as the identity.
  "cyclic"        target block i copies source block i mod N'.
  "block_expand"  block replication: each source block repeated r = M / N' times in a row.

`zero_gate=True` (cyclic / block_expand) zeroes, in every repeat (cyclic: i >= N';
block_expand: the 2nd..r-th copy), the scale_shift_table, both attention out projections
(kernel and bias) and the FFN point conv, so the repeats start as the identity and the
grown model reproduces the source.

Fresh blocks of "constant" follow the official `init_constant` exactly (where REFERENCE.md
says "remaining biases 0", the official code differs, and the code wins):
  self_attn/out/kernel, cross_attn/out/kernel, mlp/point/kernel     0 (scale_spec)
  self_attn/out/bias, cross_attn/{q,kv,out}/bias                     0
  {self,cross}_attn/{q,k}_norm                                       1
  mlp/depthwise_kernel, mlp/depthwise_bias                           N(0, 0.2)
  everything else (scale_shift_table, qkv, cross q/kv kernels,
  mlp/inverted kernel and bias)                                      N(0, scale_others=0.02)
The zero out projections make each fresh block the identity whatever the rest holds.

Non-block parameters are copied. Functions are pure: inputs are not modified, the random
draws depend only on `key`.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sana_jax.models.dit_config import DiTConfig

STRATEGIES = ("constant", "cyclic", "block_expand")
_OFFICIAL_ONLY = ("progressive", "interpolation", "random")

# Paths inside params['blocks'] (tuples of keys).
_ZERO_GATE = (
  ("scale_shift_table",),
  ("self_attn", "out", "kernel"),
  ("self_attn", "out", "bias"),
  ("cross_attn", "out", "kernel"),
  ("cross_attn", "out", "bias"),
  ("mlp", "point", "kernel"),
)
_FRESH_ZERO = (
  ("self_attn", "out", "kernel"),
  ("cross_attn", "out", "kernel"),
  ("mlp", "point", "kernel"),
  ("self_attn", "out", "bias"),
  ("cross_attn", "q", "bias"),
  ("cross_attn", "kv", "bias"),
  ("cross_attn", "out", "bias"),
)
_FRESH_ONE = (
  ("self_attn", "q_norm"),
  ("self_attn", "k_norm"),
  ("cross_attn", "q_norm"),
  ("cross_attn", "k_norm"),
)
_FRESH_DEPTHWISE = (("mlp", "depthwise_kernel"), ("mlp", "depthwise_bias"))


def _path_key(path) -> tuple[str, ...]:
  return tuple(getattr(p, "key", getattr(p, "name", str(p))) for p in path)


def _blocks_depth(params: Mapping, cfg: DiTConfig) -> int:
  if "blocks" not in params:
    raise ValueError("params have no 'blocks' subtree; expected a SanaDiT parameter tree")
  depths = {int(np.shape(a)[0]) for a in jax.tree_util.tree_leaves(params["blocks"])}
  if depths != {cfg.depth}:
    raise ValueError(
      f"block leaves have leading sizes {sorted(depths)}, config depth is {cfg.depth}"
    )
  return cfg.depth


def _check_strategy(strategy: str) -> str:
  if not isinstance(strategy, str) or strategy.lower() not in STRATEGIES:
    extra = (
      (f" ('{strategy}' is an official strategy the paper did not use; it is not implemented)")
      if isinstance(strategy, str) and strategy.lower() in _OFFICIAL_ONLY
      else ""
    )
    raise ValueError(f"unknown growth strategy {strategy!r}; expected one of {STRATEGIES}{extra}")
  return strategy.lower()


def source_indices(
  source_depth: int, target_depth: int, strategy: str, keep: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Where each target block comes from.

  Returns (src (M,) int, fresh (M,) bool): target block i copies source block src[i], or,
  where fresh[i], is a repeat to be zero-gated (cyclic / block_expand) or a new identity
  block (constant; src[i] is then -1).
  """
  strategy = _check_strategy(strategy)
  n, m = int(source_depth), int(target_depth)
  if keep is None:
    if strategy == "constant":
      if n <= 2:
        raise ValueError(
          f"'constant' keeps N - 2 source blocks by default; the source has "
          f"only {n}: pass keep=1..{n}"
        )
      keep = n - 2
    else:
      keep = n
  if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)) or not 1 <= keep <= n:
    raise ValueError(f"keep must be an int in 1..{n} (source blocks), got {keep!r}")
  if isinstance(target_depth, bool) or not isinstance(target_depth, (int, np.integer)):
    raise ValueError(f"target depth must be an int, got {target_depth!r}")
  if m < n:
    raise ValueError(
      f"growth needs target depth >= source depth, got {m} < {n} "
      "(use sana_jax.scaling.pruning to make a model shallower)"
    )
  i = np.arange(m)
  if strategy == "constant":
    return np.where(i < keep, i, -1), i >= keep
  if strategy == "cyclic":
    return i % keep, i >= keep
  if m % keep:
    raise ValueError(
      f"'block_expand' needs the target depth to be a multiple of the kept "
      f"source blocks: {m} is not a multiple of {keep}"
    )
  r = m // keep
  return i // r, (i % r) > 0


def _fresh_leaf(path: tuple[str, ...], shape, dtype, key, scale_spec: float, scale_others: float):
  if path in _FRESH_ZERO:
    if path[-1] == "kernel" and scale_spec:
      return (jax.random.normal(key, shape, jnp.float32) * scale_spec).astype(dtype)
    return jnp.zeros(shape, dtype)
  if path in _FRESH_ONE:
    return jnp.ones(shape, dtype)
  std = 0.2 if path in _FRESH_DEPTHWISE else scale_others
  return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)


def grow(
  params: Mapping,
  cfg: DiTConfig,
  depth: int,
  strategy: str = "constant",
  *,
  keep: int | None = None,
  zero_gate: bool = False,
  key: jax.Array | None = None,
  scale_spec: float = 0.0,
  scale_others: float = 0.02,
) -> tuple[dict, DiTConfig]:
  """Grows a SanaDiT parameter tree from cfg.depth to `depth` blocks.

  params: plain nested dict (block leaves (N, ...)); cfg: its DiTConfig.
  depth: target depth M >= N. strategy: one of STRATEGIES.
  keep: source blocks used (N'; default N - 2 for "constant", N otherwise).
  zero_gate: zero-gate the repeats (cyclic / block_expand; "constant" blocks are already
    the identity, so it is rejected there).
  key: jax PRNG key, required by "constant" (fresh blocks); unused otherwise.
  scale_spec / scale_others: the official init_constant arguments (0.0 keeps the identity).
  Returns (new params with block leaves (M, ...), cfg.replace(depth=M)).
  """
  cfg = DiTConfig.coerce(cfg)
  strategy = _check_strategy(strategy)
  n = _blocks_depth(params, cfg)
  src, fresh = source_indices(n, depth, strategy, keep)
  if strategy == "constant":
    if zero_gate:
      raise ValueError(
        "zero_gate applies to 'cyclic' and 'block_expand'; 'constant' blocks "
        "already start as the identity"
      )
    if key is None:
      raise ValueError("'constant' growth draws fresh blocks: pass key=jax.random.key(seed)")
  take = jnp.asarray(np.maximum(src, 0))
  fresh_j = jnp.asarray(fresh)

  leaves, treedef = jax.tree_util.tree_flatten_with_path(params["blocks"])
  keys = (
    jax.random.split(key, len(leaves))
    if key is not None and strategy == "constant"
    else [None] * len(leaves)
  )
  out = []
  for (path, leaf), k in zip(leaves, keys):
    path = _path_key(path)
    leaf = jnp.asarray(leaf)
    grown = jnp.take(leaf, take, axis=0)
    mask = fresh_j.reshape((-1,) + (1,) * (leaf.ndim - 1))
    if strategy == "constant":
      new = _fresh_leaf(path, grown.shape, leaf.dtype, k, scale_spec, scale_others)
      grown = jnp.where(mask, new, grown)
    elif zero_gate and path in _ZERO_GATE:
      grown = jnp.where(mask, jnp.zeros_like(grown), grown)
    out.append(grown)
  new_params = {k: v for k, v in params.items() if k != "blocks"}
  new_params = jax.tree_util.tree_map(jnp.asarray, new_params)
  new_params["blocks"] = jax.tree_util.tree_unflatten(treedef, out)
  return new_params, cfg.replace(depth=int(depth))


def describe(
  source_depth: int,
  target_depth: int,
  strategy: str,
  keep: int | None = None,
  zero_gate: bool = False,
) -> list[str]:
  """One human-readable line per target block (for logs and the CLI)."""
  src, fresh = source_indices(source_depth, target_depth, strategy, keep)
  strategy = _check_strategy(strategy)
  lines = []
  for i, (s, f) in enumerate(zip(src, fresh)):
    if strategy == "constant":
      lines.append(f"block {i}: " + ("fresh (identity init)" if f else f"source block {s}"))
    else:
      tag = " (zero-gated repeat)" if f and zero_gate else (" (repeat)" if f else "")
      lines.append(f"block {i}: source block {s}{tag}")
  return lines
