"""Sample images from a SANA model folder (`sana-sample`, or `python sample.py` in a checkout).

  python sample.py --prompt "a photo of two red circles" --num_images 4
  python sample.py --prompts_file prompts.txt --num_images 4 --out outputs/run1
  python sample.py --model MODEL --prompt "..." --height 1024 --width 768 --steps 20

Without --model it samples from the embedded ShapesEval model shipped in the repository.
Writes one PNG per image (prompt index, image index, seed in the name), a grid.png and
a samples.json with the prompt and seed of each image into --out (default: a new
outputs/run-NNN for each run), then prints where.

Every argument is checked before the model is loaded: a bad one ends with `error: ...` and
exit status 2. An --out that already holds files is refused unless --overwrite is given;
the output folder appears whole once every image exists (with --overwrite the old one is
replaced only then). A size other than the model's own is sampled at the nearest
aspect-ratio bin of the model's base size and resized (a `note:` says so); more than 2x
upscaling is refused (--no_binning samples at the size asked instead). Prompts longer than
the model reads and words its tokenizer does not know are named in a `warning:` line.
Compiled programs are kept in a persistent cache (--compile_cache, --no_compile_cache;
sana_jax/commands/compile_cache.py), so a second start does not compile again.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
import uuid
import warnings

from sana_jax.cli import CommandParser, UsageError
from sana_jax.commands import compile_cache, malloc_settings

MAX_UPSCALE = 2.0  # the largest resize factor from the sampled bin to the requested size
MAX_SEED = 2**63 - 1


def _prog() -> str:
  """`sana-sample` when started as the console command, else `sample.py`."""
  name = pathlib.Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
  return "sana-sample" if name.startswith("sana-sample") else "sample.py"


def build_parser() -> argparse.ArgumentParser:
  ap = CommandParser(
    prog=_prog(), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument(
    "--prompt",
    action="append",
    default=[],
    help="a prompt; may be repeated (default: none, then --prompts_file)",
  )
  ap.add_argument(
    "--prompts_file",
    type=pathlib.Path,
    help="a text file with one prompt per line, blank lines skipped (default: none)",
  )
  ap.add_argument(
    "--model",
    type=pathlib.Path,
    default=None,
    help="model folder (default: the embedded ShapesEval model, sana_jax/assets/shapes_model)",
  )
  ap.add_argument(
    "--lora",
    type=pathlib.Path,
    default=None,
    help="a LoRA .safetensors file in diffusers' format (ours exported, or PEFT-trained) for "
    "this model, merged into the transformer before sampling (default: none)",
  )
  ap.add_argument(
    "--lora_scale",
    type=float,
    default=None,
    help="strength of --lora: W + scale * (alpha / r) A B; 0 is the base model (default: 1.0)",
  )
  ap.add_argument(
    "--height",
    type=int,
    default=None,
    help="image height in pixels, a multiple of the model's size multiple "
    "(default: the model's image_size in pipeline.json)",
  )
  ap.add_argument(
    "--width",
    type=int,
    default=None,
    help="image width in pixels (default: the model's image_size)",
  )
  ap.add_argument(
    "--no_binning",
    action="store_true",
    help="sample at exactly --height x --width instead of the nearest "
    "aspect-ratio bin of the model's base size resized to it (default: "
    "off, binning as diffusers)",
  )
  ap.add_argument(
    "--steps",
    type=int,
    default=None,
    help="denoising steps, >= 1 (default: the model's, pipeline.json)",
  )
  ap.add_argument(
    "--guidance",
    type=float,
    default=None,
    help="classifier-free guidance scale, >= 0; 1 is one conditional pass, 0 "
    "the unconditional one (default: the model's, pipeline.json)",
  )
  ap.add_argument(
    "--sampler",
    choices=("dpm_solver", "euler"),
    default=None,
    help="flow solver (default: the model's, pipeline.json)",
  )
  ap.add_argument(
    "--seed",
    type=int,
    default=0,
    help="seed of the first image; image k uses seed + k (default: 0)",
  )
  ap.add_argument("--num_images", type=int, default=1, help="images per prompt, >= 1 (default: 1)")
  ap.add_argument(
    "--batch_size",
    type=int,
    default=None,
    help="images per denoising batch, >= 1; the images do not depend on it "
    "(default: all images in one batch)",
  )
  ap.add_argument(
    "--out",
    type=pathlib.Path,
    default=None,
    help="output folder, new or empty unless --overwrite (default: the next "
    "free outputs/run-NNN, so a rerun never touches an earlier run)",
  )
  ap.add_argument(
    "--overwrite",
    action="store_true",
    help="replace a non-empty --out, once the new images are complete (default: off, refuse)",
  )
  ap.add_argument(
    "--no_progress", action="store_true", help="no progress bar (default: off, show it)"
  )
  compile_cache.add_arguments(ap)
  return ap


def parse_args(argv):
  return build_parser().parse_args(argv)


def read_prompts(args) -> list[str]:
  prompts = list(args.prompt)
  if args.prompts_file is not None:
    f = args.prompts_file
    if not f.exists():
      raise UsageError(f"--prompts_file {f}: no such file")
    if not f.is_file():
      raise UsageError(f"--prompts_file {f}: not a file (a text file, one prompt a line)")
    try:
      text = f.read_text()
    except (OSError, UnicodeDecodeError) as e:
      raise UsageError(f"--prompts_file {f}: cannot be read as text ({e})") from None
    lines = [l.strip() for l in text.splitlines()]
    lines = [l for l in lines if l]
    if not lines:
      raise UsageError(f"--prompts_file {f} has no prompts")
    prompts += lines
  if not prompts:
    raise UsageError("give --prompt and/or --prompts_file")
  if any(not p.strip() for p in prompts):
    raise UsageError(f"empty prompt: --prompt {next(p for p in prompts if not p.strip())!r}")
  return prompts


def next_run_folder(root: pathlib.Path) -> pathlib.Path:
  """root/run-NNN with NNN one above the highest existing (run-001 in a new root)."""
  taken = [int(p.name[4:]) for p in root.glob("run-*") if p.name[4:].isdigit()]
  return root / f"run-{max(taken, default=0) + 1:03d}"


def check_out(out: pathlib.Path, overwrite: bool) -> None:
  """--out must be a folder that is new, empty, or (with --overwrite) replaceable, in a
  place this process can write: probed by making (and removing) an empty folder there."""
  if out.exists() and not out.is_dir():
    raise UsageError(f"--out {out} is an existing file; give a folder (new or empty)")
  if out.is_dir() and any(out.iterdir()) and not overwrite:
    n = sum(1 for _ in out.iterdir())
    raise UsageError(
      f"--out {out} already holds {n} entries (a previous run?); pass "
      "--overwrite to replace it once the new images exist, or give a new "
      "folder"
    )
  parent = out.absolute().parent
  while not parent.exists():
    parent = parent.parent
  if not parent.is_dir():
    raise UsageError(f"--out {out}: {parent} is a file, not a folder")
  probe = parent / f".sample-probe-{uuid.uuid4().hex[:8]}"
  try:
    probe.mkdir()
    probe.rmdir()
  except OSError as e:
    raise UsageError(f"--out {out}: cannot write in {parent} ({e.strerror or e})") from None


def check_args(args) -> dict:
  """Every check that needs no model weights; returns what main needs."""
  for name, low in (
    ("num_images", 1),
    ("batch_size", 1),
    ("steps", 1),
    ("height", 1),
    ("width", 1),
    ("seed", 0),
  ):
    v = getattr(args, name)
    if v is not None and v < low:
      raise UsageError(f"--{name} {v}: must be >= {low}")
  if args.guidance is not None and not args.guidance >= 0:
    raise UsageError(f"--guidance {args.guidance:g}: must be >= 0")
  prompts = read_prompts(args)
  n = len(prompts) * args.num_images
  if args.seed + n - 1 > MAX_SEED:
    raise UsageError(f"--seed {args.seed}: seeds up to {MAX_SEED} (seed + images - 1)")
  if args.out is None:
    args.out = next_run_folder(pathlib.Path("outputs"))
  check_out(args.out, args.overwrite)

  from sana_jax import bundle
  from sana_jax.pipeline import folder_geometry, generation_size
  from sana_jax.embedded import EMBEDDED_MODEL as DEFAULT_MODEL

  model = args.model or DEFAULT_MODEL
  if model.exists() and not model.is_dir():
    raise UsageError(f"--model {model} is a file; give a model folder")
  try:
    _, settings = bundle.check_folder(model)
    geo = folder_geometry(model)
  except bundle.BundleError as e:
    raise UsageError(f"--model {model}: {e}") from None
  base, m = geo["image_size"], geo["multiple"]
  h = base if args.height is None else args.height
  w = base if args.width is None else args.width
  for name, v in (("height", h), ("width", w)):
    if v % m:
      raise UsageError(
        f"--{name} {v}: must be a multiple of {m} for this model "
        f"(autoencoder downsampling {geo['downsample']} x patch "
        f"{geo['patch_size']})"
      )
  gen_h, gen_w = generation_size(h, w, base, m, binning=not args.no_binning)
  factor = max(h / gen_h, w / gen_w)
  if factor > MAX_UPSCALE:
    raise UsageError(
      f"--height/--width {h}x{w}: this model samples that aspect ratio at {gen_h}x{gen_w} "
      f"(its base size is {base} px), so the images would be upscaled {factor:g}x; at "
      f"most {MAX_UPSCALE:g}x is allowed ({int(gen_h * MAX_UPSCALE)}x"
      f"{int(gen_w * MAX_UPSCALE)} here), or pass --no_binning to sample at {h}x{w}"
    )
  lora = check_lora(args, model)
  note = None
  if (gen_h, gen_w) != (h, w):
    note = (
      f"note: sampling at {gen_h}x{gen_w} (the aspect-ratio bin of this model's "
      f"{base} px base size nearest {h}x{w}), then resizing the images to {h}x{w}"
    )
  return {"prompts": prompts, "model": model, "note": note, "lora": lora}


def check_lora(args, model: pathlib.Path):
  """(adapter tree, its config) of --lora checked against the model's transformer config
  (the LoRA file is read; the model's weights are not), or None without --lora."""
  import math

  if args.lora is None:
    if args.lora_scale is not None:
      raise UsageError(f"--lora_scale {args.lora_scale:g}: needs --lora FILE")
    return None
  if args.lora_scale is not None and not math.isfinite(args.lora_scale):
    raise UsageError(f"--lora_scale {args.lora_scale:g}: must be a finite number")
  from sana_jax.lora import LoraError
  from sana_jax.lora import diffusers as lora_diffusers
  from sana_jax.models.dit_config import DiTConfig
  from sana_jax.weights import io

  if not args.lora.is_file():
    what = "a folder" if args.lora.is_dir() else "no such file"
    raise UsageError(f"--lora {args.lora}: {what}; give a LoRA .safetensors file")
  try:
    meta = io.read_json(model / "transformer" / "config.json", "transformer config")
    cfg = DiTConfig.coerce(meta["model"])
    return lora_diffusers.load(args.lora, cfg)
  except (LoraError, io.CheckpointError, KeyError, ValueError) as e:
    raise UsageError(f"--lora {args.lora}: {e}") from None


def _show_warning(message, category, filename, lineno, file=None, line=None):
  print(f"warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
  """Returns the exit status: 0, or 2 after an `error: ...` line for a bad argument."""
  malloc_settings.restart(argv)
  try:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    plan = check_args(args)
    cache = compile_cache.resolve(args)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  compile_cache.enable(cache)
  from sana_jax import bundle
  from sana_jax.models.prompts import PromptWarning
  from sana_jax.pipeline import SamplingOptions, SanaPipeline
  from sana_jax.utils_images import save_images

  prompts = plan["prompts"]
  t0 = time.perf_counter()
  loaded = bundle.load(plan["model"])
  if plan["lora"]:
    from sana_jax.lora import merge

    scale = 1.0 if args.lora_scale is None else args.lora_scale
    loaded.dit_params, loaded.dit_config = merge.merge_into(
      loaded.dit_params, loaded.dit_config, *plan["lora"], scale
    )
    lcfg = plan["lora"][1]
    print(
      f"merged LoRA {args.lora} (rank {lcfg.lora_rank}, {len(lcfg.lora_targets)} targets) at scale {scale:g}"
    )
  pipe = SanaPipeline(loaded)
  opts = SamplingOptions(
    height=args.height,
    width=args.width,
    steps=args.steps,
    guidance_scale=args.guidance,
    sampler=args.sampler,
    resolution_binning=not args.no_binning,
  )
  resolved = pipe.resolve(opts)
  if plan["note"]:
    print(plan["note"])
  flat = [(i, p) for i, p in enumerate(prompts) for _ in range(args.num_images)]
  seeds = [args.seed + k for k in range(len(flat))]
  with warnings.catch_warnings():
    warnings.simplefilter("always", PromptWarning)
    warnings.showwarning = _show_warning
    images = pipe.generate(
      [p for _, p in flat], seeds, opts, progress=not args.no_progress, batch_size=args.batch_size
    )
  names = [
    f"p{i:03d}_{k % args.num_images:02d}_seed{s}.png"
    for k, ((i, _), s) in enumerate(zip(flat, seeds))
  ]
  records = [
    {
      "file": n,
      "prompt": p,
      "seed": s,
      **{k: resolved[k] for k in ("steps", "guidance_scale", "solver", "flow_shift")},
    }
    for n, (_, p), s in zip(names, flat, seeds)
  ]
  save_images(
    args.out,
    images,
    names,
    records,
    grid_cols=args.num_images,
    captions=[p for _, p in flat],
    overwrite=args.overwrite,
  )
  dt = time.perf_counter() - t0
  print(
    f"wrote {len(images)} images ({resolved['height']}x{resolved['width']}, "
    f"{resolved['steps']} {resolved['solver']} steps, CFG {resolved['guidance_scale']}) "
    f"and grid.png to {args.out.resolve()} in {dt:.1f} s"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
