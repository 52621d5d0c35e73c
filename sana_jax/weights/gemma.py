"""Gemma-2 weights: transformers checkpoint folder <-> our Flax parameter tree.

One declarative table (`_LAYER_TABLE`, `_GLOBAL_TABLE`) maps transformers names to Flax
paths with the tensor transform; both directions use it. Loading is strict: missing,
unexpected or mis-shaped tensors raise one ValueError listing all of them. safetensors
files are read without torch by the shared reader (`io.read_safetensors`: memory-mapped,
bfloat16 kept through ml_dtypes).

Accepted folders: `Gemma2Model.save_pretrained` (keys `layers.0....`) or
`Gemma2ForCausalLM.save_pretrained` (keys `model.layers.0....`, optional `lm_head.weight`,
which the encoder does not use and is skipped), as `model.safetensors` or sharded with
`model.safetensors.index.json`.

Our own format (`save_params` / `load_params`): a folder with `params.safetensors`
(flat keys 'layers/attn/q/kernel', ...) and `config.json` (Gemma2Config.to_dict()).
"""

from __future__ import annotations

import json
import os

import numpy as np

from sana_jax.models.text_encoder import FULL, SLIDING, Gemma2Config
from sana_jax.weights import io

# transformers per-layer name -> (our path inside 'layers', transform kind)
_LAYER_TABLE: tuple[tuple[str, str, str], ...] = (
  ("input_layernorm.weight", "input_norm/scale", "copy"),
  ("post_attention_layernorm.weight", "post_attn_norm/scale", "copy"),
  ("pre_feedforward_layernorm.weight", "pre_ffw_norm/scale", "copy"),
  ("post_feedforward_layernorm.weight", "post_ffw_norm/scale", "copy"),
  ("self_attn.q_proj.weight", "attn/q/kernel", "linear"),
  ("self_attn.k_proj.weight", "attn/k/kernel", "linear"),
  ("self_attn.v_proj.weight", "attn/v/kernel", "linear"),
  ("self_attn.o_proj.weight", "attn/o/kernel", "linear"),
  ("mlp.gate_proj.weight", "mlp/gate/kernel", "linear"),
  ("mlp.up_proj.weight", "mlp/up/kernel", "linear"),
  ("mlp.down_proj.weight", "mlp/down/kernel", "linear"),
)
_GLOBAL_TABLE: tuple[tuple[str, str, str], ...] = (
  ("embed_tokens.weight", "embed/embedding", "copy"),
  ("norm.weight", "final_norm/scale", "copy"),
)
# Keys a Gemma2ForCausalLM folder may hold that the encoder does not use.
_IGNORED = ("lm_head.weight",)


def expected_hf_shapes(config: Gemma2Config) -> dict[str, tuple[int, ...]]:
  """transformers name (without 'model.') -> shape, for a Gemma2Model of this config."""
  c = config
  D, F, V = c.hidden_size, c.intermediate_size, c.vocab_size
  qd, kd = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  per_layer = {
    "input_layernorm.weight": (D,),
    "post_attention_layernorm.weight": (D,),
    "pre_feedforward_layernorm.weight": (D,),
    "post_feedforward_layernorm.weight": (D,),
    "self_attn.q_proj.weight": (qd, D),
    "self_attn.k_proj.weight": (kd, D),
    "self_attn.v_proj.weight": (kd, D),
    "self_attn.o_proj.weight": (D, qd),
    "mlp.gate_proj.weight": (F, D),
    "mlp.up_proj.weight": (F, D),
    "mlp.down_proj.weight": (D, F),
  }
  shapes = {"embed_tokens.weight": (V, D), "norm.weight": (D,)}
  for i in range(c.num_layers):
    for k, s in per_layer.items():
      shapes[f"layers.{i}.{k}"] = s
  return shapes


# ---------------------------------------------------------------------------------------
# Reading transformers folders


