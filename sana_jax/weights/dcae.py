"""DC-AE weights: diffusers `AutoencoderDC` folder <-> our Flax parameter tree.

Names: a diffusers key maps to a Flax path by merging numeric parts into the preceding
name (`decoder.up_blocks.3.1.attn.to_qkv_multiscale.0.proj_in.weight` ->
`decoder/up_blocks_3_1/attn/to_qkv_multiscale_0/proj_in/kernel`); the inverse splits them
again. The tensor transform is chosen by the name of the module owning the tensor, from
one table (`_MODULE_KIND`) used in both directions:

  conv       torch (O, I, kh, kw)      <-> (kh, kw, I, O)
  dense      torch (O, I) or (O, I, 1, 1) <-> (I, O)
  depthwise  torch (C, 1, k, k)        <-> (k, k, C)
  grouped    torch (G*o, i, 1, 1)      <-> (G, i, o)       (1x1 conv with G groups)
  norm       weight / bias / running_mean / running_var <-> scale / bias / mean / var

Loading is strict: the expected diffusers keys and shapes are derived from our module for
the config (jax.eval_shape), and missing, unexpected or mis-shaped tensors raise one
ValueError that lists them all. BatchNorm `num_batches_tracked` buffers are accepted and
dropped. safetensors are read by the shared reader (`io.read_safetensors`: memory-mapped,
no torch, bf16 kept as bf16 until the conversion casts it to the fp32 parameters).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Iterable, Mapping

import jax
import numpy as np

from sana_jax.models.autoencoder import AutoencoderDC, DCAEConfig, param_shapes
from sana_jax.weights import io

CONFIG_NAME = "config.json"
WEIGHTS_STEM = "diffusion_pytorch_model"

# Name of the module that owns a tensor -> transform kind.
_MODULE_KIND = {
  "conv_in": "conv",
  "conv_out": "conv",
  "conv1": "conv",
  "conv2": "conv",
  "conv": "conv",
  "to_q": "dense",
  "to_k": "dense",
  "to_v": "dense",
  "to_out": "dense",
  "conv_inverted": "dense",
  "conv_point": "dense",
  "proj_in": "depthwise",
  "conv_depth": "depthwise",
  "proj_out": "grouped",
  "norm": "norm",
  "norm_out": "norm",
}
_LEAF_TO_TORCH = {
  "kernel": "weight",
  "scale": "weight",
  "bias": "bias",
  "mean": "running_mean",
  "var": "running_var",
}
_TORCH_TO_LEAF = {"weight": None, "bias": "bias", "running_mean": "mean", "running_var": "var"}
_IGNORED_LEAVES = ("num_batches_tracked",)


class DCAECheckpointError(ValueError):
  """A DC-AE checkpoint that does not fit the config."""


# ----------------------------------------------------------------------------------------
# Names and transforms.
# ----------------------------------------------------------------------------------------


def flax_path_to_torch_key(path: tuple[str, ...]) -> str:
  """('decoder', 'up_blocks_3_1', 'conv1', 'kernel') -> 'decoder.up_blocks.3.1.conv1.weight'."""
  parts = []
  for p in path[:-1]:
    m = re.fullmatch(r"(.*?)((?:_\d+)+)", p)
    if m:
      parts.append(m.group(1))
      parts.extend(m.group(2)[1:].split("_"))
    else:
      parts.append(p)
  return ".".join(parts + [_LEAF_TO_TORCH[path[-1]]])


def torch_key_to_flax_path(key: str, kind_of_weight: str | None = None) -> tuple[str, ...] | None:
  """Inverse of `flax_path_to_torch_key`; None for keys with no counterpart."""
  tokens = key.split(".")
  merged: list[str] = []
  for t in tokens[:-1]:
    if t.isdigit() and merged:
      merged[-1] = f"{merged[-1]}_{t}"
    else:
      merged.append(t)
  leaf = tokens[-1]
  if leaf not in _TORCH_TO_LEAF or len(merged) < 2:
    return None
  if leaf == "weight":
    kind = _MODULE_KIND.get(merged[-1])
    if kind is None:
      return None
    new_leaf = "scale" if kind == "norm" else "kernel"
  else:
    new_leaf = _TORCH_TO_LEAF[leaf]
  return tuple(merged) + (new_leaf,)


def _kind(path: tuple[str, ...]) -> str:
  if path[-1] != "kernel":
    return "copy"
  return _MODULE_KIND[path[-2]]


def to_flax(kind: str, w: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
  """torch layout -> ours; `flax_shape` only disambiguates group counts."""
  if kind == "conv":
    return w.transpose(2, 3, 1, 0)
  if kind == "dense":
    return (w[:, :, 0, 0] if w.ndim == 4 else w).T
  if kind == "depthwise":
    return w[:, 0].transpose(1, 2, 0)
  if kind == "grouped":
    g, i, o = flax_shape
    return w[:, :, 0, 0].reshape(g, o, i).transpose(0, 2, 1)
  return w


def to_torch(kind: str, w: np.ndarray, torch_4d: bool = False) -> np.ndarray:
  """Ours -> torch layout (inverse of `to_flax`)."""
  if kind == "conv":
    return w.transpose(3, 2, 0, 1)
  if kind == "dense":
    return w.T[:, :, None, None] if torch_4d else w.T
  if kind == "depthwise":
    return w.transpose(2, 0, 1)[:, None]
  if kind == "grouped":
    g, i, o = w.shape
    return w.transpose(0, 2, 1).reshape(g * o, i)[:, :, None, None]
  return w


def _is_torch_conv1x1(path: tuple[str, ...]) -> bool:
  """diffusers stores GLUMBConv's 1x1 convs as Conv2d (4-D); attention linears are 2-D."""
  return path[-2] in ("conv_inverted", "conv_point")


