"""Claim 1, model growth: train 3 blocks, grow to 6, train on; against 6 blocks from scratch,
per training FLOP.

  python -m sana_jax.experiments.growth --out outputs/claim_growth [--quick]

SANA-1.5 (section 2.1, fig. 3): growing a trained 1.6B model (20 blocks) to 4.8B (60 blocks)
and training on reaches the from-scratch 4.8B model's quality with about 60% less training
time. Here, with the recipe (configs/shapes.py, batch 64, CAME-8bit, lr 3e-4, warm-up 200)
on the same training scenes in the same order:

  * scratch: 6 blocks from a random init (seed 0), --steps steps;
  * small: the recipe at half depth (3 blocks, seed 0), --small_steps steps; grown to 6
    blocks with partial preservation (sana_jax.scaling.growth "constant", keeping the first
    2 source blocks, 4 fresh identity blocks), cyclic + zero gate and block replication +
    zero gate; each trained on at 6 blocks until its total training compute reaches the
    scratch run's (the small model's steps at its own FLOPs), with a fresh optimizer state
    (as the paper's grown run restarts its optimizer) and a --grown_warmup warm-up (the
    recipe's 200 is for a random init; the grown model is already trained).

Every --eval_every steps each run is scored on ShapesEval validation prompts (--val_per_category
of each category, one image each) and its held-out loss measured (256 scenes of another seed,
4 fixed noise / timestep draws), both plotted against total training FLOPs (train_step_flops,
model FLOPs; the small model's steps at its own, smaller FLOPs). Reported: the compute at which
each grown run first reaches the scratch run's final validation score and final held-out loss
(goal to test: >= 40% less), and the final score of every run on the evaluation prompts
(--per_category). Writes results.json, table.md and claim_growth.png.

Default size (400 steps of batch 64 from scratch; 200 at 3 blocks, then ~300 at 6 for each
grown run: ~1300 steps at 6 blocks and 200 at 3 in all, 17 curve points on 48 validation
prompts, 4 x 300 final prompts): measured at 55 minutes on this 2-core CPU while other jobs
kept the load at 2-5 (3302 s of process CPU, so ~28 minutes of an idle machine's two
cores); see docs/paper_claims.md. --quick is a seconds-long smoke run.
"""

from __future__ import annotations

import sys


from sana_jax.experiments import common as C

OUTPUTS = ("results.json", "table.md", "claim_growth.png")
STRATEGIES = (
  ("partial preservation", "constant", dict(keep=2)),
  ("cyclic + zero gate", "cyclic", dict(zero_gate=True)),
  ("block replication + zero gate", "block_expand", dict(zero_gate=True)),
)


def build_parser():
  ap = C.parser("python -m sana_jax.experiments.growth", __doc__)
  ap.add_argument(
    "--steps",
    type=C.positive("--steps"),
    default=400,
    help="steps of the scratch run (6 blocks); each grown run trains --small_steps at 3 "
    "blocks, then at 6 until its compute equals the scratch run's (default: 400)",
  )
  ap.add_argument(
    "--small_steps",
    type=C.positive("--small_steps"),
    default=200,
    help="steps of the 3-block model before growing, < --steps (default: 200)",
  )
  ap.add_argument(
    "--grown_warmup",
    type=C.non_negative("--grown_warmup"),
    default=50,
    help="learning-rate warm-up of the grown runs' fresh optimizer (default: 50)",
  )
  ap.add_argument(
    "--eval_every",
    type=C.positive("--eval_every"),
    default=100,
    help="score and held-out loss every this many steps, a divisor of both step counts "
    "(default: 100)",
  )
  ap.add_argument(
    "--val_per_category",
    type=C.positive("--val_per_category"),
    default=8,
    help="validation prompts per category for the curves, 1..90 (default: 8)",
  )
  C.add_shared_options(ap, per_category_help='evaluation prompts per category for the final scores')
  return ap


def check(args):
  C.check_out(args.out, OUTPUTS, args.overwrite)
  C.check_per_category(args)
  if args.val_per_category > 90:
    raise C.UsageError(
      f"--val_per_category {args.val_per_category}: at most 90 validation prompts per category"
    )
  args.heldout, args.sample_steps = 256, None
  if args.quick:
    args.steps, args.small_steps, args.eval_every, args.grown_warmup = 2, 1, 1, 1
    args.val_per_category, args.per_category, args.num_train = 1, 1, 64
    args.batch, args.heldout, args.sample_steps = 8, 8, 2
  if args.small_steps >= args.steps:
    raise C.UsageError(
      f"--small_steps {args.small_steps} must be < --steps {args.steps} (the grown model "
      "trains on for the rest)"
    )
  bad = [
    f"{n} {v}"
    for n, v in (("--steps", args.steps), ("--small_steps", args.small_steps))
    if v % args.eval_every
  ]
  if bad:
    raise C.UsageError(
      f"--eval_every {args.eval_every} must divide {' and '.join(bad)} (the curves' points)"
    )


