"""Grow the tiny model, train it, prune it back by block importance, fine-tune (issue 8.6).

  python benchmarks/scaling_grow_prune.py [--workdir /tmp/scaling_run] [--depth 6] [--keep 2]
      [--steps 200] [--finetune 100] [--chart docs/images/block_importance.png]

On the tiny overfit set (8 fixed latents/captions, as in tests/test_train.py):
  1. train `configs/tiny.py` (depth 3) for --steps steps -> the source;
  2. grow it to --depth blocks with each strategy (partial preservation keeping --keep
     source blocks; cyclic and block replication with the zero gate) and train --steps more
     steps from there (train.py's train.init_from);
  3. compute block importance of the grown "constant" model with the prune CLI (the set's
     captions and latents as calibration data), prune back to 3 blocks, fine-tune --finetune
     steps.
Prints a table of the fixed-draw loss (the whole set at 16 fixed noise/timestep draws, the
same measure as tests/test_train.py) at each stage, and the first/last logged training
losses of each run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/sana_jax_bench_jit_cache")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sana_jax.configs import tiny  # noqa: E402
from sana_jax.data import latents_tfds  # noqa: E402
from sana_jax.diffusion import flow  # noqa: E402
from sana_jax.models import dit  # noqa: E402
from sana_jax.models.dit_config import DiTConfig  # noqa: E402
from sana_jax.scaling import growth, prune_cli, pruning  # noqa: E402
from sana_jax.train import checkpoint, loop  # noqa: E402
from sana_jax.weights import dit as W  # noqa: E402


def write_dataset(
  root: pathlib.Path, n=8, hw=(4, 6), channels=4, caption_len=12, caption_channels=20, seed=0
) -> str:
  rng = np.random.default_rng(seed)
  latents = rng.standard_normal((n, *hw, channels)).astype(np.float32)
  captions = rng.standard_normal((n, caption_len, caption_channels)).astype(np.float32)
  lengths = rng.integers(3, caption_len + 1, n)
  masks = (np.arange(caption_len)[None] < lengths[:, None]).astype(np.int8)

  def examples():
    for i in range(n):
      yield {
        "latent": latents[i],
        "caption": captions[i],
        "caption_mask": masks[i],
        "text": f"example {i}",
      }

  return latents_tfds.write_dataset(
    examples,
    str(root),
    "tiny",
    buckets=[hw],
    channels=channels,
    caption_len=caption_len,
    caption_channels=caption_channels,
    null_caption=rng.standard_normal((caption_len, caption_channels)).astype(np.float32),
    null_mask=np.ones(caption_len, np.int32),
  )


def load_set(data_dir: str) -> dict:
  src = latents_tfds.open_dataset(data_dir)["train_4x6"]
  return {
    k: np.stack([np.asarray(src[i][k]) for i in range(len(src))])
    for k in ("latent", "caption", "caption_mask")
  }


def fixed_loss(cfg: DiTConfig, params, batch, flow_shift: float, draws: int = 16) -> float:
  model = dit.SanaDiT(cfg)

  @jax.jit
  def loss(params, key):
    k1, k2 = jax.random.split(key)
    x0 = jnp.asarray(batch["latent"])
    noise = jax.random.normal(k1, x0.shape)
    ti = flow.training_inputs(x0, noise, jax.random.normal(k2, (x0.shape[0],)), flow_shift)
    pred = model.apply(
      {"params": params}, ti.x_t, ti.model_time, batch["caption"], batch["caption_mask"]
    )
    return flow.flow_loss(pred, x0, noise)

  return float(np.mean([loss(params, jax.random.key(100 + i)) for i in range(draws)]))


def train_run(data_dir, workdir: pathlib.Path, depth: int, steps: int, init_from: str = ""):
  """Trains tiny at `depth`; returns (params, [(step, loss), ...] logged)."""
  config = tiny.get_config()
  config.data.dir = data_dir
  config.model.depth = depth
  config.mesh.update(num_devices=1, data=1)
  config.train.update(
    steps=steps,
    checkpoint_every=steps,
    ema_decay=0.0,
    log_every=10,
    init_from=init_from,
    async_checkpoints=False,
  )
  loop.train(config, str(workdir), progress=False)
  params, _ = checkpoint.restore_params(workdir, ema=False)
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return jax.device_get(params), [(r["step"], r["loss"]) for r in logged]


def prune_and_finetune(args, work, data_dir, batch, base, grown_ckpt, row, curves) -> dict:
  """Block importance (CLI) of the trained grown model, prune to base.depth, fine-tune."""
  np.savez(work / "calib.npz", caption=batch["caption"], mask=batch["caption_mask"])
  np.savez(work / "latents.npz", latents=batch["latent"])
  pruned_ckpt = work / "pruned"
  chart = args.chart or str(work / "block_importance.png")
  # --overwrite: this script made pruned_ckpt and the chart (or was told to write it there).
  rc = prune_cli.main(
    [
      "--checkpoint",
      str(grown_ckpt),
      "--captions",
      str(work / "calib.npz"),
      "--latents",
      str(work / "latents.npz"),
      "--draws",
      "4",
      "--depth",
      str(base.depth),
      "--out",
      str(pruned_ckpt),
      "--chart",
      chart,
      "--overwrite",
    ]
  )
  if rc:
    raise SystemExit(f"prune_cli exited {rc}")
  report = json.loads((pruned_ckpt / "block_importance.json").read_text())
  pruned, pcfg, _ = W.load_flax(pruned_ckpt)
  row(f"pruned to blocks {report['kept']} (most important)", pcfg, pruned)
  grown, gcfg, _ = W.load_flax(grown_ckpt)
  least = sorted(np.argsort(report["importance"], kind="stable")[: base.depth].tolist())
  for name, idx in (("least important", least), ("first", list(range(base.depth)))):
    if idx != report["kept"]:
      p, c = pruning.keep_blocks(grown, gcfg, idx)
      row(f"  (baseline: blocks {idx}, {name})", c, jax.device_get(p))
  tuned, curves["pruned finetune"] = train_run(
    data_dir, work / "finetune", pcfg.depth, args.finetune, str(pruned_ckpt)
  )
  row(f"pruned + {args.finetune} fine-tune steps", pcfg, tuned)
  return report


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--workdir", default="/tmp/sana_jax_scaling_run")
  ap.add_argument("--depth", type=int, default=6)
  ap.add_argument("--keep", type=int, default=2)
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--finetune", type=int, default=100)
  ap.add_argument("--strategies", default="constant,cyclic,block_expand")
  ap.add_argument("--chart", default=None)
  args = ap.parse_args(argv)
  work = pathlib.Path(args.workdir)
  if work.exists() and any(work.iterdir()):
    raise SystemExit(f"{work} is not empty; pass a fresh --workdir")
  work.mkdir(parents=True, exist_ok=True)
  data_dir = write_dataset(work / "data")
  batch = load_set(data_dir)
  base = DiTConfig.coerce(tiny.get_config().model)
  shift = tiny.get_config().flow_shift
  rows, curves = [], {}

  def row(name, cfg, params):
    loss = fixed_loss(cfg, params, batch, shift)
    rows.append((name, cfg.depth, loss))
    print(f"{name:<48s} depth {cfg.depth:2d}  fixed-draw loss {loss:.4f}", flush=True)

  init = jax.device_get(dit.init_params(base, jax.random.key(0)))
  row("tiny at init", base, init)
  src, curves["source"] = train_run(data_dir, work / "source", base.depth, args.steps)
  row(f"source: tiny trained {args.steps} steps", base, src)

  grown_ckpt = None
  for strategy in args.strategies.split(","):
    kw = (
      dict(keep=args.keep, key=jax.random.key(1))
      if strategy == "constant"
      else dict(zero_gate=True)
    )
    grown, gcfg = growth.grow(src, base, args.depth, strategy, **kw)
    grown = jax.device_get(grown)
    tag = f"{strategy} (keep {args.keep})" if strategy == "constant" else f"{strategy} + zero gate"
    row(f"grown {tag}", gcfg, grown)
    ckpt = work / f"grown_{strategy}"
    W.save_flax(ckpt, grown, gcfg)
    trained, curves[f"grown {strategy}"] = train_run(
      data_dir, work / f"train_{strategy}", gcfg.depth, args.steps, str(ckpt)
    )
    row(f"grown {tag} + {args.steps} steps", gcfg, trained)
    if strategy == "constant":
      grown_ckpt = work / "grown_trained"
      W.save_flax(grown_ckpt, trained, gcfg)
  if grown_ckpt is not None:
    cut = dict(src, blocks=jax.tree_util.tree_map(lambda a: a[: args.keep], src["blocks"]))
    row(f"(source cut to its first {args.keep} blocks)", base.replace(depth=args.keep), cut)
    report = prune_and_finetune(args, work, data_dir, batch, base, grown_ckpt, row, curves)

  print("\n| stage | depth | fixed-draw loss |\n|---|---|---|")
  for name, depth, loss in rows:
    print(f"| {name} | {depth} | {loss:.4f} |")
  print("\n| run | first logged loss (step) | last logged loss (step) | finite |")
  print("|---|---|---|---|")
  for name, c in curves.items():
    finite = all(np.isfinite(v) for _, v in c)
    print(f"| {name} | {c[0][1]:.4f} ({c[0][0]}) | {c[-1][1]:.4f} ({c[-1][0]}) | {finite} |")
  if grown_ckpt is not None:
    print("\nimportance:", ", ".join(f"{v:.4f}" for v in report["importance"]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
