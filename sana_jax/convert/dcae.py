"""Convert a diffusers AutoencoderDC (DC-AE) folder to sana_jax's format, or back.

    sana-convert dcae --src /path/to/Sana_1600M_1024px_diffusers/vae --dst /path/to/dcae_jax
    sana-convert dcae --src /path/to/pipeline_root --dst ... --parts decoder
    sana-convert dcae --src /path/to/dcae_jax --dst /path/to/vae_diffusers --to-diffusers
    sana-convert dcae --src /path/to/vae --check      # strict load only, prints a summary

--src: a folder written by `AutoencoderDC.save_pretrained` (config.json +
diffusion_pytorch_model.safetensors, or sharded with its .index.json), a SANA pipeline
root holding such a `vae/` folder, or ours. --dst receives params.safetensors + config.json
(sana_jax.weights.dcae.save_params), or with --to-diffusers a diffusers folder. No torch is
needed. Loading is strict: a checkpoint that does not fit its config stops with the list of
missing, unexpected and mis-shaped tensors. Every argument is checked before anything is
loaded (bad input: `error: ...`, exit status 2); the output is built next to --dst and
renamed into place when complete, and an existing --dst is refused unless --overwrite.
"""

from __future__ import annotations

import pathlib
import sys

from sana_jax.models import autoencoder as ae
from sana_jax.weights import dcae
from sana_jax.weights import io
from sana_jax.weights.io import CheckpointError, UsageError

WEIGHTS = "diffusion_pytorch_model"


def build_parser() -> io.ArgumentParser:
  ap = io.ArgumentParser(prog="sana-convert dcae", description=__doc__)
  ap.add_argument(
    "--src",
    required=True,
    help="required: diffusers AutoencoderDC folder, a SANA pipeline root with vae/, or our folder",
  )
  ap.add_argument("--dst", default=None, help="new output folder; required unless --check")
  ap.add_argument(
    "--parts",
    nargs="+",
    default=["encoder", "decoder"],
    choices=["encoder", "decoder"],
    help="convert only these halves (default: encoder decoder)",
  )
  ap.add_argument(
    "--to-diffusers",
    action="store_true",
    help="write a diffusers AutoencoderDC folder instead of ours",
  )
  ap.add_argument(
    "--check", action="store_true", help="only load strictly and print a summary (writes nothing)"
  )
  ap.add_argument(
    "--overwrite",
    action="store_true",
    help="replace an existing --dst (only once the new output is complete)",
  )
  return ap


def check_source(src: pathlib.Path) -> pathlib.Path:
  """The folder holding the autoencoder (src or src/vae), checked without reading tensors."""
  if not src.exists():
    raise UsageError(f"--src {src}: no such folder")
  if not src.is_dir():
    raise UsageError(f"--src {src}: an AutoencoderDC folder is expected, not a file")
  folder = src if (src / "config.json").exists() or not (src / "vae").is_dir() else src / "vae"
  cfg = io.read_json(folder / "config.json", "config.json")
  if (folder / dcae.PARAMS_NAME).exists():  # ours
    io.check_safetensors(folder / dcae.PARAMS_NAME)
    return folder
  if cfg.get("_class_name") not in (None, "AutoencoderDC"):
    raise CheckpointError(
      f"{folder / 'config.json'}: _class_name is "
      f"{cfg.get('_class_name')!r}, expected 'AutoencoderDC'"
    )
  try:
    dcae.config_from_folder(folder)
  except (KeyError, TypeError) as e:
    raise CheckpointError(
      f"{folder / 'config.json'}: not an AutoencoderDC config: {type(e).__name__}: {e}"
    ) from None
  index, single = folder / f"{WEIGHTS}.safetensors.index.json", folder / f"{WEIGHTS}.safetensors"
  if index.is_file():
    weight_map = io.read_json(index, "safetensors index").get("weight_map")
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index}: no 'weight_map' object")
    shards = sorted({folder / f for f in weight_map.values()})
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
      raise CheckpointError(f"{index}: shards listed in the index are missing: {missing}")
  elif single.is_file():
    shards = [single]
  else:
    raise CheckpointError(
      f"{folder}: no {single.name} or {index.name} (a diffusers "
      "AutoencoderDC folder, e.g. the 'vae' subfolder of a SANA pipeline, "
      "is expected)"
    )
  for s in shards:
    io.check_safetensors(s)
  return folder


def _main(argv: list[str]) -> int:
  args = build_parser().parse_args(argv)
  if not args.check and not args.dst:
    raise UsageError("--dst is required unless --check")
  if args.check and (args.dst or args.to_diffusers or args.overwrite):
    raise UsageError("--check writes nothing: drop --dst / --to-diffusers / --overwrite")
  if args.to_diffusers and set(args.parts) != {"encoder", "decoder"}:
    raise UsageError(
      f"--to-diffusers writes a whole AutoencoderDC: --parts {' '.join(args.parts)} "
      "must be both encoder and decoder"
    )
  src = pathlib.Path(args.src)
  folder = check_source(src)
  if args.dst:
    dst = pathlib.Path(args.dst)
    io.check_not_source(dst, folder)
    io.check_output(dst, overwrite=args.overwrite, is_dir=True)

  _, params, config = dcae.load_autoencoder(folder, parts=args.parts)
  n = {p: ae.num_params(params[p]) for p in args.parts}
  summary = ", ".join(f"{p} {v / 1e6:.1f}M" for p, v in n.items())
  print(
    f"{args.src}: DC-AE f{config.spatial_compression_ratio}c{config.latent_channels}, "
    f"{summary} parameters, scaling factor {config.scaling_factor}"
  )
  if args.check:
    return 0
  with io.atomic_output(args.dst, is_dir=True, overwrite=args.overwrite) as tmp:
    if args.to_diffusers:
      dcae.save_diffusers(params, config, tmp)
    else:
      dcae.save_params(params, config, tmp)
  print(f"wrote {args.dst}")
  return 0


def main(argv=None) -> int:
  """The command; returns its exit status (2, with `error: ...` on stderr, for bad input)."""
  return io.run_main(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
