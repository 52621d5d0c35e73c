"""The training loop: validate, build the mesh, resume, step, log, checkpoint.

`train(config, workdir)` resumes automatically from the newest readable checkpoint in
workdir, on any mesh. `prepare` does every check first and writes nothing: a bad config,
a missing dataset, an init_from folder that does not fit, or a config change that does not
fit the workdir's checkpoint (`IncompatibleCheckpoint`: model geometry, state structure,
data order) stop before anything is created, moved or computed. SIGTERM (preemption)
saves a checkpoint at the next step boundary and stops (train.py then exits 143).

Several processes (`jax.distributed`): one global mesh, each process reading and feeding
the rows of every global batch its devices hold, process 0 alone printing and writing
metrics, every process writing its shards of each checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import tqdm

from sana_jax import host_memory, parallel
from sana_jax.cli import UsageError
from sana_jax.data import input_pipeline
from sana_jax.diffusion import flow
from sana_jax.models.dit_config import DiTConfig
from sana_jax.train import checkpoint
from sana_jax.train import metrics as metrics_lib
from sana_jax.train import optimizer as optim_lib
from sana_jax.train import state as state_lib
from sana_jax.train import step as step_lib

log = logging.getLogger(__name__)

NULL_CAPTION_FILE = "null_caption.npz"


class DatasetNotFound(UsageError, FileNotFoundError):
  pass


class IncompatibleCheckpoint(UsageError):
  """The workdir's checkpoint was written by a config the new one does not fit."""


class NonFiniteError(RuntimeError):
  pass


# Model fields that change how the model is computed, not what it is or what its state
# holds: a resume may change them.
IMPLEMENTATION_FIELDS = tuple(f"model.{k}" for k in DiTConfig.EXECUTION_FIELDS)
# Fields that fix the order of the data the checkpoint's iterator continues.
DATA_ORDER_FIELDS = ("train.global_batch", "train.seed", "data.num_epochs")
# Fields whose state is meaningless under another value even where its shapes match.
STATE_MEANING_FIELDS = ("train.optimizer", "train.lora.alpha", "train.lora.base")
# Fields added since checkpoints were first written whose absence from a saved config means
# a value other than today's default: {field: the value the code that wrote it used}.
# A saved config is compared as if it had these values (config_changes ignores absent
# fields otherwise, and the restore would then fail on shapes instead of naming the field).
ABSENT_MEANS = {"train.came_8bit_state": optim_lib.CAME_8BIT_STATE_ABSENT}


def mesh_devices(config: ml_collections.ConfigDict) -> list:
  """The devices of the mesh: all (of every process), or the first mesh.num_devices."""
  n = config.mesh.num_devices
  devices = jax.devices()
  if n != -1:
    if not isinstance(n, int) or not 1 <= n <= len(devices):
      raise UsageError(
        f"mesh.num_devices={n!r}: allowed are -1 (all) or 1..{len(devices)} "
        f"({len(devices)} devices are available)"
      )
    devices = devices[:n]
  missing = set(range(jax.process_count())) - {d.process_index for d in devices}
  if missing:
    raise UsageError(
      f"mesh.num_devices={n}: the mesh must hold devices of every process, "
      f"processes {sorted(missing)} would have none"
    )
  return devices


def _check_positive(tc, names) -> list[str]:
  return [
    f"train.{k}={tc[k]!r} must be a positive integer"
    for k in names
    if not isinstance(tc[k], int) or isinstance(tc[k], bool) or tc[k] < 1
  ]


