"""orbax checkpoints of the train state, the data iterator and the config.

Layout: workdir/checkpoints/<step>/{state, data, config}. Asynchronous saves, the last N
kept. Restore is sharded onto explicit target shardings (any mesh, any number of devices
or processes: the stored arrays are global). The grain iterator state is saved for
inspection and for the dataset check; the data position itself is the step (one global
batch per step), so resume needs no iterator state and works with any process count or
data.worker_count.

Resume rules (`config_changes`): a checkpoint is never thrown away because the config
changed. The caller compares the saved config with the new one first and refuses a change
that does not fit the checkpoint; only a checkpoint that cannot be read falls back to the
previous one (with a warning), and only that one is moved to workdir/corrupt_checkpoints/.
"""

from __future__ import annotations

import json
import logging
import pathlib
import re
import shutil
import warnings
from typing import Any, Mapping

import grain.python as grain
import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CorruptCheckpoint(RuntimeError):
  """A checkpoint whose files cannot be read (not a config mismatch)."""


def checkpoint_dir(workdir: str | pathlib.Path) -> pathlib.Path:
  return pathlib.Path(workdir).absolute() / "checkpoints"


def manager(
  workdir: str | pathlib.Path, keep: int, async_save: bool = True
) -> ocp.CheckpointManager:
  """Creates workdir/checkpoints (call it only once the run is known to start)."""
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep, create=True, enable_async_checkpointing=async_save
  )
  return ocp.CheckpointManager(
    checkpoint_dir(workdir), options=options, item_names=("state", "data", "config")
  )


def save(
  mgr: ocp.CheckpointManager,
  step: int,
  state,
  data_iterator,
  config_dict: dict,
  force: bool = False,
) -> bool:
  args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config_dict)}
  if data_iterator is not None:
    args["data"] = grain.PyGrainCheckpointSave(data_iterator)
  return mgr.save(step, args=ocp.args.Composite(**args), force=force)


def saved_steps(workdir: str | pathlib.Path) -> list[int]:
  """Steps of the finished checkpoints in workdir/checkpoints (newest last); reads only
  the directory listing (an interrupted save leaves a `*.orbax-checkpoint-tmp*` folder,
  which is not a checkpoint)."""
  root = checkpoint_dir(workdir)
  if not root.is_dir():
    return []
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


def read_config(workdir: str | pathlib.Path, step: int | None = None) -> dict:
  """The config saved with a checkpoint (the latest when step is None)."""
  steps = saved_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"no checkpoints in {checkpoint_dir(workdir)}")
  step = steps[-1] if step is None else step
  path = checkpoint_dir(workdir) / str(step) / "config" / "metadata"
  try:
    config = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise CorruptCheckpoint(f"{path}: {type(e).__name__}: {e}") from e
  if not isinstance(config, dict):
    raise CorruptCheckpoint(f"{path}: not a config mapping")
  return config


def read_data_state(workdir: str | pathlib.Path, step: int) -> dict | None:
  """The grain iterator state saved with a checkpoint (this process's file when the
  process count is unchanged, else process 0's: every process walks the same plan), or
  None when it cannot be read (it is informational: resume does not need it)."""
  root = checkpoint_dir(workdir) / str(step) / "data"
  own = root / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  files = [own] if own.exists() else sorted(root.glob("process_0-of-*.json"))
  try:
    return json.loads(files[0].read_text())
  except (OSError, ValueError, IndexError):
    return None


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """{"model": {"depth": 3}} -> {"model.depth": 3}; tuples become lists (as in JSON)."""
  flat = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      flat.update(flatten(v, key + "."))
    else:
      flat[key] = list(v) if isinstance(v, tuple) else v
  return flat


def config_changes(saved: Mapping, new: Mapping) -> dict[str, tuple[Any, Any]]:
  """{field: (saved value, new value)} for every leaf field that differs. A field the
  saved config lacks (added to the code since) or that the new one lacks is ignored."""
  a, b = flatten(saved), flatten(json.loads(json.dumps(dict(new))))
  return {k: (a[k], b[k]) for k in sorted(set(a) & set(b)) if a[k] != b[k]}


