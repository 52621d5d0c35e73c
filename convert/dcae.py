"""Convert a diffusers AutoencoderDC (DC-AE) folder to sana_jax's format, or back.

    python convert/dcae.py --src /path/to/Sana_1600M_1024px_diffusers/vae --dst /path/to/dcae_jax
    python convert/dcae.py --src /path/to/pipeline_root --dst ... --parts decoder
    python convert/dcae.py --src /path/to/dcae_jax --dst /path/to/vae_diffusers --to-diffusers
    python convert/dcae.py --src /path/to/vae --check      # strict load only, prints a summary

--src: a folder written by `AutoencoderDC.save_pretrained` (config.json +
diffusion_pytorch_model.safetensors, or sharded with its .index.json), or a SANA pipeline
root holding such a `vae/` folder. --dst receives params.safetensors + config.json
(sana_jax.weights.dcae.save_params), or with --to-diffusers a diffusers folder. No torch is
needed. Loading is strict: a checkpoint that does not fit its config stops with the list of
missing, unexpected and mis-shaped tensors.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sana_jax.models import autoencoder as ae  # noqa: E402
from sana_jax.weights import dcae  # noqa: E402


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
  ap.add_argument("--src", required=True,
                  help="diffusers AutoencoderDC folder (or ours with --to-diffusers)")
  ap.add_argument("--dst", help="output folder")
  ap.add_argument("--parts", nargs="+", default=["encoder", "decoder"],
                  choices=["encoder", "decoder"], help="convert only these halves")
  ap.add_argument("--to-diffusers", action="store_true", help="ours -> diffusers folder")
  ap.add_argument("--check", action="store_true", help="only load strictly and summarise")
  args = ap.parse_args(argv)
  if not args.check and not args.dst:
    ap.error("--dst is required unless --check")

  _, params, config = dcae.load_autoencoder(args.src, parts=args.parts)
  n = {p: ae.num_params(params[p]) for p in args.parts}
  summary = ", ".join(f"{p} {v / 1e6:.1f}M" for p, v in n.items())
  print(f"{args.src}: DC-AE f{config.spatial_compression_ratio}c{config.latent_channels}, "
        f"{summary} parameters, scaling factor {config.scaling_factor}")
  if args.check:
    return 0
  if args.to_diffusers:
    if set(args.parts) != {"encoder", "decoder"}:
      ap.error("--to-diffusers writes a whole AutoencoderDC: use both parts")
    dcae.save_diffusers(params, config, args.dst)
  else:
    dcae.save_params(params, config, args.dst)
  print(f"wrote {args.dst}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
