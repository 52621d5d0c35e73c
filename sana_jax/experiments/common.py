"""What the four claim experiments share: the recipe, the data, the trainer, the scoring.

* Recipe: configs/shapes.py (the embedded model's), depth and optimizer varied per run.
* Data: ShapesEval training scenes made as `python -m sana_jax.data.preprocess --source
  shapes` makes them (sana_jax.data.preprocess.shapes_source / encode_source with the
  shipped model folder's text encoder and its pixels autoencoder), cached as one .npz in
  the output folder (`<out>/cache/`), so every run of a claim trains on the same examples.
* Training: the project's jitted train step (`sana_jax.train.step.jit_train_step`, on one
  device; the loss, CFG dropout, clipping and optimizer of the recipe) fed batches in a
  fixed order (a permutation per epoch from the seed); no checkpoints, no EMA (the shipped
  weights are raw too).
* Scoring: `sana_jax.eval.score_model` (prompt selection, generation with seeds
  1000 * prompt + k, best-of-N tournament) and `sana_jax.eval.shapes` (GenEval's rules);
  ShapesEval validation prompts to choose, the evaluation prompts to report.
* FLOPs: `sana_jax.train.metrics` (train_step_flops with remat "none" = model FLOPs;
  sampling = steps x 2 (CFG) x dit_forward_flops per image).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time
import uuid

import numpy as np

from sana_jax.cli import CommandParser, UsageError
from sana_jax.embedded import EMBEDDED_MODEL

SHIPPED = EMBEDDED_MODEL
DATA_SEED = 0  # the recipe's config.dataset.seed (shapes.example seed)
CALIBRATION_SEED = 1  # held-out scenes for block importance


# ----------------------------------------------------------------------------- recipe


def recipe():
  """configs/shapes.py's config (ml_collections)."""
  from sana_jax.shapes_eval.model import shapes_config

  return shapes_config()


def model_config(depth: int = 6):
  """The recipe's DiTConfig at `depth` blocks."""
  from sana_jax.models.dit_config import DiTConfig

  return DiTConfig.coerce(recipe().model).replace(depth=int(depth))


def shipped_params():
  """(params fp32, DiTConfig) of the shipped 6-block transformer."""
  import jax

  from sana_jax.weights import dit as dit_weights

  params, cfg, _ = dit_weights.load_flax(SHIPPED / "transformer")
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), params), cfg


def init_params(cfg, seed: int):
  import jax

  from sana_jax.models import dit

  return jax.device_get(dit.init_params(cfg, jax.random.key(seed)))


# ------------------------------------------------------------------------------- data


def _encoders():
  from sana_jax.data import preprocess

  settings, _, _ = preprocess.read_model_settings(SHIPPED)
  return preprocess._encoders(SHIPPED, settings), settings  # pylint: disable=protected-access


def make_data(cache: pathlib.Path, num: int, seed: int = DATA_SEED) -> dict:
  """ShapesEval scenes 0..num-1 of `seed` (32 px), encoded as preprocess does:
  {"latent" (N, 32, 32, 3) float32 in [-1, 1] (pixels autoencoder), "caption" (N, 24, 64),
  "caption_mask" (N, 24), "null_caption" (24, 64)}. Cached as cache/shapes_<seed>_<num>.npz
  (written whole); a cached file is reused."""
  cache = pathlib.Path(cache)
  path = cache / f"shapes_{seed}_{num}.npz"
  if path.is_file():
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  from sana_jax.data import preprocess

  (enc, ae), settings = _encoders()
  source = preprocess.shapes_source(range(num), settings["image_size"], seed)
  rows = list(preprocess.encode_source(source, settings, enc, ae, batch=min(64, num)))
  null, _ = enc.encode_null(1)
  data = {
    "latent": np.stack([r["latent"] for r in rows]).astype(np.float32),
    "caption": np.stack([r["caption"] for r in rows]).astype(np.float32),
    "caption_mask": np.stack([r["caption_mask"] for r in rows]).astype(np.int32),
    "null_caption": np.asarray(null[0], np.float32),
  }
  cache.mkdir(parents=True, exist_ok=True)
  tmp = cache / f".{path.name}.new-{uuid.uuid4().hex[:8]}.npz"
  np.savez(tmp, **data)
  os.replace(tmp, path)
  return data


