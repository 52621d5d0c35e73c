"""Per-device memory of the compiled, donated SANA training step, without allocating it.

`sana_jax.train.step.jit_train_step` (the program train.py runs: flow-matching loss, CFG
dropout, gradient clipping, CAME-8bit from configs/common.py's train_config, EMA, the
non-finite skip) is lowered on abstract inputs (`sana_jax.train.state.abstract_state`, the
shardings of `state_shardings`, the state donated) and compiled;
`compiled.memory_analysis()` gives the per-device bytes. Nothing is allocated, so this runs
on the CPU with 8 simulated devices.

Cases (issue 7, must-show 5), bf16 compute over fp32 master weights, 1024 px (32x32
latent), 300 caption tokens of width 2304:
  SANA-1.5 4.8B, mesh data=1 fsdp=8, per-device batch 4 (global 32): goal <= 28 GB
  SANA-1.5 1.6B, one device, batch 4:                               goal <= 24 GB
for each remat policy in --policies. "total" = arguments + outputs + temporaries +
generated code - aliased (donated state buffers reused for the new state are counted once).

  python benchmarks/bench_train_memory.py
  python benchmarks/bench_train_memory.py --policies full,dots --cases 1.6B
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sana_jax import parallel  # noqa: E402
from sana_jax.models import dit  # noqa: E402
from sana_jax.train import optimizer as optim_lib  # noqa: E402
from sana_jax.train import state as state_lib  # noqa: E402
from sana_jax.train import step as step_lib  # noqa: E402

GB = 1e9
GIB = 1024**3
CASES = {  # name: (config module, mesh axes, number of devices, per-device batch, goal GB)
  "4.8B": ("sana15_4800m", dict(data=1, fsdp=8), 8, 4, 28.0),
  "1.6B": ("sana15_1600m", dict(data=1, fsdp=1), 1, 4, 24.0),
}


def load_config(name: str):
  """configs/<name>.py's get_config(). configs/common.add_training currently raises for
  configs that pass a mesh (duplicate 'data' keyword); then the model part is built and the
  default train config (what add_training adds; these configs override nothing) attached."""
  import importlib

  from configs import common

  mod = importlib.import_module(f"configs.{name}")
  try:
    return mod.get_config()
  except TypeError as e:
    print(f"[note] {name}.get_config() failed ({e}); using its model + default train config")
    orig = common.add_training
    common.add_training = lambda config, **kw: config
    try:
      config = mod.get_config()
    finally:
      common.add_training = orig
    config.train = common.train_config()
    return config


def _tree_bytes(tree) -> int:
  return int(
    sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))
  )


def analyse(case: str, policy: str, compute_dtype: str) -> dict:
  cfg_name, mesh_axes, n_dev, per_dev_batch, goal = CASES[case]
  config = load_config(cfg_name)
  config.model.compute_dtype = compute_dtype
  config.model.remat_policy = policy
  batch = per_dev_batch * n_dev
  config.train.global_batch = batch
  mesh = parallel.make_mesh(**mesh_axes, devices=jax.devices()[:n_dev])
  tx = optim_lib.make_optimizer(config.train)
  abstract = state_lib.abstract_state(config.model, tx)
  shardings = state_lib.state_shardings(config.model, tx, mesh)
  run = step_lib.jit_train_step(config, tx, mesh, shardings)
  m = config.model
  sds = jax.ShapeDtypeStruct
  batch_abs = {
    "latent": sds((batch, 32, 32, m.in_channels), jnp.float32),
    "caption": sds((batch, m.caption_len, m.caption_channels), jnp.float32),
    "caption_mask": sds((batch, m.caption_len), jnp.int32),
  }
  null_caption = sds((m.caption_len, m.caption_channels), jnp.float32)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
    compiled = run.jitted.lower(abstract, batch_abs, null_caption).compile()
  secs = time.perf_counter() - t0
  ma = compiled.memory_analysis()
  total = (
    ma.argument_size_in_bytes
    + ma.output_size_in_bytes
    + ma.temp_size_in_bytes
    + ma.generated_code_size_in_bytes
    - ma.alias_size_in_bytes
  )
  return dict(
    case=case,
    policy=policy,
    dtype=compute_dtype,
    devices=n_dev,
    batch=batch,
    params=dit.count_params(abstract.params),
    goal=goal,
    secs=secs,
    state_gb=_tree_bytes(abstract) / GB / n_dev,
    opt_gb=_tree_bytes(abstract.opt_state) / GB / n_dev,
    arg=ma.argument_size_in_bytes,
    out=ma.output_size_in_bytes,
    temp=ma.temp_size_in_bytes,
    code=ma.generated_code_size_in_bytes,
    alias=ma.alias_size_in_bytes,
    total=total,
  )


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--cases", default="4.8B,1.6B")
  ap.add_argument("--policies", default="none,full,dots,dots_no_batch")
  ap.add_argument("--dtype", default="bfloat16")
  a = ap.parse_args()
  print(
    f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}; "
    f"jax {jax.__version__}, {jax.device_count()} simulated CPU devices"
  )
  print(
    "per-device bytes from compiled.memory_analysis(); GB = 1e9 bytes; state = params + "
    "opt state + EMA (even split over the devices)"
  )
  print(
    "| model | devices | batch (per dev) | remat | compute | state GB (opt GB) | "
    "arguments GB | outputs GB | temps GB | code MB | aliased GB | total GB | goal GB | "
    "meets | compile s |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for case in a.cases.split(","):
    for policy in a.policies.split(","):
      r = analyse(case, policy, a.dtype)
      print(
        f"| SANA-1.5 {case} ({r['params'] / 1e9:.2f} B) | {r['devices']} | {r['batch']} "
        f"({r['batch'] // r['devices']}) | {policy} | {r['dtype']} | "
        f"{r['state_gb']:.2f} ({r['opt_gb']:.2f}) | {r['arg'] / GB:.2f} | "
        f"{r['out'] / GB:.2f} | {r['temp'] / GB:.2f} | {r['code'] / 1e6:.3f} | "
        f"{r['alias'] / GB:.2f} | {r['total'] / GB:.2f} | {r['goal']:.0f} | "
        f"{'yes' if r['total'] / GB <= r['goal'] else 'NO'} | {r['secs']:.0f} |",
        flush=True,
      )
  print(f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
  main()
