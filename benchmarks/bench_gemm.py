"""The matrix products' floor: how much of a step is XLA:CPU's products, against torch's
kernels on the same products and against torch's whole step (issues 20 and 21).

Every `dot_general` of our compiled computation is read from its jaxpr (scan bodies counted
`length` times), each distinct product is timed alone, jitted (XLA:CPU's kernel), and as
the same product by torch (its kernel), both in the product's canonical form (B, M, K) x
(B, K, N) on contiguous operands, alternating, and the sums are printed next to
the whole step of both frameworks, timed in the same run:

  products alone, ours / torch kernels   the kernels' ratio, flop-weighted by our products
  floor = our products / torch's step    our step's ratio to torch's if everything but the
                                         products took no time at all

  python benchmarks/bench_gemm.py --case sample_0.6b   # one denoiser step (batch 2, 512 px)
  python benchmarks/bench_gemm.py --case train_shapes  # the embedded model's train step
  python benchmarks/bench_gemm.py --case train_0.6b    # 0.6B width, depth 8 (bench_train_step)
  python benchmarks/bench_gemm.py --case train_tiny --runs 1   # seconds (tests/test_bench_gemm.py)

sample_0.6b: our step is the pipeline's DiT call (per-block weights, cached caption K/V,
[null, cond] batch 2); torch's is diffusers' SanaTransformer2DModel forward at batch 2, as
its SanaPipeline calls it. train_*: the two steps of `bench_train_step.py` (AdamW, fp32,
one device; ours the project's `jit_train_step`).
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":
  # The malloc settings our commands and bench_train_step.py run with
  # (sana_jax/commands/malloc_settings.py; SANA_JAX_KEEP_MALLOC=1 keeps the defaults).
  from sana_jax.commands import malloc_settings

  malloc_settings.restart(None)

import jax  # noqa: E402
import jax.extend.core  # noqa: E402
import numpy as np  # noqa: E402

import bench_train_step  # noqa: E402

CASES = ("sample_0.6b", "train_shapes", "train_0.6b", "train_tiny")  # tiny: seconds (the test)


# ----------------------------------------------------------------------------- products


def sub_jaxprs(params: dict):
  """Every jaxpr among an equation's params (closed ones opened), e.g. a scan's body."""
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def count_products(jaxpr, counts=None, times: int = 1) -> collections.Counter:
  """Counter of (lhs shape, rhs shape, dimension_numbers, dtype) -> executions per call,
  over `jaxpr` and every jaxpr inside it (a scan's body `length` times). Refuses a while
  loop or a cond around a product: their trip counts are not in the jaxpr."""
  counts = collections.Counter() if counts is None else counts
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      lhs, rhs = (v.aval for v in eqn.invars)
      key = (tuple(lhs.shape), tuple(rhs.shape), eqn.params["dimension_numbers"], str(lhs.dtype))
      counts[key] += times
      continue
    inner = list(sub_jaxprs(eqn.params))
    if not inner:
      continue
    if name in ("while", "cond"):
      sub = collections.Counter()
      for j in inner:
        count_products(j, sub)
      if sub:
        raise ValueError(f"a product inside a {name}: its count per call is unknown")
      continue
    for j in inner:
      count_products(j, counts, times * (eqn.params["length"] if name == "scan" else 1))
  return counts


def _timed(fn, target_s: float = 0.05) -> float:
  """Seconds per call: enough calls in a row to take ~target_s."""
  fn()
  t0 = time.perf_counter()
  fn()
  once = max(time.perf_counter() - t0, 1e-6)
  reps = max(1, int(target_s / once))
  t0 = time.perf_counter()
  for _ in range(reps):
    fn()
  return (time.perf_counter() - t0) / reps


def canonical_shape(lhs: tuple, rhs: tuple, dimension_numbers) -> tuple[int, int, int, int]:
  """(batch, rows, contraction, columns) of a dot_general: its operands as (B, M, K) and
  (B, K, N) once the batch, free and contracting axes are each merged."""
  (lc, rc), (lb, rb) = dimension_numbers
  batch = math.prod(lhs[i] for i in lb)
  k = math.prod(lhs[i] for i in lc)
  m = math.prod(lhs) // (batch * k)
  n = math.prod(rhs) // (batch * k)
  return batch, m, k, n


def time_products(counts: collections.Counter, runs: int) -> list[dict]:
  """Each distinct product in its canonical form (B, M, K) x (B, K, N) on contiguous
  operands: XLA:CPU (jitted matmul) and torch (torch.matmul), alternating; median seconds
  per call over `runs`. The canonical form measures the kernels at these sizes, not the
  layouts either framework would pick in context (an isolated dot_general over two
  contracting axes, say, gets copies XLA does not make inside the step)."""
  import torch

  rows = []
  rng = np.random.default_rng(0)
  by_shape = collections.Counter()
  for (lhs, rhs, dn, dtype), n in counts.items():
    by_shape[(canonical_shape(lhs, rhs, dn), dtype)] += n
  for ((b, m, k, n), dtype), count in by_shape.most_common():
    lhs, rhs = ((m, k), (k, n)) if b == 1 else ((b, m, k), (b, k, n))
    a = rng.standard_normal(lhs).astype(dtype)
    c = rng.standard_normal(rhs).astype(dtype)
    ja, jc = jax.device_put(a), jax.device_put(c)
    matmul = jax.jit(jax.numpy.matmul)
    ta, tc = torch.from_numpy(a), torch.from_numpy(c)
    ours = lambda: jax.block_until_ready(matmul(ja, jc))  # noqa: E731
    theirs = lambda: torch.matmul(ta, tc)  # noqa: E731
    want = theirs().numpy()
    err = np.max(np.abs(np.asarray(ours()) - want)) / np.max(np.abs(want))
    if not err < 1e-4:
      raise AssertionError(f"{lhs} x {rhs}: jax and torch disagree ({err:.1e})")
    t_ours, t_theirs = [], []
    for _ in range(runs):
      t_ours.append(_timed(ours))
      t_theirs.append(_timed(theirs))
    rows.append(
      dict(
        bmkn=(b, m, k, n),
        count=count,
        gflop=2.0 * b * m * k * n / 1e9,
        ours_s=statistics.median(t_ours),
        torch_s=statistics.median(t_theirs),
      )
    )
  return rows


# ----------------------------------------------------------------------------- the steps


def sample_case():
  """(jaxpr of our denoiser call, {"ours": step, "torch": step}) at 0.6B, 512 px, batch 2."""
  import torch

  import bench_dit
  from sana_jax.configs import sana_600m
  from sana_jax.models import dit
  from sana_jax.weights import dit as dit_weights
  from tests.dit_reference import diffusers_model

  cfg = bench_dit.model_config(sana_600m).diffusers_compatible()
  model = diffusers_model(cfg, relative_scale=0.2)
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  un = dit.unstack_blocks(dit_weights.diffusers_to_params(sd, cfg))
  del sd
  rng = np.random.default_rng(0)
  b, ly = 2, 300
  x = rng.standard_normal((b, 16, 16, cfg.in_channels)).astype(np.float32)
  y = rng.standard_normal((b, ly, cfg.caption_channels)).astype(np.float32)
  mask = np.ones((b, ly), np.int32)
  mask[:, 180:] = 0
  t = np.full((b,), 500.0, np.float32)
  kv = jax.jit(lambda u, y: dit.caption_kv_layers(cfg, u, y))(un, y)
  step = jax.jit(lambda u, x, t, y, m, kv: dit.apply_layers(cfg, u, x, t, y, m, kv))
  jaxpr = jax.make_jaxpr(step)(un, x, t, y, mask, kv).jaxpr
  args = (un, x, t, y, mask, kv)
  tx = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  tt, ty, tm = torch.from_numpy(t), torch.from_numpy(y), torch.from_numpy(mask.astype(np.float32))

  def theirs():
    with torch.inference_mode():
      return model(tx, ty, tt, encoder_attention_mask=tm, return_dict=False)[0]

  ref = theirs().numpy().transpose(0, 2, 3, 1)
  out = np.asarray(step(*args))
  print(f"velocity vs diffusers: max rel err {np.max(np.abs(out - ref)) / np.max(np.abs(ref)):.1e}")
  return jaxpr, {"ours": lambda: jax.block_until_ready(step(*args)), "torch": theirs}


def train_case(name: str):
  """(jaxpr of our train step, {"ours": step, "torch": step}), bench_train_step's geometry."""
  import flax.linen as nn

  from sana_jax import parallel
  from sana_jax.weights import dit as dit_weights
  from tests.dit_reference import diffusers_model

  geo = bench_train_step.GEOMETRIES[name]
  config, cfg = bench_train_step.build_config(geo, "adamw", None)
  model = diffusers_model(cfg, relative_scale=0.2)
  sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  params = jax.device_put(dit_weights.diffusers_to_params(sd, cfg), jax.devices()[0])
  batch = bench_train_step.make_batch(geo, cfg)
  null = np.zeros((geo.caption_len, cfg.caption_channels), np.float32)
  ours = bench_train_step.Ours(config, cfg, params, batch, null, "project")
  theirs = bench_train_step.Theirs(config, ours.cfg, model, batch, null)
  with jax.set_mesh(ours.mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
    jaxpr = jax.make_jaxpr(ours.step.jitted)(ours.state, ours.batch, ours.null).jaxpr
  ours.compile()
  return jaxpr, {"ours": ours.run_step, "torch": theirs.run_step}


# ----------------------------------------------------------------------------- report


def report(case: str, rows: list[dict], steps: dict) -> dict:
  ours = sum(r["count"] * r["ours_s"] for r in rows)
  theirs = sum(r["count"] * r["torch_s"] for r in rows)
  gflop = sum(r["count"] * r["gflop"] for r in rows)
  print(f"\n== {case}: the products of our step ({gflop:.1f} GFLOP), each timed alone")
  print("(each in its canonical form (B, M, K) x (B, K, N); n: how many per step)")
  print(f"| {'B, M, K, N':<22} | {'n':>3} | ours ms | torch ms | ratio | ours GF/s |")
  print(f"|{'-' * 24}|-----|---------|----------|-------|-----------|")
  for r in sorted(rows, key=lambda r: -r["count"] * r["ours_s"]):
    bmkn = ", ".join(str(d) for d in r["bmkn"])
    print(
      f"| {bmkn:<22} | {r['count']:>3} | {1e3 * r['ours_s']:7.2f} |"
      f" {1e3 * r['torch_s']:8.2f} | {r['ours_s'] / r['torch_s']:5.2f} |"
      f" {r['gflop'] / r['ours_s']:9.0f} |"
    )
  print(
    f"\n| per step | ms |\n|---|---|\n"
    f"| our products, XLA:CPU kernels | {1e3 * ours:.0f} |\n"
    f"| the same products, torch kernels | {1e3 * theirs:.0f} |\n"
    f"| our whole step | {1e3 * steps['ours']:.0f} |\n"
    f"| torch's whole step | {1e3 * steps['torch']:.0f} |\n"
  )
  summary = dict(
    kernels=ours / theirs,
    floor=ours / steps["torch"],
    step=steps["ours"] / steps["torch"],
    products_share=ours / steps["ours"],
  )
  print(
    f"kernels ours / torch {summary['kernels']:.2f}x; floor (our products / torch's step) "
    f"{summary['floor']:.2f}x; our step / torch's {summary['step']:.2f}x; the products are "
    f"{100 * summary['products_share']:.0f}% of our step; load {os.getloadavg()[0]:.1f}"
  )
  return summary


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--case", default="sample_0.6b", help=f"one of {', '.join(CASES)}")
  ap.add_argument("--runs", type=int, default=5, help="alternating runs per product and step")
  ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
  args = ap.parse_args(argv)
  if args.case not in CASES:
    ap.error(f"--case must be one of {', '.join(CASES)}, got {args.case!r}")
  if args.runs < 1:
    ap.error(f"--runs must be >= 1, got {args.runs}")
  import torch

  torch.set_num_threads(args.threads)
  jaxpr, steps = sample_case() if args.case == "sample_0.6b" else train_case(args.case[6:])
  counts = count_products(jaxpr)
  for fn in steps.values():  # warm up
    fn()
  step_s = bench_train_step.alternate_medians(steps, args.runs)
  rows = time_products(counts, args.runs)
  return report(args.case, rows, step_s)


if __name__ == "__main__":
  main()