# ---------------------------------------------------------------------------- training


@dataclasses.dataclass
class Run:
  """One training run's result."""

  params: dict
  cfg: object
  losses: list  # [(step, loss)] every log_every steps (mean over the interval)
  step_flops: float  # model FLOPs of one step (remat none)
  seconds: float  # wall, compile and callbacks included
  cpu_seconds: float  # process CPU of the steps alone (compile excluded), for estimates
  opt_state_bytes: int


def step_flops(cfg, batch: int) -> float:
  from sana_jax.train import metrics

  r = recipe()
  return metrics.train_step_flops(
    cfg, r.image_size, r.image_size, r.model.caption_len, batch, remat="none"
  )


def sample_flops(cfg, images: int = 1) -> float:
  """DiT FLOPs of sampling `images` images with the recipe's sampler (steps forwards, each
  on the conditional and the null caption: CFG)."""
  from sana_jax.train import metrics

  r = recipe()
  fwd = metrics.dit_forward_flops(cfg, r.image_size, r.image_size, r.model.caption_len)
  return images * r.sampler.steps * 2 * fwd


def make_tx(optimizer: str, tc):
  """The recipe's optimizer chain for one of OPTIMIZERS (adamw_bf16mu: optax AdamW with a
  bf16 first moment, mu_dtype)."""
  import jax.numpy as jnp
  import optax

  from sana_jax.train import optimizer as optim_lib

  if optimizer != "adamw_bf16mu":
    return optim_lib.make_optimizer(tc)
  opt = optax.adamw(
    optim_lib.learning_rate(tc), weight_decay=tc.weight_decay, mu_dtype=jnp.bfloat16
  )
  return optim_lib.clipped(tc, opt)


OPTIMIZERS = ("came_8bit", "came", "adamw", "adamw_bf16mu")
_STEPS: dict = {}
STATS = {"generate_cpu_s": 0.0, "images": 0}  # sampling cost of this process, for estimates
_LOSS_FNS: dict = {}