def validate(config: ml_collections.ConfigDict) -> dict:
  """Every check that needs no compile; clear errors (UsageError). Returns the dataset's
  shapes."""
  for section in ("model", "train", "data", "mesh"):
    if section not in config:
      raise UsageError(
        f"the config has no {section!r} section (a training config needs "
        "model, train, data and mesh; see configs/tiny.py)"
      )
  try:
    n_devices = len(mesh_devices(config))
    mesh = config.mesh
    data, fsdp, _ = parallel.mesh_shape(n_devices, mesh.data, mesh.fsdp, mesh.tensor)
  except UsageError:
    raise
  except (ValueError, TypeError) as e:
    raise UsageError(f"config.mesh: {e}") from e
  tc = config.train
  bad = _check_positive(
    tc,
    (
      "steps",
      "global_batch",
      "grad_accum",
      "log_every",
      "checkpoint_every",
      "keep_checkpoints",
      "max_consecutive_nonfinite",
    ),
  )
  if not (isinstance(tc.ema_decay, (int, float)) and 0 <= tc.ema_decay <= 1):
    bad.append(f"train.ema_decay={tc.ema_decay!r} must be in [0, 1]")
  bad += state_lib.check_train_settings(tc)
  if not (isinstance(tc.cfg_dropout, (int, float)) and 0 <= tc.cfg_dropout <= 1):
    bad.append(f"train.cfg_dropout={tc.cfg_dropout!r} must be in [0, 1]")
  if not isinstance(tc.lr, (int, float)) or tc.lr < 0:
    bad.append(f"train.lr={tc.lr!r} must be a number >= 0")
  if tc.timestep_sampler not in flow.TIMESTEP_SAMPLERS:
    bad.append(
      f"train.timestep_sampler={tc.timestep_sampler!r} must be one of "
      f"{', '.join(flow.TIMESTEP_SAMPLERS)}"
    )
  if not isinstance(config.data.num_epochs, int) or config.data.num_epochs < 1:
    bad.append(f"data.num_epochs={config.data.num_epochs!r} must be a positive integer")
  if config.data.get("worker_count", 0) < 0:
    bad.append(f"data.worker_count={config.data.worker_count!r} must be >= 0")
  if bad:
    raise UsageError("; ".join(bad))
  if tc.global_batch % (data * fsdp):
    raise UsageError(
      f"train.global_batch={tc.global_batch} is not divisible by the batch "
      f"axes data*fsdp = {data}*{fsdp} = {data * fsdp}"
    )
  if tc.global_batch % (tc.grad_accum * data * fsdp):
    raise UsageError(
      f"train.global_batch={tc.global_batch} must split into grad_accum="
      f"{tc.grad_accum} micro-batches divisible by data*fsdp={data * fsdp}"
    )
  try:
    optim_lib.make_optimizer(tc)  # validates the optimizer name
    m = DiTConfig.coerce(config.model)
    m = state_lib.model_config(config)
  except (ValueError, TypeError) as e:
    raise UsageError(str(e)) from e
  if not config.data.dir:
    raise UsageError(
      "data.dir is not set (a dataset written by python -m "
      "sana_jax.data.preprocess; --config.data.dir=PATH)"
    )
  if not pathlib.Path(config.data.dir).exists():
    raise DatasetNotFound(f"dataset not found: data.dir={config.data.dir}")
  try:
    shapes = input_pipeline.dataset_shapes(config.data.dir)
  except Exception as e:  # noqa: BLE001 - anything unreadable there is a bad data.dir
    raise UsageError(
      f"data.dir={config.data.dir} is not a readable latent dataset "
      f"({type(e).__name__}: {str(e)[:300]})"
    ) from e
  try:
    plan = input_pipeline.make_plan(
      config.data.dir, tc.global_batch, tc.seed, config.data.num_epochs
    )
  except ValueError as e:
    raise UsageError(
      f"data.dir={config.data.dir}, train.global_batch={tc.global_batch}: {e}"
    ) from e
  if tc.steps > len(plan):
    raise UsageError(
      f"train.steps={tc.steps} needs more batches than data.num_epochs="
      f"{config.data.num_epochs} epochs of {plan.batches_per_epoch} global "
      f"batches hold ({len(plan)}); raise data.num_epochs"
    )
  bad = []
  if shapes["latent_channels"] != m.in_channels:
    bad.append(
      f"latents have {shapes['latent_channels']} channels, model.in_channels={m.in_channels}"
    )
  if shapes["caption_channels"] != m.caption_channels:
    bad.append(
      f"captions are {shapes['caption_channels']} wide, model.caption_channels={m.caption_channels}"
    )
  for h, w in shapes["buckets"]:
    if h % m.patch_size or w % m.patch_size:
      bad.append(f"latent bucket {h}x{w} is not a multiple of model.patch_size={m.patch_size}")
  if bad:
    raise UsageError(f"dataset {config.data.dir} does not fit the model: " + "; ".join(bad))
  return shapes