def config_from_hf(hf: dict, **overrides) -> Gemma2Config:
  """Gemma2Config from a transformers config.json dict (v4 or v5 layout)."""
  if hf.get("model_type") not in (None, "gemma2"):
    raise ValueError(f"expected a gemma2 config, got model_type={hf.get('model_type')!r}")
  rope = hf.get("rope_parameters") or {}
  rope_type = rope.get("rope_type", (hf.get("rope_scaling") or {}).get("rope_type", "default"))
  if rope_type != "default":
    raise ValueError(f"only default RoPE is supported, config has rope_type={rope_type!r}")
  if hf.get("attention_bias"):
    raise ValueError("attention_bias=True is not supported by the Gemma-2 encoder")
  if hf.get("use_bidirectional_attention"):
    raise ValueError("use_bidirectional_attention=True is not supported")
  fields = dict(
    vocab_size=hf["vocab_size"],
    hidden_size=hf["hidden_size"],
    intermediate_size=hf["intermediate_size"],
    num_layers=hf["num_hidden_layers"],
    num_heads=hf["num_attention_heads"],
    num_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
    head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
    rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
    rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
    query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
    sliding_window=hf.get("sliding_window", 4096),
    attn_logit_softcapping=hf.get("attn_logit_softcapping"),
    hidden_activation=hf.get("hidden_activation") or hf.get("hidden_act", "gelu_pytorch_tanh"),
    layer_types=tuple(hf["layer_types"]) if hf.get("layer_types") else None,
  )
  fields.update(overrides)
  return Gemma2Config(**fields)


def load_hf_config(folder: str, **overrides) -> Gemma2Config:
  path = os.path.join(_check_folder(folder), "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no config.json in {folder!r}")
  with open(path) as f:
    return config_from_hf(json.load(f), **overrides)


def _check_folder(folder: str) -> str:
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"checkpoint folder {folder!r} does not exist")
  return folder


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of one .safetensors file (io.read_safetensors: memory-mapped, no torch,
  bf16 kept)."""
  return io.read_safetensors(path)


def read_hf_state_dict(folder: str) -> dict[str, np.ndarray]:
  """Tensors of a transformers folder (single file or sharded with an index json)."""
  _check_folder(folder)
  index = os.path.join(folder, "model.safetensors.index.json")
  single = os.path.join(folder, "model.safetensors")
  if os.path.isfile(index):
    return io.read_safetensors_index(index)
  if os.path.isfile(single):
    return io.read_safetensors(single)
  raise FileNotFoundError(
    f"{folder!r} holds neither model.safetensors nor "
    f"model.safetensors.index.json (files: {sorted(os.listdir(folder))})"
  )


def _strip_prefix(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drop the 'model.' prefix of Gemma2ForCausalLM and its unused lm_head."""
  out = {}
  for k, v in state.items():
    if k in _IGNORED:
      continue
    out[k[len("model.") :] if k.startswith("model.") else k] = v
  return out


# ---------------------------------------------------------------------------------------
# Conversion


def hf_to_params(state: dict[str, np.ndarray], config: Gemma2Config, dtype=np.float32) -> dict:
  """transformers state dict -> our nested param dict (layers stacked on axis 0).

  Strict: raises ValueError listing missing, unexpected and mis-shaped tensors.
  """
  state = _strip_prefix(state)
  expected = expected_hf_shapes(config)
  missing = sorted(set(expected) - set(state))
  unexpected = sorted(set(state) - set(expected))
  mis_shaped = sorted(
    f"{k}: checkpoint {tuple(state[k].shape)} vs config {expected[k]}"
    for k in set(expected) & set(state)
    if tuple(state[k].shape) != expected[k]
  )
  if missing or unexpected or mis_shaped:
    raise ValueError(_mismatch_message(config, missing, unexpected, mis_shaped))

  flat = {path: np.asarray(state[hf_name]).astype(dtype) for hf_name, path, _ in _GLOBAL_TABLE}
  for hf_name, path, kind in _LAYER_TABLE:
    first = state[f"layers.0.{hf_name}"]
    shape = first.T.shape if kind == "linear" else first.shape
    stacked = np.empty((config.num_layers, *shape), dtype)  # filled per layer: one copy
    for i in range(config.num_layers):
      t = np.asarray(state[f"layers.{i}.{hf_name}"])
      stacked[i] = t.T if kind == "linear" else t  # torch Linear (out, in) -> kernel (in, out)
    flat[f"layers/{path}"] = stacked
  return unflatten(flat)


def params_to_hf(params: dict, config: Gemma2Config, prefix: str = "") -> dict:
  """Inverse of `hf_to_params`: our tree -> transformers names (prefix 'model.' for a
  Gemma2ForCausalLM body). Arrays are numpy in the params' dtype, contiguous."""
  flat = flatten(params)
  out = {}
  for hf_name, path, kind in _GLOBAL_TABLE:
    out[prefix + hf_name] = np.ascontiguousarray(np.asarray(flat[path]))
  for hf_name, path, kind in _LAYER_TABLE:
    stacked = np.asarray(flat[f"layers/{path}"])
    for i in range(config.num_layers):
      t = stacked[i].T if kind == "linear" else stacked[i]
      out[f"{prefix}layers.{i}.{hf_name}"] = np.ascontiguousarray(t)
  return out


