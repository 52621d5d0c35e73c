"""Where our train step's time goes: op time by phase and kind, from a profile (issue 21).

Runs the project's jitted train step (`bench_train_step.Ours`: the flow-matching loss, the
gradient, norm, guard, optimizer and EMA; fp32, one device, state donated) on random
weights under `jax.profiler`, reads the trace's per-op durations, finds each op's HLO
instruction in the compiled program, and sums the durations by

  phase: forward (the differentiated forward, `jvp(...)` in the op's metadata), backward
         (`transpose(...)`), update (everything else: noise and timesteps, the loss, norm,
         optimizer, EMA);
  kind:  products (dot_general), depthwise conv (the `depthwise_conv3x3` named scope),
         self-attention, cross-attention, copies (layout changes, slices of stacked
         weights, scan residual writes: copy / dynamic-slice / dynamic-update-slice ops),
         zero fills (broadcasts of a constant: scan accumulators), other (elementwise and
         reductions).

Op time is summed over the trace's op events. XLA:CPU splits large ops over its threads
and each share is an event, so the total can exceed the step's wall time: compare rows with
each other, and the step's wall time with the other side's (bench_train_step.py).

  python benchmarks/profile_train_step.py                          # the embedded model
  python benchmarks/profile_train_step.py --geometry 0.6b --top 25 # Sana 0.6B width
  python benchmarks/profile_train_step.py --variant scan           # another variant
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
if __name__ == "__main__":
  # The malloc settings our commands and bench_train_step.py run with
  # (sana_jax/commands/malloc_settings.py; SANA_JAX_KEEP_MALLOC=1 keeps the defaults).
  from sana_jax.commands import malloc_settings

  malloc_settings.restart(None)

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train_step as bts  # noqa: E402

from sana_jax.models import dit  # noqa: E402

PHASES = ("forward", "backward", "update")
KINDS = (
  "products",
  "depthwise conv",
  "self-attention",
  "cross-attention",
  "copies",
  "zero fills",
  "other",
)
# name = shape opcode(...): the shape may be a tuple, "(s32[], f32[2,3]{1,0})".
_INSTRUCTION = re.compile(
  r"^\s*(?:ROOT )?%([\w.\-]+) = (\([^\n]*?\)|\S+) ([\w\-]+)\(([^\n]*)", re.M
)
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Control flow: its event spans the ops of its body, which are events of their own.
_CONTAINERS = ("while", "conditional", "call")


def instructions(hlo_text: str) -> dict[str, tuple[str, str, str]]:
  """{instruction name: (shape, opcode, op_name or "")} of a compiled module's text."""
  out = {}
  for name, shape, opcode, rest in _INSTRUCTION.findall(hlo_text):
    op = _OP_NAME.search(rest)
    out[name] = (shape.split("{")[0], opcode, op.group(1) if op else "")
  return out


def phase_of(op_name: str) -> str:
  if "transpose(" in op_name:
    return "backward"
  if "jvp(" in op_name:
    return "forward"
  return "update"


def kind_of(name: str, opcode: str, op_name: str) -> str:
  """name: the instruction's name (XLA names fusions after their ops, e.g.
  `copy_bitcast_fusion`); opcode: `fusion`, `copy`, ...; op_name: its metadata."""
  if "dot_general" in op_name:
    return "products"
  if "depthwise_conv3x3" in op_name:
    return "depthwise conv"
  if "self_attn" in op_name:
    return "self-attention"
  if "cross_attn" in op_name:
    return "cross-attention"
  head = name.split(".")[0]
  if head.startswith(
    ("copy", "transpose_copy", "dynamic-slice", "dynamic-update-slice", "bitcast_dynamic")
  ) or (opcode in ("copy", "dynamic-slice", "dynamic-update-slice")):
    return "copies"
  if head.startswith("wrapped_broadcast") or opcode == "broadcast":
    return "zero fills"
  return "other"


def op_times(trace_dir: str, hlo_text: str, steps: int) -> list[dict]:
  """Per instruction of the program: {name, shape, phase, kind, op_name, ms (per step),
  count (events per step)}, from the first trace under trace_dir, largest first. Events that
  are no instruction of `hlo_text` (the runtime's spans) and control-flow ops (whose events
  span their bodies' ops) are left out."""
  files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
  events = json.load(gzip.open(files[0]))
  events = events["traceEvents"] if isinstance(events, dict) else events
  info = instructions(hlo_text)
  total, count = collections.Counter(), collections.Counter()
  for e in events:  # the program's ops; not the runtime's own spans or control flow
    op = info.get(e.get("name"))
    if e.get("ph") == "X" and "dur" in e and op and op[1] not in _CONTAINERS:
      total[e["name"]] += e["dur"]
      count[e["name"]] += 1
  rows = []
  for name, us in total.items():
    shape, opcode, op = info[name]
    rows.append(
      dict(
        name=name,
        shape=shape,
        phase=phase_of(op),
        kind=kind_of(name, opcode, op),
        op_name=op,
        ms=us / 1e3 / steps,
        count=count[name] / steps,
      )
    )
  return sorted(rows, key=lambda r: -r["ms"])