def state_structure(config_dict: dict):
  """(treedef, [(shape, dtype)]) of the train state a config builds (nothing allocated)."""
  c = ml_collections.ConfigDict(config_dict)
  abstract = state_lib.abstract_state(
    state_lib.model_config(c), optim_lib.make_optimizer(c.train), c.train
  )
  leaves, treedef = jax.tree_util.tree_flatten(abstract)
  return treedef, [(tuple(l.shape), str(l.dtype)) for l in leaves]


def _with_values(config_dict: dict, values: dict) -> dict:
  out = json.loads(json.dumps(config_dict))
  for key, value in values.items():
    node = out
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return out


def _with_absent_values(saved: dict) -> dict:
  """`saved` with each ABSENT_MEANS field it lacks (under a section it has) set to the value
  its absence means."""
  flat = checkpoint.flatten(saved)
  missing = {
    k: v
    for k, v in ABSENT_MEANS.items()
    if k not in flat and any(f.startswith(k.rsplit(".", 1)[0] + ".") for f in flat)
  }
  return _with_values(saved, missing) if missing else saved


def checkpoint_conflicts(
  saved: dict,
  config: ml_collections.ConfigDict,
  data_source: str | None = None,
  saved_data_source: str | None = None,
) -> dict[str, tuple[Any, Any]]:
  """The config changes a resume from a checkpoint written with `saved` cannot take:
  {field: (saved, new)}. Refused: model fields other than IMPLEMENTATION_FIELDS, any field
  whose change alters the train state's structure (optimizer, grad_clip on/off, ...), the
  DATA_ORDER_FIELDS, STATE_MEANING_FIELDS, and a dataset with other bucket sizes
  ("data.dir (dataset)")."""
  new = config.to_dict()
  changes = checkpoint.config_changes(_with_absent_values(saved), new)
  conflicts = {
    k: v
    for k, v in changes.items()
    if (k.startswith("model.") and k not in IMPLEMENTATION_FIELDS)
    or k in DATA_ORDER_FIELDS
    or k in STATE_MEANING_FIELDS
  }
  candidates = {
    k: v for k, v in changes.items() if k.startswith(("model.", "train.")) and k not in conflicts
  }
  if candidates:
    try:  # the other changes at their new values: does any of these alter the state?
      old_struct = state_structure(_with_values(new, {k: v[0] for k, v in candidates.items()}))
    except Exception as e:  # noqa: BLE001 - the saved config no longer builds a state
      conflicts.update(candidates)
      log.warning("the checkpoint's config does not build a train state today: %s", e)
    else:
      if old_struct != state_structure(new):
        culprits = {
          k: v
          for k, v in candidates.items()
          if state_structure(_with_values(new, {k: v[0]})) != state_structure(new)
        }
        conflicts.update(culprits or candidates)
  if (
    saved_data_source is not None
    and data_source is not None
    and saved_data_source != data_source
    and not conflicts
  ):
    conflicts["data.dir (dataset)"] = (saved_data_source, data_source)
  return dict(sorted(conflicts.items()))


@dataclasses.dataclass
class Prepared:
  """What `prepare` found: everything `train` needs to start, nothing written yet."""

  shapes: dict
  devices: list
  mesh_shape: tuple
  model_cfg: DiTConfig
  resume_step: int | None  # the checkpoint a resume will try first
  init_from_cfg: Any = None
  lora_base_cfg: Any = None  # the DiTConfig of train.lora.base


def _check_workdir(workdir: pathlib.Path) -> None:
  if workdir.exists() and not workdir.is_dir():
    raise UsageError(f"--workdir {workdir} exists and is not a directory")
  parent = workdir
  while not parent.exists():
    parent = parent.parent
  if not os.access(parent, os.W_OK | os.X_OK):
    raise UsageError(f"--workdir {workdir}: {parent} is not writable")
  if (workdir / "checkpoints").exists() and not (workdir / "checkpoints").is_dir():
    raise UsageError(f"{workdir / 'checkpoints'} exists and is not a directory")


