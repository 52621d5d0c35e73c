"""Our DiT's LoRA adapters <-> the safetensors file diffusers' Sana pipeline loads.

diffusers (`SanaPipeline.load_lora_weights`, `SanaTransformer2DModel.load_lora_adapter`)
reads PEFT keys `transformer.transformer_blocks.{i}.<module>.lora_A.weight` (r, in) and
`.lora_B.weight` (out, r); the MLP's 1x1 convs carry trailing (1, 1) dims. The module names
come from the DiT key table (`sana_jax.weights.dit_table.BLOCK_ROWS`), the same rows the base
weights use: a fused kernel listed with several diffusers keys (our self-attention qkv ->
attn1.to_q / to_k / to_v, cross kv -> attn2.to_k / to_v) has one adapter per slice.

Scale. PEFT applies y += (alpha / r) (x A^T) B^T per module (alpha / sqrt(r) with rsLoRA).
A file without adapter metadata means alpha = r (scale 1) in diffusers. Export folds our
alpha / r into lora_B and writes no adapter metadata, so diffusers applies exactly our term.
Import reads `lora_adapter_metadata` (lora_alpha, r, rank_pattern, alpha_pattern,
use_rslora) when the file has it and folds each module's scale into our lora_b, giving a
config with lora_alpha = lora_rank (scale 1).

The MLP's up-projection is one diffusers module (ff.conv_inverted, 2H outputs) but two
groups in our kernel (in, 2, H), each with its own (A, B). Import copies the module's A into
both groups and splits its B; export writes rank r when both groups share A (an imported
adapter) and otherwise the exact rank-2r equivalent ([A0 A1], block-diagonal B).

Ranks that differ between modules (rank_pattern) import zero-padded to the largest rank;
a fused slice without an adapter (e.g. only to_q trained) imports as a zero slice. Both are
exact: zero rows and columns add nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import re
import struct
from typing import Any, Mapping

import numpy as np

from sana_jax.lora.errors import (
  LoraError,
  LoraFormatError,
  LoraGeometryError,
  LoraKeyError,
  LoraRankError,
  LoraShapeError,
)
from sana_jax.models.dit_config import LORA_TARGETS, DiTConfig
from sana_jax.weights import dit_table
from sana_jax.weights import io

PREFIX = "transformer."  # diffusers' LoRA files prefix every transformer key with this
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
_KEY = re.compile(r"^transformer_blocks\.(\d+)\.(.+)\.(lora_A|lora_B)\.weight$")


# ---------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class Target:
  """One adapter target of ours and the diffusers module(s) it corresponds to."""

  name: str  # e.g. "self_attn.qkv" (models.dit_config.LORA_TARGETS)
  path: tuple[str, ...]  # its node under params["blocks"]
  modules: tuple[str, ...]  # diffusers module names within a block ("attn1.to_q", ...)
  kind: str  # dit_table kind of the kernel row: linear, linear_split, conv1x1, conv1x1_split

  @property
  def conv(self) -> bool:
    return self.kind.startswith("conv")


def _build_targets() -> dict[str, Target]:
  rows = {r.flax: r for r in dit_table.BLOCK_ROWS}
  out = {}
  for name in LORA_TARGETS:
    path = tuple(name.split("."))
    row = rows["blocks/" + "/".join(path) + "/kernel"]
    block = "transformer_blocks.{i}."
    modules = tuple(d.removeprefix(block).removesuffix(".weight") for d in row.diffusers)
    out[name] = Target(name, path, modules, row.kind)
  return out


TARGETS: dict[str, Target] = _build_targets()
_BY_MODULE = {m: (t, j) for t in TARGETS.values() for j, m in enumerate(t.modules)}


def kernel_shapes(cfg: DiTConfig) -> dict[str, tuple]:
  """{target: per-block kernel shape (in, [g,] out)} of cfg's geometry (nothing allocated)."""
  return dict(_kernel_shapes(cfg.replace(lora_rank=0, lora_alpha=0.0, lora_targets=())))


