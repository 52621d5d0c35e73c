"""The SANA DiT forward: our jitted JAX model vs diffusers' SanaTransformer2DModel, and the
per-device memory of the compiled SANA-1.5 4.8B forward on an 8-device FSDP mesh.

Part 1 (time, issue 2 must-show 6): Sana 0.6B geometry (28 blocks, width 1152), random
weights, fp32, 512 px (16x16 latent), batch 1, 300 caption tokens (the last 120 padded).
One diffusers model is built; our parameters are converted from it (so the run also checks
parity). Our forward is compiled once per `--impls` depthwise-conv form ("per_layer": the
shift form with every block's weights in their own buffers, dit.apply_layers); timed runs
alternate (ours-shift, ours-conv, diffusers, ours-shift, ...) so load from other processes
hits all alike; medians are reported with the load average. torch uses --threads (2 by
default). On a heavily loaded 2-core machine torch's 2-thread forward is much slower than
its 1-thread one, so compare with `--threads 1` too (docs/benchmarks.md).

Part 2 (memory): SANA-1.5 4.8B (60 blocks, width 2240) at 1024 px (32x32 latent), global
batch 8 (1 per device), 300 caption tokens, parameters sharded by the FSDP rules on mesh
(data=1, fsdp=8). `jax.jit(...).lower(ShapeDtypeStructs with shardings).compile()
.memory_analysis()`: nothing is allocated.

  python benchmarks/bench_dit.py                      # 5 timed runs each, both impls, memory
  python benchmarks/bench_dit.py --runs 7 --impls shift --no-memory
  python benchmarks/bench_dit.py --runs 5 --impls shift,per_layer --no-memory
  python benchmarks/bench_dit.py --no-time            # memory only (a few seconds)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# 8 simulated CPU devices for the FSDP memory analysis; must precede the jax import.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from sana_jax import parallel  # noqa: E402
from sana_jax.models import dit  # noqa: E402
from sana_jax.models.dit_config import DiTConfig  # noqa: E402

GIB = 1024**3


def model_config(mod) -> DiTConfig:
  return DiTConfig.coerce(mod.get_config().model)


def load() -> str:
  return " ".join(f"{x:.1f}" for x in os.getloadavg())


# ----------------------------------------------------------------------------- time


def time_forward(runs: int, impls: list[str], threads: int) -> None:
  import torch

  from sana_jax.weights import dit as dit_weights
  from sana_jax.configs import sana_600m

  torch.set_num_threads(threads)
  cfg = model_config(sana_600m).diffusers_compatible()
  print(
    f"== forward time: Sana 0.6B geometry (depth {cfg.depth}, width {cfg.hidden_size}), "
    f"fp32, 512 px (16x16 latent), batch 1, 300 caption tokens; torch threads "
    f"{torch.get_num_threads()}, jax {jax.__version__}, torch {torch.__version__}"
  )
  t0 = time.perf_counter()
  from tests.dit_reference import diffusers_model

  model = diffusers_model(cfg, relative_scale=0.2)
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  params = jax.device_put(dit_weights.diffusers_to_params(sd, cfg), jax.devices()[0])
  del sd
  print(f"built + converted in {time.perf_counter() - t0:.1f} s")

  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 16, 16, cfg.in_channels)).astype(np.float32)
  y = rng.standard_normal((1, 300, cfg.caption_channels)).astype(np.float32)
  mask = np.ones((1, 300), np.int32)
  mask[:, 180:] = 0
  t = np.array([500.0], np.float32)
  args = (x, t, y, mask)
  tx, tt, ty, tm = (
    torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
    torch.from_numpy(t),
    torch.from_numpy(y),
    torch.from_numpy(mask.astype(np.float32)),
  )

  def theirs():
    with torch.inference_mode():
      return model(
        hidden_states=tx,
        encoder_hidden_states=ty,
        timestep=tt,
        encoder_attention_mask=tm,
        return_dict=False,
      )[0]

  runners = {}
  for impl in impls:
    t0 = time.perf_counter()
    if impl == "per_layer":
      un = dit.unstack_blocks(params)
      fn = jax.jit(dit.apply_layers, static_argnums=0).lower(cfg, un, *args).compile()
      run = lambda fn=fn, un=un: jax.block_until_ready(fn(un, *args))  # noqa: E731
    else:
      c = cfg.replace(depthwise_impl=impl)
      fn = jax.jit(dit.SanaDiT(c).apply).lower({"params": params}, *args).compile()
      run = lambda fn=fn: jax.block_until_ready(fn({"params": params}, *args))  # noqa: E731
    print(f"compiled ours ({impl}) in {time.perf_counter() - t0:.1f} s")
    runners[f"ours ({impl})"] = run
  runners["diffusers"] = theirs

  ref = theirs().numpy().transpose(0, 2, 3, 1)
  for name, fn in runners.items():  # warm-up, and parity at this geometry
    out = np.asarray(fn()) if name != "diffusers" else ref
    if name != "diffusers":
      err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
      print(f"{name}: max rel err vs diffusers {err:.2e}")

  times = {name: [] for name in runners}
  loads = [os.getloadavg()[0]]
  for _ in range(runs):
    for name, fn in runners.items():
      s = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - s)
    loads.append(os.getloadavg()[0])
  med_ref = statistics.median(times["diffusers"])
  print(
    f"\n{runs} alternating runs; 1-min load average during the runs "
    f"{min(loads):.1f}-{max(loads):.1f} (2 cores)"
  )
  print(f"| {'model':<16} | median s | min s  | max s  | ours / diffusers |")
  print(f"|{'-' * 18}|----------|--------|--------|------------------|")
  for name, ts in times.items():
    med = statistics.median(ts)
    ratio = f"{med / med_ref:.2f}" if name != "diffusers" else "1.00"
    print(f"| {name:<16} | {med:8.3f} | {min(ts):6.3f} | {max(ts):6.3f} | {ratio:>16} |")


# ----------------------------------------------------------------------------- memory


def forward_memory(compute_dtypes: list[str], batch: int) -> None:
  from sana_jax.configs import sana15_4800m

  base = model_config(sana15_4800m)
  mesh = parallel.make_mesh(data=1, fsdp=8)
  print(
    f"\n== compiled forward memory: SANA-1.5 4.8B (depth {base.depth}, width "
    f"{base.hidden_size}), 1024 px (32x32 latent), global batch {batch} "
    f"({batch // 8} per device), 300 caption tokens, mesh data=1 fsdp=8, per device"
  )
  print(
    "| compute | params (fp32) | arguments GiB | outputs GiB | temps GiB | code KiB "
    "| total GiB | compile s |"
  )
  print(
    "|---------|---------------|---------------|-------------|-----------|----------"
    "|-----------|-----------|"
  )
  for dtype in compute_dtypes:
    cfg = base.replace(compute_dtype=dtype)
    p_sh = parallel.param_shardings(cfg, mesh)
    shapes = dit.abstract_params(cfg)
    n_params = dit.count_params(shapes)
    abstract = jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, p_sh
    )

    def arg(shape, dtype):
      return jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharding(mesh, len(shape)))

    inputs = (
      arg((batch, 32, 32, cfg.in_channels), jnp.float32),
      arg((batch,), jnp.float32),
      arg((batch, 300, cfg.caption_channels), jnp.float32),
      arg((batch, 300), jnp.int32),
    )
    out_sh = NamedSharding(mesh, P(("data", "fsdp")))
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
      fn = jax.jit(dit.SanaDiT(cfg).apply, out_shardings=out_sh)
      compiled = fn.lower({"params": abstract}, *inputs).compile()
    secs = time.perf_counter() - t0
    m = compiled.memory_analysis()
    total = (
      m.argument_size_in_bytes
      + m.output_size_in_bytes
      + m.temp_size_in_bytes
      + m.generated_code_size_in_bytes
      - m.alias_size_in_bytes
    )
    print(
      f"| {dtype:<7} | {n_params / 1e9:9.3f} B   | {m.argument_size_in_bytes / GIB:13.3f} "
      f"| {m.output_size_in_bytes / GIB:11.4f} | {m.temp_size_in_bytes / GIB:9.3f} "
      f"| {m.generated_code_size_in_bytes / 2**10:8.1f} | {total / GIB:9.3f} | {secs:9.1f} |"
    )


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--runs", type=int, default=5)
  ap.add_argument("--impls", default="shift,conv", help="depthwise_impl forms to time")
  ap.add_argument("--threads", type=int, default=2, help="torch threads")
  ap.add_argument("--no-time", action="store_true")
  ap.add_argument("--no-memory", action="store_true")
  ap.add_argument("--memory-batch", type=int, default=8)
  a = ap.parse_args()
  print(f"load average at start: {load()}")
  if not a.no_time:
    time_forward(a.runs, a.impls.split(","), a.threads)
  if not a.no_memory:
    forward_memory(["float32", "bfloat16"], a.memory_batch)
  print(f"load average at end: {load()}")


if __name__ == "__main__":
  main()