def format_changes(changes: Mapping[str, tuple[Any, Any]]) -> str:
  return ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())


def _is_corrupt(e: Exception) -> bool:
  """A restore error that means "the files are unreadable" rather than "the target does
  not fit" (the caller has compared configs first, so a shape mismatch is a bug)."""
  return not re.search(r"not compatible with the stored shape|[Ss]hape mismatch", str(e))


def restore_latest(mgr: ocp.CheckpointManager, abstract_state, check_config=None):
  """Restores the newest readable checkpoint onto `abstract_state`'s shardings.

  abstract_state: a tree of jax.ShapeDtypeStruct with `.sharding` set on every leaf (the
  target mesh; restore never falls back to the saved shardings). check_config(step,
  saved_config_dict) may raise to refuse a checkpoint (nothing is moved then). Returns
  (step, state), or (None, None) when no checkpoint is readable. A checkpoint whose files
  cannot be read is moved to workdir/corrupt_checkpoints/ with a warning and the previous
  one is tried.
  """
  workdir = pathlib.Path(mgr.directory).parent
  steps = sorted(mgr.all_steps(), reverse=True)
  for i, step in enumerate(steps):
    try:
      saved = read_config(workdir, step)
      if check_config is not None:
        check_config(step, saved)
      try:
        restored = mgr.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
      except Exception as e:  # noqa: BLE001 - classified below
        if not _is_corrupt(e):
          raise
        raise CorruptCheckpoint(f"{type(e).__name__}: {str(e)[:200]}") from e
    except CorruptCheckpoint as e:
      older = steps[i + 1] if i + 1 < len(steps) else None
      msg = f"checkpoint at step {step} could not be restored ({e}); " + (
        f"falling back to step {older}"
        if older is not None
        else "no older checkpoint: starting fresh"
      )
      warnings.warn(msg)
      log.warning(msg)
      _move_aside(mgr, step)
      continue
    return step, restored["state"]
  return None, None


def _move_aside(mgr: ocp.CheckpointManager, step: int) -> None:
  """Moves an unreadable checkpoint to workdir/corrupt_checkpoints/ (kept for inspection;
  process 0 moves, every process waits for it)."""
  if jax.process_index() == 0:
    src = pathlib.Path(mgr.directory) / str(step)
    dst = pathlib.Path(mgr.directory).parent / "corrupt_checkpoints" / str(step)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
      shutil.rmtree(dst)
    shutil.move(str(src), str(dst))
  from sana_jax import parallel

  parallel.barrier(f"sana_jax_move_aside_{step}")
  mgr.reload()


def restore_tree(workdir: str | pathlib.Path, step: int | None = None) -> tuple[dict, int]:
  """(the whole train state as nested dicts of numpy arrays, step) from a training
  checkpoint (the latest when step is None), without a target structure; reads on the
  host, whatever mesh wrote it."""
  steps = saved_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"no checkpoints in {checkpoint_dir(workdir)}")
  step = steps[-1] if step is None else step
  path = checkpoint_dir(workdir) / str(step) / "state"
  from etils import epath

  handler = ocp.PyTreeCheckpointHandler()
  tree = handler.metadata(epath.Path(path)).tree
  restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  restored = ocp.Checkpointer(handler).restore(
    path, args=ocp.args.PyTreeRestore(restore_args=restore_args)
  )
  return restored, step


def restore_params(workdir: str | pathlib.Path, step: int | None = None, ema: bool = True):
  """(params as numpy arrays, step) from a training checkpoint, without the optimizer
  (for export); reads on the host, whatever mesh wrote it."""
  restored, step = restore_tree(workdir, step)
  key = "ema_params" if ema else "params"
  return restored[key], step


# ----------------------------------------------------------------------------- LoRA

ADAPTER_FORMAT = "sana_jax.lora_adapter"
ADAPTER_DIR = "lora"


