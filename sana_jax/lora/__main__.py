"""LoRA files on the command line.

  python -m sana_jax.lora export --model MODEL --lora RUN/lora/adapter.safetensors --out F
  python -m sana_jax.lora merge --model MODEL --lora F [--lora_scale S] --out NEW_MODEL

export: a LoRA (train.py's WORKDIR/lora/adapter.safetensors, or a diffusers file) as the
safetensors file diffusers loads (`SanaPipeline.load_lora_weights(F)`): PEFT keys,
alpha / r folded into lora_B.
merge: a copy of the model folder MODEL whose transformer has the LoRA folded in
(W + S * (alpha / r) A B, float32), a plain model any sana_jax command samples.

MODEL is a model folder (sana_jax.bundle) or a DiT folder (config.json +
params.safetensors): the LoRA is checked against its transformer's geometry. Every
argument is checked before anything is written; --out is refused if it exists unless
--overwrite (then replaced once the new output is complete).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import shutil
import sys

from sana_jax.cli import CommandParser, UsageError


def build_parser() -> argparse.ArgumentParser:
  ap = CommandParser(
    prog="python -m sana_jax.lora",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  ap.add_argument("command", choices=("export", "merge"), help="what to do (required)")
  ap.add_argument(
    "--model", type=pathlib.Path, required=True, help="model or DiT folder (required)"
  )
  ap.add_argument("--lora", type=pathlib.Path, required=True, help="LoRA .safetensors (required)")
  ap.add_argument("--out", type=pathlib.Path, required=True, help="output file/folder (required)")
  ap.add_argument(
    "--lora_scale", type=float, default=1.0, help="merge: strength (default: %(default)s)"
  )
  ap.add_argument(
    "--overwrite", action="store_true", help="replace an existing --out (default: refuse)"
  )
  return ap


def _dit_folder(model: pathlib.Path) -> pathlib.Path:
  for folder in (model, model / "transformer"):
    if (folder / "config.json").is_file() and (folder / "params.safetensors").is_file():
      return folder
  raise UsageError(
    f"--model {model}: not a model folder (transformer/) nor a DiT folder "
    "(config.json + params.safetensors)"
  )


def check(args) -> dict:
  """Every check that writes nothing; returns (dit folder, adapter tree, its config)."""
  from sana_jax.lora import LoraError
  from sana_jax.lora import diffusers as lora_diffusers
  from sana_jax.models.dit_config import DiTConfig
  from sana_jax.weights import io

  dit = _dit_folder(args.model)
  if not math.isfinite(args.lora_scale):
    raise UsageError(f"--lora_scale {args.lora_scale:g}: must be a finite number")
  if args.command == "export" and args.lora_scale != 1.0:
    raise UsageError(f"--lora_scale {args.lora_scale:g}: applies to merge only")
  if not args.lora.is_file():
    raise UsageError(f"--lora {args.lora}: no such file")
  if (args.out.exists() or args.out.is_symlink()) and not args.overwrite:
    raise UsageError(f"--out {args.out}: exists; pass --overwrite to replace it")
  if args.out.resolve() in (args.model.resolve(), args.lora.resolve()):
    raise UsageError(f"--out {args.out}: is an input")
  try:
    cfg = DiTConfig.coerce(io.read_json(dit / "config.json", "DiT config.json")["model"])
    tree, lcfg = lora_diffusers.load(args.lora, cfg)
  except (LoraError, io.CheckpointError, KeyError, ValueError) as e:
    raise UsageError(f"--lora {args.lora}: {e}") from None
  return {"dit": dit, "tree": tree, "lora_cfg": lcfg}


def run(args) -> str:
  plan = check(args)
  from sana_jax.lora import diffusers as lora_diffusers
  from sana_jax.lora import merge
  from sana_jax.weights import dit as dit_weights
  from sana_jax.weights import io

  params, cfg, extras = dit_weights.load_flax(plan["dit"])
  tree, lcfg = plan["tree"], plan["lora_cfg"]
  if args.command == "export":
    lcfg = cfg.replace(
      lora_rank=lcfg.lora_rank, lora_alpha=lcfg.lora_alpha, lora_targets=lcfg.lora_targets
    )
    lora_diffusers.save(args.out, merge.attach(params, tree), lcfg, overwrite=args.overwrite)
    return f"wrote {args.out} (diffusers LoRA: rank {lcfg.lora_rank}, {lcfg.lora_targets})"
  merged, cfg = merge.merge_into(params, cfg, tree, lcfg, args.lora_scale)
  is_bundle = plan["dit"] != args.model
  with io.atomic_output(args.out, is_dir=True, overwrite=args.overwrite) as tmp:
    if is_bundle:
      shutil.copytree(
        args.model, tmp, ignore=shutil.ignore_patterns("transformer"), dirs_exist_ok=True
      )
      target = tmp / "transformer"
    else:
      target = tmp
    dit_weights.save_flax(target, merged, cfg, extras, overwrite=True)
  return f"wrote {args.out} ({'model' if is_bundle else 'DiT'} folder, LoRA merged at {args.lora_scale:g})"


def main(argv=None) -> int:
  try:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    message = run(args)
  except (UsageError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(message)
  return 0


if __name__ == "__main__":
  sys.exit(main())
