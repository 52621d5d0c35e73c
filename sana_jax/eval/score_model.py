"""Score a model folder on ShapesEval: one image per prompt, and best-of-N.

  python -m sana_jax.eval.score_model --model sana_jax/assets/shapes_model --out outputs/score

Generates N_max candidates per evaluation prompt (seed = 1000 * prompt index + k), saves
them in GenEval's folder layout, scores candidate 0 of every prompt (the default, one image
per prompt), then for each N plays the official knock-out tournament over the first N
candidates with the ShapesEval judge (sana_jax.scaling) and scores the winner. Writes
report.json, a table, a plot of accuracy against log2 N and a per-category gallery.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import numpy as np
import tqdm

from sana_jax.data import shapes
from sana_jax.eval import shapes as evaluator
from sana_jax.scaling import best_of_n as bon
from sana_jax.scaling.judges import ShapesJudge


def generate_all(pipe, prompts, n_max: int, batch: int, options) -> np.ndarray:
  """(P, n_max, H, W, 3) uint8; seeds 1000 * p + k."""
  flat = [(p, k) for p in range(len(prompts)) for k in range(n_max)]
  out = []
  for start in tqdm.tqdm(range(0, len(flat), batch), desc="generate", unit="batch"):
    chunk = flat[start:start + batch]
    out.append(pipe.generate([prompts[p]["prompt"] for p, _ in chunk],
                             [1000 * p + k for p, k in chunk], options))
  images = np.concatenate(out)
  return images.reshape(len(prompts), n_max, *images.shape[1:])


def best_of_n_table(prompts, verdicts, ns) -> dict:
  """{N: report}: each prompt contributes the tournament winner among its first N.

  verdicts: per prompt, (judge verdicts, evaluator results) for its candidates."""
  tables = {}
  for n in ns:
    results = []
    for spec, (vs, res) in zip(prompts, verdicts):
      winner = bon.tournament(vs[:n], 1).winners[0]
      results.append((spec, res[winner]))
    tables[n] = evaluator.report(results)
  return tables


def plot(tables: dict, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  ns = sorted(tables)
  fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
  cats = list(next(iter(tables.values()))["categories"])
  for c in cats:
    ax.plot(ns, [tables[n]["categories"][c]["accuracy"] for n in ns], marker=".", lw=1,
            alpha=0.6, label=c)
  ax.plot(ns, [tables[n]["overall"] for n in ns], marker="o", lw=2.5, color="black",
          label="overall")
  ax.set_xscale("log", base=2)
  ax.set_xticks(ns, [str(n) for n in ns])
  ax.set_xlabel("N candidates (log scale)")
  ax.set_ylabel("ShapesEval accuracy")
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="lower right")
  ax.set_title("Best-of-N with the ShapesEval judge (knock-out tournament)")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def gallery(prompts, images, path: pathlib.Path, per_category: int = 6) -> None:
  """One row per category: candidate 0 of the first prompts of that category, captioned."""
  from PIL import Image, ImageDraw
  scale, cell = 3, images.shape[2] * 3
  rows = []
  for cat in shapes.CATEGORIES:
    idx = [i for i, p in enumerate(prompts) if p["tag"] == cat][:per_category]
    rows.append((cat, idx))
  cap_w = 140
  canvas = Image.new("RGB", (cap_w + per_category * (cell + 4), len(rows) * (cell + 24)),
                     "white")
  draw = ImageDraw.Draw(canvas)
  for r, (cat, idx) in enumerate(rows):
    y = r * (cell + 24)
    draw.text((4, y + cell // 2), cat, fill="black")
    for j, i in enumerate(idx):
      x = cap_w + j * (cell + 4)
      canvas.paste(Image.fromarray(images[i, 0]).resize((cell, cell), Image.NEAREST), (x, y))
      words = prompts[i]["prompt"].split()
      draw.text((x, y + cell + 1), " ".join(words[:4]), fill="black")
      draw.text((x, y + cell + 11), " ".join(words[4:8]), fill="black")
  canvas.save(path)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", type=pathlib.Path, default=None)
  ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("outputs/score"))
  ap.add_argument("--ns", default="1,2,4,8,16")
  ap.add_argument("--num_prompts", type=int, default=None, help="first K prompts only")
  ap.add_argument("--per_category", type=int, default=None,
                  help="the first K prompts of every category only")
  ap.add_argument("--validation", action="store_true",
                  help="score held-out validation prompts (disjoint from the evaluation "
                       "set; --per_category of them, default 50) instead: use these to "
                       "choose sampling settings")
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--steps", type=int, default=None)
  ap.add_argument("--guidance", type=float, default=None)
  args = ap.parse_args(argv)
  from sana_jax.pipeline import SamplingOptions, SanaPipeline
  from sana_jax.shapes_model import DEFAULT_MODEL
  ns = sorted(int(n) for n in args.ns.split(","))
  if ns[0] < 1:
    raise ValueError("N must be >= 1")
  if args.validation:
    prompts = shapes.make_eval_prompts(args.per_category or shapes.EVAL_PER_CATEGORY,
                                       shapes.VALIDATION_SEED, exclude_eval_prompts=True)
  else:
    prompts = shapes.eval_prompts()[:args.num_prompts]
  if args.per_category:
    prompts = [p for c in shapes.CATEGORIES
               for p in [q for q in prompts if q["tag"] == c][:args.per_category]]
  pipe = SanaPipeline.from_folder(args.model or DEFAULT_MODEL)
  options = SamplingOptions(steps=args.steps, guidance_scale=args.guidance)
  images = generate_all(pipe, prompts, ns[-1], args.batch, options)
  args.out.mkdir(parents=True, exist_ok=True)
  for i, (spec, ims) in enumerate(zip(prompts, images)):
    evaluator.save_geneval_folder(str(args.out / "images"), i, spec, list(ims))
  verdicts = []
  for spec, ims in tqdm.tqdm(list(zip(prompts, images)), desc="judge"):
    judge = ShapesJudge(spec)
    vs = judge.judge(list(ims), spec["prompt"])
    verdicts.append((vs, [evaluator.evaluate(im, spec) for im in ims]))
  tables = best_of_n_table(prompts, verdicts, ns)
  single = tables[1]
  print("One image per prompt (candidate 0, default settings):")
  print(evaluator.format_report(single))
  print("\nBest-of-N (ShapesEval judge):")
  cats = list(single["categories"])
  print(f"{'N':>4} " + " ".join(f"{c[:11]:>11}" for c in cats) + f" {'overall':>8}")
  for n in ns:
    t = tables[n]
    print(f"{n:>4} " + " ".join(f"{t['categories'][c]['accuracy']:>11.3f}" for c in cats)
          + f" {t['overall']:>8.3f}")
  (args.out / "report.json").write_text(json.dumps(
      {"settings": pipe.resolve(options), "prompts": len(prompts),
       "best_of_n": {str(n): tables[n] for n in ns}}, indent=2))
  plot(tables, args.out / "best_of_n.png")
  gallery(prompts, images, args.out / "gallery.png")
  print(f"\nwrote report.json, best_of_n.png, gallery.png and images/ to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
