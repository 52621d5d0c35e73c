"""Sample images from a SANA model folder.

  python sample.py --prompt "a red circle above a blue square"
  python sample.py --prompts_file prompts.txt --num_images 4 --out outputs/run1
  python sample.py --model MODEL --prompt "..." --height 1024 --width 768 --steps 20

Without --model it samples from the embedded ShapesEval model shipped in the repository.
Writes one PNG per image (prompt index, image index, seed in the name), a grid.png and
a samples.json with the prompt and seed of each image, then prints where they are.
Everything is validated before sampling; files are written only after all images exist.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time


def parse_args(argv):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--prompt", action="append", default=[], help="may be repeated")
  ap.add_argument("--prompts_file", type=pathlib.Path, help="one prompt per line")
  ap.add_argument("--model", type=pathlib.Path, default=None,
                  help="model folder (default: the embedded ShapesEval model)")
  ap.add_argument("--height", type=int, default=None)
  ap.add_argument("--width", type=int, default=None)
  ap.add_argument("--steps", type=int, default=None)
  ap.add_argument("--guidance", type=float, default=None, help="CFG scale")
  ap.add_argument("--sampler", choices=("dpm_solver", "euler"), default=None)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--num_images", type=int, default=1, help="images per prompt")
  ap.add_argument("--batch_size", type=int, default=None)
  ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("outputs"))
  ap.add_argument("--no_progress", action="store_true")
  return ap.parse_args(argv)


def read_prompts(args) -> list[str]:
  prompts = list(args.prompt)
  if args.prompts_file is not None:
    if not args.prompts_file.exists():
      raise FileNotFoundError(f"no such prompts file: {args.prompts_file}")
    lines = [l.strip() for l in args.prompts_file.read_text().splitlines()]
    lines = [l for l in lines if l]
    if not lines:
      raise ValueError(f"prompts file {args.prompts_file} has no prompts")
    prompts += lines
  if not prompts:
    raise ValueError("give --prompt and/or --prompts_file")
  if any(not p.strip() for p in prompts):
    raise ValueError("empty prompt")
  return prompts


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  prompts = read_prompts(args)
  if args.num_images < 1:
    raise ValueError(f"--num_images must be >= 1, got {args.num_images}")
  from sana_jax import bundle
  from sana_jax.pipeline import SamplingOptions, SanaPipeline
  from sana_jax.shapes_model import DEFAULT_MODEL
  from sana_jax.utils_images import save_images
  model = args.model or DEFAULT_MODEL
  bundle.check_folder(model)  # clear error for a missing or incomplete folder, before loading
  t0 = time.perf_counter()
  pipe = SanaPipeline.from_folder(model)
  opts = SamplingOptions(height=args.height, width=args.width, steps=args.steps,
                         guidance_scale=args.guidance, sampler=args.sampler)
  resolved = pipe.resolve(opts)  # validates sizes, steps, guidance before any sampling
  flat = [(i, p) for i, p in enumerate(prompts) for _ in range(args.num_images)]
  seeds = [args.seed + k for k in range(len(flat))]
  images = pipe.generate([p for _, p in flat], seeds, opts, progress=not args.no_progress,
                         batch_size=args.batch_size)
  names = [f"p{i:03d}_{k % args.num_images:02d}_seed{s}.png"
           for k, ((i, _), s) in enumerate(zip(flat, seeds))]
  records = [{"file": n, "prompt": p, "seed": s, **{k: resolved[k] for k in (
      "steps", "guidance_scale", "solver", "flow_shift")}} for n, (_, p), s in zip(names, flat, seeds)]
  save_images(args.out, images, names, records, grid_cols=args.num_images,
              captions=[p for _, p in flat])
  dt = time.perf_counter() - t0
  print(f"wrote {len(images)} images ({resolved['height']}x{resolved['width']}, "
        f"{resolved['steps']} {resolved['solver']} steps, CFG {resolved['guidance_scale']}) "
        f"and grid.png to {args.out.resolve()} in {dt:.1f} s")
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main())
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
