"""Convert SANA DiT weights between the official .pth, diffusers folders and ours.

  sana-convert dit --src Sana_1600M_1024px.pth --to diffusers --dst out/transformer
  sana-convert dit --src out/transformer --to flax --dst out/dit
  sana-convert dit --src out/dit --to official --dst out/sana.pth --null-embedding null.npy

The source format is detected (a .pth/.pt/.bin file: official; a folder whose config.json
says "sana_jax.dit": ours; a folder with a SanaTransformer2DModel config.json: diffusers).
Official sources need a config only for widths that are not released (--config): the rest
of the geometry, and the positional embedding (use_pe, sample_size, pe_interpolation), is
read from the checkpoint itself, its `pos_embed` buffer included.
Every argument is checked before anything is loaded; bad input ends with `error: ...` and
exit status 2. The output is built next to --dst and renamed into place when complete; an
existing --dst is refused unless --overwrite (then replaced only once the new one is whole).
"""

from __future__ import annotations

import json
import pathlib
import sys
import warnings

import numpy as np

from sana_jax.config_loader import load_config, packaged_config_names, split_config_args
from sana_jax.models.dit_config import DiTConfig
from sana_jax.weights import dit as W
from sana_jax.weights import io
from sana_jax.weights.io import CheckpointError, UsageError

FORMATS = ("official", "diffusers", "flax")
OFFICIAL_SUFFIXES = (".pth", ".pt", ".bin")
FILE_SUFFIXES = OFFICIAL_SUFFIXES + (".safetensors", ".json", ".npy", ".npz", ".ckpt", ".py")
ARRAY_SUFFIXES = (".npy", ".safetensors")


def detect_format(src: pathlib.Path) -> str:
  """'official' (a .pth/.pt/.bin file), 'flax' or 'diffusers' (a folder, by config.json)."""
  src = pathlib.Path(src)
  if not src.exists():
    raise FileNotFoundError(f"--src {src}: no such file or folder")
  if src.is_file():
    if src.suffix in OFFICIAL_SUFFIXES:
      return "official"
    raise CheckpointError(
      f"--src {src}: a file must be an official checkpoint "
      f"({'/'.join(OFFICIAL_SUFFIXES)}); folders are ours or diffusers'"
    )
  cfg_file = src / "config.json"
  if not cfg_file.exists():
    raise CheckpointError(f"--src {src}: folder without config.json is neither ours nor diffusers'")
  meta = io.read_json(cfg_file, "config.json")
  if meta.get("format") == W.FORMAT:
    return "flax"
  if meta.get("_class_name") == "SanaTransformer2DModel":
    return "diffusers"
  raise CheckpointError(
    f"{cfg_file} describes neither a sana_jax DiT (format "
    f"{W.FORMAT!r}) nor a diffusers SanaTransformer2DModel "
    f"(format {meta.get('format')!r}, _class_name "
    f"{meta.get('_class_name')!r})"
  )


def load_any(src: pathlib.Path, fmt: str, cfg: DiTConfig | None, ema: bool):
  """-> (params, config, extras)."""
  if fmt == "official":
    return W.load_official(src, cfg, ema=ema)
  if ema:
    raise UsageError("--ema applies to official .pth sources only")
  if fmt == "diffusers":
    params, cfg2 = W.load_diffusers(src, cfg)
    return params, cfg2, {}
  params, cfg2, extras = W.load_flax(src)
  _check_same_config(cfg, cfg2)
  return params, cfg2, extras


def _check_same_config(given: DiTConfig | None, stored: DiTConfig) -> None:
  if given is not None and given.to_dict() != stored.to_dict():
    diff = {
      k: (v, stored.to_dict()[k]) for k, v in given.to_dict().items() if stored.to_dict()[k] != v
    }
    raise CheckpointError(f"--config does not fit the checkpoint (config, checkpoint): {diff}")


def _read_array(path: str) -> np.ndarray:
  p = pathlib.Path(path)
  if not p.is_file():
    raise UsageError(f"--null-embedding {p}: no such file")
  if p.suffix not in ARRAY_SUFFIXES:
    raise UsageError(f"--null-embedding {p}: must be a {' or '.join(ARRAY_SUFFIXES)} file")
  if p.suffix == ".npy":
    try:
      return np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
      raise UsageError(f"--null-embedding {p}: not a readable .npy array: {e}") from None
  tensors = io.read_safetensors(p)
  if len(tensors) != 1:
    raise UsageError(f"--null-embedding {p} must hold exactly one tensor, has {list(tensors)}")
  return next(iter(tensors.values()))


