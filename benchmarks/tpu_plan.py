"""TPU pod plans without a TPU: the TPU compiler's memory and cost of the real train step.

COMPILER PLANS, NOT MEASURED STEP TIMES. libtpu (`pip install "jax[tpu]==<our jax>"`)
compiles ahead of time for a TPU topology on this CPU
(`jax.experimental.topologies.get_topology_desc`); nothing runs on a TPU. For each model,
topology, mesh and remat policy this prints, per chip:

  * the TPU compiler's `memory_analysis()` of `sana_jax.train.step.jit_train_step` (the
    program train.py runs: flow-matching loss, CFG dropout, gradient clipping, CAME-8bit,
    EMA, the non-finite skip; the state donated; bf16 compute over fp32 master weights),
    lowered on abstract inputs carrying NamedShardings on a mesh over the topology's chips:
    arguments, temporaries and total (arguments + outputs + temporaries + code - aliased)
    against the chip's HBM;
  * the largest per-chip batch the compiler fits (compile succeeds and total <= HBM),
    found by compiling at batch 1 and 2, extrapolating the temporaries linearly and checking
    the prediction and its neighbour by compiling them;
  * FLOPs per step per chip from `cost_analysis()` next to the analytic matmul count
    (`sana_jax.train.metrics.train_step_flops`). XLA counts a loop body once, and the 20 or
    60 blocks are one `nn.scan` (a while loop, forward and backward): the figure is
    corrected with two probes of the same width and batch, depth 1 and depth 2 with the scan
    unrolled, as cost(depth 1) + (depth - 1) * (cost(depth 2) - cost(depth 1)); bytes
    accessed likewise. "raw" is the uncorrected figure of the real program;
  * the roofline bound max(FLOPs / peak, bytes / HBM bandwidth) as a lower bound on step
    time (so an upper bound on throughput and MFU: model FLOPs = 3x forward, no recompute).
    Inter-chip communication is not in it.

and the same memory / FLOPs / roofline for the denoiser forward alone (bf16 parameters, the
sampling program's core) at --forward_batch per chip.

  python benchmarks/tpu_plan.py                                    # the full table (hours)
  python benchmarks/tpu_plan.py --models 4.8B --topologies v5e:4x4 --policies full
  python benchmarks/tpu_plan.py --models tiny --topologies v5e:2x2 --policies none --batches 2

Chip figures: /work/shared/REFERENCE.md section 11 (vendor bf16 dense peak, HBM, bandwidth).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for TPU, run nothing
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other jax processes may hold libtpu
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sana_jax import parallel  # noqa: E402
from sana_jax.models import dit  # noqa: E402
from sana_jax.models.dit_config import DiTConfig  # noqa: E402
from sana_jax.train import metrics  # noqa: E402
from sana_jax.train import optimizer as optim_lib  # noqa: E402
from sana_jax.train import state as state_lib  # noqa: E402
from sana_jax.train import step as step_lib  # noqa: E402

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_tflops: float  # bf16 dense
  hbm_gb: float
  hbm_tbps: float


CHIPS = {  # REFERENCE.md section 11
  "v5e": Chip("TPU v5e", 197.0, 16.0, 0.82),
  "v6e": Chip("TPU v6e", 918.0, 32.0, 1.64),
  "v5p": Chip("TPU v5p", 459.0, 95.0, 2.77),
  "v4": Chip("TPU v4", 275.0, 32.0, 1.2),
}

MODELS = {  # name: (config module, latent side)
  "tiny": ("tiny", 8),
  "1.6B": ("sana15_1600m", 32),
  "4.8B": ("sana15_4800m", 32),
  "1.6B@4K": ("sana_1600m_4k", 128),
}

POLICIES = ("none", "full", "dots", "dots_no_batch")


def load_config(name: str):
  return importlib.import_module(f"sana_jax.configs.{MODELS[name][0]}").get_config()


def topology(name: str):
  """(chip figures, the topology's devices) for e.g. "v5e:4x4"."""
  from jax.experimental import topologies

  kind = name.split(":")[0]
  if kind not in CHIPS:
    raise ValueError(f"unknown chip {kind!r} in {name!r}; known: {sorted(CHIPS)}")
  topo = topologies.get_topology_desc(platform="tpu", topology_name=name)
  return CHIPS[kind], list(topo.devices)


def parse_mesh(text: str) -> dict:
  """ "data=1,fsdp=-1" -> {"data": 1, "fsdp": -1}."""
  out = {}
  for part in text.split(","):
    k, v = part.split("=")
    if k not in parallel.MESH_AXES:
      raise ValueError(f"mesh axis {k!r} not in {parallel.MESH_AXES}")
    out[k] = int(v)
  return out


@contextlib.contextmanager
def unrolled_scans():
  """nn.scan fully unrolled (no while loop), so XLA's cost analysis sees every block. The
  model passes its own `unroll` (DiTConfig.scan_unroll): it is overridden here."""
  orig = nn.scan
  nn.scan = lambda *args, **kw: orig(*args, **{**kw, "unroll": True})
  try:
    yield
  finally:
    nn.scan = orig


def _is_oom(e: Exception) -> bool:
  s = str(e)
  return "RESOURCE_EXHAUSTED" in s or "Ran out of memory" in s or "out of memory" in s.lower()


@dataclasses.dataclass
class Compiled:
  arg: int = 0
  out: int = 0
  temp: int = 0
  code: int = 0
  alias: int = 0
  flops: float = 0.0
  bytes: float = 0.0
  secs: float = 0.0
  oom: str = ""  # the compiler's refusal, if it ran out of memory

  @property
  def total(self) -> int:
    return self.arg + self.out + self.temp + self.code - self.alias

  def fits(self, chip: Chip) -> bool:
    return not self.oom and self.total <= chip.hbm_gb * GB


def _analyse(lowered_fn) -> Compiled:
  t0 = time.perf_counter()
  try:
    compiled = lowered_fn().compile()
  except Exception as e:  # pylint: disable=broad-except
    if _is_oom(e):
      msg = str(e).splitlines()[0][:200]
      return Compiled(oom=msg, secs=time.perf_counter() - t0)
    raise
  secs = time.perf_counter() - t0
  ma = compiled.memory_analysis()
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return Compiled(
    arg=ma.argument_size_in_bytes,
    out=ma.output_size_in_bytes,
    temp=ma.temp_size_in_bytes,
    code=ma.generated_code_size_in_bytes,
    alias=ma.alias_size_in_bytes,
    flops=float(ca.get("flops", 0.0)),
    bytes=float(ca.get("bytes accessed", 0.0)),
    secs=secs,
  )


def train_program(config, mesh, per_chip_batch: int):
  """A thunk lowering jit_train_step on abstract, sharded inputs."""
  n = mesh.devices.size
  batch = per_chip_batch * n
  config.train.global_batch = batch
  tx = optim_lib.make_optimizer(config.train)
  shardings = state_lib.state_shardings(config.model, tx, mesh)
  abstract = state_lib.abstract_state(config.model, tx)
  sds = jax.ShapeDtypeStruct
  state_in = jax.tree_util.tree_map(
    lambda a, s: sds(a.shape, a.dtype, sharding=s), abstract, shardings
  )
  run = step_lib.jit_train_step(config, tx, mesh, shardings)
  m, side = config.model, config.latent_side
  bsh = run.batch_shardings
  batch_in = {
    "latent": sds((batch, side, side, m.in_channels), jnp.float32, sharding=bsh["latent"]),
    "caption": sds(
      (batch, m.caption_len, m.caption_channels), jnp.float32, sharding=bsh["caption"]
    ),
    "caption_mask": sds((batch, m.caption_len), jnp.int32, sharding=bsh["caption_mask"]),
  }
  null = sds(
    (m.caption_len, m.caption_channels),
    jnp.float32,
    sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
  )

  def lower():
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
      return run.jitted.lower(state_in, batch_in, null)

  return lower


def forward_program(config, mesh, per_chip_batch: int):
  """A thunk lowering the denoiser forward (bf16 parameters, sharded like training)."""
  n = mesh.devices.size
  batch = per_chip_batch * n
  cfg = DiTConfig.coerce(config.model)
  p_sh = parallel.param_shardings(cfg, mesh)
  sds = jax.ShapeDtypeStruct
  params = jax.tree_util.tree_map(
    lambda a, s: sds(a.shape, jnp.bfloat16, sharding=s), dit.abstract_params(cfg), p_sh
  )
  side = config.latent_side
  bs = lambda nd: parallel.batch_sharding(mesh, nd)  # noqa: E731
  x = sds((batch, side, side, cfg.in_channels), jnp.float32, sharding=bs(4))
  t = sds((batch,), jnp.float32, sharding=bs(1))
  cap = sds((batch, cfg.caption_len, cfg.caption_channels), jnp.bfloat16, sharding=bs(3))
  mask = sds((batch, cfg.caption_len), jnp.int32, sharding=bs(2))
  model = dit.SanaDiT(cfg)
  fn = jax.jit(lambda p, *a: model.apply({"params": p}, *a), out_shardings=bs(4))

  def lower():
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
      return fn.lower(params, x, t, cap, mask)

  return lower


def corrected_cost(make_program, config, mesh, batch: int) -> tuple[float, float]:
  """(FLOPs, bytes) per chip of the depth-D program with every block counted: probes at
  depth 1 and depth 2 (scan unrolled) give the per-block cost."""
  depth = config.model.depth
  probes = []
  for d in (1, 2):
    c = _copy(config)
    c.model.depth = d
    with unrolled_scans():
      probes.append(_analyse(make_program(c, mesh, batch)))
  if any(p.oom for p in probes):
    return float("nan"), float("nan")
  f1, f2 = probes[0].flops, probes[1].flops
  b1, b2 = probes[0].bytes, probes[1].bytes
  return f1 + (depth - 1) * (f2 - f1), b1 + (depth - 1) * (b2 - b1)


def _copy(config):
  c = config.copy_and_resolve_references()
  c.latent_side = config.latent_side
  return c


def _config(model: str, policy: str, depthwise: str):
  config = load_config(model)
  config.model.compute_dtype = "bfloat16"
  config.model.remat_policy = policy
  config.model.depthwise_impl = depthwise
  config.latent_side = MODELS[model][1]
  return config


def max_batch(
  config, mesh, chip: Chip, batches, cap: int, verify: bool, log
) -> tuple[int, str, dict]:
  """Largest per-chip batch the compiler fits (0 if batch 1 does not), how it was found
  ("compiled", or "extrapolated" linearly from the compiles at batch 1 and 2), and
  {batch: Compiled}. With `verify` the extrapolation is checked by compiling the predicted
  batch and walking to the boundary (fits(b) and not fits(b + 1))."""
  seen = {}

  def at(b):
    if b not in seen:
      seen[b] = _analyse(train_program(_copy(config), mesh, b))
      r = seen[b]
      log(
        f"    batch {b}: "
        + (f"OOM ({r.oom})" if r.oom else f"total {r.total / GB:.2f} GB, temp {r.temp / GB:.2f} GB")
        + f", compile {r.secs:.0f} s"
      )
    return seen[b]

  if batches:  # explicit list: compile each
    for b in batches:
      at(b)
    ok = [b for b in batches if seen[b].fits(chip)]
    return (max(ok) if ok else 0), "largest of --batches", seen
  if not at(1).fits(chip):
    return 0, "compiled", seen
  r1, r2 = at(1), at(2)
  if not r2.fits(chip):
    return 1, "compiled", seen
  slope = max(r2.total - r1.total, 1)
  guess = max(2, min(int(1 + (chip.hbm_gb * GB - r1.total) // slope), cap))
  if not verify or guess == 2:
    return guess, ("compiled" if guess == 2 else "extrapolated"), seen
  b = guess
  if at(b).fits(chip):
    while b < cap and at(b + 1).fits(chip):
      b += 1
  else:
    while b > 2 and not at(b - 1).fits(chip):
      b -= 1
    b -= 1
  return b, "compiled", seen


def plan_train(model, topo_name, mesh_text, policy, depthwise, batches, cap, verify, probes, log):
  chip, devices = topology(topo_name)
  mesh = parallel.make_mesh(**parse_mesh(mesh_text), devices=devices)
  config = _config(model, policy, depthwise)
  best, how, seen = max_batch(config, mesh, chip, batches, cap, verify, log)
  # Memory and cost are reported for the largest compiled batch that fits (or batch 1).
  fitting = [b for b in seen if seen[b].fits(chip)]
  b = max(fitting) if fitting else min(seen)
  r = seen[b]
  flops, nbytes = (
    corrected_cost(train_program, config, mesh, b)
    if probes and not r.oom
    else (float("nan"), float("nan"))
  )
  cfg = DiTConfig.coerce(config.model)
  side = config.latent_side
  model_flops = metrics.train_step_flops(cfg, side, side, cfg.caption_len, b, remat=False)
  hw_flops = metrics.train_step_flops(cfg, side, side, cfg.caption_len, b, remat=policy != "none")
  return dict(
    kind="train",
    model=model,
    params=dit.count_params(dit.abstract_params(cfg)),
    topo=topo_name,
    chips=len(devices),
    chip=chip,
    mesh=dict(mesh.shape),
    policy=policy,
    depthwise=depthwise,
    batch=b,
    fits=bool(best),
    r=r,
    max_batch=best,
    how=how,
    flops=flops,
    bytes=nbytes,
    model_flops=model_flops,
    hw_flops=hw_flops,
    compiles=len(seen) + 2,
    secs=sum(x.secs for x in seen.values()),
  )


def plan_forward(model, topo_name, mesh_text, depthwise, batch, probes, log):
  chip, devices = topology(topo_name)
  mesh = parallel.make_mesh(**parse_mesh(mesh_text), devices=devices)
  config = _config(model, "none", depthwise)
  r = _analyse(forward_program(_copy(config), mesh, batch))
  log(
    f"    forward batch {batch}: "
    + (f"OOM ({r.oom})" if r.oom else f"total {r.total / GB:.2f} GB")
    + f", {r.secs:.0f} s"
  )
  flops, nbytes = (
    corrected_cost(forward_program, config, mesh, batch)
    if probes and not r.oom
    else (float("nan"), float("nan"))
  )
  cfg = DiTConfig.coerce(config.model)
  side = config.latent_side
  f = batch * metrics.dit_forward_flops(cfg, side, side, cfg.caption_len)
  return dict(
    kind="forward",
    model=model,
    params=dit.count_params(dit.abstract_params(cfg)),
    topo=topo_name,
    chips=len(devices),
    chip=chip,
    mesh=dict(mesh.shape),
    policy="-",
    depthwise=depthwise,
    batch=batch,
    fits=r.fits(chip),
    r=r,
    max_batch=None,
    how="",
    flops=flops,
    bytes=nbytes,
    model_flops=f,
    hw_flops=f,
    compiles=3,
    secs=r.secs,
  )


def roofline(row) -> tuple[float, float, str]:
  """(step-time lower bound in s, MFU upper bound, bound kind) per chip. Without the cost
  probes (--no_probes) only the compute term of the analytic count (with recompute)."""
  chip = row["chip"]
  peak, bw = chip.peak_tflops * 1e12, chip.hbm_tbps * 1e12
  if np.isnan(row["flops"]):
    t, kind = row["hw_flops"] / peak, "compute (analytic)"
  else:
    tc, tm = row["flops"] / peak, row["bytes"] / bw
    t, kind = max(tc, tm), ("compute" if tc >= tm else "HBM")
  return t, row["model_flops"] / (t * peak), kind


BANNER = (
  "COMPILER PLANS, NOT MEASURED STEP TIMES: libtpu's AOT compile on a CPU; the "
  "roofline ignores communication and is a lower bound on step time."
)
HEADER = (
  "| program | model | topology (chips) | mesh | remat | depthwise | largest per-chip "
  "batch that fits | compiled at batch | arguments GB | temporaries GB | total GB / HBM "
  "| XLA TFLOP/step (raw) | analytic TFLOP (model; with recompute) | HBM GB accessed | "
  "roofline bound s/step (bound by) | MFU bound | compile s |"
)


def _f(x, fmt):
  return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, fmt)


def format_row(row) -> str:
  r, chip = row["r"], row["chip"]
  mesh = "x".join(f"{k}{v}" for k, v in row["mesh"].items() if v > 1) or "1"
  if r.oom:
    mem = "compiler: out of memory | - | - "
    t = mfu = float("nan")
    kind = ""
  else:
    mem = f"{r.arg / GB:.2f} | {r.temp / GB:.2f} | {r.total / GB:.2f} / {chip.hbm_gb:.0f} "
    t, mfu, kind = roofline(row)
  if row["kind"] == "train":
    best = (
      f"{row['max_batch']} ({row['how']})" if row["max_batch"] else "none: batch 1 does not fit"
    )
  else:
    best = "-"
  return (
    f"| {row['kind']} | {row['model']} ({row['params'] / 1e9:.2f} B) | "
    f"{row['topo']} ({row['chips']}) | {mesh} | {row['policy']} | {row['depthwise']} | "
    f"{best} | {row['batch']} | {mem}| {_f(row['flops'] / 1e12, '.2f')} "
    f"({r.flops / 1e12:.2f}) | {row['model_flops'] / 1e12:.2f} "
    f"({row['hw_flops'] / 1e12:.2f}) | {_f(row['bytes'] / GB, '.1f')} | "
    f"{_f(t, '.3f')} ({kind}) | {_f(mfu, '.0%')} | {row['secs']:.0f} |"
  )


def default_mesh(model: str, topo: str) -> str:
  """The mesh a user would pick: FSDP over every chip (the configs' data=1, fsdp=-1)."""
  del model, topo
  return "data=1,fsdp=-1"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument(
    "--models",
    default="1.6B,4.8B",
    help=f"comma-separated, from {sorted(MODELS)} (default: %(default)s)",
  )
  ap.add_argument(
    "--topologies",
    default="v5e:4x4,v6e:4x4,v5p:4x4x4",
    help="comma-separated libtpu topology names (default: %(default)s)",
  )
  ap.add_argument(
    "--meshes",
    default="",
    help="';'-separated mesh specs such as 'data=1,fsdp=-1;data=4,fsdp=-1' "
    "(default: FSDP over every chip)",
  )
  ap.add_argument(
    "--policies",
    default=",".join(POLICIES),
    help="remat policies, comma-separated (default: %(default)s)",
  )
  ap.add_argument(
    "--depthwise",
    default="shift",
    help="depthwise_impl values, comma-separated: shift, conv (default: %(default)s)",
  )
  ap.add_argument(
    "--batches",
    default="",
    help="per-chip batches to compile, comma-separated (default: search the largest that fits)",
  )
  ap.add_argument(
    "--max_batch",
    type=int,
    default=64,
    help="largest per-chip batch the search tries (default: %(default)s)",
  )
  ap.add_argument(
    "--forward_batch",
    type=int,
    default=4,
    help="per-chip batch of the forward plan; 0 skips it (default: %(default)s)",
  )
  ap.add_argument("--no_train", action="store_true", help="forward plans only (default: off)")
  ap.add_argument(
    "--verify",
    action="store_true",
    help="compile the extrapolated largest batch and its neighbours to confirm "
    "it (default: off: extrapolate from the compiles at batch 1 and 2)",
  )
  ap.add_argument(
    "--no_probes",
    action="store_true",
    help="skip the depth-1/2 cost probes that correct XLA's once-per-loop "
    "FLOP and byte counts (default: run them)",
  )
  a = ap.parse_args(argv)
  for m in a.models.split(","):
    if m not in MODELS:
      ap.error(f"--models: {m!r} is not one of {sorted(MODELS)}")
  policies = a.policies.split(",")
  for p in policies:
    if p not in POLICIES:
      ap.error(f"--policies: {p!r} is not one of {POLICIES}")
  batches = [int(b) for b in a.batches.split(",")] if a.batches else []
  log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
  print(BANNER)
  print(
    f"jax {jax.__version__}; load average {os.getloadavg()[0]:.1f}; GB = 1e9 bytes; "
    "TFLOP and GB per chip per step"
  )
  print(HEADER)
  print("|" + "---|" * (HEADER.count("|") - 1))
  for model in a.models.split(","):
    for topo in a.topologies.split(","):
      meshes = a.meshes.split(";") if a.meshes else [default_mesh(model, topo)]
      for mesh in meshes:
        for dw in a.depthwise.split(","):
          if not a.no_train:
            for policy in policies:
              log(f"[{model} {topo} {mesh} {policy} {dw}]")
              print(
                format_row(
                  plan_train(
                    model,
                    topo,
                    mesh,
                    policy,
                    dw,
                    batches,
                    a.max_batch,
                    a.verify,
                    not a.no_probes,
                    log,
                  )
                ),
                flush=True,
              )
          if a.forward_batch:
            log(f"[{model} {topo} {mesh} forward {dw}]")
            print(
              format_row(
                plan_forward(model, topo, mesh, dw, a.forward_batch, not a.no_probes, log)
              ),
              flush=True,
            )
  return 0


if __name__ == "__main__":
  sys.exit(main())