def grown_steps_at_equal_compute(steps: int, small_steps: int, f_big: float, f_small: float):
  """Steps at 6 blocks after `small_steps` at 3 that bring a grown run's training FLOPs to
  the scratch run's `steps` at 6 blocks, rounded down (never more compute); at least 1."""
  return max(1, int((steps * f_big - small_steps * f_small) // f_big))


def first_reach(curve, target, lower_is_better: bool):
  """First FLOPs at which `curve` [(flops, value)] reaches target (linear interpolation
  between points); None if never."""
  prev = None
  for f, v in curve:
    ok = v <= target if lower_is_better else v >= target
    if ok:
      if prev is None:
        return f
      pf, pv = prev
      if pv == v:
        return f
      return pf + (target - pv) / (v - pv) * (f - pf)
    prev = (f, v)
  return None


def saving_text(f, target_flops) -> str:
  """'TFLOPs (saving vs the scratch run's total)'; 'never'; 'at init' when the target is met
  before any training (a target that says nothing, e.g. a scratch score of 0)."""
  if f is None:
    return "never"
  if f == 0:
    return "at init (trivial target)"
  return f"{f / 1e12:.2f} ({100 * (1 - f / target_flops):+.0f}%)"


def work(args):
  import time

  import jax

  from sana_jax.scaling import growth

  t0 = time.perf_counter()
  cache = args.out / "cache"
  data = C.make_data(cache, args.num_train)
  held = C.make_data(cache, args.heldout, C.CALIBRATION_SEED + 1)
  val = C.prompts(True, args.val_per_category)
  specs = C.prompts(False, args.per_category)
  big_cfg, small_cfg = C.model_config(6), C.model_config(3)
  f_big, f_small = C.step_flops(big_cfg, args.batch), C.step_flops(small_cfg, args.batch)
  grown_steps = grown_steps_at_equal_compute(args.steps, args.small_steps, f_big, f_small)

  def measure(name, offset_steps, offset_flops, cfg, f_step, curves):
    def cb(step, params):
      v = C.score(params, cfg, val, args.sample_steps)["overall"]
      loss = C.fixed_loss(params, cfg, held, batch=min(64, args.heldout))
      curves.append(
        dict(step=offset_steps + step, flops=offset_flops + step * f_step, val=v, loss=loss)
      )
      print(
        f"{name:32s} step {offset_steps + step:5d}  val {v:.3f}  held-out loss {loss:.4f}",
        flush=True,
      )

    return cb

  runs = {}
  curves = []
  init6 = C.init_params(big_cfg, 0)
  cb = measure("scratch (6 blocks)", 0, 0.0, big_cfg, f_big, curves)
  cb(0, init6)
  r = C.train(
    init6,
    big_cfg,
    data,
    steps=args.steps,
    batch=args.batch,
    warmup=args.warmup,
    log_every=args.eval_every,
    callback=cb,
    desc="train scratch (6 blocks)",
  )
  runs["scratch (6 blocks)"] = dict(params=r.params, cfg=big_cfg, curve=curves, losses=r.losses)

  small_curve = []
  cb = measure("small (3 blocks)", 0, 0.0, small_cfg, f_small, small_curve)
  init3 = C.init_params(small_cfg, 0)
  cb(0, init3)
  r = C.train(
    init3,
    small_cfg,
    data,
    steps=args.small_steps,
    batch=args.batch,
    warmup=args.warmup,
    log_every=args.eval_every,
    callback=cb,
    desc="train 3 blocks",
  )
  small, small_losses = r.params, r.losses
  f0 = args.small_steps * f_small
  for label, strategy, kw in STRATEGIES:
    grown, gcfg = growth.grow(small, small_cfg, 6, strategy, key=jax.random.key(1), **kw)
    grown = jax.device_get(grown)
    curve = list(small_curve)
    cb = measure(f"grown: {label}", args.small_steps, f0, gcfg, f_big, curve)
    cb(0, grown)
    # The rest of the data order: the grown run continues where the small one stopped.
    r = C.train(
      grown,
      gcfg,
      data,
      steps=grown_steps,
      batch=args.batch,
      warmup=args.grown_warmup,
      log_every=args.eval_every,
      callback=cb,
      seed=0,
      skip=args.small_steps,
      desc=f"train grown: {label}",
    )
    runs[f"grown: {label}"] = dict(
      params=r.params,
      cfg=gcfg,
      curve=curve,
      losses=small_losses + [(s + args.small_steps, l) for s, l in r.losses],
    )

  final = {
    k: C.score(v["params"], v["cfg"], specs, args.sample_steps)["overall"] for k, v in runs.items()
  }
  scratch = runs["scratch (6 blocks)"]["curve"]
  t_val, t_loss, t_flops = scratch[-1]["val"], scratch[-1]["loss"], scratch[-1]["flops"]
  rows = []
  for name, v in runs.items():
    c = v["curve"]
    fv = first_reach([(p["flops"], p["val"]) for p in c], t_val, False)
    fl = first_reach([(p["flops"], p["loss"]) for p in c], t_loss, True)
    saving = lambda f: saving_text(f, t_flops)  # noqa: E731
    rows.append(
      dict(
        name=name,
        total_flops=c[-1]["flops"],
        final_val=c[-1]["val"],
        final_loss=c[-1]["loss"],
        final_eval=final[name],
        reach_val=fv,
        reach_loss=fl,
        text_val=saving(fv),
        text_loss=saving(fl),
      )
    )
  table = C.markdown_table(
    [
      "run",
      "training TFLOPs",
      "final val",
      "final held-out loss",
      "eval (reported)",
      "TFLOPs to scratch's final val (saving)",
      "TFLOPs to scratch's final loss (saving)",
    ],
    [
      [
        r["name"],
        f"{r['total_flops'] / 1e12:.2f}",
        f"{r['final_val']:.3f}",
        f"{r['final_loss']:.4f}",
        f"{r['final_eval']:.3f}",
        r["text_val"],
        r["text_loss"],
      ]
      for r in rows
    ],
  )
  text = (
    f"batch {args.batch}; scratch: {args.steps} steps at 6 blocks; grown: {args.small_steps} "
    f"at 3 blocks, then {grown_steps} at 6 (warm-up {args.grown_warmup}; the same total "
    f"compute, or just under); validation curves on {len(val)} prompts, final scores on {len(specs)} "
    f"evaluation prompts; one step = {f_big / 1e9:.1f} GFLOPs at 6 blocks, "
    f"{f_small / 1e9:.1f} at 3.\n\n{table}\n\nGoal (>= 40% less compute than scratch to reach "
    "its final score / loss): see the saving columns (positive = less compute).\n"
  )
  print("\n" + text)
  result = dict(
    rows=rows,
    curves={k: v["curve"] for k, v in runs.items()},
    losses={k: v["losses"] for k, v in runs.items()},
    step_flops=dict(big=f_big, small=f_small),
    grown_steps=grown_steps,
    args={k: (str(v) if k == "out" else v) for k, v in vars(args).items()},
    seconds=time.perf_counter() - t0,
  )
  C.write_outputs(
    args.out,
    {
      "results.json": C.dump(result),
      "table.md": text,
      "claim_growth.png": lambda p: plot(runs, f0, p),
    },
  )
  print(f"wrote {', '.join(OUTPUTS)} to {args.out} ({time.perf_counter() - t0:.0f} s)")


def plot(runs, f0, path):
  plt = C.pyplot()
  fig, (a0, a1) = plt.subplots(1, 2, figsize=(9.5, 3.6), dpi=100)
  for name, v in runs.items():
    c = v["curve"]
    x = [p["flops"] / 1e12 for p in c]
    a0.plot(x, [p["val"] for p in c], marker=".", label=name)
    a1.plot(x, [p["loss"] for p in c], marker=".", label=name)
  for a in (a0, a1):
    a.axvline(f0 / 1e12, color="gray", ls="--", lw=1)
    a.set_xlabel("training TFLOPs (model FLOPs)")
    a.grid(alpha=0.3)
  a0.set_ylabel("ShapesEval (validation)")
  a0.set_ylim(0, 1.02)
  a1.set_ylabel("held-out flow-matching loss")
  a1.set_yscale("log")
  a1.legend(fontsize=7)
  a0.set_title("growth 3 -> 6 blocks (dashed: grown here)")
  fig.tight_layout()
  fig.savefig(path, format="png")
  plt.close(fig)


def main(argv=None) -> int:
  return C.run_main(check, work, argv, build_parser())


if __name__ == "__main__":
  sys.exit(main())
