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
optimizer = tx.update + apply_updates; EMA; guard = gradient norm + isfinite + the `where`
over params, optimizer state and EMA), theirs inside its step (perf_counter around each
phase; torch on CPU is synchronous). Compile = lower + compile of the whole step.

  python benchmarks/bench_train_step.py                                   # shapes + 0.6B
  python benchmarks/bench_train_step.py --geometries shapes --optimizers adamw --runs 7
  python benchmarks/bench_train_step.py --geometries 1.6b --depth 4       # 1.6B width
  python benchmarks/bench_train_step.py --geometries tiny --runs 1        # seconds (the test)

Run the 0.6B / 1.6B geometries under `flock /tmp/heavy.lock` on the shared machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from sana_jax import parallel  # noqa: E402
from sana_jax.models import dit  # noqa: E402
from sana_jax.models.dit_config import DiTConfig  # noqa: E402
from sana_jax.train import optimizer as optim_lib  # noqa: E402
from sana_jax.train import state as state_lib  # noqa: E402
from sana_jax.train import step as step_lib  # noqa: E402

OPTIMIZERS = ("adamw", "came", "came_8bit")


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

  config = importlib.import_module(f"configs.{geo.config}").get_config()
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

  def __init__(self, config, cfg: DiTConfig, params: dict, batch: dict, null: np.ndarray):
    self.config, self.cfg = config, cfg
    self.tx = optim_lib.make_optimizer(config.train)
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

    t0 = time.perf_counter()
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
      self.compiled = self.step.jitted.lower(self.state, self.batch, self.null).compile()
    self.compile_s = time.perf_counter() - t0
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
      draws = step_lib.flow.timestep_draws(k_t, (b,), tc.timestep_sampler)
      return noise, draws, jax.random.uniform(k_drop, (b,))

    def loss(params, batch, null, step):
      noise, draws, drop_u = inputs(step)
      return step_lib._loss_fn(params, model, batch, noise, draws, drop_u, null, config)

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

    @jax.jit
    def guard(loss, grads, new, old):
      finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
      return jax.tree_util.tree_map(lambda a, c: jnp.where(finite, a, c), new, old)

    trio = (state.params, state.opt_state, state.ema_params)
    lo = jnp.float32(0.5)
    bl = jax.block_until_ready
    return {
      "forward": lambda: bl(fwd(state.params, self.batch, self.null, state.step)),
      "forward+backward": lambda: bl(fwd_bwd(state.params, self.batch, self.null, state.step)),
      "optimizer": lambda: bl(opt(state.params, state.opt_state, grads)),
      "ema": lambda: bl(ema(state.ema_params, state.params)),
      "guard": lambda: bl(guard(lo, grads, trio, trio)),
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


def loss_parity(ours: Ours, theirs: Theirs, geo: Geometry, seed: int = 1) -> float:
  """Both models' flow-matching loss on the same x_t, t, caption, mask, target (same weights).
  Returns |ours - theirs| / |theirs|."""
  torch = theirs.torch
  rng = np.random.default_rng(seed)
  b = geo.batch
  x0 = np.asarray(ours.batch["latent"])
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  sigma = rng.uniform(0.1, 0.9, (b,)).astype(np.float32)
  x_t = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
  target = noise - x0
  cap, mask = np.array(ours.batch["caption"]), np.array(ours.batch["caption_mask"])
  pred = dit.SanaDiT(ours.cfg).apply({"params": ours.state.params}, x_t, sigma * 1000, cap, mask)
  ours_loss = float(jnp.mean((pred - target) ** 2))
  with torch.no_grad():
    tp = theirs.model(
      hidden_states=torch.from_numpy(np.ascontiguousarray(x_t.transpose(0, 3, 1, 2))),
      encoder_hidden_states=torch.from_numpy(cap),
      timestep=torch.from_numpy(sigma * 1000),
      encoder_attention_mask=torch.from_numpy(mask.astype(np.float32)),
      return_dict=False,
    )[0]
  theirs_loss = float(torch.mean((tp.permute(0, 2, 3, 1) - torch.from_numpy(target)) ** 2))
  return abs(ours_loss - theirs_loss) / abs(theirs_loss)


# ----------------------------------------------------------------------------- driver


def median_ms(ts) -> float:
  return 1e3 * statistics.median(ts)


def bench(geo: Geometry, optimizers, runs: int, depth, breakdown: bool, out: list) -> list[dict]:
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
    ours = Ours(config, cfg, params, batch, null)
    theirs = Theirs(config, cfg, model, batch, null)
    row = {"geometry": geo.name, "optimizer": name, "params": n_ours}
    if name == optimizers[0]:
      row["loss_rel_err"] = loss_parity(ours, theirs, geo)
      print(f"loss parity (same weights and inputs): rel err {row['loss_rel_err']:.2e}")
    ours.compile()
    row["compile_s"] = ours.compile_s
    ours.run_step()  # warm-up
    theirs.run_step()
    ts_ours, ts_theirs, parts_theirs = [], [], {}
    for _ in range(runs):
      s = time.perf_counter()
      m = ours.run_step()
      ts_ours.append(time.perf_counter() - s)
      s = time.perf_counter()
      theirs.run_step()
      ts_theirs.append(time.perf_counter() - s)
      for k, v in theirs.last.items():
        parts_theirs.setdefault(k, []).append(v)
    if not bool(m["finite"]):
      raise RuntimeError(f"{name}: our step was not finite")
    row["ours_ms"], row["theirs_ms"] = median_ms(ts_ours), median_ms(ts_theirs)
    row["theirs_parts"] = {k: median_ms(v) for k, v in parts_theirs.items()}
    if breakdown:
      parts = ours.parts()
      for fn in parts.values():
        fn()  # compile
      times = {k: [] for k in parts}
      for _ in range(runs):
        for k, fn in parts.items():
          s = time.perf_counter()
          fn()
          times[k].append(time.perf_counter() - s)
      med = {k: median_ms(v) for k, v in times.items()}
      med["backward"] = med.pop("forward+backward") - med["forward"]
      row["ours_parts"] = med
    row["load"] = load()
    print(
      f"{name}: ours {row['ours_ms']:.0f} ms, torch {row['theirs_ms']:.0f} ms, ratio "
      f"{row['ours_ms'] / row['theirs_ms']:.2f}; compile {row['compile_s']:.1f} s; load "
      f"{row['load']}",
      flush=True,
    )
    rows.append(row)
    out.append(row)
    del ours, theirs
  del model
  return rows


def print_table(rows: list[dict]) -> None:
  print("\n| geometry | optimizer | ours ms | torch ms | ours / torch | compile s |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    torch_name = "AdamW" if r["optimizer"] == "adamw" else "CAME (came-pytorch)"
    print(
      f"| {r['geometry']} | {r['optimizer']} vs {torch_name} | {r['ours_ms']:.0f} | "
      f"{r['theirs_ms']:.0f} | **{r['ours_ms'] / r['theirs_ms']:.2f}** | {r['compile_s']:.1f} |"
    )
  if any("ours_parts" in r for r in rows):
    print("\nbreakdown, ms (ours: each part jitted alone; torch: inside its step)")
    print(
      "| geometry | optimizer | ours fwd | ours bwd | ours opt | ours EMA | ours guard "
      "| torch fwd | torch bwd | torch clip+opt | torch EMA |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
      o, t = r.get("ours_parts"), r["theirs_parts"]
      if o is None:
        continue
      print(
        f"| {r['geometry']} | {r['optimizer']} | {o['forward']:.0f} | {o['backward']:.0f} | "
        f"{o['optimizer']:.0f} | {o['ema']:.1f} | {o['guard']:.1f} | {t['forward']:.0f} | "
        f"{t['backward']:.0f} | {t['clip+optimizer']:.0f} | {t['ema']:.1f} |"
      )


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
  ap.add_argument("--no-breakdown", action="store_true", help="skip the per-part timings")
  args = ap.parse_args(argv)
  geos = args.geometries.split(",")
  bad = [g for g in geos if g not in GEOMETRIES]
  opts = args.optimizers.split(",")
  bad += [o for o in opts if o not in OPTIMIZERS]
  if bad or args.runs < 1:
    ap.error(f"unknown geometry/optimizer {bad} or --runs < 1")
  return args, geos, opts


def main(argv=None) -> list[dict]:
  import torch

  args, geos, opts = parse_args(argv)
  threads = args.threads or os.cpu_count()
  torch.set_num_threads(threads)
  print(
    f"jax {jax.__version__} ({jax.devices()[0].platform}, {os.cpu_count()} cores), torch "
    f"{torch.__version__} ({torch.get_num_threads()} threads); {args.runs} alternating runs",
    flush=True,
  )
  rows = []
  for g in geos:
    bench(GEOMETRIES[g], opts, args.runs, args.depth, not args.no_breakdown, rows)
  print_table(rows)
  return rows


if __name__ == "__main__":
  main()
