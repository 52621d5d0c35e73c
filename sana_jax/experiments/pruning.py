"""Claim 2, depth pruning: prune the shipped 6-block ShapesEval model by block importance,
by first-k and by a random k; fine-tune; ShapesEval before and after.

  python -m sana_jax.experiments.pruning --out outputs/claim_pruning [--quick]

SANA-1.5 (section 2.4, fig. 7): blocks ranked by importance BI_i = 1 - E[cos(X_i, X_i+1)]
can be dropped and ~100 fine-tune steps recover the quality. Here: importance of the
shipped 6-block model (sana_jax/assets/shapes_model) calibrated on --calib held-out
ShapesEval scenes (seed 1; their captions, and their rendered images as the clean latents,
5 timesteps); for each depth of --depths the kept blocks by importance, the first k, and a
random k (seed 0); each fine-tuned with the recipe (configs/shapes.py: CAME-8bit, lr 3e-4;
batch --batch, warm-up --warmup) on the recipe's training scenes, scored on the ShapesEval
evaluation prompts (--per_category of each of the six categories; 50 = all 300) before
fine-tuning and after each count of --finetune steps. Identical block sets (e.g. first-k =
importance) are trained and scored once. Writes results.json, table.md and claim_pruning.png.

Default size (9 block sets x 500 fine-tune steps of batch 16, scored 3 times on 300
prompts): measured at 45 minutes on this 2-core CPU while other jobs kept the load at 3-6
(3158 s of process CPU, so ~26 minutes of an idle machine's two cores); see
docs/paper_claims.md. --quick is a seconds-long smoke run.
"""

from __future__ import annotations

import sys

import numpy as np

from sana_jax.experiments import common as C

OUTPUTS = ("results.json", "table.md", "claim_pruning.png")
METHODS = ("importance", "first", "random")


def build_parser():
  ap = C.parser("python -m sana_jax.experiments.pruning", __doc__)
  ap.add_argument(
    "--depths",
    type=C.int_list("--depths", 1, 5),
    default=[5, 4, 3],
    help="pruned depths, comma-separated, each 1..5 (default: 5,4,3)",
  )
  ap.add_argument(
    "--finetune",
    type=C.int_list("--finetune", 1, 100000),
    default=[100, 500],
    help="fine-tune step counts to score at, comma-separated (default: 100,500)",
  )
  ap.add_argument(
    "--calib",
    type=C.positive("--calib"),
    default=64,
    help="calibration scenes (captions + rendered images) for the importance (default: 64)",
  )
  ap.add_argument(
    "--lr",
    type=C.positive_float("--lr"),
    default=None,
    help="fine-tune learning rate (default: the recipe's, 3e-4)",
  )
  C.add_shared_options(
    ap,
    num_train_help='training scenes for fine-tuning',
    batch=(16, "fine-tune batch (default: 16; the recipe's 64 would not fit the time)"),
    warmup=(
      10,
      "fine-tune warm-up steps (default: 10; the recipe's 200 would cover the 100 steps)",
    ),
  )
  return ap


def check(args):
  C.check_out(args.out, OUTPUTS, args.overwrite)
  C.check_per_category(args)
  if args.quick:
    args.depths, args.finetune, args.per_category = [4], [2], 1
    args.calib, args.num_train, args.batch, args.sample_steps = 4, 64, 8, 2
  else:
    args.sample_steps = None


def importance(params, cfg, calib: dict) -> np.ndarray:
  import jax

  from sana_jax.scaling import pruning

  return pruning.block_importance(
    params,
    cfg,
    calib["caption"],
    calib["caption_mask"],
    latents=calib["latent"],
    key=jax.random.key(0),
  )


def block_sets(bi: np.ndarray, depth: int, seed: int = 0) -> dict:
  """{method: kept block indices (ascending)} for one pruned depth."""
  from sana_jax.scaling import pruning

  n = len(bi)
  rng = np.random.default_rng(seed + depth)
  return {
    "importance": pruning.select_blocks(bi, depth),
    "first": list(range(depth)),
    "random": sorted(int(i) for i in rng.choice(n, depth, replace=False)),
  }


def prune_and_finetune(params, cfg, kept, data, steps_list, batch, warmup, on_score, lr=None):
  """Prunes to `kept`, scores (on_score(steps, params, cfg) -> value) at 0 and after each of
  steps_list fine-tune steps (one run to the largest, scored on the way)."""
  from sana_jax.scaling import pruning

  p, c = pruning.keep_blocks(params, cfg, kept)
  import jax

  p = jax.device_get(p)
  scores = {0: on_score(0, p, c)}
  marks = set(steps_list)
  if not steps_list:
    return scores, []

  def cb(step, q):
    if step in marks:
      scores[step] = on_score(step, q, c)

  from math import gcd
  from functools import reduce

  every = reduce(gcd, steps_list)
  run = C.train(
    p,
    c,
    data,
    steps=max(steps_list),
    batch=batch,
    warmup=warmup,
    lr=lr,
    log_every=every,
    callback=cb,
    desc=f"fine-tune blocks {kept}",
  )
  return scores, run.losses


