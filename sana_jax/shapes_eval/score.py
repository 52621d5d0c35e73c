"""Score a model folder on ShapesEval: one image per prompt, and best-of-N.

  python -m sana_jax.eval.score_model --model sana_jax/assets/shapes_model --out outputs/score

Generates N_max candidates per evaluation prompt (seed = 1000 * prompt index + k), saves
them in GenEval's folder layout, scores candidate 0 of every prompt (the default, one image
per prompt), then for each N of --ns plays the official knock-out tournament over the first
N candidates with the ShapesEval judge (sana_jax.scaling) and scores the winner. Writes
report.json ("one_image": the candidate-0 report, "best_of_n": {N: report}), prints both
tables, and draws a plot of accuracy against log2 N and a per-category gallery.

Every argument is checked before the model is loaded (bad input: `error: ...`, exit status
2). The output folder is written whole: into a temporary sibling that becomes --out at the
end; an existing non-empty --out is replaced only with --overwrite.
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import tqdm

from sana_jax.shapes_eval import task as shapes
from sana_jax.shapes_eval import evaluator as evaluator
from sana_jax.scaling import best_of_n as bon
from sana_jax.scaling import best_of_n_cli as bon_cli
from sana_jax.scaling.judges import ShapesJudge


# The prompt grammar has about 94 distinct single_object prompts outside the evaluation set
# (counted over 30000 draws); asking make_eval_prompts for more would never end.
MAX_VALIDATION_PER_CATEGORY = 90


def generate_all(pipe, prompts, n_max: int, batch: int, options) -> np.ndarray:
  """(P, n_max, H, W, 3) uint8; seeds 1000 * p + k."""
  flat = [(p, k) for p in range(len(prompts)) for k in range(n_max)]
  out = []
  for start in tqdm.tqdm(range(0, len(flat), batch), desc="generate", unit="batch"):
    chunk = flat[start : start + batch]
    out.append(
      pipe.generate(
        [prompts[p]["prompt"] for p, _ in chunk], [1000 * p + k for p, k in chunk], options
      )
    )
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
    ax.plot(
      ns, [tables[n]["categories"][c]["accuracy"] for n in ns], marker=".", lw=1, alpha=0.6, label=c
    )
  ax.plot(
    ns, [tables[n]["overall"] for n in ns], marker="o", lw=2.5, color="black", label="overall"
  )
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

  cell = images.shape[2] * 3  # each image drawn at 3x
  rows = []
  for cat in shapes.CATEGORIES:
    idx = [i for i, p in enumerate(prompts) if p["tag"] == cat][:per_category]
    rows.append((cat, idx))
  cap_w = 140
  canvas = Image.new("RGB", (cap_w + per_category * (cell + 4), len(rows) * (cell + 24)), "white")
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


def build_parser() -> bon_cli.CommandParser:
  ap = bon_cli.CommandParser(
    prog="python -m sana_jax.eval.score_model",
    description=__doc__,
    formatter_class=bon_cli.HelpFormatter,
  )
  ap.add_argument(
    "--model",
    type=pathlib.Path,
    default=None,
    help="model folder (default: the embedded ShapesEval model, sana_jax/assets/shapes_model)",
  )
  ap.add_argument(
    "--out",
    type=pathlib.Path,
    default=pathlib.Path("outputs/score"),
    help="output folder (default: outputs/score); an existing non-empty one needs --overwrite",
  )
  ap.add_argument(
    "--overwrite",
    action="store_true",
    help="replace an existing --out, once the new output is complete (default: off, refuse)",
  )
  ap.add_argument(
    "--ns",
    type=bon_cli.int_list(1),
    default=[1, 2, 4, 8, 16],
    help="comma-separated N >= 1 of the best-of-N table, any numbers (byes fill "
    "the bracket; 1 is not required: the one-image table is always "
    "candidate 0) (default: 1,2,4,8,16)",
  )
  ap.add_argument(
    "--num_prompts",
    type=bon_cli.int_at_least(1),
    default=None,
    help="the first K prompts only (default: all; 300 evaluation prompts, or "
    "the validation prompts with --validation)",
  )
  ap.add_argument(
    "--per_category",
    type=bon_cli.int_at_least(1),
    default=None,
    help=f"the first K prompts of every category only, K >= 1 (default: all; "
    f"the evaluation set has {shapes.EVAL_PER_CATEGORY} per category)",
  )
  ap.add_argument(
    "--validation",
    action="store_true",
    help="score held-out validation prompts (disjoint from the evaluation "
    "set; --per_category of them per category, default "
    f"{shapes.EVAL_PER_CATEGORY}, at most {MAX_VALIDATION_PER_CATEGORY}) "
    "instead: use these to choose sampling settings (default: off, the "
    "evaluation prompts)",
  )
  ap.add_argument(
    "--batch",
    type=bon_cli.int_at_least(1),
    default=128,
    help="images per generation call (default 128)",
  )
  ap.add_argument(
    "--steps",
    type=bon_cli.int_at_least(1),
    default=None,
    help="denoising steps (default: the model folder's pipeline.json)",
  )
  ap.add_argument(
    "--guidance",
    type=bon_cli.float_in(0.0),
    default=None,
    help="classifier-free guidance scale >= 0 (default: the model folder's pipeline.json)",
  )
  return ap


def select_prompts(args) -> list[dict]:
  """The prompts a run scores (evaluation or validation set, --num_prompts, --per_category).
  Raises UsageError for a selection the set cannot give."""
  if args.validation:
    if args.per_category is not None and args.per_category > MAX_VALIDATION_PER_CATEGORY:
      raise bon_cli.UsageError(
        f"--per_category {args.per_category}: --validation draws at most "
        f"{MAX_VALIDATION_PER_CATEGORY} prompts per category (the grammar has about 94 "
        "distinct single_object prompts outside the evaluation set)"
      )
    prompts = shapes.make_eval_prompts(
      args.per_category or shapes.EVAL_PER_CATEGORY,
      shapes.VALIDATION_SEED,
      exclude_eval_prompts=True,
    )
  else:
    prompts = shapes.eval_prompts()
    if args.per_category is not None and args.per_category > shapes.EVAL_PER_CATEGORY:
      raise bon_cli.UsageError(
        f"--per_category {args.per_category}: the evaluation set has "
        f"{shapes.EVAL_PER_CATEGORY} prompts per category (expected 1.."
        f"{shapes.EVAL_PER_CATEGORY}; --validation draws any number)"
      )
  if args.num_prompts is not None:
    if args.num_prompts > len(prompts):
      raise bon_cli.UsageError(
        f"--num_prompts {args.num_prompts}: this set has "
        f"{len(prompts)} prompts (expected 1..{len(prompts)})"
      )
    prompts = prompts[: args.num_prompts]
  if args.per_category:
    prompts = [
      p
      for c in shapes.CATEGORIES
      for p in [q for q in prompts if q["tag"] == c][: args.per_category]
    ]
  return prompts


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  ns = sorted(set(args.ns))
  try:
    prompts = select_prompts(args)
    model = bon_cli.check_model_folder(args.model)
    out = bon_cli.check_new_output(args.out, "--out", overwrite=args.overwrite)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from sana_jax.pipeline import SamplingOptions, SanaPipeline

  pipe = SanaPipeline.from_folder(model)
  options = SamplingOptions(steps=args.steps, guidance_scale=args.guidance)
  settings = pipe.resolve(options)
  images = generate_all(pipe, prompts, ns[-1], args.batch, options)
  verdicts = []
  for spec, ims in tqdm.tqdm(list(zip(prompts, images)), desc="judge"):
    judge = ShapesJudge(spec)
    vs = judge.judge(list(ims), spec["prompt"])
    verdicts.append((vs, [evaluator.evaluate(im, spec) for im in ims]))
  single = evaluator.report([(spec, res[0]) for spec, (_, res) in zip(prompts, verdicts)])
  tables = best_of_n_table(prompts, verdicts, ns)
  with bon_cli.staged_folder(out) as tmp:
    for i, (spec, ims) in enumerate(zip(prompts, images)):
      evaluator.save_geneval_folder(str(tmp / "images"), i, spec, list(ims))
    (tmp / "report.json").write_text(
      json.dumps(
        {
          "model": str(model),
          "settings": settings,
          "prompts": len(prompts),
          "validation": bool(args.validation),
          "one_image": single,
          "best_of_n": {str(n): tables[n] for n in ns},
        },
        indent=2,
      )
    )
    plot(tables, tmp / "best_of_n.png")
    gallery(prompts, images, tmp / "gallery.png")
  print("One image per prompt (candidate 0):")
  print(evaluator.format_report(single))
  print("\nBest-of-N (ShapesEval judge):")
  print(format_best_of_n(tables))
  print(f"\nwrote report.json, best_of_n.png, gallery.png and images/ to {out}")
  return 0


def format_best_of_n(tables: dict) -> str:
  """The best-of-N table: one row per N, the accuracy per category and overall."""
  ns = sorted(tables)
  cats = list(tables[ns[0]]["categories"])
  lines = [f"{'N':>4} " + " ".join(f"{c[:11]:>11}" for c in cats) + f" {'overall':>8}"]
  for n in ns:
    t = tables[n]
    lines.append(
      f"{n:>4} "
      + " ".join(f"{t['categories'][c]['accuracy']:>11.3f}" for c in cats)
      + f" {t['overall']:>8.3f}"
    )
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