@functools.lru_cache(maxsize=16)
def _kernel_shapes(cfg: DiTConfig) -> tuple:
  from sana_jax.models import dit

  blocks = dit.abstract_params(cfg)["blocks"]
  out = {}
  for name, t in TARGETS.items():
    node = blocks
    for p in t.path:
      node = node[p]
    out[name] = tuple(node["kernel"].shape[1:])
  return tuple(out.items())


# ------------------------------------------------------------------------------- export


def _node(params: Mapping, t: Target) -> Mapping:
  node = params["blocks"]
  for p in t.path:
    node = node[p]
  return node


def _module_factors(t: Target, a: np.ndarray, b: np.ndarray):
  """One block's leaves -> [(module, A (in, r), B (r, out))] in diffusers' module split."""
  if t.kind in ("linear", "conv1x1"):
    return [(t.modules[0], a, b)]
  if t.kind == "linear_split":
    return [(m, a[:, j], b[j]) for j, m in enumerate(t.modules)]
  # conv1x1_split: one diffusers module whose outputs are our groups, concatenated.
  g, r, out = b.shape
  if all(np.array_equal(a[:, 0], a[:, j]) for j in range(1, g)):
    return [(t.modules[0], a[:, 0], np.concatenate(list(b), axis=1))]
  big_b = np.zeros((g * r, g * out), b.dtype)
  for j in range(g):
    big_b[j * r : (j + 1) * r, j * out : (j + 1) * out] = b[j]
  return [(t.modules[0], np.concatenate([a[:, j] for j in range(g)], axis=1), big_b)]


def to_diffusers(params: Mapping, cfg: DiTConfig) -> dict[str, np.ndarray]:
  """The adapters of a parameter tree (the `lora_a`/`lora_b` leaves of cfg.lora_targets) as
  diffusers' LoRA state dict, float32, with `transformer.` keys and alpha / r folded into
  lora_B. Raises LoraError subclasses naming what does not fit cfg."""
  if not cfg.lora_rank:
    raise LoraGeometryError("the config has lora_rank 0: there are no adapters to export")
  check_adapters(params, cfg)
  scale = cfg.lora_scale
  out = {}
  for name in cfg.lora_targets:
    t = TARGETS[name]
    node = _node(params, t)
    a = np.asarray(node["lora_a"], np.float32)
    b = np.asarray(node["lora_b"], np.float32)
    for i in range(cfg.depth):
      for module, ma, mb in _module_factors(t, a[i], b[i]):
        key = f"{PREFIX}transformer_blocks.{i}.{module}"
        la, lb = np.ascontiguousarray(ma.T), np.ascontiguousarray(scale * mb.T)
        if t.conv:
          la, lb = la[:, :, None, None], lb[:, :, None, None]
        out[f"{key}.lora_A.weight"] = la
        out[f"{key}.lora_B.weight"] = lb
  return out


def check_adapters(params: Mapping, cfg: DiTConfig) -> None:
  """Raises unless params holds lora_a (L, in, [g,] r) / lora_b (L, [g,] r, out) for every
  target of cfg, with cfg's depth, widths and rank."""
  shapes = kernel_shapes(cfg)
  bad = []
  for name in cfg.lora_targets:
    t = TARGETS[name]
    try:
      node = _node(params, t)
      a, b = node["lora_a"], node["lora_b"]
    except (KeyError, TypeError):
      bad.append(f"{name}: no lora_a/lora_b leaves")
      continue
    k = shapes[name]
    want_a = (cfg.depth, k[0], *k[1:-1], cfg.lora_rank)
    want_b = (cfg.depth, *k[1:-1], cfg.lora_rank, k[-1])
    for leaf, arr, want in (("lora_a", a, want_a), ("lora_b", b, want_b)):
      if tuple(arr.shape) != want:
        bad.append(f"{name}/{leaf}: shape {tuple(arr.shape)}, config needs {want}")
  if bad:
    raise LoraGeometryError("adapters do not fit the config:\n  " + "\n  ".join(bad))