def work(args):
  import time

  t0 = time.perf_counter()
  cache = args.out / "cache"
  data = C.make_data(cache, args.num_train)
  calib = C.make_data(cache, args.calib, C.CALIBRATION_SEED)
  params, cfg = C.shipped_params()
  specs = C.prompts(False, args.per_category)
  bi = importance(params, cfg, calib)
  print("block importance:", ", ".join(f"{b:.4f}" for b in bi), flush=True)

  def on_score(step, p, c):
    rep = C.score(p, c, specs, args.sample_steps)
    return rep["overall"]

  base = on_score(0, params, cfg)
  print(f"unpruned 6 blocks: ShapesEval {base:.3f}", flush=True)
  rows, done = [], {}
  for depth in args.depths:
    for method, kept in block_sets(bi, depth).items():
      key = tuple(kept)
      if key not in done:
        done[key] = prune_and_finetune(
          params, cfg, kept, data, args.finetune, args.batch, args.warmup, on_score, args.lr
        )
      scores, losses = done[key]
      rows.append(dict(depth=depth, method=method, kept=kept, scores=scores, losses=losses))
      print(
        f"depth {depth} {method:10s} blocks {kept}: "
        + ", ".join(f"{s} steps {v:.3f}" for s, v in sorted(scores.items())),
        flush=True,
      )
  steps = [0] + sorted(args.finetune)
  header = ["depth", "method", "kept blocks"] + [f"after {s} steps" for s in steps]
  header += [f"% of unpruned after {s}" for s in steps[1:]]
  table_rows = [["6", "unpruned", "0-5", f"{base:.3f}"] + [""] * (2 * len(steps) - 2)]
  for r in rows:
    table_rows.append(
      [r["depth"], r["method"], ",".join(map(str, r["kept"]))]
      + [f"{r['scores'][s]:.3f}" for s in steps]
      + [f"{100 * r['scores'][s] / base:.0f}%" if base else "-" for s in steps[1:]]
    )
  table = C.markdown_table(header, table_rows)
  goal = goals(rows, base, 100 if 100 in args.finetune else min(args.finetune))
  text = (
    f"ShapesEval overall ({len(specs)} evaluation prompts, one image each; fine-tuned at batch "
    f"{args.batch}, lr {'the recipe' if args.lr is None else args.lr}, warm-up "
    f"{args.warmup}); block importance "
    + ", ".join(f"{b:.4f}" for b in bi)
    + f"\n\n{table}\n\n{goal}\n"
  )
  print("\n" + text)
  result = dict(
    importance=[float(b) for b in bi],
    unpruned=base,
    rows=[{**r, "scores": {str(k): v for k, v in r["scores"].items()}} for r in rows],
    prompts=len(specs),
    args={k: (str(v) if k == "out" else v) for k, v in vars(args).items()},
    seconds=time.perf_counter() - t0,
  )
  C.write_outputs(
    args.out,
    {
      "results.json": C.dump(result),
      "table.md": text,
      "claim_pruning.png": lambda p: plot(rows, base, bi, steps, p),
    },
  )
  print(f"wrote {', '.join(OUTPUTS)} to {args.out} ({time.perf_counter() - t0:.0f} s)")


def goals(rows, base, first) -> str:
  by = {(r["depth"], r["method"]): r["scores"] for r in rows}
  if (4, "importance") not in by:
    return "(goal not tested: depth 4 not run)"
  imp, fk = by[(4, "importance")][first], by[(4, "first")][first]
  ok = base > 0 and imp >= 0.9 * base
  return (
    f"Goal: 4 blocks by importance after {first} steps {imp:.3f} = "
    f"{100 * imp / base if base else float('nan'):.0f}% of unpruned ({'>=' if ok else '<'} 90%); "
    f"first-k {fk:.3f} ({'beaten' if imp > fk else 'not beaten'})."
  )


def plot(rows, base, bi, steps, path):
  plt = C.pyplot()
  fig, (a0, a1) = plt.subplots(
    1, 2, figsize=(9, 3.6), dpi=100, gridspec_kw=dict(width_ratios=[1, 2])
  )
  a0.bar(range(len(bi)), bi, color="tab:gray")
  a0.set_xlabel("block")
  a0.set_ylabel("importance 1 - cos")
  a0.set_title("block importance (shipped model)")
  colors = {"importance": "tab:blue", "first": "tab:orange", "random": "tab:green"}
  styles = {5: ":", 4: "-", 3: "--"}
  for r in rows:
    xs = sorted(r["scores"])
    a1.plot(
      [max(x, 1) for x in xs],
      [r["scores"][x] for x in xs],
      marker="o",
      color=colors[r["method"]],
      ls=styles.get(r["depth"], "-."),
      label=f"{r['depth']} blocks, {r['method']}",
    )
  a1.axhline(base, color="black", lw=1.5, label="unpruned (6 blocks)")
  a1.set_xscale("log")
  a1.set_xlabel("fine-tune steps (0 plotted at 1)")
  a1.set_ylabel("ShapesEval overall")
  a1.set_ylim(0, 1.02)
  a1.grid(alpha=0.3)
  a1.legend(fontsize=6, ncol=2)
  a1.set_title("pruned, then fine-tuned")
  fig.tight_layout()
  fig.savefig(path, format="png")
  plt.close(fig)


def main(argv=None) -> int:
  return C.run_main(check, work, argv, build_parser())


if __name__ == "__main__":
  sys.exit(main())
