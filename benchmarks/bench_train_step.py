"""One training step, ours vs PyTorch's, side by side in one process (issue 21).

Ours: the project's `jit_train_step` (flow-matching loss, CFG dropout, gradient clip, the
optimizer, EMA, the non-finite guard; fp32, one device, state donated). Theirs: diffusers'
`SanaTransformer2DModel` with the same geometry and weights, the same flow-matching loss on
noise / logit-normal timesteps / CFG dropout drawn with torch, `clip_grad_norm_`, the torch
optimizer (AdamW: `torch.optim.AdamW`, default foreach; CAME: came-pytorch's `CAME`) and an
EMA update (`torch._foreach_lerp_`). Our CAME and CAME-8bit run against came-pytorch's CAME.

Timed runs alternate (ours, theirs, ours, ...) so load from other processes hits both
alike; medians are reported. torch gets as many threads as XLA:CPU's pool (the machine's
cores, `--threads` to change). The breakdown times each part alone: ours as separately
jitted functions (forward = the loss; backward = value_and_grad minus the forward;
update = the step's whole post-gradient update, as `train/update.py` does it (gradient norm,
non-finite guard, optimizer, EMA; state donated); optimizer = tx.update + apply_updates
alone; EMA alone), theirs inside its step (perf_counter around each
phase; torch on CPU is synchronous). Compile = lower + compile of the whole step.

  python benchmarks/bench_train_step.py                                   # shapes + 0.6B
  python benchmarks/bench_train_step.py --geometries shapes --optimizers adamw --runs 7
  python benchmarks/bench_train_step.py --geometries 1.6b --depth 4       # 1.6B width
  python benchmarks/bench_train_step.py --geometries tiny --runs 1        # seconds (the test)

Run the 0.6B / 1.6B geometries under `flock /tmp/heavy.lock` on the shared machine.
The script restarts itself with the malloc settings of our commands (large blocks kept in
the heap, huge pages, single-device programs run inline: sana_jax/commands/
malloc_settings.py), for both sides; SANA_JAX_KEEP_MALLOC=1 keeps glibc's and JAX's defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
if __name__ == "__main__":
  # Both sides run with the malloc settings our commands run with
  # (sana_jax/commands/malloc_settings.py; SANA_JAX_KEEP_MALLOC=1 keeps the defaults).
  from sana_jax.commands import malloc_settings

  malloc_settings.restart(None)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from sana_jax import parallel  # noqa: E402
from sana_jax.diffusion import flow  # noqa: E402
from sana_jax.models import dit  # noqa: E402
from sana_jax.models.dit_config import DiTConfig  # noqa: E402
from sana_jax.train import optimizer as optim_lib  # noqa: E402
from sana_jax.train import state as state_lib  # noqa: E402
from sana_jax.train import step as step_lib  # noqa: E402

OPTIMIZERS = ("adamw", "came", "came_8bit")


def where_guard_update(state, loss, grads, *, tx, tc):
  """The update as it was before issue 21 (commit 28637d8's train/update.py): the
  non-finite guard a `jnp.where` over every new leaf of params, optimizer state and EMA.
  Kept here so each run measures before and after side by side."""
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = tc.ema_decay
  ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, params)
  keep = lambda new, old: jax.tree_util.tree_map(lambda a, c: jnp.where(finite, a, c), new, old)  # noqa: E731
  new_state = state.replace(
    step=state.step + 1,
    params=keep(params, state.params),
    opt_state=keep(opt_state, state.opt_state),
    ema_params=keep(ema, state.ema_params),
    skipped=state.skipped + (~finite).astype(jnp.int32),
    nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),
  )
  metrics = {
    "loss": loss,
    "grad_norm": grad_norm,
    "finite": finite,
    "lr": optim_lib.learning_rate(tc)(state.step - state.skipped),
  }
  return new_state, metrics


def _clip_before(clip, tc):
  """optax.chain(clip(tc.grad_clip), the optimizer without its clip)."""
  plain = tc.copy_and_resolve_references()
  plain.grad_clip = 0.0
  return optax.chain(clip(tc.grad_clip), optim_lib.make_optimizer(plain))


def optax_clip_optimizer(tc):
  """The optimizer after optax.clip_by_global_norm, the clip before the fused one (each
  leaf divided by the norm, which the chain recomputes inside the update)."""
  return _clip_before(optax.clip_by_global_norm, tc)


def chained_clip_optimizer(tc):
  """The optimizer after the fused clip as its own transformation: CAME's form before the
  factor was handed to it (the clipped gradient formed; for AdamW the project's form)."""
  return _clip_before(optim_lib.clip_by_global_norm, tc)


def official_state_optimizer(tc):
  """make_optimizer with train.came_8bit_state="official" (the trainer's CAME-8bit state
  before "compact" became the default)."""
  tc = tc.copy_and_resolve_references()
  tc.came_8bit_state = "official"
  return optim_lib.make_optimizer(tc)


# Our step's variants: name -> (DiTConfig overrides, update function or None = the project's,
# optimizer factory fn(config.train) or None = make_optimizer). "project" is the code as it
# is; the others measure alternatives in the same run.
VARIANTS = {
  "project": ((), None, None),
  "optax_clip": ((), None, optax_clip_optimizer),
  "chained_clip": ((), None, chained_clip_optimizer),
  "official_state": ((), None, official_state_optimizer),
  "where_guard": ((), where_guard_update, None),
  "conv_dw": ((("depthwise_impl", "conv"),), None, None),
  "scan": ((("scan_unroll", 1),), None, None),  # one block in the program, looped over depth
  "unroll": ((("scan_unroll", 1000),), None, None),  # min(., depth): the whole stack unrolled
  "remat_dots": ((("remat_policy", "dots"),), None, None),
  "remat_full": ((("remat_policy", "full"),), None, None),  # blocks recomputed in the backward
}


@dataclasses.dataclass(frozen=True)
class Geometry:
  name: str
  config: str  # module in configs/
  batch: int
  latent: int  # latent (or pixel) height = width
  caption_len: int
  overrides: tuple = ()  # DiTConfig field overrides

  def describe(self, cfg: DiTConfig) -> str:
    return (
      f"{self.name}: depth {cfg.depth} x width {cfg.hidden_size}, {self.latent}x{self.latent}"
      f"x{cfg.in_channels} input, patch {cfg.patch_size}, {self.caption_len} caption tokens"
      f" of {cfg.caption_channels}, batch {self.batch}"
    )


GEOMETRIES = {
  "shapes": Geometry("shapes", "shapes", batch=32, latent=32, caption_len=24),
  "0.6b": Geometry(
    "0.6b", "sana_600m", batch=2, latent=8, caption_len=300, overrides=(("depth", 8),)
  ),
  "1.6b": Geometry(
    "1.6b", "sana15_1600m", batch=2, latent=8, caption_len=300, overrides=(("depth", 4),)
  ),
  # Seconds-long (tests/test_bench_train_step.py); every dimension differs.
  "tiny": Geometry(
    "tiny",
    "shapes",
    batch=3,
    latent=12,
    caption_len=5,
    overrides=(
      ("hidden_size", 48),
      ("depth", 2),
      ("self_head_dim", 16),
      ("cross_heads", 2),
      ("cross_head_dim", 12),
      ("caption_channels", 20),
      ("sample_size", 12),
    ),
  ),
}


def load() -> str:
  return " ".join(f"{x:.1f}" for x in os.getloadavg())


def build_config(geo: Geometry, optimizer: str, depth: int | None):
  import importlib

  config = importlib.import_module(f"sana_jax.configs.{geo.config}").get_config()
  cfg = DiTConfig.coerce(config.model).replace(**dict(geo.overrides))
  if depth is not None and geo.name != "tiny":
    cfg = cfg.replace(depth=depth)
  # diffusers' numerics (same cost) so both sides compute the same loss on the same inputs.
  cfg = cfg.diffusers_compatible()
  config.model = cfg.to_dict()
  config.train.optimizer = optimizer
  config.train.global_batch = geo.batch
  config.train.warmup_steps = 0
  return config, cfg


# ----------------------------------------------------------------------------- inputs


def make_batch(geo: Geometry, cfg: DiTConfig, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  b, n, ly = geo.batch, geo.latent, geo.caption_len
  mask = np.ones((b, ly), np.int32)
  mask[:, max(1, (ly * 3) // 5) :] = 0  # the last 40% padded (300 -> 180 kept)
  return {
    "latent": rng.standard_normal((b, n, n, cfg.in_channels)).astype(np.float32),
    "caption": rng.standard_normal((b, ly, cfg.caption_channels)).astype(np.float32),
    "caption_mask": mask,
  }


# ----------------------------------------------------------------------------- ours


class Ours:
  """Our step and its parts, on one device."""

  def __init__(
    self, config, cfg: DiTConfig, params: dict, batch: dict, null: np.ndarray, variant="project"
  ):
    overrides, self.update_fn, make_tx = VARIANTS[variant]
    if overrides:
      cfg = cfg.replace(**dict(overrides))
      config = config.copy_and_resolve_references()
      config.model = cfg.to_dict()
    self.config, self.cfg, self.variant = config, cfg, variant
    self.tx = (make_tx or optim_lib.make_optimizer)(config.train)
    self.mesh = parallel.make_mesh(devices=jax.devices()[:1])
    self.state_sh = state_lib.state_shardings(config.model, self.tx, self.mesh)
    create = jax.jit(lambda p: state_lib.create(p, self.tx), out_shardings=self.state_sh)
    self.state = create(params)
    self.step = step_lib.jit_train_step(config, self.tx, self.mesh, self.state_sh)
    self.batch = jax.device_put(batch, jax.devices()[0])
    self.null = jnp.asarray(null)
    self.compile_s = None

  def compile(self):
    import flax.linen as nn

    from sana_jax import host_memory
    from sana_jax.train import update as update_lib

    original = update_lib.apply_gradients
    if self.update_fn is not None:
      update_lib.apply_gradients = self.update_fn  # only while tracing
    try:
      t0 = time.perf_counter()
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
        self.compiled = self.step.jitted.lower(self.state, self.batch, self.null).compile()
      self.compile_s = time.perf_counter() - t0
      host_memory.release_freed()  # as the train loop does
    finally:
      update_lib.apply_gradients = original
    return self.compiled

  def run_step(self):
    self.state, metrics = self.compiled(self.state, self.batch, self.null)
    jax.block_until_ready(metrics["loss"])
    return metrics

  def parts(self) -> dict:
    """Separately jitted parts of the step, each a zero-argument callable that blocks."""
    config, tx, state = self.config, self.tx, self.state
    tc = config.train
    model = dit.SanaDiT(config.model)
    b = self.batch["latent"].shape[0]

    def inputs(step):
      key = jax.random.fold_in(jax.random.key(tc.seed), step)
      k_noise, k_t, k_drop = jax.random.split(key, 3)
      noise = jax.random.normal(k_noise, self.batch["latent"].shape, jnp.float32)
      draws = flow.timestep_draws(k_t, (b,), tc.timestep_sampler)
      return noise, draws, jax.random.uniform(k_drop, (b,))

    def loss(params, batch, null, step):  # the step's loss (train.step._loss_fn), no LoRA
      noise, draws, drop_u = inputs(step)
      ti = flow.training_inputs(
        batch["latent"], noise, draws, config.flow_shift, tc.timestep_sampler
      )
      caption = flow.drop_captions(drop_u, batch["caption"], null, tc.cfg_dropout)
      pred = model.apply({"params": params}, ti.x_t, ti.model_time, caption, batch["caption_mask"])
      return flow.flow_loss(pred, batch["latent"], noise)

    fwd = jax.jit(loss)
    fwd_bwd = jax.jit(jax.value_and_grad(loss))
    _, grads = fwd_bwd(state.params, self.batch, self.null, state.step)
    grads = jax.block_until_ready(grads)

    @jax.jit
    def opt(params, opt_state, grads):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    decay = tc.ema_decay
    ema = jax.jit(
      lambda e, p: jax.tree_util.tree_map(lambda a, c: decay * a + (1 - decay) * c, e, p)
    )
    from sana_jax.train import update as update_lib

    fn = self.update_fn or update_lib.apply_gradients
    update = jax.jit(functools.partial(fn, tx=tx, tc=tc), donate_argnums=(0,))
    box = [jax.tree_util.tree_map(jnp.copy, state)]
    lo = jnp.float32(0.5)

    def run_update():  # the whole post-gradient update as the step does it, state donated
      box[0] = update(box[0], lo, grads)[0]
      jax.block_until_ready(box[0].params)

    bl = jax.block_until_ready
    return {
      "forward": lambda: bl(fwd(state.params, self.batch, self.null, state.step)),
      "forward+backward": lambda: bl(fwd_bwd(state.params, self.batch, self.null, state.step)),
      "update": run_update,
      "optimizer": lambda: bl(opt(state.params, state.opt_state, grads)),
      "ema": lambda: bl(ema(state.ema_params, state.params)),
    }


# ----------------------------------------------------------------------------- theirs


class Theirs:
  """diffusers' model with a torch optimizer, EMA and the same flow-matching loss."""

  def __init__(self, config, cfg: DiTConfig, model, batch: dict, null: np.ndarray):
    import torch

    self.torch = torch
    tc = config.train
    self.model = model.train()
    self.params = [p for p in model.parameters() if p.requires_grad]
    self.ema = [p.detach().clone() for p in self.params]
    if tc.optimizer == "adamw":
      self.opt = torch.optim.AdamW(self.params, lr=tc.lr, weight_decay=tc.weight_decay)
    else:
      from came_pytorch import CAME

      self.opt = CAME(
        self.params,
        lr=tc.lr,
        weight_decay=tc.weight_decay,
        betas=(0.9, 0.999, 0.9999),
        eps=(1e-30, 1e-16),
      )
    self.tc, self.shift = tc, float(config.flow_shift)
    self.x0 = torch.from_numpy(np.ascontiguousarray(batch["latent"].transpose(0, 3, 1, 2)))
    self.caption = torch.from_numpy(batch["caption"])
    self.mask = torch.from_numpy(batch["caption_mask"].astype(np.float32))
    self.null = torch.from_numpy(null)
    self.gen = torch.Generator().manual_seed(0)
    self.last = {}

  def run_step(self):
    torch, tc = self.torch, self.tc
    clock = time.perf_counter
    t0 = clock()
    b = self.x0.shape[0]
    noise = torch.randn(self.x0.shape, generator=self.gen)
    u = torch.sigmoid(torch.randn((b,), generator=self.gen))  # logit-normal
    sigma = self.shift * u / (1 + (self.shift - 1) * u)
    s = sigma.view(b, 1, 1, 1)
    x_t = (1 - s) * self.x0 + s * noise
    drop = (torch.rand((b,), generator=self.gen) < tc.cfg_dropout).view(b, 1, 1)
    caption = torch.where(drop, self.null.expand_as(self.caption), self.caption)
    pred = self.model(
      hidden_states=x_t,
      encoder_hidden_states=caption,
      timestep=sigma * 1000,
      encoder_attention_mask=self.mask,
      return_dict=False,
    )[0]
    loss = torch.mean((pred - (noise - self.x0)) ** 2)
    t1 = clock()
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    t2 = clock()
    if tc.grad_clip and tc.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(self.params, tc.grad_clip)
    self.opt.step()
    t3 = clock()
    with torch.no_grad():
      torch._foreach_lerp_(self.ema, self.params, 1 - tc.ema_decay)
    t4 = clock()
    self.last = {
      "forward": t1 - t0,
      "backward": t2 - t1,
      "clip+optimizer": t3 - t2,
      "ema": t4 - t3,
    }
    return float(loss.detach())


# ----------------------------------------------------------------------------- checks


def prediction_parity(ours: Ours, theirs: Theirs, geo: Geometry, seed: int = 1) -> float:
  """Both models' velocity on the same x_t, t, caption and mask (same weights): the two
  sides train the same function. Returns max |ours - theirs| / max |theirs|."""
  torch = theirs.torch
  rng = np.random.default_rng(seed)
  x_t = rng.standard_normal(ours.batch["latent"].shape).astype(np.float32)
  t = rng.uniform(100, 900, (geo.batch,)).astype(np.float32)
  cap, mask = np.array(ours.batch["caption"]), np.array(ours.batch["caption_mask"])
  pred = dit.SanaDiT(ours.cfg).apply({"params": ours.state.params}, x_t, t, cap, mask)
  with torch.no_grad():
    tp = theirs.model(
      hidden_states=torch.from_numpy(np.ascontiguousarray(x_t.transpose(0, 3, 1, 2))),
      encoder_hidden_states=torch.from_numpy(cap),
      timestep=torch.from_numpy(t),
      encoder_attention_mask=torch.from_numpy(mask.astype(np.float32)),
      return_dict=False,
    )[0]
  ref = tp.numpy().transpose(0, 2, 3, 1)
  return float(np.max(np.abs(np.asarray(pred) - ref)) / np.max(np.abs(ref)))


# ----------------------------------------------------------------------------- driver


def median_ms(ts) -> float:
  return 1e3 * statistics.median(ts)


# Seconds of idle before each timed run, so that no step starts while the other side's
# worker threads still spin after theirs. An order effect remained: the variant listed
# first (the one that runs right after torch's step) measured 5-27% slower than the same
# code listed second (2026-12-02, 0.6B, CAME-8bit, both orders). So by default (--lead 1)
# every timed step follows an untimed step of its own side, as steps follow each other in
# a training loop (whether torch's step is slowed likewise was not settled: docs/train_speed.md).
SETTLE_S = 0.25


def settle() -> None:
  time.sleep(SETTLE_S)


def alternate_medians(fns: dict, runs: int) -> dict:
  """Each zero-argument callable of `fns` timed `runs` times, alternating (one of each per
  round, so load hits all alike): {name: median seconds}."""
  times = {k: [] for k in fns}
  for _ in range(runs):
    for k, fn in fns.items():
      settle()
      t0 = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def bench(
  geo: Geometry, optimizers, variants, runs: int, depth, breakdown: bool, out: list, lead: int = 1
):
  from sana_jax.weights import dit as dit_weights
  from tests.dit_reference import diffusers_model

  config, cfg = build_config(geo, optimizers[0], depth)
  print(f"\n== {geo.describe(cfg)}; load {load()}", flush=True)
  t0 = time.perf_counter()
  model = diffusers_model(cfg, relative_scale=0.2)
  sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  params = jax.device_put(dit_weights.diffusers_to_params(sd, cfg), jax.devices()[0])
  del sd
  n_ours = dit.count_params(params)
  n_theirs = sum(p.numel() for p in model.parameters())
  print(
    f"built + converted in {time.perf_counter() - t0:.1f} s; parameters ours {n_ours:,}, "
    f"diffusers {n_theirs:,}",
    flush=True,
  )
  if n_ours != n_theirs:
    raise RuntimeError(f"parameter counts differ: ours {n_ours}, diffusers {n_theirs}")
  batch = make_batch(geo, cfg)
  null = np.zeros((geo.caption_len, cfg.caption_channels), np.float32)
  rows = []
  init_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
  for name in optimizers:
    config, _ = build_config(geo, name, depth)
    model.load_state_dict(init_sd)
    ours = {v: Ours(config, cfg, params, batch, null, v) for v in variants}
    theirs = Theirs(config, cfg, model, batch, null)
    err = None
    if name == optimizers[0]:
      err = prediction_parity(ours[variants[0]], theirs, geo)
      print(f"prediction parity (same weights and inputs): max rel err {err:.2e}")
    for o in ours.values():
      o.compile()
      o.run_step()  # warm-up
    theirs.run_step()
    ts = {v: [] for v in variants}
    ts_theirs, parts_theirs = [], {}
    for _ in range(runs):
      for v, o in ours.items():
        settle()
        for _ in range(lead):
          o.run_step()
        s = time.perf_counter()
        m = o.run_step()
        ts[v].append(time.perf_counter() - s)
        if not bool(m["finite"]):
          raise RuntimeError(f"{name} ({v}): our step was not finite")
      settle()
      for _ in range(lead):
        theirs.run_step()
      s = time.perf_counter()
      theirs.run_step()
      ts_theirs.append(time.perf_counter() - s)
      for k, t in theirs.last.items():
        parts_theirs.setdefault(k, []).append(t)
    theirs_ms = median_ms(ts_theirs)
    theirs_parts = {k: median_ms(t) for k, t in parts_theirs.items()}
    for v, o in ours.items():
      row = {
        "geometry": geo.name,
        "optimizer": name,
        "variant": v,
        "params": n_ours,
        "compile_s": o.compile_s,
        "ours_ms": median_ms(ts[v]),
        "theirs_ms": theirs_ms,
        "theirs_parts": theirs_parts,
        "pred_rel_err": err,
      }
      if breakdown:
        parts = o.parts()
        for fn in parts.values():
          fn()  # compile
        med = {k: 1e3 * t for k, t in alternate_medians(parts, runs).items()}
        med["backward"] = med.pop("forward+backward") - med["forward"]
        row["ours_parts"] = med
        del parts
      row["load"] = load()
      print(
        f"{name} ({v}): ours {row['ours_ms']:.0f} ms, torch {theirs_ms:.0f} ms, ratio "
        f"{row['ours_ms'] / theirs_ms:.2f}; compile {o.compile_s:.1f} s; load {row['load']}",
        flush=True,
      )
      rows.append(row)
      out.append(row)
    del ours, theirs
  del model
  return rows


def print_table(rows: list[dict]) -> None:
  print("\n| geometry | optimizer | ours | ours ms | torch ms | ours / torch | compile s |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    torch_name = "AdamW" if r["optimizer"] == "adamw" else "CAME (came-pytorch)"
    print(
      f"| {r['geometry']} | {r['optimizer']} vs {torch_name} | {r['variant']} | "
      f"{r['ours_ms']:.0f} | {r['theirs_ms']:.0f} | **{r['ours_ms'] / r['theirs_ms']:.2f}** | "
      f"{r['compile_s']:.1f} |"
    )
  if any("ours_parts" in r for r in rows):
    print(
      "\nbreakdown, ms (ours: each part jitted alone, update = norm + guard + optimizer + EMA"
      " as the step does it; torch: inside its step)"
    )
    print(
      "| geometry | optimizer | ours | fwd | bwd | update | (opt alone) | (EMA alone) "
      "| torch fwd | torch bwd | torch clip+opt | torch EMA |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
      o, t = r.get("ours_parts"), r["theirs_parts"]
      if o is None:
        continue
      print(
        f"| {r['geometry']} | {r['optimizer']} | {r['variant']} | {o['forward']:.0f} | "
        f"{o['backward']:.0f} | {o['update']:.0f} | {o['optimizer']:.0f} | {o['ema']:.1f} | "
        f"{t['forward']:.0f} | {t['backward']:.0f} | {t['clip+optimizer']:.0f} | "
        f"{t['ema']:.1f} |"
      )


def compile_times(specs: list[str], repeats: int) -> list[dict]:
  """Lower + compile time of the project's whole train step from abstract inputs (nothing is
  allocated, so full widths are cheap). specs: "config[:depth[:batch[:latent]]]" with a
  module of configs/ and the config's own optimizer; caption length = the config's. Compiles
  alternate between the specs, `repeats` times each; a fresh jit every time (no cache)."""
  import importlib

  import flax.linen as nn

  jax.config.update("jax_enable_compilation_cache", False)
  cases = []
  for spec in specs:
    name, *rest = spec.split(":")
    config = importlib.import_module(f"sana_jax.configs.{name}").get_config()
    cfg = DiTConfig.coerce(config.model)
    depth = int(rest[0]) if rest else cfg.depth
    batch = int(rest[1]) if len(rest) > 1 else config.train.global_batch
    latent = int(rest[2]) if len(rest) > 2 else config.image_size // config.vae_downsample
    config.model = cfg.replace(depth=depth).to_dict()
    config.train.global_batch = batch
    cases.append((spec, config, batch, latent))
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  times = {spec: [] for spec, *_ in cases}
  for _ in range(repeats):
    for spec, config, b, n in cases:
      cfg = DiTConfig.coerce(config.model)
      tx = optim_lib.make_optimizer(config.train)
      sh = state_lib.state_shardings(config.model, tx, mesh)
      abstract = state_lib.abstract_state(config.model, tx)
      ly = cfg.caption_len
      sds = jax.ShapeDtypeStruct
      batch = {
        "latent": sds((b, n, n, cfg.in_channels), jnp.float32),
        "caption": sds((b, ly, cfg.caption_channels), jnp.float32),
        "caption_mask": sds((b, ly), jnp.int32),
      }
      null = sds((ly, cfg.caption_channels), jnp.float32)
      step = step_lib.jit_train_step(config, tx, mesh, sh)
      t0 = time.perf_counter()
      with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
        step.jitted.lower(abstract, batch, null).compile()
      times[spec].append(time.perf_counter() - t0)
      print(
        f"compiled {spec} ({config.train.optimizer}, batch {b}, {n}x{n}) in "
        f"{times[spec][-1]:.1f} s; load {load()}",
        flush=True,
      )
  rows = [{"spec": k, "compile_s": statistics.median(v)} for k, v in times.items()]
  base = rows[0]["compile_s"]
  print("\n| step | compile s (median) | / first |")
  print("|---|---|---|")
  for r in rows:
    print(f"| {r['spec']} | {r['compile_s']:.1f} | {r['compile_s'] / base:.2f} |")
  return rows


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument(
    "--geometries",
    default="shapes,0.6b",
    help=f"comma-separated, of {sorted(GEOMETRIES)} (default shapes,0.6b)",
  )
  ap.add_argument(
    "--optimizers", default=",".join(OPTIMIZERS), help="comma-separated (default all three)"
  )
  ap.add_argument("--runs", type=int, default=5, help="timed runs of each side (default 5)")
  ap.add_argument(
    "--depth", type=int, default=None, help="blocks (default: 8 for 0.6b, 4 for 1.6b)"
  )
  ap.add_argument(
    "--threads", type=int, default=None, help="torch threads (default: os.cpu_count())"
  )
  ap.add_argument(
    "--variants",
    default="project",
    help=f"our step's variants, comma-separated, of {sorted(VARIANTS)} (default project)",
  )
  ap.add_argument(
    "--compile",
    default="",
    help="only time compiles of these steps, comma-separated config[:depth[:batch[:latent]]]"
    " (e.g. sana15_1600m:20,sana15_1600m:60); default: none (the comparison)",
  )
  ap.add_argument(
    "--lead",
    type=int,
    default=1,
    help="untimed steps of the same side right before each timed one (default 1: a timed step"
    " follows a step of its own program, as in a training loop; 0: it follows the other "
    "side's step, which slowed our step by up to ~25%% in one session)",
  )
  ap.add_argument("--no-breakdown", action="store_true", help="skip the per-part timings")
  args = ap.parse_args(argv)
  geos = args.geometries.split(",")
  bad = [g for g in geos if g not in GEOMETRIES]
  opts = args.optimizers.split(",")
  bad += [o for o in opts if o not in OPTIMIZERS]
  variants = args.variants.split(",")
  bad += [v for v in variants if v not in VARIANTS]
  if bad or args.runs < 1 or args.lead < 0:
    ap.error(f"unknown geometry/optimizer/variant {bad}, or --runs < 1, or --lead < 0")
  return args, geos, opts, variants


def main(argv=None) -> list[dict]:
  import torch

  args, geos, opts, variants = parse_args(argv)
  threads = args.threads or os.cpu_count()
  torch.set_num_threads(threads)
  print(
    f"jax {jax.__version__} ({jax.devices()[0].platform}, {os.cpu_count()} cores), torch "
    f"{torch.__version__} ({torch.get_num_threads()} threads); {args.runs} alternating runs, "
    f"each after {args.lead} untimed step(s) of its own side; "
    f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}",
    flush=True,
  )
  if args.compile:
    return compile_times(args.compile.split(","), args.runs)
  rows = []
  for g in geos:
    bench(
      GEOMETRIES[g], opts, variants, args.runs, args.depth, not args.no_breakdown, rows, args.lead
    )
  print_table(rows)
  return rows


if __name__ == "__main__":
  main()