def _flatten(tree: Mapping) -> dict[tuple[str, ...], object]:
  """io.flatten (the shared tree flattening) with the keys split into path tuples."""
  return {tuple(k.split("/")): v for k, v in io.flatten(tree).items()}


def _unflatten(flat: Mapping[tuple[str, ...], object]) -> dict:
  return io.unflatten({"/".join(path): v for path, v in flat.items()})


def expected_torch_shapes(
  config: DCAEConfig, parts: Iterable[str] = ("encoder", "decoder")
) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...]]]:
  """diffusers key -> (flax path, torch shape, flax shape) for this config."""
  parts = tuple(parts)
  flat = _flatten(param_shapes(config))
  out = {}
  for path, sds in flat.items():
    if path[0] not in parts:
      continue
    kind = _kind(path)
    dummy = np.broadcast_to(np.zeros((), np.float32), sds.shape)
    tshape = to_torch(kind, dummy, torch_4d=_is_torch_conv1x1(path)).shape
    out[flax_path_to_torch_key(path)] = (path, tuple(tshape), tuple(sds.shape))
  return out


# ----------------------------------------------------------------------------------------
# Conversion.
# ----------------------------------------------------------------------------------------


def _fmt(items: list[str], limit: int = 20) -> str:
  more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
  return ", ".join(items[:limit]) + more