def _load_dit_config(path: str, overrides: list[str]) -> DiTConfig:
  p = pathlib.Path(path)
  what = "a configs/*.py file or a packaged config's name whose get_config() has a `model` field"
  named = p.suffix == "" and p.name == path and path in packaged_config_names()
  if not named and not p.is_file():
    raise UsageError(
      f"--config {p}: no such file ({what}; packaged: {', '.join(packaged_config_names())})"
    )
  if not named and p.suffix != ".py":
    raise UsageError(
      f"--config {p}: must be {what}, e.g. configs/sana_1600m_2k.py; "
      f"got a {p.suffix or 'suffix-less'} file"
    )
  try:
    config = load_config(str(p), overrides)
  except Exception as e:  # the user's own file: any failure is reported, never a traceback
    raise UsageError(f"--config {p}: cannot be loaded: {type(e).__name__}: {e}") from None
  model = config.get("model") if hasattr(config, "get") else None
  if model is None:
    raise UsageError(f"--config {p}: get_config() has no `model` field ({what})")
  try:
    return DiTConfig.coerce(model)
  except (TypeError, ValueError) as e:
    raise UsageError(f"--config {p}: its `model` is not a DiT config: {e}") from None


def _source_config(src: pathlib.Path, fmt: str) -> DiTConfig | None:
  """The config a folder source declares, checked (cheaply) with its weight files."""
  if fmt == "official":
    if not src.is_file():
      raise UsageError(f"--src {src}: an official source is a .pth file, not a folder")
    return None
  if not src.is_dir():
    raise UsageError(f"--src {src}: a {fmt} source is a folder")
  meta = io.read_json(src / "config.json", "config.json")
  try:
    if fmt == "flax":
      if meta.get("format") != W.FORMAT:
        raise CheckpointError(f"format is {meta.get('format')!r}, expected {W.FORMAT!r}")
      cfg = DiTConfig.coerce(meta["model"])
      io.check_safetensors(src / "params.safetensors")
    else:
      if meta.get("_class_name") != "SanaTransformer2DModel":
        raise CheckpointError(
          f"_class_name is {meta.get('_class_name')!r}, expected 'SanaTransformer2DModel'"
        )
      cfg = W.from_diffusers_config(meta)
      files = sorted(src.glob("*.safetensors"))
      if not files:
        raise CheckpointError("no *.safetensors weights in the folder")
      for f in files:
        io.check_safetensors(f)
  except KeyError as e:
    raise CheckpointError(f"{src / 'config.json'}: missing field {e}") from None
  except FileNotFoundError as e:
    raise CheckpointError(f"{src}: {e}") from None
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"--src {src} ({fmt}): {e}") from None
  return cfg


def _has_null_embedding(src: pathlib.Path, fmt: str) -> bool | None:
  """Whether a folder source carries the null-caption embedding (None: only known after
  loading an official .pth)."""
  if fmt == "diffusers":
    return False
  if fmt == "flax":
    with open(src / "params.safetensors", "rb") as f:
      (n,) = np.frombuffer(f.read(8), "<u8")
      return "extras/null_caption_embedding" in json.loads(f.read(int(n)))
  return None


def build_parser() -> io.ArgumentParser:
  ap = io.ArgumentParser(prog="sana-convert dit", description=__doc__)
  ap.add_argument(
    "--src",
    required=True,
    help="required: official .pth/.pt/.bin file, diffusers "
    "SanaTransformer2DModel folder, or our folder",
  )
  ap.add_argument(
    "--dst",
    required=True,
    help="required: output (.pth/.pt file for --to official, else a new folder)",
  )
  ap.add_argument("--to", required=True, choices=FORMATS, help="required: output format")
  ap.add_argument(
    "--from",
    dest="src_format",
    choices=FORMATS + ("auto",),
    default="auto",
    help="source format; auto detects it from --src",
  )
  ap.add_argument(
    "--overwrite",
    action="store_true",
    help="replace an existing --dst (only once the new output is complete)",
  )
  ap.add_argument(
    "--ema",
    action="store_true",
    help="official source: convert state_dict_ema instead of state_dict",
  )
  ap.add_argument(
    "--config",
    default=None,
    help="a configs/*.py file, or a packaged config's name (e.g. sana_1600m_2k), whose "
    "`model` field describes the source "
    "(needed only for official sources at non-released widths; overrides as "
    "--config.field=value); default: read from the source",
  )
  ap.add_argument(
    "--null-embedding",
    default=None,
    help=".npy/.safetensors (caption_len, caption_channels) null-caption "
    "embedding for official outputs from sources without one; default: the "
    "source's own",
  )
  ap.add_argument(
    "--no-null-embedding",
    action="store_true",
    help="write an official checkpoint without y_embedder.y_embedding",
  )
  ap.add_argument(
    "--max-shard-mb",
    type=int,
    default=None,
    help="--to diffusers: shard size in MiB; default: one file",
  )
  return ap