def _check_init_from(path: str, model_cfg: DiTConfig) -> DiTConfig:
  folder = pathlib.Path(path)
  config_file = folder / "config.json"
  if not config_file.is_file() or not (folder / "params.safetensors").is_file():
    raise UsageError(
      f"train.init_from={path}: not a sana_jax DiT folder (config.json and "
      "params.safetensors, as written by sana_jax.weights.dit.save_flax)"
    )
  try:
    meta = json.loads(config_file.read_text())
    cfg = DiTConfig.coerce(meta["model"])
  except Exception as e:  # noqa: BLE001
    raise UsageError(
      f"train.init_from={path}: unreadable {config_file} ({type(e).__name__}: {e})"
    ) from e
  ignore = DiTConfig.EXECUTION_FIELDS
  diff = {
    f"model.{k}": (v, getattr(model_cfg, k))
    for k, v in cfg.to_dict().items()
    if k not in ignore and getattr(model_cfg, k) != v
  }
  if diff:
    raise UsageError(
      f"train.init_from {path} does not fit the model config (folder -> "
      f"config): {checkpoint.format_changes(diff)}"
    )
  return cfg


def _check_lora_base(path: str, model_cfg: DiTConfig) -> DiTConfig:
  """train.lora.base must be a DiT folder (or pipeline folder, or training workdir) of the
  model's geometry (its adapter fields and implementation fields aside)."""
  try:
    cfg = DiTConfig.coerce(checkpoint.base_config(path))
  except (ValueError, TypeError, OSError, checkpoint.CorruptCheckpoint) as e:
    raise UsageError(f"train.lora.base={path}: {e}") from e
  ignore = IMPLEMENTATION_FIELDS + ("model.lora_rank", "model.lora_alpha", "model.lora_targets")
  diff = {
    f"model.{k}": (v, getattr(model_cfg, k))
    for k, v in cfg.to_dict().items()
    if f"model.{k}" not in ignore and getattr(model_cfg, k) != v
  }
  if diff:
    raise UsageError(
      f"train.lora.base {path} does not fit the model config (base -> config): "
      f"{checkpoint.format_changes(diff)}"
    )
  return cfg