def save(
  path: str | os.PathLike, params: Mapping, cfg: DiTConfig, overwrite: bool = False
) -> pathlib.Path:
  """Writes `to_diffusers(params, cfg)` as one .safetensors file (whole or not at all)."""
  sd = to_diffusers(params, cfg)
  path = pathlib.Path(path)
  meta = {
    "format": "pt",
    "sana_jax.lora": json.dumps(
      {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha or cfg.lora_rank, "targets": cfg.lora_targets}
    ),
  }
  with io.atomic_output(path, is_dir=False, overwrite=overwrite) as tmp:
    io.write_safetensors(sd, tmp, metadata=meta)
  return path


# ------------------------------------------------------------------------------- import


def _read(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
  """(tensors, the header's __metadata__ strings) of a .safetensors file. Raises
  LoraFormatError for anything that is not a readable safetensors file, FileNotFoundError
  for a missing one."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"no such LoRA file: {path}")
  if path.is_dir():
    raise LoraFormatError(f"{path}: a folder, not a LoRA .safetensors file")
  try:
    io.check_safetensors(path)
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(n))
    tensors = io.read_safetensors(path)
  except (io.CheckpointError, ValueError, KeyError, TypeError) as e:
    raise LoraFormatError(f"{path}: not a safetensors file ({e})") from None
  return tensors, dict(header.get("__metadata__") or {})


def read_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict | None]:
  """(tensors, adapter metadata or None) of a diffusers LoRA .safetensors file.

  The metadata is diffusers' `lora_adapter_metadata` header entry with its `transformer.`
  prefix removed (PEFT LoraConfig fields). Raises LoraFormatError for anything that is not a
  readable safetensors file, FileNotFoundError for a missing one."""
  tensors, header = _read(path)
  raw = header.get(METADATA_KEY)
  metadata = None
  if raw:
    try:
      metadata = json.loads(raw)
    except json.JSONDecodeError as e:
      raise LoraFormatError(f"{path}: malformed {METADATA_KEY} ({e})") from None
    if not isinstance(metadata, dict):
      raise LoraFormatError(f"{path}: {METADATA_KEY} is not a JSON object")
    metadata = {k.removeprefix(PREFIX): v for k, v in metadata.items()}
  return tensors, metadata


def _pattern_value(patterns: Mapping, module: str, default):
  """PEFT's rank_pattern/alpha_pattern lookup (peft.utils.other.get_pattern_key): the first
  pattern p with re.match(rf"(.*\\.)?({p})$", module)."""
  for p, v in (patterns or {}).items():
    if re.match(rf"(.*\.)?({p})$", module):
      return v
  return default


def _module_scale(metadata: Mapping | None, module: str, rank: int) -> float:
  """diffusers' scale for one module: 1 without metadata (alpha mirrors the rank), else
  alpha / r (alpha / sqrt(r) with use_rslora) from the LoraConfig fields."""
  if metadata is None:
    return 1.0
  r = _pattern_value(metadata.get("rank_pattern"), module, metadata.get("r", rank))
  if int(r) != rank:
    raise LoraRankError(
      f"{module}: the adapter metadata gives rank {r}, its lora_A/lora_B have rank {rank}"
    )
  alpha = _pattern_value(metadata.get("alpha_pattern"), module, metadata.get("lora_alpha", rank))
  return float(alpha) / (math.sqrt(rank) if metadata.get("use_rslora") else rank)


def from_diffusers(
  state_dict: Mapping[str, Any], cfg: DiTConfig, metadata: Mapping | None = None
) -> tuple[dict, DiTConfig]:
  """A diffusers/PEFT LoRA state dict -> (adapter tree, config with the adapters).

  state_dict: keys with or without the `transformer.` prefix, numpy or torch tensors.
  cfg: the base model's config (its lora fields are ignored). Returns the tree
  {"blocks": {...: {"lora_a", "lora_b"}}} holding only the adapter leaves (float32; merge it
  into base parameters with `sana_jax.lora.merge.attach`) and cfg with lora_rank = the
  largest module rank, lora_alpha = lora_rank (scales folded into lora_b) and lora_targets =
  the targets the file touches.
  """
  if metadata is not None:
    unsupported = [k for k in ("use_dora", "lora_bias") if metadata.get(k)]
    if unsupported:
      raise LoraFormatError(f"unsupported LoRA variant: {unsupported} (plain LoRA only)")
  sd = {str(k): _numpy(v) for k, v in state_dict.items()}
  if not sd:
    raise LoraFormatError("the LoRA file holds no tensors")
  if any(k.startswith(PREFIX) for k in sd):
    foreign = sorted(k for k in sd if not k.startswith(PREFIX))
    if foreign:
      raise LoraKeyError(
        f"keys outside the transformer ({len(foreign)}; only transformer adapters are "
        f"supported): {foreign[:8]}"
      )
    sd = {k.removeprefix(PREFIX): v for k, v in sd.items()}

  # Parse and group: (block, module) -> {"lora_A": ..., "lora_B": ...}.
  found: dict[tuple[int, str], dict] = {}
  unknown = []
  for key, arr in sd.items():
    m = _KEY.match(key)
    if not m or m.group(2) not in _BY_MODULE:
      unknown.append(key)
      continue
    found.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = arr
  if unknown:
    allowed = sorted(_BY_MODULE)
    raise LoraKeyError(
      f"{len(unknown)} keys name no adapter of a SANA block: {sorted(unknown)[:8]}; expected "
      f"transformer_blocks.<i>.<module>.lora_A.weight / lora_B.weight, module one of {allowed}"
    )
  half = sorted(f"transformer_blocks.{i}.{m}" for (i, m), ab in found.items() if len(ab) != 2)
  if half:
    raise LoraKeyError(f"modules with lora_A or lora_B but not both: {half[:8]}")

  blocks = sorted({i for i, _ in found})
  if blocks[-1] + 1 != cfg.depth:
    raise LoraGeometryError(
      f"a LoRA for another geometry: it adapts blocks up to {blocks[-1]} (depth "
      f"{blocks[-1] + 1}), the model has depth {cfg.depth}"
    )

  shapes = kernel_shapes(cfg)
  factors = {}  # (block, module) -> (A (in, r), B (r, out)) scale folded into B
  bad_geo = []
  for (i, module), ab in sorted(found.items()):
    t, j = _BY_MODULE[module]
    name = f"transformer_blocks.{i}.{module}"
    a, b = ab["lora_A"], ab["lora_B"]
    want_nd = 4 if t.conv else 2
    for leaf, arr in (("lora_A", a), ("lora_B", b)):
      if arr.ndim != want_nd or (t.conv and arr.shape[2:] != (1, 1)):
        raise LoraShapeError(
          f"{name}.{leaf}.weight: shape {tuple(arr.shape)}; a "
          + (
            "1x1 conv adapter needs (r, in, 1, 1) / (out, r, 1, 1)"
            if t.conv
            else "linear adapter needs (r, in) / (out, r)"
          )
        )
    a, b = (a[:, :, 0, 0], b[:, :, 0, 0]) if t.conv else (a, b)
    if a.shape[0] != b.shape[1]:
      raise LoraRankError(
        f"{name}: lora_A has rank {a.shape[0]} (shape {tuple(a.shape)}), lora_B has rank "
        f"{b.shape[1]} (shape {tuple(b.shape)})"
      )
    k = shapes[t.name]
    want_in = k[0]
    want_out = k[-1] * (k[1] if t.kind == "conv1x1_split" else 1)
    if (a.shape[1], b.shape[0]) != (want_in, want_out):
      bad_geo.append(
        f"{name}: in {a.shape[1]} / out {b.shape[0]}, the model's {module} has in "
        f"{want_in} / out {want_out}"
      )
      continue
    scale = _module_scale(metadata, name, a.shape[0])
    factors[(i, module)] = (a.T.astype(np.float32), (scale * b.T).astype(np.float32))
  if bad_geo:
    raise LoraGeometryError(
      f"a LoRA for another geometry (hidden_size {cfg.hidden_size}, cross inner "
      f"{cfg.cross_inner}, mlp hidden {cfg.mlp_hidden}):\n  " + "\n  ".join(bad_geo[:10])
    )

  rank = max(a.shape[1] for a, _ in factors.values())
  targets = [n for n in LORA_TARGETS if any(_BY_MODULE[m][0].name == n for _, m in factors)]
  tree: dict = {}
  for name in targets:
    t, k = TARGETS[name], shapes[name]
    groups = k[1:-1]
    a_all = np.zeros((cfg.depth, k[0], *groups, rank), np.float32)
    b_all = np.zeros((cfg.depth, *groups, rank, k[-1]), np.float32)
    for (i, module), (a, b) in factors.items():
      tt, j = _BY_MODULE[module]
      if tt.name != name:
        continue
      r = a.shape[1]
      if t.kind in ("linear", "conv1x1"):
        a_all[i, :, :r], b_all[i, :r] = a, b
      elif t.kind == "linear_split":
        a_all[i, :, j, :r], b_all[i, j, :r] = a, b
      else:  # conv1x1_split: one module's A shared by the groups, its B split among them
        out = k[-1]
        for g in range(groups[0]):
          a_all[i, :, g, :r] = a
          b_all[i, g, :r] = b[:, g * out : (g + 1) * out]
    node = tree.setdefault("blocks", {})
    for p in t.path:
      node = node.setdefault(p, {})
    node["lora_a"], node["lora_b"] = a_all, b_all
  new_cfg = cfg.replace(lora_rank=rank, lora_alpha=float(rank), lora_targets=tuple(targets))
  return tree, new_cfg


NATIVE_FORMAT = "sana_jax.lora_adapter"  # train.py's WORKDIR/lora/adapter.safetensors


def from_native(
  tensors: Mapping[str, np.ndarray], header: Mapping[str, str], cfg: DiTConfig
) -> tuple[dict, DiTConfig]:
  """train.py's adapter file (leaves keyed by their '/'-joined tree path, metadata rank,
  alpha, targets) -> (adapter tree, cfg with those adapters), checked against cfg."""
  from sana_jax.weights import dit as dit_weights

  try:
    rank, alpha = int(header["rank"]), float(header["alpha"])
    targets = tuple(json.loads(header["targets"]))
    lora_cfg = cfg.replace(lora_rank=rank, lora_alpha=alpha, lora_targets=targets)
  except (KeyError, ValueError, TypeError) as e:
    raise LoraFormatError(f"a {NATIVE_FORMAT} file with bad rank/alpha/targets ({e!r})") from None
  want = {
    f"blocks/{'/'.join(TARGETS[t].path)}/{leaf}" for t in targets for leaf in ("lora_a", "lora_b")
  }
  unknown, missing = sorted(set(tensors) - want), sorted(want - set(tensors))
  if unknown or missing:
    raise LoraKeyError(
      f"a {NATIVE_FORMAT} file for targets {list(targets)}: "
      + (f"unexpected {unknown[:8]} " if unknown else "")
      + (f"missing {missing[:8]}" if missing else "")
    )
  tree = dit_weights.unflatten({k: np.asarray(v, np.float32) for k, v in tensors.items()})
  try:
    check_adapters(tree, lora_cfg)
  except LoraGeometryError as e:
    raise LoraGeometryError(f"a LoRA for another geometry: {e}") from None
  return tree, lora_cfg


def load(path: str | os.PathLike, cfg: DiTConfig) -> tuple[dict, DiTConfig]:
  """(adapter tree, cfg with the adapters) of a LoRA .safetensors file: diffusers' format
  (`from_diffusers`) or train.py's own adapter file (`from_native`). Errors name the file."""
  tensors, header = _read(path)
  try:
    if header.get("format") == NATIVE_FORMAT:
      return from_native(tensors, header, cfg)
    _, metadata = read_file(path)
    return from_diffusers(tensors, cfg, metadata)
  except LoraError as e:
    raise type(e)(f"{path}: {e}") from None


def _numpy(v) -> np.ndarray:
  if hasattr(v, "detach"):  # a torch tensor
    return io.torch_to_numpy(v).astype(np.float32)
  return np.asarray(v, np.float32)
