"""Adapter trees beside base parameters: split them off, attach them, fold them in.

A parameter tree with adapters holds, beside each targeted block kernel (L, in, [g,] out),
`lora_a` (L, in, [g,] r) and `lora_b` (L, [g,] r, out); the model adds
(alpha / r) (x A) B. Merging replaces the kernel by W + lora_scale * (alpha / r) A B per
block and slice (computed and stored in float32: a bf16 base kernel is not rounded back,
which would erase adapter updates below bf16's resolution) and drops the adapter leaves, so the plain model (lora_rank 0) computes what the adapted one did (lora_scale 1).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from sana_jax.lora.errors import LoraGeometryError
from sana_jax.models.dit_config import DiTConfig

ADAPTER_LEAVES = ("lora_a", "lora_b")


def split(params: Mapping) -> tuple[dict, dict]:
  """(base tree without adapter leaves, tree of only the adapter leaves)."""
  base, adapters = {}, {}
  for k, v in params.items():
    if isinstance(v, Mapping):
      b, a = split(v)
      base[k] = b
      if a:
        adapters[k] = a
    elif k in ADAPTER_LEAVES:
      adapters[k] = v
    else:
      base[k] = v
  return base, adapters


def attach(base: Mapping, adapters: Mapping, where: str = "") -> dict:
  """base with the adapter leaves added beside their kernels (trees are not modified).
  Raises LoraGeometryError when an adapter has no kernel to sit beside."""
  out = dict(base)
  for k, v in adapters.items():
    here = f"{where}/{k}" if where else k
    if isinstance(v, Mapping):
      if not isinstance(base.get(k), Mapping):
        raise LoraGeometryError(f"adapter node {here} has no counterpart in the base parameters")
      out[k] = attach(base[k], v, here)
    else:
      if "kernel" not in base:
        raise LoraGeometryError(f"adapter leaf {here} has no kernel beside it in the base")
      out[k] = v
  return out


def _delta(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """A (L, in, [g,] r), B (L, [g,] r, out) -> A B (L, in, [g,] out), float32."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  if a.ndim == 3:
    return np.einsum("lir,lro->lio", a, b)
  return np.einsum("ligr,lgro->ligo", a, b)


def merge(params: Mapping, cfg: DiTConfig, lora_scale: float = 1.0) -> tuple[dict, DiTConfig]:
  """(params with every adapter folded into its kernel, cfg with lora_rank 0).

  lora_scale multiplies the adapters' effect (0: the base model, 1: as trained). Merged
  kernels are float32 (float64 stays float64); other leaves keep their dtype."""
  if not cfg.lora_rank:
    raise LoraGeometryError("the config has lora_rank 0: there are no adapters to merge")
  factor = float(lora_scale) * cfg.lora_scale

  def fold(node):
    out = {}
    for k, v in node.items():
      if isinstance(v, Mapping):
        out[k] = fold(v)
      elif k not in ADAPTER_LEAVES:
        out[k] = v
    if "lora_a" in node:
      kernel = np.asarray(node["kernel"])
      delta = _delta(node["lora_a"], node["lora_b"])
      if delta.shape != kernel.shape:
        raise LoraGeometryError(
          f"adapter product {delta.shape} does not match its kernel {kernel.shape}"
        )
      dtype = np.float64 if kernel.dtype == np.float64 else np.float32
      out["kernel"] = kernel.astype(dtype) + factor * delta.astype(dtype)
    return out

  merged = fold(params)
  _, left = split(merged)
  assert not left
  return merged, cfg.replace(lora_rank=0, lora_alpha=0.0)


def merge_into(
  base: Mapping, base_cfg: DiTConfig, adapters: Mapping, lora_cfg: DiTConfig, lora_scale: float
) -> tuple[dict, DiTConfig]:
  """A model without adapters (base, base_cfg) with an adapter tree (from
  `sana_jax.lora.diffusers.load`, whose lora_cfg gives rank, alpha and targets) folded in
  at lora_scale: (merged params, base_cfg)."""
  cfg = base_cfg.replace(
    lora_rank=lora_cfg.lora_rank, lora_alpha=lora_cfg.lora_alpha, lora_targets=lora_cfg.lora_targets
  )
  merged, _ = merge(attach(base, adapters), cfg, lora_scale)
  return merged, base_cfg