def train(
  params,
  cfg,
  data: dict,
  *,
  steps: int,
  batch: int,
  optimizer: str = "came_8bit",
  lr: float | None = None,
  warmup: int | None = None,
  seed: int = 0,
  log_every: int = 10,
  callback=None,
  skip: int = 0,
  desc: str = "train",
) -> Run:
  """Trains `params` (a DiT tree of config `cfg`) for `steps` steps of `batch` examples of
  `data` with the recipe's step (flow matching, CFG dropout, grad clip, warm-up) and
  `optimizer`; batches in a fixed order (a permutation per epoch from `seed`).
  callback(step, params) is called every log_every steps (e.g. to score). skip: start the
  data order at that step (a run continuing another's). desc: the progress bar's label
  (stderr)."""
  import jax
  import tqdm
  import jax.numpy as jnp

  from sana_jax import parallel
  from sana_jax.train import state as state_lib
  from sana_jax.train import step as step_lib

  config = recipe()
  config.model = ml_dict(cfg)
  tc = config.train
  tc.update(global_batch=batch, steps=steps, seed=seed, ema="off")
  tc.optimizer = optimizer if optimizer != "adamw_bf16mu" else "adamw"
  if lr is not None:
    tc.lr = lr
  if warmup is not None:
    tc.warmup_steps = warmup
  key = (cfg, optimizer, batch, float(tc.lr), int(tc.warmup_steps), seed)
  if key not in _STEPS:  # one compiled step per setting in a process
    tx = make_tx(optimizer, tc)
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    sh = state_lib.state_shardings(cfg, tx, mesh, tc)
    create = jax.jit(lambda p: state_lib.create(p, tx, tc), out_shardings=sh)
    _STEPS[key] = (create, step_lib.jit_train_step(config, tx, mesh, sh))
  create, run = _STEPS[key]
  state = create(jax.tree_util.tree_map(jnp.asarray, params))
  opt_bytes = sum(int(np.asarray(x).nbytes) for x in jax.tree_util.tree_leaves(state.opt_state))
  null = jnp.asarray(data["null_caption"])
  n = data["latent"].shape[0]
  rng = np.random.default_rng(seed)
  epochs = -(-(steps + skip) * batch // n) + 1
  order = np.concatenate([rng.permutation(n) for _ in range(epochs)])[skip * batch :]
  losses, acc, t0, cpu = [], [], time.perf_counter(), 0.0
  dev = jax.devices()[0]
  for s in tqdm.trange(steps, desc=desc, unit="step", leave=False):
    idx = order[s * batch : (s + 1) * batch]
    b = {k: jax.device_put(data[k][idx], dev) for k in ("latent", "caption", "caption_mask")}
    c0 = time.process_time()
    state, m = run(state, b, null)
    acc.append(m["loss"])
    if s > 0:  # step 0 compiles (or loads) the program
      jax.block_until_ready(m["loss"])
      cpu += time.process_time() - c0
    if (s + 1) % log_every == 0 or s + 1 == steps:
      losses.append((s + 1, float(np.mean(jax.device_get(acc)))))
      acc = []
      if callback is not None:
        callback(s + 1, jax.device_get(state.params))
  params = jax.device_get(state.params)
  return Run(
    params,
    cfg,
    losses,
    step_flops(cfg, batch),
    time.perf_counter() - t0,
    cpu / max(steps - 1, 1) * steps,
    opt_bytes,
  )


def ml_dict(cfg):
  import ml_collections

  d = dataclasses.asdict(cfg)
  return ml_collections.ConfigDict(
    {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
  )


def fixed_loss(params, cfg, data: dict, draws: int = 4, batch: int = 64) -> float:
  """Flow-matching loss on `data` (no CFG dropout) at fixed noise/timestep draws (seeds
  100 + i, the recipe's logit-normal timesteps): the same numbers for every model."""
  import jax
  import jax.numpy as jnp

  from sana_jax.diffusion import flow
  from sana_jax.models import dit

  r = recipe()
  model = dit.SanaDiT(cfg)

  def loss(params, x0, cap, mask, key):
    k1, k2 = jax.random.split(key)
    noise = jax.random.normal(k1, x0.shape)
    ti = flow.training_inputs(
      x0,
      noise,
      flow.timestep_draws(k2, (x0.shape[0],), r.train.timestep_sampler),
      r.flow_shift,
      r.train.timestep_sampler,
    )
    pred = model.apply({"params": params}, ti.x_t, ti.model_time, cap, mask)
    return flow.flow_loss(pred, x0, noise)

  loss = _LOSS_FNS.setdefault(cfg, jax.jit(loss))
  n = data["latent"].shape[0] // batch * batch or data["latent"].shape[0]
  batch = min(batch, n)
  vals = []
  for i in range(draws):
    for s in range(0, n, batch):
      sl = slice(s, s + batch)
      key = jax.random.fold_in(jax.random.key(100 + i), s)
      vals.append(
        float(
          loss(
            params,
            jnp.asarray(data["latent"][sl]),
            jnp.asarray(data["caption"][sl]),
            jnp.asarray(data["caption_mask"][sl]),
            key,
          )
        )
      )
  return float(np.mean(vals))


# ----------------------------------------------------------------------------- scoring


def prompts(validation: bool, per_category: int) -> list[dict]:
  """ShapesEval prompts via score_model.select_prompts: `per_category` of each of the six
  categories, validation (for choosing) or evaluation (the 300, 50 per category)."""
  from sana_jax.shapes_eval import score as score_model

  ns = argparse.Namespace(validation=validation, per_category=per_category, num_prompts=None)
  return score_model.select_prompts(ns)


_BUNDLE = {}


def pipeline(params, cfg, steps: int | None = None):
  """A SanaPipeline with the shipped folder's text encoder, sampler settings and pixels
  autoencoder, and the given transformer."""
  import jax.numpy as jnp

  import jax

  from sana_jax import bundle as bundle_lib
  from sana_jax.pipeline import SanaPipeline

  if "b" not in _BUNDLE:
    _BUNDLE["b"] = bundle_lib.load(SHIPPED)
  b = dataclasses.replace(_BUNDLE["b"], dit_config=cfg, dit_params=params)
  pipe = SanaPipeline(b)
  pipe.params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
  return pipe


def generate(params, cfg, specs, n: int = 1, sample_steps: int | None = None, batch: int = 128):
  """(P, n, 32, 32, 3) uint8 via score_model.generate_all (seeds 1000 * p + k)."""
  from sana_jax.shapes_eval import score as score_model
  from sana_jax.pipeline import SamplingOptions

  pipe = pipeline(params, cfg)
  c0 = time.process_time()
  out = score_model.generate_all(pipe, specs, n, batch, SamplingOptions(steps=sample_steps))
  STATS["generate_cpu_s"] += time.process_time() - c0
  STATS["images"] += len(specs) * n
  return out


def score(params, cfg, specs, sample_steps: int | None = None) -> dict:
  """ShapesEval report (GenEval's: per-category accuracy, overall = mean over categories) of
  one image per prompt (seed 1000 * p)."""
  from sana_jax.shapes_eval import evaluator as evaluator

  images = generate(params, cfg, specs, 1, sample_steps)
  return evaluator.report([(s, evaluator.evaluate(im[0], s)) for s, im in zip(specs, images)])


def best_of_n(params, cfg, specs, ns, sample_steps: int | None = None) -> dict:
  """{N: report} of best-of-N with the ShapesEval judge (score_model's tournament)."""
  from sana_jax.shapes_eval import score as score_model
  from sana_jax.shapes_eval import evaluator as evaluator
  from sana_jax.scaling.judges import ShapesJudge

  images = generate(params, cfg, specs, max(ns), sample_steps)
  verdicts = []
  for spec, ims in zip(specs, images):
    vs = ShapesJudge(spec).judge(list(ims), spec["prompt"])
    verdicts.append((vs, [evaluator.evaluate(im, spec) for im in ims]))
  return score_model.best_of_n_table(specs, verdicts, sorted(ns))


# --------------------------------------------------------------------------------- CLI


def parser(prog: str, doc: str) -> CommandParser:
  ap = CommandParser(
    prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument(
    "--out",
    type=pathlib.Path,
    required=True,
    help="output folder (required): results.json, table.md, the plot, and cache/ (the "
    "training data, reused by later runs)",
  )
  ap.add_argument(
    "--overwrite",
    action="store_true",
    help="replace existing results in --out once the new ones are complete (default: off, refuse)",
  )
  ap.add_argument(
    "--quick",
    action="store_true",
    help="a seconds-long smoke run (a few steps, a few prompts, 2 sampling steps); its "
    "numbers mean nothing (default: off, the documented size)",
  )
  return ap


def add_shared_options(
  ap,
  *,
  per_category_help: str = "evaluation prompts per category",
  num_train_help: str = "training scenes",
  batch: tuple = (64, "training batch (default: 64, the recipe's)"),
  warmup: tuple | None = (200, "learning-rate warm-up steps (default: 200, the recipe's)"),
) -> None:
  """--per_category, --num_train, --batch and (unless warmup is None) --warmup, as every
  claim command takes them; `batch` and `warmup` are (default, help)."""
  ap.add_argument(
    "--per_category",
    type=positive("--per_category"),
    default=50,
    help=f"{per_category_help}, 1..50 (default: 50, all 300)",
  )
  ap.add_argument(
    "--num_train",
    type=positive("--num_train"),
    default=20000,
    help=f"{num_train_help} (default: 20000)",
  )
  ap.add_argument("--batch", type=positive("--batch"), default=batch[0], help=batch[1])
  if warmup is not None:
    ap.add_argument("--warmup", type=non_negative("--warmup"), default=warmup[0], help=warmup[1])


def check_per_category(args) -> None:
  if args.per_category > 50:
    raise UsageError(
      f"--per_category {args.per_category}: the evaluation set has 50 per category (expected 1..50)"
    )


def positive(name: str):
  def parse(text):
    try:
      v = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not an integer (expected >= 1)") from None
    if v < 1:
      raise argparse.ArgumentTypeError(f"{v} must be >= 1")
    return v

  parse.__name__ = name
  return parse


def non_negative(name: str):
  def parse(text):
    try:
      v = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not an integer (expected >= 0)") from None
    if v < 0:
      raise argparse.ArgumentTypeError(f"{v} must be >= 0")
    return v

  parse.__name__ = name
  return parse


def positive_float(name: str):
  def parse(text):
    try:
      v = float(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not a number (expected > 0)") from None
    if not v > 0 or v == float("inf"):
      raise argparse.ArgumentTypeError(f"{v} must be a finite number > 0")
    return v

  parse.__name__ = name
  return parse


def int_list(name: str, lo: int, hi: int):
  """Comma-separated integers, each in lo..hi, no repeats; returned in the given order."""

  def parse(text):
    try:
      vals = [int(t) for t in text.split(",")]
    except ValueError:
      raise argparse.ArgumentTypeError(
        f"{text!r} is not a comma-separated list of integers ({lo}..{hi})"
      ) from None
    bad = [v for v in vals if not lo <= v <= hi]
    if bad:
      raise argparse.ArgumentTypeError(f"{text!r}: {bad} outside {lo}..{hi}")
    if len(set(vals)) != len(vals):
      raise argparse.ArgumentTypeError(f"{text!r}: repeated values")
    return vals

  parse.__name__ = name
  return parse


def check_out(out: pathlib.Path, names, overwrite: bool) -> pathlib.Path:
  """--out may hold cache/ and other files; the result files `names` are refused unless
  overwrite. The nearest existing folder must be a writable folder."""
  out = pathlib.Path(out)
  if out.exists() and not out.is_dir():
    raise UsageError(f"--out {out} is an existing file; give a folder")
  existing = [n for n in names if (out / n).exists()]
  if existing and not overwrite:
    raise UsageError(
      f"--out {out} already holds {', '.join(existing)}; pass --overwrite to replace "
      "them (once the new results are complete)"
    )
  parent = out.absolute()
  while not parent.exists():
    parent = parent.parent
  if not parent.is_dir() or not os.access(parent, os.W_OK):
    raise UsageError(f"--out {out}: {parent} is not a writable folder")
  return out


def write_outputs(out: pathlib.Path, files: dict) -> None:
  """files: name -> bytes or a callable(path) writing it. All are written to temporary
  siblings first, then renamed into place (an output appears whole or not at all)."""
  out.mkdir(parents=True, exist_ok=True)
  tag = uuid.uuid4().hex[:8]
  tmps = {}
  try:
    for name, content in files.items():
      tmp = out / f".{name}.new-{tag}{pathlib.Path(name).suffix}"
      if callable(content):
        content(tmp)
      else:
        tmp.write_bytes(content if isinstance(content, bytes) else content.encode())
      tmps[name] = tmp
    for name, tmp in tmps.items():
      os.replace(tmp, out / name)
  finally:
    for tmp in tmps.values():
      if tmp.exists():
        tmp.unlink()


def run_main(check, work, argv, ap) -> int:
  """Parses, runs check(args) (UsageError -> `error: ...`, exit 2), then work(args)."""
  args = ap.parse_args(argv)
  try:
    check(args)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from sana_jax.commands import compile_cache

  compile_cache.enable_from_env()
  wall, cpu = time.perf_counter(), time.process_time()
  work(args)
  print(
    f"elapsed: {time.perf_counter() - wall:.0f} s wall, {time.process_time() - cpu:.0f} s "
    f"process CPU; sampling {STATS['images']} images took {STATS['generate_cpu_s']:.0f} s CPU"
  )
  return 0


def markdown_table(header, rows) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    lines.append("| " + " | ".join(str(c) for c in r) + " |")
  return "\n".join(lines)


def dump(obj) -> str:
  return json.dumps(obj, indent=2, default=float)


def pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt
