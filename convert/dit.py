"""Convert SANA DiT weights between the official .pth, diffusers folders and ours.

  python -m convert.dit --src Sana_1600M_1024px.pth --to diffusers --dst out/transformer
  python -m convert.dit --src out/transformer --to flax --dst out/dit
  python -m convert.dit --src out/dit --to official --dst out/sana.pth --null-embedding null.npy

The source format is detected (a .pth/.pt file: official; a folder whose config.json says
"sana_jax.dit": ours; a folder with a SanaTransformer2DModel config.json: diffusers).
Official sources need a config only for geometries that are not released (--config).
Nothing is written when anything is wrong.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

from sana_jax.config_loader import load_config, split_config_args
from sana_jax.models.dit_config import DiTConfig
from sana_jax.weights import dit as W
from sana_jax.weights.io import CheckpointError

FORMATS = ("official", "diffusers", "flax")


def detect_format(src: pathlib.Path) -> str:
  if not src.exists():
    raise FileNotFoundError(f"no such file or folder: {src}")
  if src.is_file():
    if src.suffix in (".pth", ".pt", ".bin"):
      return "official"
    raise CheckpointError(f"{src}: a file must be an official .pth checkpoint")
  cfg_file = src / "config.json"
  if not cfg_file.exists():
    raise CheckpointError(f"{src}: folder without config.json is neither ours nor diffusers'")
  meta = json.loads(cfg_file.read_text())
  if meta.get("format") == W.FORMAT:
    return "flax"
  if meta.get("_class_name") == "SanaTransformer2DModel":
    return "diffusers"
  raise CheckpointError(f"{src}/config.json describes neither a sana_jax DiT nor a "
                        "diffusers SanaTransformer2DModel")


def load_any(src: pathlib.Path, fmt: str, cfg: DiTConfig | None, ema: bool):
  """-> (params, config, extras)."""
  if fmt == "official":
    return W.load_official(src, cfg, ema=ema)
  if ema:
    raise ValueError("--ema applies to official .pth sources only")
  if fmt == "diffusers":
    params, cfg2 = W.load_diffusers(src, cfg)
    return params, cfg2, {}
  params, cfg2, extras = W.load_flax(src)
  if cfg is not None and cfg.to_dict() != cfg2.to_dict():
    diff = {k: (v, cfg2.to_dict()[k]) for k, v in cfg.to_dict().items() if cfg2.to_dict()[k] != v}
    raise CheckpointError(f"--config does not fit the checkpoint (config, checkpoint): {diff}")
  return params, cfg2, extras


def _read_array(path: str) -> np.ndarray:
  p = pathlib.Path(path)
  if p.suffix == ".npy":
    return np.load(p)
  from sana_jax.weights.io import read_safetensors
  tensors = read_safetensors(p)
  if len(tensors) != 1:
    raise ValueError(f"{p} must hold exactly one tensor, has {list(tensors)}")
  return next(iter(tensors.values()))


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  argv, overrides = split_config_args(argv)
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--src", required=True)
  ap.add_argument("--dst", required=True)
  ap.add_argument("--to", required=True, choices=FORMATS)
  ap.add_argument("--from", dest="src_format", choices=FORMATS + ("auto",), default="auto")
  ap.add_argument("--ema", action="store_true", help="official source: use state_dict_ema")
  ap.add_argument("--config", help="a configs/*.py file (its `model` field) for the source")
  ap.add_argument("--null-embedding", help=".npy/.safetensors (caption_len, caption_channels) "
                  "null-caption embedding for official outputs from sources without one")
  ap.add_argument("--no-null-embedding", action="store_true",
                  help="write an official checkpoint without y_embedder.y_embedding")
  ap.add_argument("--max-shard-mb", type=int, default=None, help="diffusers output shard size")
  args = ap.parse_args(argv)

  src, dst = pathlib.Path(args.src), pathlib.Path(args.dst)
  fmt = detect_format(src) if args.src_format == "auto" else args.src_format
  cfg = None
  if args.config:
    cfg = DiTConfig.coerce(load_config(args.config, overrides).model)
  elif overrides:
    raise ValueError("--config.* overrides need --config")
  params, cfg, extras = load_any(src, fmt, cfg, args.ema)

  if args.to == "official":
    if args.null_embedding:
      emb = _read_array(args.null_embedding)
      if emb.ndim != 2 or emb.shape[1] != cfg.caption_channels:
        raise ValueError(f"null embedding has shape {emb.shape}, expected "
                         f"(caption_len, {cfg.caption_channels})")
      cfg = cfg.replace(caption_len=emb.shape[0])  # diffusers configs do not record it
      extras = {**extras, "null_caption_embedding": emb}
    if "null_caption_embedding" not in extras and not args.no_null_embedding:
      raise CheckpointError(
          "the official format carries y_embedder.y_embedding (the null-caption embedding), "
          "which this source lacks: pass --null-embedding FILE or --no-null-embedding")
    W.save_official(dst, params, cfg, extras)
  elif args.to == "diffusers":
    max_bytes = args.max_shard_mb * 2**20 if args.max_shard_mb else None
    W.save_diffusers(dst, params, cfg, max_shard_bytes=max_bytes)
  else:
    W.save_flax(dst, params, cfg, extras)
  n = sum(int(np.prod(np.shape(v))) for v in W.flatten(params).values())
  print(f"wrote {args.to} checkpoint ({n / 1e6:.1f}M parameters, depth {cfg.depth}) to {dst}")
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main())
  except (CheckpointError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