def _mismatch_message(config, missing, unexpected, mis_shaped, limit=20) -> str:
  def fmt(title, items):
    if not items:
      return ""
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {title} ({len(items)}): " + ", ".join(items[:limit]) + more

  c = config
  return (
    "checkpoint does not match the Gemma2Config "
    f"(num_layers={c.num_layers}, hidden_size={c.hidden_size}, "
    f"intermediate_size={c.intermediate_size}, num_heads={c.num_heads}, "
    f"num_kv_heads={c.num_kv_heads}, head_dim={c.head_dim}, "
    f"vocab_size={c.vocab_size}):"
    + fmt("missing", missing)
    + fmt("unexpected", unexpected)
    + fmt("mis-shaped", mis_shaped)
  )


def load_hf_folder(
  folder: str, config: Gemma2Config | None = None, dtype=np.float32
) -> tuple[dict, Gemma2Config]:
  """transformers Gemma-2 folder -> (params, config).

  With `config=None` the geometry comes from the folder's config.json; with a config
  given, the checkpoint must match it exactly (strict).
  """
  _check_folder(folder)
  if config is None:
    config = load_hf_config(folder)
  return hf_to_params(read_hf_state_dict(folder), config, dtype), config


# ---------------------------------------------------------------------------------------
# Our format


flatten, unflatten = io.flatten, io.unflatten  # the shared tree flattening


PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"


def save_params(params: dict, config: Gemma2Config, folder: str) -> None:
  """Write `params.safetensors` (flat '/'-joined keys) and `config.json` into folder."""
  os.makedirs(folder, exist_ok=True)
  io.write_safetensors(
    flatten(params), os.path.join(folder, PARAMS_FILE), metadata={"format": "sana_jax.gemma2"}
  )
  with open(os.path.join(folder, CONFIG_FILE), "w") as f:
    json.dump(config.to_dict(), f, indent=2)


def load_params(folder: str, config: Gemma2Config | None = None) -> tuple[dict, Gemma2Config]:
  """Read a folder written by `save_params`; strict against `config` (or its own)."""
  _check_folder(folder)
  for name in (PARAMS_FILE, CONFIG_FILE):
    if not os.path.isfile(os.path.join(folder, name)):
      raise FileNotFoundError(f"{folder!r} has no {name} (not a sana_jax Gemma-2 folder)")
  if config is None:
    with open(os.path.join(folder, CONFIG_FILE)) as f:
      config = Gemma2Config.from_dict(json.load(f))
  flat = read_safetensors(os.path.join(folder, PARAMS_FILE))
  want = param_shapes(config)
  missing = sorted(set(want) - set(flat))
  unexpected = sorted(set(flat) - set(want))
  mis_shaped = sorted(
    f"{k}: file {tuple(flat[k].shape)} vs config {want[k]}"
    for k in set(want) & set(flat)
    if tuple(flat[k].shape) != want[k]
  )
  if missing or unexpected or mis_shaped:
    raise ValueError(_mismatch_message(config, missing, unexpected, mis_shaped))
  return unflatten(flat), config


def param_shapes(config: Gemma2Config) -> dict[str, tuple[int, ...]]:
  """Flat '/'-joined path -> shape of our param tree for this config."""
  c = config
  N, D, F, V = c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size
  qd, kd = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  return {
    "embed/embedding": (V, D),
    "final_norm/scale": (D,),
    "layers/input_norm/scale": (N, D),
    "layers/post_attn_norm/scale": (N, D),
    "layers/pre_ffw_norm/scale": (N, D),
    "layers/post_ffw_norm/scale": (N, D),
    "layers/attn/q/kernel": (N, D, qd),
    "layers/attn/k/kernel": (N, D, kd),
    "layers/attn/v/kernel": (N, D, kd),
    "layers/attn/o/kernel": (N, qd, D),
    "layers/mlp/gate/kernel": (N, D, F),
    "layers/mlp/up/kernel": (N, D, F),
    "layers/mlp/down/kernel": (N, F, D),
  }


__all__ = [
  "FULL",
  "SLIDING",
  "config_from_hf",
  "load_hf_config",
  "read_safetensors",
  "read_hf_state_dict",
  "hf_to_params",
  "params_to_hf",
  "load_hf_folder",
  "save_params",
  "load_params",
  "param_shapes",
  "expected_hf_shapes",
]
