"""CAME / CAME-8bit: optimizer-state bytes per parameter and update time.

  python benchmarks/bench_came.py                  # memory table + timing + tiny-DiT check
  python benchmarks/bench_came.py --skip_time --skip_dit

1. State bytes per parameter on the SANA-1.5 1.6B and 4.8B trees (shapes from
   sana_jax.models.dit.abstract_params; jax.eval_shape of opt.init, nothing allocated),
   for optax.adamw, optax.adafactor (optax defaults: no momentum), came, came_8bit and
   variants, next to the official CAME-8bit's 1.019 B/param; plus a breakdown.
2. Update time of came and came_8bit vs optax.adamw on the Sana 0.6B tree (allocated,
   jitted, params and state donated; the three alternate run by run, medians of --repeats
   runs of wall and process-CPU time; the CPU time is steadier on a loaded box; with our
   commands' malloc settings, sana_jax/commands/malloc_settings.py). On a small CPU box
   the full 0.6B tree with AdamW state (about 12 GB live) does not fit next to other work,
   so --depth (default 7 of 28 blocks, about 150M parameters) keeps the per-parameter mix
   of the real tree; the ratio is what is compared (goal <= 2x).
3. Tiny DiT: came vs came_8bit held-out loss after --dit_steps steps of distilling a random
   teacher DiT on fresh random inputs: came_8bit COMPACT (every m 8-bit), with fp32
   metadata, and the defaults (the official choices) with min_8bit_size lowered to 1024
   (blocks of 256) so that its tiny matrices are quantised at all.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
if __name__ == "__main__":
  # The update timed as our commands run it (sana_jax/commands/malloc_settings.py: large
  # blocks kept in the heap, huge pages, inline runs); SANA_JAX_KEEP_MALLOC=1 keeps the
  # defaults.
  from sana_jax.commands import malloc_settings

  malloc_settings.restart(None)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import sana_jax.optim as O  # noqa: E402
from sana_jax.models import dit  # noqa: E402

OFFICIAL_8BIT = 1.019  # REFERENCE.md section 6, measured on the SANA-1.5 shapes


def _model_config(mod):
  return mod.get_config().model


def _nbytes(tree) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _optimizers():
  spec = O.sana_spec()
  compact = O.COMPACT
  return {
    "optax.adamw": optax.adamw(1e-4),
    "optax.adafactor": optax.adafactor(1e-4),
    "came": O.came(1e-4, spec=spec),
    "came_8bit COMPACT": O.came_8bit(1e-4, spec=spec, **compact),
    "came_8bit COMPACT, fp32 metadata": O.came_8bit(
      1e-4, spec=spec, **{**compact, "meta_dtype": jnp.float32}
    ),
    "came_8bit COMPACT, block 4096": O.came_8bit(1e-4, spec=spec, block_size=4096, **compact),
    "came_8bit COMPACT, small leaves fp32 (> 16384)": O.came_8bit(
      1e-4, spec=spec, **{**compact, "min_8bit_size": 16384}
    ),
    "came_8bit defaults (the official choices)": O.came_8bit(1e-4, spec=spec),
    "came_8bit defaults, block 16384": O.came_8bit(1e-4, spec=spec, block_size=16384),
  }


def _breakdown(state, n):
  came_state = state[0]
  is_q = lambda x: isinstance(x, O.quant8.QuantizedArray)
  mu = jax.tree.leaves(came_state.mu, is_leaf=is_q)
  is_nu = lambda x: isinstance(x, (O.FactoredMoments, O.FullMoment))
  nu = jax.tree.leaves(came_state.nu, is_leaf=is_nu)
  parts = {
    "uint8 m": sum(x.q.size for x in mu if is_q(x)),
    "block min/scale": sum(_nbytes((x.minimum, x.scale)) for x in mu if is_q(x)),
    "fp32 m (small/unfactored)": sum(4 * x.size for x in mu if not is_q(x)),
    "fp32 row/col stats": sum(_nbytes(x) for x in nu if isinstance(x, O.FactoredMoments)),
    "fp32 v (unfactored)": sum(_nbytes(x) for x in nu if isinstance(x, O.FullMoment)),
  }
  return {k: v / n for k, v in parts.items()}


def memory_table():
  from sana_jax.configs import sana15_1600m, sana15_4800m

  trees = {"SANA-1.5 1.6B": sana15_1600m, "SANA-1.5 4.8B": sana15_4800m}
  opts = _optimizers()
  rows, breakdowns = {}, {}
  for tname, mod in trees.items():
    abstract = dit.abstract_params(_model_config(mod))
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))
    for oname, opt in opts.items():
      state = jax.eval_shape(opt.init, abstract)
      rows.setdefault(oname, {})[tname] = _nbytes(state) / n
      if oname == "came_8bit COMPACT":
        breakdowns[tname] = _breakdown(state, n)
    rows.setdefault("official CAME-8bit (REFERENCE.md)", {})[tname] = OFFICIAL_8BIT
    print(f"{tname}: {n / 1e6:.1f}M parameters")
  names = list(trees)
  print("\nOptimizer state, bytes per parameter (jax.eval_shape, nothing allocated)")
  print(f"{'optimizer':<48}" + "".join(f"{t:>16}" for t in names))
  for oname, r in rows.items():
    print(f"{oname:<48}" + "".join(f"{r[t]:>16.4f}" for t in names))
  print("\ncame_8bit COMPACT breakdown, bytes per parameter")
  for part in next(iter(breakdowns.values())):
    print(f"  {part:<36}" + "".join(f"{breakdowns[t][part]:>16.4f}" for t in names))


def _params_0p6b(depth):
  from sana_jax.configs import sana_600m

  cfg = _model_config(sana_600m)
  full = dit.abstract_params(cfg)
  n_full = sum(math.prod(x.shape) for x in jax.tree.leaves(full))
  if depth:
    cfg.depth = depth
  abstract = dit.abstract_params(cfg)
  return abstract, n_full


def time_update(depth, repeats):
  """Median wall and process-CPU time of one jitted, donated update per optimizer, the
  optimizers alternating run by run (a shared box drifts; alternation spreads it)."""
  abstract, n_full = _params_0p6b(depth)
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))
  print(
    f"\nUpdate time on the Sana 0.6B tree ({n_full / 1e6:.1f}M params); timed on "
    f"{'depth %d: ' % depth if depth else ''}{n / 1e6:.1f}M params, fp32, "
    f"{jax.devices()[0].platform}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
    f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}"
  )
  key = jax.random.key(0)
  keys = jax.random.split(key, len(jax.tree.leaves(abstract)))
  grads = jax.tree.map(
    lambda s, k: jax.random.normal(k, s.shape, s.dtype),
    abstract,
    jax.tree.unflatten(jax.tree.structure(abstract), list(keys)),
  )
  runs = {}
  for name, opt in [
    ("optax.adamw", optax.adamw(1e-4)),
    ("came", O.came(1e-4, spec=O.sana_spec())),
    ("came_8bit", O.came_8bit(1e-4, spec=O.sana_spec())),
  ]:
    params = jax.tree.map(lambda s: jnp.full(s.shape, 0.01, s.dtype), abstract)
    state = jax.jit(opt.init)(params)

    def step(params, state, grads, opt=opt):
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    fn = jax.jit(step, donate_argnums=(0, 1))
    params, state = fn(params, state, grads)  # compile + warm up
    params, state = fn(params, state, grads)
    jax.block_until_ready(params)
    runs[name] = [fn, params, state, [], []]
  for _ in range(repeats):
    for name, r in runs.items():
      fn, params, state = r[:3]
      t0, c0 = time.perf_counter(), time.process_time()
      params, state = fn(params, state, grads)
      jax.block_until_ready((params, state))
      r[3].append(time.perf_counter() - t0)
      r[4].append(time.process_time() - c0)
      r[1], r[2] = params, state
  wall = {k: statistics.median(r[3]) for k, r in runs.items()}
  cpu = {k: statistics.median(r[4]) for k, r in runs.items()}
  print(
    f"  {'optimizer':<14}{'wall ms':>10}{'x adamw':>9}{'cpu ms':>10}{'x adamw':>9}  runs (wall ms)"
  )
  for k, r in runs.items():
    print(
      f"  {k:<14}{wall[k] * 1e3:>10.1f}{wall[k] / wall['optax.adamw']:>9.2f}"
      f"{cpu[k] * 1e3:>10.1f}{cpu[k] / cpu['optax.adamw']:>9.2f}  "
      + ", ".join(f"{t * 1e3:.0f}" for t in r[3])
    )


# The CAME-8bit settings of the tiny-DiT comparison (the first is COMPACT, what
# train.came_8bit_state="compact" runs; under the official choices the tiny model has no
# 8-bit leaf, so the third lowers the threshold to 1024 to have some).
DIT_VARIANTS = {
  "came_8bit COMPACT (m of leaves > 1024 per layer 8-bit, bf16 metadata)": dict(O.COMPACT),
  "came_8bit COMPACT, fp32 metadata": {**O.COMPACT, "meta_dtype": jnp.float32},
  "came_8bit defaults (official) with matrices > 1024 8-bit, block 256": dict(
    min_8bit_size=1024,
    block_size=256,
    quantize_unfactored=False,
    meta_dtype=jnp.float32,
  ),
}


def tiny_dit(steps, seed=0, variants=None):
  """Distil a randomly initialised teacher DiT into a student (same tiny config, other
  seed) on fresh random inputs every step; report the loss on a held-out batch. `seed`
  shifts the student's and teacher's init and every batch's key (0: the keys of the
  figures in docs/came.md). Returns {variant name: gap to came}."""
  from sana_jax.configs import tiny

  cfg = _model_config(tiny)
  model = dit.SanaDiT(dit.DiTConfig.coerce(cfg))
  params = dit.init_params(cfg, jax.random.key(0 + 7919 * seed))
  teacher = dit.init_params(cfg, jax.random.key(1 + 7919 * seed))
  s = cfg.sample_size

  def batch(key, b):
    k = jax.random.split(key, 3)
    x = jax.random.normal(k[0], (b, s, s, cfg.in_channels))
    t = jax.random.uniform(k[1], (b,), minval=0.0, maxval=1000.0)
    cap = jax.random.normal(k[2], (b, cfg.caption_len, cfg.caption_channels))
    mask = jnp.ones((b, cfg.caption_len), jnp.int32)
    tgt = model.apply({"params": teacher}, x, t, cap, mask)
    return x, t, cap, mask, tgt

  def loss(params, data):
    x, t, cap, mask, tgt = data
    return jnp.mean((model.apply({"params": params}, x, t, cap, mask) - tgt) ** 2)

  held_out = batch(jax.random.key(123 + 7919 * seed), 64)

  def run(opt):
    st = opt.init(params)

    @jax.jit
    def step(pp, st, key):
      g = jax.grad(loss)(pp, batch(key, 16))
      u, st = opt.update(g, st, pp)
      return optax.apply_updates(pp, u), st

    pp = params
    for i in range(steps):
      pp, st = step(pp, st, jax.random.key(1000 + i + 7919 * seed))
    return float(loss(pp, held_out)), st

  lr = optax.cosine_decay_schedule(1e-3, steps)
  spec = O.sana_spec()
  init_loss = float(loss(params, held_out))
  f32, _ = run(O.came(lr, spec=spec))
  is_q = lambda v: isinstance(v, O.quant8.QuantizedArray)
  print(
    f"\nTiny DiT distillation ({sum(x.size for x in jax.tree.leaves(params)) / 1e3:.0f}K "
    f"params), seed {seed}, {steps} steps, held-out loss {init_loss:.4f} at init, came "
    f"{f32:.5f}"
  )
  gaps = {}
  for name, kw in DIT_VARIANTS.items():
    if variants is not None and name not in variants:
      continue
    f8, st = run(O.came_8bit(lr, spec=spec, **kw))
    nq = sum(is_q(v) for v in jax.tree.leaves(st[0].mu, is_leaf=is_q))
    n = len(jax.tree.leaves(params))
    gaps[name] = (f8 - f32) / f32
    print(f"  {name}: {f8:.5f} ({gaps[name]:+.2%}), {nq} of {n} leaves with 8-bit m")
  return gaps


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument(
    "--depth", type=int, default=7, help="blocks of the 0.6B tree to time (0 = all 28)"
  )
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--dit_steps", type=int, default=300)
  ap.add_argument(
    "--dit_seeds",
    type=int,
    default=1,
    help="tiny-DiT runs with seeds 0..N-1, COMPACT only when N > 1, then the mean gap "
    "(default 1: seed 0, every variant)",
  )
  ap.add_argument("--skip_time", action="store_true")
  ap.add_argument("--skip_dit", action="store_true")
  ap.add_argument("--skip_memory", action="store_true")
  args = ap.parse_args()
  bad = [
    f"--{k} {getattr(args, k)} < {low}"
    for k, low in (("depth", 0), ("repeats", 1), ("dit_steps", 1), ("dit_seeds", 1))
    if getattr(args, k) < low
  ]
  if bad:
    ap.error("; ".join(bad))
  if not args.skip_memory:
    memory_table()
  if not args.skip_time:
    time_update(args.depth, args.repeats)
  if not args.skip_dit and args.dit_seeds == 1:
    tiny_dit(args.dit_steps)
  elif not args.skip_dit:
    name = next(iter(DIT_VARIANTS))
    gaps = [tiny_dit(args.dit_steps, s, [name])[name] for s in range(args.dit_seeds)]
    print(
      f"\n{name} against came over {len(gaps)} seeds: gaps "
      + ", ".join(f"{g:+.2%}" for g in gaps)
      + f"; mean {np.mean(gaps):+.2%}, spread (std) {np.std(gaps, ddof=1):.2%}"
    )


if __name__ == "__main__":
  main()
