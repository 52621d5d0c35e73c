"""DiT weights: official state dict <-> diffusers state dict <-> our parameter tree.

All conversions go through `dit_table`. Every reader is strict: missing, unexpected or
mis-shaped tensors raise `CheckpointError` listing them. Tensors are numpy arrays (torch
tensors only at the .pth boundary, in `io`).

Our checkpoint format ("flax"): a folder with `config.json` ({"format": "sana_jax.dit",
"model": DiTConfig fields}) and `params.safetensors` holding the tree flattened with '/'
(plus `extras/...` buffers such as the null-caption embedding).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import warnings
from typing import Any, Mapping

import numpy as np

from sana_jax.models.dit_config import DiTConfig
from sana_jax.weights import dit_table as table
from sana_jax.weights import io
from sana_jax.weights.io import CheckpointError

FORMAT = "sana_jax.dit"


# ------------------------------------------------------------------------- tree helpers


flatten = io.flatten  # the one tree flattening ('a/b/kernel' keys), shared by all models
unflatten = io.unflatten


def _expected_flax_shapes(cfg: DiTConfig) -> dict[str, tuple]:
  from sana_jax.models import dit

  return {k: tuple(v.shape) for k, v in flatten(dit.abstract_params(cfg)).items()}


def _block_count(keys, pattern: str) -> int:
  rx = re.compile(pattern)
  idx = {int(m.group(1)) for k in keys if (m := rx.match(k))}
  return max(idx) + 1 if idx else 0


# ------------------------------------------------------------------- config inference


def infer_geometry(official: Mapping[str, np.ndarray]) -> dict:
  """Config fields that an official state dict determines by itself."""

  def shape(key):
    if key not in official:
      raise CheckpointError(f"official state dict has no {key!r}; is it a SANA DiT checkpoint?")
    return official[key].shape

  c, cin, p, _ = shape("x_embedder.proj.weight")
  return {
    "hidden_size": c,
    "in_channels": cin,
    "patch_size": p,
    "out_channels": shape("final_layer.linear.weight")[0] // (p * p),
    "depth": _block_count(official, r"blocks\.(\d+)\."),
    "caption_channels": shape("y_embedder.y_proj.fc1.weight")[1],
    "mlp_hidden": shape("blocks.0.mlp.point_conv.conv.weight")[1],
    "cross_inner": shape("blocks.0.cross_attn.q_linear.weight")[0],
    "qk_norm": "blocks.0.attn.q_norm.weight" in official,
    "cross_norm": "blocks.0.cross_attn.q_norm.weight" in official,
    "caption_norm": "attention_y_norm.weight" in official,
  }


class PositionalEmbeddingError(CheckpointError):
  """An official `pos_embed` buffer that no 2-D sin-cos embedding reproduces."""


def official_pos_embed(hidden: int, base: int, interpolation: float) -> np.ndarray:
  """The (base * base, hidden) float64 buffer the official code stores as `pos_embed`.

  REFERENCE.md section 1: positions arange(base) / (base / base) / interpolation, computed
  in float32 as the official get_2d_sincos_pos_embed does; the first half of the channels
  encodes the w coordinate, the second h, each half [sin, cos] with
  omega = 1 / 10000 ** (arange(hidden / 4) / (hidden / 4)).
  """
  axis = _axis_embed(hidden, base, interpolation)
  w = np.broadcast_to(axis[None, :, :], (base, base, hidden // 2))  # token (h, w): w's
  h = np.broadcast_to(axis[:, None, :], (base, base, hidden // 2))
  return np.concatenate([w, h], axis=-1).reshape(base * base, hidden)


def _axis_embed(hidden: int, base: int, interpolation: float) -> np.ndarray:
  """(base, hidden / 2) float64: [sin, cos] of one coordinate's official positions."""
  if hidden % 4:
    raise PositionalEmbeddingError(
      f"a sin-cos positional embedding needs hidden_size % 4 == 0, got {hidden}"
    )
  pos = (
    np.arange(base, dtype=np.float32) / np.float32(base / base) / np.float32(interpolation)
  ).astype(np.float32)
  omega = 1.0 / 10000 ** (np.arange(hidden // 4, dtype=np.float64) / (hidden / 4))
  out = np.outer(pos.astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _pe_error(pe: np.ndarray, base: int, interpolation: float) -> float:
  """max |pe - official_pos_embed| for a float32 (base**2, C) buffer, without building the
  full embedding (each half depends on one coordinate)."""
  c = pe.shape[1]
  grid = pe.reshape(base, base, c)
  axis = _axis_embed(c, base, interpolation).astype(np.float32)
  return float(
    max(
      np.max(np.abs(grid[..., : c // 2] - axis[None])),
      np.max(np.abs(grid[..., c // 2 :] - axis[:, None])),
    )
  )


def _pos_embed_buffer(
  official: Mapping[str, np.ndarray], hidden: int | None
) -> tuple[np.ndarray, int, Any] | None:
  """(buffer (tokens, C) as float32, base grid size, stored dtype), or None without one."""
  if "pos_embed" not in official:
    return None
  pe = np.asarray(official["pos_embed"])
  shape = tuple(pe.shape)
  if pe.ndim == 3 and shape[0] == 1:
    pe = pe[0]
  if pe.ndim != 2 or (hidden is not None and pe.shape[1] != hidden):
    raise PositionalEmbeddingError(
      f"pos_embed has shape {shape}, expected (1, tokens, {hidden or 'hidden_size'})"
    )
  base = math.isqrt(pe.shape[0])
  if base * base != pe.shape[0] or base == 0:
    raise PositionalEmbeddingError(
      f"pos_embed has {pe.shape[0]} tokens, not a square base grid (base_size ** 2)"
    )
  return pe.astype(np.float32), base, pe.dtype


def _pe_tolerance(buffer_dtype, base: int) -> float:
  """Max |difference| a correct sin-cos may show: the buffer's rounding plus the official
  float32 positions (|pos| < base)."""
  import ml_dtypes

  try:
    eps = float(ml_dtypes.finfo(buffer_dtype).eps)
  except (TypeError, ValueError):
    eps = float(np.finfo(np.float32).eps)
  return 2 * eps + base * 2.0**-22


def _positional_mismatches(official: Mapping[str, np.ndarray], cfg: DiTConfig) -> list[str]:
  found = _pos_embed_buffer(official, cfg.hidden_size)
  if found is None:
    return []
  pe, base, dtype = found
  bad, ours = [], cfg.sample_size // cfg.patch_size
  if ours != base:
    bad.append(
      f"sample_size: config gives a {ours}x{ours} base grid (sample_size "
      f"{cfg.sample_size} / patch {cfg.patch_size}), checkpoint's pos_embed has "
      f"{base}x{base} tokens (sample_size {base * cfg.patch_size})"
    )
  nonzero = bool(np.any(pe))
  if nonzero != cfg.use_pe:
    bad.append(
      f"use_pe: config gives use_pe={cfg.use_pe}, checkpoint's pos_embed is "
      f"{'non-zero (the model uses the positional embedding)' if nonzero else 'zero'}"
    )
  elif cfg.use_pe and ours == base:
    err = _pe_error(pe, base, cfg.pe_interpolation)
    tol = _pe_tolerance(dtype, base)
    if err > tol:
      bad.append(
        f"pe_interpolation: config's sin-cos embedding (pe_interpolation "
        f"{cfg.pe_interpolation}) is {err:.3g} off the checkpoint's pos_embed "
        f"(tolerance {tol:.2g})"
      )
  return bad


def infer_positional(
  official: Mapping[str, np.ndarray], patch_size: int, hidden: int | None = None
) -> dict:
  """use_pe, sample_size and pe_interpolation from an official `pos_embed` buffer.

  The official code stores `pos_embed` (1, base_size ** 2, C), base_size = input_size / p:
  zeros without the positional embedding, else the sin-cos of the base grid
  (`official_pos_embed`). Returns {} without a buffer, {use_pe: False, sample_size} for a
  zero one, else also pe_interpolation, read from the phases of the last column's
  w-channels (lowest frequency first, unwrapping upwards), rounded to the fewest decimals
  that still reproduce the whole buffer to its float precision. Raises
  PositionalEmbeddingError when no interpolation reproduces it.
  """
  found = _pos_embed_buffer(official, hidden)
  if found is None:
    return {}
  pe, base, dtype = found
  fields = {"use_pe": False, "sample_size": base * patch_size}
  if not np.any(pe):
    return fields
  c = pe.shape[1]
  if c % 4:
    raise PositionalEmbeddingError(
      f"pos_embed is non-zero but hidden_size {c} is not a "
      "multiple of 4 (no 2-D sin-cos embedding fits)"
    )
  if base < 2:
    raise PositionalEmbeddingError(
      "a one-token pos_embed does not determine pe_interpolation: pass a config"
    )
  q = c // 4
  omega = 1.0 / 10000 ** (np.arange(q, dtype=np.float64) / q)
  row = pe[base - 1].astype(np.float64)  # token (h 0, w base-1): w-channels first
  x = None
  for k in np.argsort(omega):
    phase = math.atan2(row[k], row[q + k])
    if x is None:
      x = phase / omega[k]
    else:
      x = (phase + 2 * math.pi * round((x * omega[k] - phase) / (2 * math.pi))) / omega[k]
  tol = _pe_tolerance(dtype, base)
  best = (math.inf, float("nan"))
  if x is not None and math.isfinite(x) and x > 0:
    estimate = (base - 1) / x
    for cand in [round(estimate, n) for n in range(7)] + [estimate]:
      if cand <= 0:
        continue
      err = _pe_error(pe, base, cand)
      if err <= tol:
        return {**fields, "use_pe": True, "pe_interpolation": float(cand)}
      best = min(best, (err, cand))
  raise PositionalEmbeddingError(
    f"pos_embed (1, {base * base}, {c}) is non-zero but matches no 2-D sin-cos "
    f"embedding of its {base}x{base} base grid (grid = arange(n) / (n / base_size) / "
    f"pe_interpolation): the closest, pe_interpolation {best[1]:.6g}, is {best[0]:.3g} off "
    f"(tolerance {tol:.2g}); pass a config if the model uses another embedding"
  )


def check_config_fits(official: Mapping[str, np.ndarray], cfg: DiTConfig) -> None:
  """Raises naming every config field that contradicts the checkpoint (its tensors' shapes
  and, when present, its `pos_embed` buffer: use_pe, sample_size, pe_interpolation)."""
  geo = infer_geometry(official)
  derived = {"mlp_hidden": cfg.mlp_hidden, "cross_inner": cfg.cross_inner}
  bad = []
  for name, value in geo.items():
    ours = derived[name] if name in derived else getattr(cfg, name)
    if ours != value:
      field = {"mlp_hidden": "mlp_ratio", "cross_inner": "cross_heads * cross_head_dim"}.get(
        name, name
      )
      bad.append(f"{field}: config gives {name}={ours}, checkpoint has {value}")
  bad += _positional_mismatches(official, cfg)
  if bad:
    raise CheckpointError("config does not fit the checkpoint:\n  " + "\n  ".join(bad))


_RELEASED_CROSS = {1152: (16, 72), 2240: (20, 112)}


def config_from_official(official: Mapping[str, np.ndarray], **overrides) -> DiTConfig:
  """A config for an official state dict; head splits from the released models' table.

  use_pe, sample_size and pe_interpolation come from the `pos_embed` buffer (see
  `infer_positional`); a state dict without one (not written by the official code) keeps
  the defaults (no positional embedding, sample_size 32) with a warning.
  """
  geo = infer_geometry(official)
  c = geo["hidden_size"]
  heads = _RELEASED_CROSS.get(c)
  if heads is None and "cross_heads" not in overrides:
    raise CheckpointError(
      f"hidden size {c} is not a released geometry: pass a config "
      "(cross_heads / cross_head_dim cannot be read from the weights)"
    )
  fields = {k: v for k, v in geo.items() if k not in ("mlp_hidden", "cross_inner")}
  if heads:
    fields.update(cross_heads=heads[0], cross_head_dim=heads[1])
  fields["mlp_ratio"] = geo["mlp_hidden"] / c
  positional = infer_positional(official, geo["patch_size"], c)
  if not positional and not {"use_pe", "sample_size"} & set(overrides):
    warnings.warn(
      "the state dict has no pos_embed buffer (every official checkpoint has "
      "one): assuming use_pe=False, sample_size=32; pass a config if the model "
      "uses the positional embedding",
      stacklevel=2,
    )
  fields.update(positional)
  if (
    np.asarray(official["x_embedder.proj.weight"]).dtype == np.float16
    and "fp16_attn_clip" not in overrides
  ):
    warnings.warn(
      "an fp16 checkpoint: fp16_attn_clip stays False, but the fp16-trained "
      "models need the self-attention clip to +-65504 (REFERENCE.md, fp16 "
      "checkpoints): pass a config with fp16_attn_clip=True",
      stacklevel=2,
    )
  fields.update(overrides)
  return DiTConfig(**fields)


# ------------------------------------------------------ official <-> diffusers (numpy)


def _expand(row: table.Row, depth: int) -> list[tuple[str, tuple[str, ...]]]:
  if not row.in_block:
    return [(row.official, row.diffusers)]
  return [
    (row.official.format(i=i), tuple(d.format(i=i) for d in row.diffusers)) for i in range(depth)
  ]


def official_to_diffusers(official: Mapping[str, np.ndarray], cfg: DiTConfig) -> dict:
  """Official state dict -> diffusers state dict (buffers dropped)."""
  _check_keys(official, _official_keys(cfg), "official", extra_ok=_official_extra)
  out = {}
  for row in table.rows_for(cfg):
    for okey, dkeys in _expand(row, cfg.depth):
      parts = np.split(np.asarray(official[okey]), len(dkeys), axis=0)
      out.update(zip(dkeys, parts))
  return out


def diffusers_to_official(diffusers: Mapping[str, np.ndarray], cfg: DiTConfig) -> dict:
  """Diffusers state dict -> official state dict (without the y_embedding buffer)."""
  _check_keys(diffusers, _diffusers_keys(cfg), "diffusers")
  out = {}
  for row in table.rows_for(cfg):
    for okey, dkeys in _expand(row, cfg.depth):
      parts = [np.asarray(diffusers[d]) for d in dkeys]
      out[okey] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
  return out


def _official_keys(cfg):
  return [o for r in table.rows_for(cfg) for o, _ in _expand(r, cfg.depth)]


def _diffusers_keys(cfg):
  return [d for r in table.rows_for(cfg) for _, ds in _expand(r, cfg.depth) for d in ds]


def _official_extra(key: str) -> bool:
  return key in table.OFFICIAL_BUFFERS or key.startswith(table.OFFICIAL_DROPPED_PREFIXES)


def _check_keys(sd: Mapping, expected: list[str], what: str, extra_ok=lambda k: False):
  missing = sorted(set(expected) - set(sd))
  unexpected = sorted(k for k in set(sd) - set(expected) if not extra_ok(k))
  if missing or unexpected:
    msg = [f"{what} checkpoint does not match the config:"]
    if missing:
      msg.append(f"  missing ({len(missing)}): {missing[:20]}")
    if unexpected:
      msg.append(f"  unexpected ({len(unexpected)}): {unexpected[:20]}")
    raise CheckpointError("\n".join(msg))


# --------------------------------------------------------------- official <-> params


def official_to_params(official: Mapping[str, np.ndarray], cfg: DiTConfig) -> tuple[dict, dict]:
  """Official state dict -> (params tree, extras). Strict on keys and shapes."""
  check_config_fits(official, cfg)
  _check_keys(official, _official_keys(cfg), "official", extra_ok=_official_extra)
  shapes = _expected_flax_shapes(cfg)
  flat, bad = {}, []
  for row in table.rows_for(cfg):
    want = shapes[row.flax]
    per_block = want[1:] if row.in_block else want
    tensors = []
    for okey, _ in _expand(row, cfg.depth):
      t = np.asarray(official[okey])
      expect = table.torch_shape(row, per_block, cfg)
      if tuple(t.shape) != expect:
        bad.append(f"{okey}: checkpoint {tuple(t.shape)}, expected {expect}")
        continue
      tensors.append(table.to_flax(row, t, cfg))
    if len(tensors) == (cfg.depth if row.in_block else 1):
      flat[row.flax] = np.stack(tensors) if row.in_block else tensors[0]
  if bad:
    raise CheckpointError("mis-shaped tensors:\n  " + "\n  ".join(bad))
  extras = {
    name: np.asarray(official[k]) for k, name in table.OFFICIAL_BUFFERS.items() if k in official
  }
  return unflatten(flat), extras


def params_to_official(params: Mapping, cfg: DiTConfig, extras: Mapping | None = None) -> dict:
  """Params tree (+ extras) -> official state dict, with the `pos_embed` buffer the official
  code writes (its sin-cos at the base grid when use_pe, else zeros), so the file says
  what it is."""
  flat = {k: np.asarray(v) for k, v in flatten(params).items()}
  _check_params(flat, cfg)
  out = {}
  for row in table.rows_for(cfg):
    arr = flat[row.flax]
    for i, (okey, _) in enumerate(_expand(row, cfg.depth)):
      out[okey] = table.to_torch_layout(row, arr[i] if row.in_block else arr, cfg)
  for okey, name in table.OFFICIAL_BUFFERS.items():
    if extras and name in extras:
      out[okey] = np.asarray(extras[name])
  base = cfg.sample_size // cfg.patch_size
  dtype = flat["patch_embed/kernel"].dtype
  out["pos_embed"] = (
    official_pos_embed(cfg.hidden_size, base, cfg.pe_interpolation)
    if cfg.use_pe
    else np.zeros((base * base, cfg.hidden_size))
  )[None].astype(dtype)
  return out


def _check_params(flat: Mapping[str, np.ndarray], cfg: DiTConfig) -> None:
  shapes = _expected_flax_shapes(cfg)
  missing = sorted(set(shapes) - set(flat))
  unexpected = sorted(set(flat) - set(shapes))
  mis = [
    f"{k}: {tuple(flat[k].shape)} vs expected {shapes[k]}"
    for k in shapes
    if k in flat and tuple(flat[k].shape) != shapes[k]
  ]
  if missing or unexpected or mis:
    raise CheckpointError(
      "parameters do not match the config:"
      + (f"\n  missing: {missing}" if missing else "")
      + (f"\n  unexpected: {unexpected}" if unexpected else "")
      + ("\n  mis-shaped:\n    " + "\n    ".join(mis) if mis else "")
    )


def diffusers_to_params(diffusers: Mapping[str, np.ndarray], cfg: DiTConfig) -> dict:
  params, _ = official_to_params(diffusers_to_official(diffusers, cfg), cfg)
  return params


def params_to_diffusers(params: Mapping, cfg: DiTConfig) -> dict:
  return official_to_diffusers(params_to_official(params, cfg), cfg)


# ------------------------------------------------------------- diffusers config json


def to_diffusers_config(cfg: DiTConfig) -> dict:
  """config.json of a diffusers SanaTransformer2DModel with this geometry."""
  if cfg.qk_norm != cfg.cross_norm:
    raise ValueError(
      "diffusers has one qk_norm switch for self- and cross-attention; "
      f"qk_norm={cfg.qk_norm} and cross_norm={cfg.cross_norm} cannot be exported"
    )
  if not cfg.caption_norm:
    raise ValueError("diffusers' SanaTransformer2DModel always has caption_norm")
  return {
    "_class_name": "SanaTransformer2DModel",
    "in_channels": cfg.in_channels,
    "out_channels": cfg.out_channels,
    "num_attention_heads": cfg.self_heads,
    "attention_head_dim": cfg.self_head_dim,
    "num_layers": cfg.depth,
    "num_cross_attention_heads": cfg.cross_heads,
    "cross_attention_head_dim": cfg.cross_head_dim,
    "cross_attention_dim": cfg.hidden_size,
    "caption_channels": cfg.caption_channels,
    "mlp_ratio": cfg.mlp_ratio,
    "attention_bias": False,
    "sample_size": cfg.sample_size,
    "patch_size": cfg.patch_size,
    "norm_elementwise_affine": False,
    "norm_eps": cfg.norm_eps,
    "interpolation_scale": cfg.pe_interpolation if cfg.use_pe else None,
    "qk_norm": "rms_norm_across_heads" if cfg.qk_norm else None,
  }


def from_diffusers_config(d: Mapping, **overrides) -> DiTConfig:
  """Our config for a diffusers config.json; numerics set to diffusers' choices."""
  if d.get("cross_attention_dim") not in (None, d["num_attention_heads"] * d["attention_head_dim"]):
    raise ValueError("cross_attention_dim must equal the hidden size in SANA")
  if d.get("guidance_embeds"):
    raise ValueError("guidance-embedding (SANA-Sprint) models are not supported")
  qk = d.get("qk_norm") is not None
  fields = dict(
    in_channels=d.get("in_channels", 32),
    out_channels=d.get("out_channels") or d.get("in_channels", 32),
    hidden_size=d["num_attention_heads"] * d["attention_head_dim"],
    self_head_dim=d["attention_head_dim"],
    depth=d["num_layers"],
    cross_heads=d["num_cross_attention_heads"],
    cross_head_dim=d["cross_attention_head_dim"],
    caption_channels=d["caption_channels"],
    mlp_ratio=d["mlp_ratio"],
    sample_size=d.get("sample_size", 32),
    patch_size=d.get("patch_size", 1),
    norm_eps=d.get("norm_eps", 1e-6),
    qk_norm=qk,
    cross_norm=qk,
    use_pe=d.get("interpolation_scale") is not None,
    pe_interpolation=float(d.get("interpolation_scale") or 1.0),
  )
  return DiTConfig(**fields).diffusers_compatible().replace(**overrides)


# ------------------------------------------------------------------ folders and files


def save_flax(
  folder: str | os.PathLike,
  params: Mapping,
  cfg: DiTConfig,
  extras: Mapping | None = None,
  overwrite: bool = True,
) -> None:
  """Our folder, built next to `folder` and renamed into place (an existing one is replaced
  only once complete; refused with overwrite=False)."""
  flat = {k: np.asarray(v) for k, v in flatten(params).items()}
  _check_params(flat, cfg)
  flat.update({f"extras/{k}": np.asarray(v) for k, v in (extras or {}).items()})
  with io.atomic_output(folder, is_dir=True, overwrite=overwrite) as tmp:
    io.write_safetensors(flat, tmp / "params.safetensors")
    (tmp / "config.json").write_text(
      json.dumps({"format": FORMAT, "model": cfg.to_dict()}, indent=2)
    )


def load_flax(folder: str | os.PathLike) -> tuple[dict, DiTConfig, dict]:
  """Our checkpoint folder -> (params, config, extras)."""
  folder = pathlib.Path(folder)
  if not (folder / "config.json").exists():
    raise CheckpointError(f"{folder}: not a sana_jax checkpoint (no config.json)")
  meta = io.read_json(folder / "config.json", "config.json")
  if meta.get("format") != FORMAT:
    raise CheckpointError(
      f"{folder}: config.json format is {meta.get('format')!r}, expected {FORMAT!r}"
    )
  cfg = DiTConfig.coerce(meta["model"])
  flat = io.read_safetensors(folder / "params.safetensors")
  extras = {k[len("extras/") :]: v for k, v in flat.items() if k.startswith("extras/")}
  flat = {k: v for k, v in flat.items() if not k.startswith("extras/")}
  _check_params(flat, cfg)
  return unflatten(flat), cfg, extras


def save_diffusers(
  folder: str | os.PathLike,
  params: Mapping,
  cfg: DiTConfig,
  max_shard_bytes: int | None = None,
  overwrite: bool = True,
) -> None:
  """A diffusers SanaTransformer2DModel folder (written like `save_flax`)."""
  sd = params_to_diffusers(params, cfg)
  config = to_diffusers_config(cfg)
  with io.atomic_output(folder, is_dir=True, overwrite=overwrite) as tmp:
    io.write_safetensors_sharded(sd, tmp, "diffusion_pytorch_model", max_shard_bytes)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))


def load_diffusers(
  folder: str | os.PathLike, cfg: DiTConfig | None = None
) -> tuple[dict, DiTConfig]:
  """A diffusers SanaTransformer2DModel folder -> (params, config)."""
  folder = pathlib.Path(folder)
  if not folder.exists():
    raise FileNotFoundError(f"no such folder: {folder}")
  if cfg is None:
    if not (folder / "config.json").exists():
      raise CheckpointError(f"{folder}: no config.json")
    cfg = from_diffusers_config(io.read_json(folder / "config.json", "config.json"))
  sd = io.read_safetensors_folder(folder)
  return diffusers_to_params(sd, cfg), cfg


def load_official(
  path: str | os.PathLike, cfg: DiTConfig | None = None, ema: bool = False
) -> tuple[dict, DiTConfig, dict]:
  """An official .pth -> (params, config, extras). `ema` picks state_dict_ema."""
  ckpt = io.read_pth(path)
  key = "state_dict_ema" if ema else "state_dict"
  if isinstance(ckpt, Mapping) and key in ckpt:
    sd = ckpt[key]
  elif isinstance(ckpt, Mapping) and not ema and "x_embedder.proj.weight" in ckpt:
    sd = ckpt  # a bare state dict
  else:
    keys = list(ckpt)[:10] if isinstance(ckpt, Mapping) else type(ckpt).__name__
    raise CheckpointError(f"{path}: no {key!r} in the checkpoint (top-level keys: {keys})")
  sd = {k: io.torch_to_numpy(v) for k, v in sd.items()}
  if cfg is None:
    cfg = config_from_official(sd)
  params, extras = official_to_params(sd, cfg)
  return params, cfg, extras


def save_official(
  path: str | os.PathLike,
  params: Mapping,
  cfg: DiTConfig,
  extras: Mapping | None = None,
  key: str = "state_dict",
  overwrite: bool = True,
) -> None:
  """An official .pth ({key: state dict}), written like `save_flax`."""
  sd = params_to_official(params, cfg, extras)
  io.write_pth({key: {k: io.numpy_to_torch(v) for k, v in sd.items()}}, path, overwrite=overwrite)