def table(rows: list[dict]) -> dict[tuple[str, str], float]:
  """{(phase, kind): ms per step}, every phase x kind present (0 where none)."""
  out = {(p, k): 0.0 for p in PHASES for k in KINDS}
  for r in rows:
    out[(r["phase"], r["kind"])] += r["ms"]
  return out


def profile(geometry: str, optimizer: str, variant: str, steps: int, depth=None) -> dict:
  """Compile our step at `geometry` on random weights, run it twice, profile `steps` more.
  Returns {"wall_ms" (median of the profiled steps), "rows" (op_times), "compile_s",
  "geometry" (its description)}."""
  geo = bts.GEOMETRIES[geometry]
  config, cfg = bts.build_config(geo, optimizer, depth)
  params = dit.init_params(cfg, jax.random.key(0))
  batch = bts.make_batch(geo, cfg)
  null = np.zeros((geo.caption_len, cfg.caption_channels), np.float32)
  ours = bts.Ours(config, cfg, params, batch, null, variant)
  # Compiled afresh: JAX's persistent cache keys ignore metadata, so a cached executable
  # would carry the op names of the code it was first compiled from.
  cached = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    hlo = ours.compile().as_text()
  finally:
    jax.config.update("jax_enable_compilation_cache", cached)
  ours.run_step()
  ours.run_step()
  walls = []
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(steps):
        t0 = time.perf_counter()
        ours.run_step()
        walls.append(time.perf_counter() - t0)
    rows = op_times(trace_dir, hlo, steps)
  return dict(
    wall_ms=bts.median_ms(walls), rows=rows, compile_s=ours.compile_s, geometry=geo.describe(cfg)
  )


def print_report(result: dict, top: int) -> None:
  cells = table(result["rows"])
  total = sum(cells.values())
  print(f"\nstep wall time {result['wall_ms']:.0f} ms (median); op time {total:.0f} ms per step")
  print("\n| kind | " + " | ".join(f"{p} ms" for p in PHASES) + " | all ms | share |")
  print("|---|" + "---|" * (len(PHASES) + 2))
  for k in KINDS:
    row = [cells[(p, k)] for p in PHASES]
    print(
      f"| {k} | " + " | ".join(f"{v:.1f}" for v in row) + f" | {sum(row):.1f} | "
      f"{sum(row) / total:.0%} |"
    )
  sums = [sum(cells[(p, k)] for k in KINDS) for p in PHASES]
  print("| **all** | " + " | ".join(f"{v:.1f}" for v in sums) + f" | {total:.1f} | 100% |")
  print(f"\nthe {top} largest ops, repeats across blocks summed (ms per step, events per step)")
  for r in grouped(result["rows"])[:top]:
    op = re.sub(r"^jit\([^)]*\)/", "", r["op_name"])[-70:]
    print(
      f"{r['ms']:8.1f} {r['count']:5.0f}x {r['shape'][:26]:26s} {r['phase']:>8s} / "
      f"{r['kind']:<15s} {op}"
    )


def grouped(rows: list[dict]) -> list[dict]:
  """op_times rows summed over instructions with the same phase, kind, shape and op_name
  (one op of every unrolled block; a scanned block's op is one instruction already)."""
  out = {}
  for r in rows:
    key = (r["phase"], r["kind"], r["shape"], r["op_name"])
    g = out.setdefault(key, dict(r, ms=0.0, count=0.0))
    g["ms"] += r["ms"]
    g["count"] += r["count"]
  return sorted(out.values(), key=lambda r: -r["ms"])


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--geometry", default="shapes", help=f"one of {sorted(bts.GEOMETRIES)}")
  ap.add_argument("--optimizer", default="adamw", help=f"one of {bts.OPTIMIZERS}")
  ap.add_argument("--variant", default="project", help=f"one of {sorted(bts.VARIANTS)}")
  ap.add_argument("--steps", type=int, default=3, help="profiled steps (default 3)")
  ap.add_argument("--depth", type=int, default=None, help="blocks (the geometry's by default)")
  ap.add_argument("--top", type=int, default=15, help="largest ops listed (default 15)")
  args = ap.parse_args(argv)
  if args.geometry not in bts.GEOMETRIES:
    ap.error(f"unknown --geometry {args.geometry!r}")
  if args.optimizer not in bts.OPTIMIZERS:
    ap.error(f"unknown --optimizer {args.optimizer!r}")
  if args.variant not in bts.VARIANTS:
    ap.error(f"unknown --variant {args.variant!r}")
  if args.steps < 1 or args.top < 0:
    ap.error("--steps must be >= 1 and --top >= 0")
  print(
    f"jax {jax.__version__} ({jax.devices()[0].platform}, {os.cpu_count()} cores); "
    f"{args.geometry}, {args.optimizer}, variant {args.variant}; load {bts.load()}",
    flush=True,
  )
  result = profile(args.geometry, args.optimizer, args.variant, args.steps, args.depth)
  print(f"{result['geometry']}; compile {result['compile_s']:.1f} s")
  print_report(result, args.top)
  return result


if __name__ == "__main__":
  main()