def prepare(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Prepared:
  """Every check before any work; reads only, creates nothing. Raises UsageError (and
  IncompatibleCheckpoint for a config change the workdir's checkpoint cannot take)."""
  workdir = pathlib.Path(workdir)
  shapes = validate(config)
  _check_workdir(workdir)
  devices = mesh_devices(config)
  m = config.mesh
  shape = parallel.mesh_shape(len(devices), m.data, m.fsdp, m.tensor)
  model_cfg = state_lib.model_config(config)
  resume_step = None
  for step in reversed(checkpoint.saved_steps(workdir)):
    try:
      saved = checkpoint.read_config(workdir, step)
      data_state = checkpoint.read_data_state(workdir, step)
    except checkpoint.CorruptCheckpoint:
      continue  # unreadable: restore will move it aside and try the previous one
    check_resume(config, workdir, step, saved, data_state)
    resume_step = step
    break
  init_cfg = _check_init_from(config.train.init_from, model_cfg) if config.train.init_from else None
  base = state_lib.lora_settings(config.train)["base"]
  base_cfg = _check_lora_base(base, model_cfg) if base else None
  return Prepared(shapes, devices, shape, model_cfg, resume_step, init_cfg, base_cfg)


def check_resume(config, workdir, step: int, saved: dict, data_state: dict | None) -> None:
  """Raises IncompatibleCheckpoint when `config` cannot continue checkpoint `step`."""
  tc = config.train
  plan_repr = repr(
    input_pipeline.make_plan(config.data.dir, tc.global_batch, tc.seed, config.data.num_epochs)
  )
  conflicts = checkpoint_conflicts(saved, config, plan_repr, (data_state or {}).get("data_source"))
  if conflicts:
    raise IncompatibleCheckpoint(
      f"--workdir {workdir} holds a checkpoint at step {step} that the new config does "
      f"not fit: {checkpoint.format_changes(conflicts)}. These fields fix the train "
      "state's structure, the model, or the order of the data the checkpoint continues; "
      "set them back to the checkpoint's values to resume, or use another --workdir for "
      "a new run. Nothing was changed."
    )


def load_null_caption(data_dir: str) -> np.ndarray:
  found = sorted(pathlib.Path(data_dir).glob(f"**/{NULL_CAPTION_FILE}"))
  if not found:
    raise FileNotFoundError(
      f"{data_dir}: no {NULL_CAPTION_FILE} (the null-caption embedding "
      "written by the preprocessing command)"
    )
  return np.load(found[0])["caption"].astype(np.float32)


def init_params_from(path: str, model_cfg: DiTConfig, like):
  """Parameters of a Flax DiT folder (`train.init_from`), cast to the dtypes of `like` (the
  fresh state's parameters): shipped folders store fp16, training keeps fp32 masters."""
  from sana_jax.weights import dit as dit_weights

  params, cfg, _ = dit_weights.load_flax(path)
  if cfg.replace(**{k: getattr(model_cfg, k) for k in DiTConfig.EXECUTION_FIELDS}) != model_cfg:
    diff = {
      k: (v, getattr(model_cfg, k)) for k, v in cfg.to_dict().items() if getattr(model_cfg, k) != v
    }
    raise UsageError(
      f"train.init_from {path} does not fit the model config (checkpoint, config): {diff}"
    )
  return jax.tree.map(lambda p, ref: np.asarray(p).astype(ref.dtype), params, like)


def lora_base_params(path: str, like):
  """The frozen base from train.lora.base (a tree like `like`, the state's `frozen`), cast
  to its dtypes. Refuses a base whose leaves or shapes differ (named)."""
  from sana_jax.weights import dit as dit_weights

  loaded = dit_weights.flatten(checkpoint.load_base(path))
  want = dit_weights.flatten(like)
  missing = sorted(set(want) - set(loaded))
  wrong = [
    f"{k} {tuple(np.shape(loaded[k]))} (expected {tuple(want[k].shape)})"
    for k in want
    if k in loaded and tuple(np.shape(loaded[k])) != tuple(want[k].shape)
  ]
  if missing or wrong:
    raise UsageError(
      f"train.lora.base {path} does not hold the model's base parameters: "
      + (f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}; " if missing else "")
      + (f"wrong shapes {wrong[:5]}" if wrong else "")
    )
  flat = {k: np.asarray(loaded[k]).astype(want[k].dtype) for k in want}
  return jax.tree.map(lambda _, v: v, like, dit_weights.unflatten(flat))


def _say(verbose: bool, msg: str) -> None:
  if verbose and jax.process_index() == 0:
    print(msg, flush=True)


def train(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  max_steps: int | None = None,
  progress: bool = True,
  verbose: bool = True,
) -> state_lib.TrainState:
  """Runs (or resumes) training to config.train.steps (or max_steps). Returns the state
  (stopped early only by SIGTERM, after saving). verbose: process 0 prints what it starts,
  where it resumes and where its outputs are."""
  parallel.maybe_initialize_distributed()
  prep = prepare(config, workdir)
  tc = config.train
  workdir = pathlib.Path(workdir)
  model_cfg = prep.model_cfg
  shapes = prep.shapes
  total = tc.steps if max_steps is None else min(tc.steps, max_steps)
  kinds = sorted({d.platform for d in prep.devices})
  _say(
    verbose,
    f"train: {config.get('name', 'model')} (depth {model_cfg.depth}, width "
    f"{model_cfg.hidden_size}), {len(prep.devices)} {'/'.join(kinds)} devices in "
    f"{jax.process_count()} process(es), mesh "
    f"{dict(zip(parallel.MESH_AXES, prep.mesh_shape))}, global batch {tc.global_batch}, "
    f"to step {total}, workdir {workdir.absolute()}",
  )

  mesh = parallel.make_mesh(*prep.mesh_shape, devices=prep.devices)
  tx = optim_lib.make_optimizer(tc)
  shardings = state_lib.state_shardings(model_cfg, tx, mesh, tc)
  abstract = jax.tree_util.tree_map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    state_lib.abstract_state(model_cfg, tx, tc),
    shardings,
  )
  batch_sharding = parallel.batch_sharding(mesh, 4)
  rows = input_pipeline.process_rows(batch_sharding, tc.global_batch)

  workdir.mkdir(parents=True, exist_ok=True)
  mgr = checkpoint.manager(workdir, tc.keep_checkpoints, tc.async_checkpoints)
  start, state = checkpoint.restore_latest(
    mgr,
    abstract,
    check_config=lambda step, saved: check_resume(
      config, workdir, step, saved, checkpoint.read_data_state(workdir, step)
    ),
  )
  if state is None:
    start = 0
    state = step_lib.init_state(config, tx, mesh, shardings)
    if tc.init_from:
      fp32 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, np.float32), state.params)
      params = init_params_from(tc.init_from, model_cfg, fp32)
      del state  # the step-0 state of these weights (EMA and dtypes per train.ema/param_dtype)
      state = jax.jit(lambda p: state_lib.create(p, tx, tc), out_shardings=shardings)(
        jax.device_put(params, shardings.params)
      )
      _say(verbose, f"starting from step 0 with the weights of {tc.init_from}")
    elif state.frozen is not None and state_lib.lora_settings(tc)["base"]:
      base = state_lib.lora_settings(tc)["base"]
      state = state.replace(
        frozen=jax.device_put(lora_base_params(base, state.frozen), shardings.frozen)
      )
      _say(
        verbose,
        f"starting from step 0: LoRA rank {model_cfg.lora_rank} on "
        f"{', '.join(model_cfg.lora_targets)} over the frozen base {base}",
      )
    else:
      _say(verbose, "starting from step 0 (no checkpoint in the workdir)")
  else:
    _say(
      verbose,
      f"resumed from step {start} ({mgr.directory / str(start)})"
      + (" (train.init_from is not used: the run continues)" if tc.init_from else ""),
    )
  total = max(total, start)
  # One global batch per step: a run at step `start` reads the plan from batch `start` on.
  loader, _ = input_pipeline.make_loader(
    config.data.dir,
    tc.global_batch,
    tc.seed,
    num_epochs=config.data.num_epochs,
    worker_count=config.data.get("worker_count", 0),
    rows=rows,
    start_batch=min(start, max(total - 1, 0)),
  )
  iterator = iter(loader)
  null_caption = load_null_caption(config.data.dir)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  null_caption = jax.make_array_from_process_local_data(
    replicated, null_caption, null_caption.shape
  )
  step_fn = step_lib.jit_train_step(config, tx, mesh, shardings)
  compiled = {}  # one executable per batch shape (aspect bucket)
  config_dict = config.to_dict()
  multi = jax.process_count() > 1
  # A single-device CPU step run inline (sana_jax/commands/malloc_settings.py) stays on this
  # thread only if its inputs are ready; elsewhere waiting for the batch would only cost.
  wait_for_batch = (
    mesh.devices.size == 1
    and mesh.devices.flat[0].platform == "cpu"
    and not jax.config.read("jax_cpu_enable_async_dispatch")
  )

  preempted = {"flag": False}
  previous = signal.getsignal(signal.SIGTERM)

  def on_sigterm(signum, frame):
    del signum, frame
    preempted["flag"] = True

  try:
    signal.signal(signal.SIGTERM, on_sigterm)
  except ValueError:  # not the main thread
    previous = None

  def stop_now(step: int) -> bool:
    """SIGTERM seen (on any process: with several they agree at log steps, through the
    coordination service's key-value store and a barrier; no collective)."""
    if not multi:
      return preempted["flag"]
    if step % tc.log_every and step != total:
      return False
    from jax._src import distributed

    client = distributed.global_state.client
    if preempted["flag"]:
      client.key_value_set(f"sana_jax_sigterm/{jax.process_index()}", str(step))
    parallel.barrier(f"sana_jax_stop_check_{step}")
    return bool(client.key_value_dir_get("sana_jax_sigterm/"))

  writer = metrics_lib.Writer(workdir, enabled=jax.process_index() == 0)

  def step_flops(latent_shape, policy):
    """FLOPs of one step on this batch's aspect bucket (hardware: with the remat recompute;
    model FLOPs for MFU: policy "none")."""
    _, h, w, _ = latent_shape
    return metrics_lib.train_step_flops(
      model_cfg, h, w, shapes["caption_len"], tc.global_batch, policy
    )

  bar = tqdm.tqdm(
    total=total,
    initial=start,
    desc="train",
    disable=not progress or jax.process_index() != 0,
    dynamic_ncols=True,
  )
  t_last, step_last = time.perf_counter(), start
  step = start
  try:
    while step < total:
      local = next(iterator)
      batch = {
        k: jax.make_array_from_process_local_data(
          step_fn.batch_shardings[k], v, (tc.global_batch, *v.shape[1:])
        )
        for k, v in local.items()
      }
      if wait_for_batch:
        jax.block_until_ready(batch)
      shape = batch["latent"].shape
      if shape not in compiled:  # compile ahead, then start together (see parallel.barrier)
        with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
          compiled[shape] = step_fn.jitted.lower(state, batch, null_caption).compile()
        host_memory.release_freed()  # the compiler's freed memory, not kept resident
        # then the collectives start
        parallel.barrier("sana_jax_train_step_compiled_" + "x".join(map(str, shape[1:3])))
      state, m = compiled[shape](state, batch, null_caption)
      step += 1
      bar.update(1)
      if step % tc.log_every == 0 or step == total:
        m = jax.device_get(m)
        run = int(state.nonfinite_run)
        now = time.perf_counter()
        dt = (now - t_last) / max(step - step_last, 1)
        t_last, step_last = now, step
        scalars = {
          "loss": m["loss"],
          "grad_norm": m["grad_norm"],
          "lr": m["lr"],
          "skipped": int(state.skipped),
          "steps_per_s": 1 / dt,
          "images_per_s": tc.global_batch / dt,
          "tflops": step_flops(shape, model_cfg.remat_policy) / dt / 1e12,
        }
        if tc.peak_tflops:
          scalars["mfu"] = metrics_lib.mfu(
            step_flops(shape, "none"), dt, tc.peak_tflops, jax.device_count()
          )
        writer.write(step, scalars)
        bar.set_postfix(loss=f"{float(m['loss']):.4f}", skipped=int(state.skipped))
        if run >= tc.max_consecutive_nonfinite:
          raise NonFiniteError(
            f"{run} consecutive steps had a non-finite loss or gradient (up to step {step}); "
            "stopping. Lower train.lr, raise train.warmup_steps or check the data; the last "
            "good checkpoint is kept."
          )
      stop = stop_now(step)
      if step % tc.checkpoint_every == 0 or step == total or stop:
        checkpoint.save(mgr, step, state, iterator, config_dict, force=True)
        if state.frozen is not None:
          checkpoint.save_adapters(workdir, step, state, model_cfg)
      if stop:
        log.warning("SIGTERM: saved a checkpoint at step %d and stopped", step)
        _say(
          verbose,
          f"SIGTERM: saved a checkpoint at step {step} and stopped; run the same "
          "command again to resume",
        )
        break
  finally:
    bar.close()
    mgr.wait_until_finished()
    mgr.close()
    writer.close()
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
  _say(
    verbose,
    f"stopped at step {step}: checkpoints {checkpoint.checkpoint_dir(workdir)} "
    f"(steps {checkpoint.saved_steps(workdir)}), metrics {workdir.absolute() / 'metrics.jsonl'}"
    f", TensorBoard {workdir.absolute() / 'tensorboard'}"
    + (f", adapters {checkpoint.adapter_path(workdir)}" if state.frozen is not None else ""),
  )
  return state
