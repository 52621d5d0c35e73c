"""Per-device memory of the compiled, donated SANA training step, without allocating it.

`sana_jax.train.step.jit_train_step` (the program train.py runs: flow-matching loss, CFG
dropout, gradient clipping, CAME-8bit from configs/common.py's train_config, EMA, the
non-finite skip) is lowered on abstract inputs (`sana_jax.train.state.abstract_state`, the
shardings of `state_shardings`, the state donated) and compiled;
`compiled.memory_analysis()` gives the per-device bytes. Nothing is allocated, so this runs
on the CPU with 8 simulated devices.

Cases, bf16 compute over fp32 master weights, 1024 px (32x32 latent), 300 caption tokens of
width 2304, remat per --policies (the rows below use "full"):
  4.8B          SANA-1.5 4.8B, mesh data=1 fsdp=8, per-device batch 4 (global 32): goal 28 GB
  1.6B          SANA-1.5 1.6B, one device, batch 4, full fine-tune:              goal 24 GB
  4.8B-lora     SANA-1.5 4.8B, one device, LoRA rank 32 on the default targets (diffusers'
                DreamBooth q/k/v), frozen base in bf16, batch 1 and 4:           goal 24 GB
  4.8B-1dev     SANA-1.5 4.8B, one device, full fine-tune, batch 1:              goal 24 GB
--variants repeats each case per EMA storage / parameter dtype (train.ema /
train.param_dtype, e.g. fp32/float32,off/bfloat16); --base_dtype sets
train.lora.base_dtype for the LoRA cases. "total" = arguments + outputs + temporaries +
generated code - aliased (donated state buffers reused for the new state are counted once).

  python benchmarks/bench_train_memory.py --cases 1.6B --policies full --variants fp32/float32,bf16/float32,off/float32
  python benchmarks/bench_train_memory.py --cases 4.8B-lora --policies full --batches 1,4
  python benchmarks/bench_train_memory.py --cases 4.8B-1dev --policies full --variants off/bfloat16
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
CASES = {  # name: (config module, mesh axes, devices, per-device batch, goal GB, LoRA rank)
  "4.8B": ("sana15_4800m", dict(data=1, fsdp=8), 8, 4, 28.0, 0),
  "1.6B": ("sana15_1600m", dict(data=1, fsdp=1), 1, 4, 24.0, 0),
  "4.8B-lora": ("sana15_4800m", dict(data=1, fsdp=1), 1, 4, 24.0, 32),
  "4.8B-1dev": ("sana15_4800m", dict(data=1, fsdp=1), 1, 1, 24.0, 0),
}


def load_config(name: str):
  """configs/<name>.py's get_config(). configs/common.add_training currently raises for
  configs that pass a mesh (duplicate 'data' keyword); then the model part is built and the
  default train config (what add_training adds; these configs override nothing) attached."""
  import importlib

  from sana_jax.configs import common

  mod = importlib.import_module(f"sana_jax.configs.{name}")
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


def analyse(
  case: str,
  policy: str,
  compute_dtype: str,
  ema: str = "fp32",
  per_dev_batch: int | None = None,
  base_dtype: str = "bfloat16",
  param_dtype: str = "float32",
  depth: int = 0,
  guard: str = "where",
) -> dict:
  cfg_name, mesh_axes, n_dev, default_batch, goal, rank = CASES[case]
  per_dev_batch = per_dev_batch or default_batch
  config = load_config(cfg_name)
  config.model.compute_dtype = compute_dtype
  config.model.remat_policy = policy
  if depth:
    config.model.depth = depth  # a shallower proxy of the same width (fast, light compile)
  batch = per_dev_batch * n_dev
  config.train.global_batch = batch
  config.train.ema = ema
  config.train.param_dtype = param_dtype
  config.train.nonfinite_guard = guard
  if rank:
    config.train.lora.update(rank=rank, alpha=float(rank), base_dtype=base_dtype)
  mesh = parallel.make_mesh(**mesh_axes, devices=jax.devices()[:n_dev])
  tx = optim_lib.make_optimizer(config.train)
  model_cfg = state_lib.model_config(config)
  abstract = state_lib.abstract_state(model_cfg, tx, config.train)
  shardings = state_lib.state_shardings(model_cfg, tx, mesh, config.train)
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
  frozen = abstract.frozen
  return dict(
    case=case,
    what=(f"LoRA r{rank}, base {base_dtype}" if rank else "full")
    + f", params {param_dtype}, EMA {ema}",
    frozen_gb=(_tree_bytes(frozen) if frozen is not None else 0) / GB / n_dev,
    policy=policy,
    dtype=compute_dtype,
    devices=n_dev,
    batch=batch,
    params=dit.count_params(dit.abstract_params(model_cfg)),
    trained=dit.count_params(abstract.params),
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
  ap.add_argument(
    "--variants",
    default="fp32/float32",
    help="train.ema/train.param_dtype pairs, comma-separated (e.g. fp32/float32,off/bfloat16)",
  )
  ap.add_argument("--batches", default="", help="per-device batches (default: the case's)")
  ap.add_argument("--base_dtype", default="bfloat16", help="train.lora.base_dtype (LoRA)")
  ap.add_argument("--depth", type=int, default=0, help="override the depth (0: the case's)")
  ap.add_argument("--quality", default="", help="DATA: the numerics run (see quality())")
  ap.add_argument("--quality_steps", type=int, default=200)
  ap.add_argument("--quality_decay", type=float, default=0.995)
  ap.add_argument("--quality_workdir", default="/tmp/bench_train_memory_quality")
  ap.add_argument(
    "--guard",
    default="where",
    choices=("where", "cond"),
    help="train.nonfinite_guard (default: where, the lower-memory form the docs' table uses)",
  )
  a = ap.parse_args()
  if a.quality:
    quality(a.quality, a.quality_steps, a.quality_decay, a.quality_workdir)
    return
  print(
    f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}; "
    f"jax {jax.__version__}, {jax.device_count()} simulated CPU devices"
  )
  print(
    "per-device bytes from compiled.memory_analysis(); GB = 1e9 bytes; state = params + "
    "opt state + EMA (even split over the devices)"
  )
  print(
    "| model | training | devices | batch (per dev) | remat | compute | "
    "state GB (opt GB, frozen GB) | arguments GB | outputs GB | temps GB | code MB | "
    "aliased GB | total GB | goal GB | meets | compile s |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  batches = [int(b) for b in a.batches.split(",")] if a.batches else [None]
  for case in a.cases.split(","):
    for policy in a.policies.split(","):
      for variant in a.variants.split(","):
        ema, param_dtype = variant.split("/")
        for b in batches:
          _row(analyse(case, policy, a.dtype, ema, b, a.base_dtype, param_dtype, a.depth, a.guard))
  print(f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def _row(r: dict) -> None:
  print(
    f"| SANA-1.5 {r['case']} ({r['params'] / 1e9:.2f} B, {r['trained'] / 1e6:.1f} M "
    f"trained) | {r['what']} | {r['devices']} | {r['batch']} "
    f"({r['batch'] // r['devices']}) | {r['policy']} | {r['dtype']} | "
    f"{r['state_gb']:.2f} ({r['opt_gb']:.2f}, {r['frozen_gb']:.2f}) | {r['arg'] / GB:.2f} | "
    f"{r['out'] / GB:.2f} | {r['temp'] / GB:.2f} | {r['code'] / 1e6:.3f} | "
    f"{r['alias'] / GB:.2f} | {r['total'] / GB:.2f} | {r['goal']:.0f} | "
    f"{'yes' if r['total'] / GB <= r['goal'] else 'NO'} | {r['secs']:.0f} |",
    flush=True,
  )


# ----------------------------------------------------------------------------- quality


def quality(data_dir: str, steps: int, decay: float, workroot: str) -> None:
  """What the memory options cost in numerics, on a short fine-tune of the embedded
  ShapesEval model (sana_jax/assets/shapes_model) on ShapesEval scenes (a dataset written
  by `python -m sana_jax.data.preprocess --model sana_jax/assets/shapes_model --out DATA`).

  The same run (same data, noise and timesteps: all are functions of the seed and step)
  with: fp32 parameters and EMA (the reference); train.ema="bf16"; train.param_dtype=
  "bfloat16". Reported: the flow loss at 16 fixed (noise, t) draws over 256 examples of the
  raw and the EMA weights, and how far each variant's weights are from the reference's,
  relative to how far the reference moved from the start (|w - w_ref| / |w_ref - w_0|).
  """
  from sana_jax.configs import shapes
  from sana_jax.data import latents_tfds
  from sana_jax.diffusion import flow
  from sana_jax.train import loop

  src = latents_tfds.open_dataset(data_dir)["train_32x32"]
  idx = range(len(src) - 256, len(src))
  batch = {
    k: np.stack([np.asarray(src[i][k]) for i in idx]) for k in ("latent", "caption", "caption_mask")
  }
  base = "sana_jax/assets/shapes_model/transformer"

  def config_for(**train):
    c = shapes.get_config()
    c.data.dir = data_dir
    c.train.update(
      dict(
        steps=steps,
        global_batch=32,
        lr=1e-4,
        warmup_steps=10,
        ema_decay=decay,
        checkpoint_every=10**6,
        init_from=os.path.abspath(base),
      )
    )
    c.train.update(train)
    c.mesh.update(data=1, fsdp=1, num_devices=1)
    return c

  cfg0 = config_for()
  model = dit.SanaDiT(state_lib.model_config(cfg0))

  @jax.jit
  def loss(params, key):
    k1, k2 = jax.random.split(key)
    x0 = jnp.asarray(batch["latent"])
    noise = jax.random.normal(k1, x0.shape)
    ti = flow.training_inputs(x0, noise, jax.random.normal(k2, (x0.shape[0],)), cfg0.flow_shift)
    p = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    pred = model.apply(
      {"params": p}, ti.x_t, ti.model_time, batch["caption"], batch["caption_mask"]
    )
    return flow.flow_loss(pred, x0, noise)

  def fixed_loss(params):
    return float(np.mean([loss(params, jax.random.key(100 + i)) for i in range(16)]))

  def dist(a, b):
    la = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(a)]
    lb = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(b)]
    return float(np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(la, lb))))

  from sana_jax.weights import dit as dit_weights

  init, _, _ = dit_weights.load_flax(base)
  variants = {
    "fp32 params, fp32 EMA (reference)": {},
    'train.ema="bf16"': dict(ema="bf16"),
    'train.param_dtype="bfloat16"': dict(param_dtype="bfloat16"),
  }
  states = {}
  for name, over in variants.items():
    t0 = time.perf_counter()
    states[name] = jax.device_get(
      loop.train(config_for(**over), f"{workroot}/{len(states)}", progress=False, verbose=False)
    )
    print(f"[trained {name}: {time.perf_counter() - t0:.0f} s]", flush=True)
  ref = states["fp32 params, fp32 EMA (reference)"]
  moved_raw, moved_ema = dist(ref.params, init), dist(ref.ema_params, init)
  print(
    f"\nShapes model fine-tune, {steps} steps, batch 32, CAME-8bit lr 1e-4, EMA decay {decay}; "
    f"loss at start {fixed_loss(init):.5f}; reference moved |raw - w0| = {moved_raw:.4f}, "
    f"|EMA - w0| = {moved_ema:.4f}"
  )
  print(
    "| variant | raw loss | EMA loss | raw |w - w_ref| / |w_ref - w0| | "
    "EMA |w - w_ref| / |w_ref - w0| |"
  )
  print("|---|---|---|---|---|")
  for name, s in states.items():
    print(
      f"| {name} | {fixed_loss(s.params):.5f} | {fixed_loss(s.ema_params):.5f} | "
      f"{dist(s.params, ref.params) / moved_raw:.4f} | "
      f"{dist(s.ema_params, ref.ema_params) / moved_ema:.4f} |",
      flush=True,
    )


if __name__ == "__main__":
  main()