def adapter_path(workdir: str | pathlib.Path, step: int | None = None) -> pathlib.Path:
  """workdir/lora/adapter.safetensors (the latest) or workdir/lora/adapter_<step>.safetensors."""
  name = "adapter.safetensors" if step is None else f"adapter_{step}.safetensors"
  return pathlib.Path(workdir).absolute() / ADAPTER_DIR / name


def save_adapters(workdir, step: int, state, model_cfg) -> pathlib.Path | None:
  """Writes the trained adapters of a LoRA state (every process must call it; process 0
  writes): workdir/lora/adapter_<step>.safetensors, then the same bytes as
  workdir/lora/adapter.safetensors, each renamed into place whole.

  Format: safetensors, one tensor per adapter leaf keyed by its '/'-joined path in the DiT
  tree (e.g. "blocks/self_attn/qkv/lora_a", fp32, shapes as in the model: lora_a
  (depth, in, [g,] r), lora_b (depth, [g,] r, out)); the EMA weights (the raw ones under
  train.ema="off"). Header metadata (strings): format "sana_jax.lora_adapter", step,
  weights ("ema" or "params"), rank, alpha, scale (= alpha / rank, not folded in), targets
  (JSON list), model (JSON of the DiTConfig with the adapters, as in config.json)."""
  from sana_jax.weights import dit as dit_weights
  from sana_jax.weights import io

  tree = state.params if state.ema_params is None else state.ema_params
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    tree = multihost_utils.process_allgather(tree, tiled=True)
  flat = {
    k: np.asarray(v, np.float32) for k, v in dit_weights.flatten(jax.device_get(tree)).items()
  }
  if jax.process_index() != 0:
    return None
  meta = {
    "format": ADAPTER_FORMAT,
    "step": str(step),
    "weights": "params" if state.ema_params is None else "ema",
    "rank": str(model_cfg.lora_rank),
    "alpha": repr(float(model_cfg.lora_alpha)),
    "scale": repr(float(model_cfg.lora_scale)),
    "targets": json.dumps(list(model_cfg.lora_targets)),
    "model": json.dumps(model_cfg.to_dict()),
  }
  for path in (adapter_path(workdir, step), adapter_path(workdir)):
    with io.atomic_output(path, is_dir=False) as tmp:
      io.write_safetensors(flat, tmp, metadata=meta)
  return adapter_path(workdir)


def base_folder(path: str | pathlib.Path) -> pathlib.Path | None:
  """The DiT folder (config.json + params.safetensors) a train.lora.base names: the folder
  itself, or its transformer/ (a pipeline folder such as sana_jax/assets/shapes_model);
  None when it is neither (it may be a training workdir: see load_base)."""
  p = pathlib.Path(path)
  for folder in (p, p / "transformer"):
    if (folder / "config.json").is_file() and (folder / "params.safetensors").is_file():
      return folder
  return None


def base_config(path: str | pathlib.Path) -> dict:
  """The model config dict of a train.lora.base: a DiT folder's config.json "model", or the
  config saved with a training workdir's newest checkpoint. Raises ValueError (what it
  is not) or CorruptCheckpoint."""
  folder = base_folder(path)
  if folder is not None:
    meta = json.loads((folder / "config.json").read_text())
    if not isinstance(meta, dict) or "model" not in meta:
      raise ValueError(f"{folder / 'config.json'} has no 'model' section")
    return meta["model"]
  if saved_steps(path):
    return read_config(path)["model"]
  raise ValueError(
    "not a sana_jax DiT folder (config.json and params.safetensors, or a pipeline folder "
    "with transformer/) nor a training workdir with checkpoints/"
  )


def load_base(path: str | pathlib.Path) -> dict:
  """The parameter tree (numpy) of a train.lora.base: a DiT folder's weights, or a
  training workdir's newest EMA parameters (the full tree; its adapters, if any, left in)."""
  folder = base_folder(path)
  if folder is not None:
    from sana_jax.weights import dit as dit_weights

    params, _, _ = dit_weights.load_flax(folder)
    return params
  state_tree, _ = restore_params(path, ema=True)
  return state_tree