def convert_state_dict(
  state_dict: Mapping[str, np.ndarray],
  config: DCAEConfig,
  parts: Iterable[str] = ("encoder", "decoder"),
  as_jax: bool = True,
) -> dict:
  """diffusers AutoencoderDC state dict (numpy arrays, torch layout) -> our params (fp32).

  `parts` selects 'encoder' and/or 'decoder'; keys of the other part are skipped. Raises
  DCAECheckpointError (a ValueError) listing every missing, unexpected or mis-shaped tensor.
  """
  parts = tuple(parts)
  for p in parts:
    if p not in ("encoder", "decoder"):
      raise ValueError(f"parts must be 'encoder' and/or 'decoder', got {p!r}")
  expected = expected_torch_shapes(config, parts)
  missing, unexpected, misshaped = [], [], []
  flat = {}
  for key, value in state_dict.items():
    top = key.split(".", 1)[0]
    if top in ("encoder", "decoder") and top not in parts:
      continue
    if key.rsplit(".", 1)[-1] in _IGNORED_LEAVES:
      bn_key = key.rsplit(".", 1)[0] + ".running_mean"
      if bn_key in expected:
        continue
    if key not in expected:
      unexpected.append(key)
      continue
    path, tshape, fshape = expected[key]
    shape = tuple(np.shape(value))
    if shape != tshape:
      misshaped.append(f"{key}: checkpoint {shape}, expected {tshape}")
      continue
    w = to_flax(_kind(path), np.asarray(value).astype(np.float32, copy=False), fshape)
    flat[path] = jax.numpy.asarray(w) if as_jax else np.ascontiguousarray(w)  # one at a time
  missing = sorted(
    k
    for k in expected
    if expected[k][0] not in flat and not any(m.startswith(k + ":") for m in misshaped)
  )
  if missing or unexpected or misshaped:
    msg = [
      "DC-AE checkpoint does not fit the config "
      f"(latent_channels={config.latent_channels}, encoder channels "
      f"{config.encoder_block_out_channels}, decoder channels "
      f"{config.decoder_block_out_channels}):"
    ]
    if missing:
      msg.append(f"  {len(missing)} missing: {_fmt(missing)}")
    if unexpected:
      msg.append(f"  {len(sorted(unexpected))} unexpected: {_fmt(sorted(unexpected))}")
    if misshaped:
      msg.append(f"  {len(misshaped)} mis-shaped: {_fmt(sorted(misshaped))}")
    raise DCAECheckpointError("\n".join(msg))
  return _unflatten(flat)


def to_diffusers_state_dict(
  params: Mapping, config: DCAEConfig | None = None
) -> dict[str, np.ndarray]:
  """Our params -> diffusers AutoencoderDC state dict (numpy, torch layout).

  BatchNorm `num_batches_tracked` is not produced (torch's `load_state_dict(strict=False)`
  or the diffusers loader accept its absence); pass the result to `save_diffusers` to write
  a folder.
  """
  out = {}
  for path, w in _flatten(params).items():
    kind = _kind(path)
    out[flax_path_to_torch_key(path)] = np.ascontiguousarray(
      to_torch(kind, np.asarray(w, np.float32), torch_4d=_is_torch_conv1x1(path))
    )
  return out


# ----------------------------------------------------------------------------------------
# Folders.
# ----------------------------------------------------------------------------------------


def read_state_dict(folder: str | os.PathLike) -> dict[str, np.ndarray]:
  """`diffusion_pytorch_model.safetensors`, or its shards via `*.safetensors.index.json`."""
  folder = _resolve(folder)
  index = folder / f"{WEIGHTS_STEM}.safetensors.index.json"
  single = folder / f"{WEIGHTS_STEM}.safetensors"
  if index.exists():
    return io.read_safetensors_index(index)
  if single.exists():
    return io.read_safetensors(single)
  raise FileNotFoundError(
    f"{folder}: no {single.name} or {index.name} (a diffusers AutoencoderDC "
    "folder, e.g. the 'vae' subfolder of a SANA pipeline, is expected)"
  )


def config_from_folder(folder: str | os.PathLike, **overrides) -> DCAEConfig:
  path = _resolve(folder) / CONFIG_NAME
  if not path.exists():
    raise FileNotFoundError(f"{path} not found (a diffusers AutoencoderDC folder is expected)")
  d = json.loads(path.read_text())
  cls = d.get("_class_name")
  if cls not in (None, "AutoencoderDC"):
    raise DCAECheckpointError(f"{path}: _class_name is {cls!r}, expected 'AutoencoderDC'")
  return DCAEConfig.from_diffusers(d, **overrides)


def _resolve(folder: str | os.PathLike) -> pathlib.Path:
  """A SANA pipeline root holding `vae/` resolves to that subfolder."""
  folder = pathlib.Path(folder)
  if not (folder / CONFIG_NAME).exists() and (folder / "vae" / CONFIG_NAME).exists():
    return folder / "vae"
  return folder


