"""Claim 3, inference scaling: does the pruned 4-block model with best-of-N match the
unpruned 6-block model at N = 1, and at what FLOPs?

  python -m sana_jax.experiments.inference_scaling --out outputs/claim_inference [--quick]

SANA-1.5 (section 2.5, table 4): the 1.6B model with best-of-N sampling (a VLM judge)
reaches or passes the 4.8B model's GenEval. Here: the shipped 6-block ShapesEval model
pruned to 4 blocks by block importance (as in claim 2: --calib held-out scenes with their
rendered images), fine-tuned --finetune steps with the recipe, then best-of-N with the
ShapesEval judge (score_model's knock-out tournament) for each N of --ns, against the
unpruned model at N = 1 (candidate 0), on the evaluation prompts (--per_category of each
category; seeds 1000 * prompt + k). Reported: the smallest N whose overall score reaches
the 6-block N = 1 score, and the DiT FLOPs per prompt of each (N x 20 sampling steps x 2
for CFG x one forward; the judge's cost not counted). Writes results.json, table.md and
claim_inference.png.

Default size (500 fine-tune steps of batch 64, best-of-16 on 300 prompts): measured at 48
minutes on this 2-core CPU while other jobs kept the load at 3-6 (2289 s of process CPU,
so ~19 minutes of an idle machine's two cores); see docs/paper_claims.md. --quick is a
seconds-long smoke run.
"""

from __future__ import annotations

import sys

from sana_jax.experiments import common as C
from sana_jax.experiments import pruning as P

OUTPUTS = ("results.json", "table.md", "claim_inference.png")


def build_parser():
  ap = C.parser("python -m sana_jax.experiments.inference_scaling", __doc__)
  ap.add_argument(
    "--ns",
    type=C.int_list("--ns", 1, 64),
    default=[1, 2, 4, 8, 16],
    help="best-of-N candidate counts, comma-separated, each 1..64 (default: 1,2,4,8,16)",
  )
  ap.add_argument(
    "--depth", type=C.positive("--depth"), default=4, help="pruned depth, 1..5 (default: 4)"
  )
  ap.add_argument(
    "--finetune",
    type=C.non_negative("--finetune"),
    default=500,
    help="fine-tune steps after pruning (default: 500)",
  )
  ap.add_argument(
    "--calib", type=C.positive("--calib"), default=64, help="calibration scenes (default: 64)"
  )
  C.add_shared_options(ap, num_train_help='training scenes for fine-tuning', warmup=None)
  return ap


def check(args):
  C.check_out(args.out, OUTPUTS, args.overwrite)
  C.check_per_category(args)
  if args.depth > 5:
    raise C.UsageError(f"--depth {args.depth}: prune the 6-block model to 1..5 blocks")
  args.warmup, args.sample_steps = 10, None
  if args.quick:
    args.ns, args.finetune, args.per_category = [1, 2], 2, 1
    args.calib, args.num_train, args.batch, args.sample_steps = 4, 64, 8, 2


def work(args):
  import time

  import jax

  from sana_jax.scaling import pruning

  t0 = time.perf_counter()
  cache = args.out / "cache"
  data = C.make_data(cache, args.num_train)
  calib = C.make_data(cache, args.calib, C.CALIBRATION_SEED)
  params, cfg = C.shipped_params()
  specs = C.prompts(False, args.per_category)
  bi = P.importance(params, cfg, calib)
  kept = pruning.select_blocks(bi, args.depth)
  small, scfg = pruning.keep_blocks(params, cfg, kept)
  small = jax.device_get(small)
  if args.finetune:
    small = C.train(
      small,
      scfg,
      data,
      steps=args.finetune,
      batch=args.batch,
      warmup=args.warmup,
      log_every=args.finetune,
      desc=f"fine-tune {args.depth} blocks",
    ).params
  big = C.best_of_n(params, cfg, specs, [1], args.sample_steps)[1]["overall"]
  tables = C.best_of_n(small, scfg, specs, args.ns, args.sample_steps)
  f_big, f_small = C.sample_flops(cfg), C.sample_flops(scfg)
  match = next((n for n in sorted(args.ns) if tables[n]["overall"] >= big), None)
  rows = [["6 blocks (unpruned)", "1", f"{big:.3f}", f"{f_big / 1e9:.3f}", "1.00"]]
  for n in sorted(args.ns):
    rows.append(
      [
        f"{args.depth} blocks {kept}, fine-tuned {args.finetune}",
        str(n),
        f"{tables[n]['overall']:.3f}",
        f"{n * f_small / 1e9:.3f}",
        f"{n * f_small / f_big:.2f}",
      ]
    )
  table = C.markdown_table(
    ["model", "N", "ShapesEval", "DiT GFLOPs / prompt", "FLOPs vs 6-block N=1"], rows
  )
  goal = (
    f"The {args.depth}-block model matches the 6-block N = 1 score ({big:.3f}) first at N = "
    f"{match}, at {match * f_small / f_big:.2f}x its sampling FLOPs."
    if match
    else f"The {args.depth}-block model does not reach the 6-block N = 1 score ({big:.3f}) "
    f"at any N of {sorted(args.ns)}."
  )
  text = f"ShapesEval on {len(specs)} evaluation prompts.\n\n{table}\n\n{goal}\n"
  print("\n" + text)
  result = dict(
    importance=[float(b) for b in bi],
    kept=kept,
    unpruned_n1=big,
    best_of_n={str(n): tables[n]["overall"] for n in args.ns},
    flops=dict(big=f_big, small=f_small),
    match_n=match,
    prompts=len(specs),
    args={k: (str(v) if k == "out" else v) for k, v in vars(args).items()},
    seconds=time.perf_counter() - t0,
  )
  C.write_outputs(
    args.out,
    {
      "results.json": C.dump(result),
      "table.md": text,
      "claim_inference.png": lambda p: plot(tables, big, f_small, f_big, args.depth, p),
    },
  )
  print(f"wrote {', '.join(OUTPUTS)} to {args.out} ({time.perf_counter() - t0:.0f} s)")


def plot(tables, big, f_small, f_big, depth, path):
  plt = C.pyplot()
  ns = sorted(tables)
  fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
  ax.plot(
    [n * f_small / 1e9 for n in ns],
    [tables[n]["overall"] for n in ns],
    marker="o",
    label=f"{depth} blocks (pruned), best-of-N",
  )
  for n in ns:
    ax.annotate(f"N={n}", (n * f_small / 1e9, tables[n]["overall"]), fontsize=7)
  ax.scatter([f_big / 1e9], [big], color="black", zorder=3, label="6 blocks, N = 1")
  ax.set_xscale("log")
  ax.set_xlabel("DiT GFLOPs per prompt (sampling)")
  ax.set_ylabel("ShapesEval overall")
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title("inference scaling: smaller model + best-of-N")
  fig.tight_layout()
  fig.savefig(path, format="png")
  plt.close(fig)


def main(argv=None) -> int:
  return C.run_main(check, work, argv, build_parser())


if __name__ == "__main__":
  sys.exit(main())