def _main(argv: list[str]) -> int:
  argv, overrides = split_config_args(argv)
  args = build_parser().parse_args(argv)

  # Every argument, before anything is loaded.
  src, dst = pathlib.Path(args.src), pathlib.Path(args.dst)
  detected = detect_format(src)
  fmt = detected if args.src_format == "auto" else args.src_format
  if fmt != detected and not (fmt == "official" and src.is_file()):
    raise UsageError(f"--from {fmt}, but --src {src} is a {detected} source")
  src_cfg = _source_config(src, fmt)
  if args.ema and fmt != "official":
    raise UsageError(f"--ema applies to official .pth sources only; --src {src} is {fmt}")
  cfg = None
  if args.config:
    cfg = _load_dit_config(args.config, overrides)
    if fmt == "flax":
      _check_same_config(cfg, src_cfg)
  elif overrides:
    raise UsageError(f"--config.* overrides ({', '.join(overrides)}) need --config")
  official_out = args.to == "official"
  if not official_out and (args.null_embedding or args.no_null_embedding):
    raise UsageError("--null-embedding / --no-null-embedding apply to --to official only")
  if args.null_embedding and args.no_null_embedding:
    raise UsageError("--null-embedding and --no-null-embedding exclude each other")
  if args.max_shard_mb is not None and (args.to != "diffusers" or args.max_shard_mb < 1):
    raise UsageError(
      f"--max-shard-mb {args.max_shard_mb}: a positive number of MiB, and only with --to diffusers"
    )
  if official_out and dst.suffix not in (".pth", ".pt"):
    raise UsageError(f"--dst {dst}: --to official writes a .pth or .pt file")
  if not official_out and dst.suffix in FILE_SUFFIXES:
    raise UsageError(
      f"--dst {dst}: --to {args.to} writes a folder; give a folder path (not a {dst.suffix} file)"
    )
  io.check_not_source(dst, src)
  io.check_output(dst, overwrite=args.overwrite, is_dir=not official_out)
  null = None
  known = cfg or src_cfg
  if args.null_embedding:
    null = _read_array(args.null_embedding)
    if null.ndim != 2 or (known is not None and null.shape[1] != known.caption_channels):
      raise UsageError(
        f"--null-embedding {args.null_embedding} has shape {null.shape}, "
        "expected (caption_len, "
        f"{known.caption_channels if known else 'caption_channels'})"
      )
  if (
    official_out
    and null is None
    and not args.no_null_embedding
    and _has_null_embedding(src, fmt) is False
  ):
    raise UsageError(
      "the official format carries y_embedder.y_embedding (the null-caption embedding), "
      f"which this {fmt} source lacks: pass --null-embedding FILE or --no-null-embedding"
    )

  # The work.
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    params, cfg, extras = load_any(src, fmt, cfg, args.ema)
  for w in caught:
    print(f"warning: {w.message}", file=sys.stderr)

  if official_out:
    if null is not None:
      if null.shape[1] != cfg.caption_channels:
        raise UsageError(
          f"--null-embedding {args.null_embedding} has shape {null.shape}, "
          f"expected (caption_len, {cfg.caption_channels})"
        )
      cfg = cfg.replace(caption_len=null.shape[0])  # diffusers configs do not record it
      extras = {**extras, "null_caption_embedding": null}
    if "null_caption_embedding" not in extras and not args.no_null_embedding:
      raise CheckpointError(
        "the official format carries y_embedder.y_embedding (the null-caption embedding), "
        "which this source lacks: pass --null-embedding FILE or --no-null-embedding"
      )
    W.save_official(dst, params, cfg, extras, overwrite=args.overwrite)
  elif args.to == "diffusers":
    max_bytes = args.max_shard_mb * 2**20 if args.max_shard_mb else None
    W.save_diffusers(dst, params, cfg, max_shard_bytes=max_bytes, overwrite=args.overwrite)
  else:
    W.save_flax(dst, params, cfg, extras, overwrite=args.overwrite)
  n = sum(int(np.prod(np.shape(v))) for v in W.flatten(params).values())
  pe = (
    f", positional embedding (sample_size {cfg.sample_size}, pe_interpolation "
    f"{cfg.pe_interpolation})"
    if cfg.use_pe
    else ""
  )
  print(f"wrote {args.to} checkpoint ({n / 1e6:.1f}M parameters, depth {cfg.depth}{pe}) to {dst}")
  return 0


def main(argv=None) -> int:
  """The command; returns its exit status (2, with `error: ...` on stderr, for bad input)."""
  return io.run_main(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