def load_autoencoder(
  folder: str | os.PathLike, parts: Iterable[str] = ("encoder", "decoder"), **config_overrides
) -> tuple[AutoencoderDC, dict, DCAEConfig]:
  """A DC-AE folder -> (module, params, config).

  `folder`: a diffusers AutoencoderDC folder (config.json + diffusion_pytorch_model
  safetensors, single or sharded), a SANA pipeline root with such a `vae/` subfolder, or our
  format (`save_params`: params.safetensors + config.json). `config_overrides` set execution
  fields (e.g. compute_dtype="bfloat16"). Then use `sana_jax.models.autoencoder.encode /
  decode(config, params, x)` or `module.apply({'params': params}, x, method=module.decode)`.
  """
  folder = _resolve(folder)
  if (folder / PARAMS_NAME).exists():
    params, config = load_params(folder, parts, **config_overrides)
    return AutoencoderDC(config), params, config
  config = config_from_folder(folder, **config_overrides)
  params = convert_state_dict(read_state_dict(folder), config, parts)
  return AutoencoderDC(config), params, config


PARAMS_NAME = "params.safetensors"


def save_params(params: Mapping, config: DCAEConfig, folder: str | os.PathLike) -> None:
  """Our format: params.safetensors (keys 'decoder/up_blocks_3_0/attn/to_q/kernel', ...) and
  config.json (DCAEConfig fields, with `_class_name` 'sana_jax.DCAEConfig')."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  flat = {
    "/".join(k): np.ascontiguousarray(np.asarray(v, np.float32))
    for k, v in _flatten(params).items()
  }
  io.write_safetensors(flat, folder / PARAMS_NAME)
  cfg = {
    "_class_name": "sana_jax.DCAEConfig",
    **config.to_diffusers(),
    "compute_dtype": config.compute_dtype,
    "upsample_impl": config.upsample_impl,
  }
  (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))


def load_params(
  folder: str | os.PathLike, parts: Iterable[str] = ("encoder", "decoder"), **config_overrides
) -> tuple[dict, DCAEConfig]:
  """Reads `save_params` output strictly (same checks as the diffusers converter)."""
  folder = pathlib.Path(folder)
  d = json.loads((folder / CONFIG_NAME).read_text())
  config = DCAEConfig.from_diffusers(d, **config_overrides)
  parts = tuple(parts)
  flat = {tuple(k.split("/")): v for k, v in io.read_safetensors(folder / PARAMS_NAME).items()}
  expected = {p: tuple(s.shape) for p, s in _flatten(param_shapes(config)).items() if p[0] in parts}
  got = {p: v for p, v in flat.items() if p[0] in parts}
  missing = sorted("/".join(p) for p in expected if p not in got)
  unexpected = sorted("/".join(p) for p in got if p not in expected)
  misshaped = sorted(
    f"{'/'.join(p)}: checkpoint {tuple(v.shape)}, expected {expected[p]}"
    for p, v in got.items()
    if p in expected and tuple(v.shape) != expected[p]
  )
  if missing or unexpected or misshaped:
    msg = [f"{folder}: parameters do not fit the config:"]
    for name, items in (
      ("missing", missing),
      ("unexpected", unexpected),
      ("mis-shaped", misshaped),
    ):
      if items:
        msg.append(f"  {len(items)} {name}: {_fmt(items)}")
    raise DCAECheckpointError("\n".join(msg))
  tree = _unflatten({p: jax.numpy.asarray(v, np.float32) for p, v in got.items()})
  return tree, config


def save_diffusers(params: Mapping, config: DCAEConfig, folder: str | os.PathLike) -> None:
  """Writes a diffusers AutoencoderDC folder (config.json + diffusion_pytorch_model.safetensors)."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  cfg = {"_class_name": "AutoencoderDC", **config.to_diffusers()}
  (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
  io.write_safetensors(
    to_diffusers_state_dict(params, config), folder / f"{WEIGHTS_STEM}.safetensors"
  )
