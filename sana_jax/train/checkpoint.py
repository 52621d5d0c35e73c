"""orbax checkpoints of the train state, the data iterator and the config.

Asynchronous saves, the last N kept, restore sharded from abstract shapes; a latest
checkpoint that fails to restore falls back to the previous one with a warning.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
import warnings

import grain.python as grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def manager(workdir: str | pathlib.Path, keep: int, async_save: bool = True
            ) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=async_save)
  path = pathlib.Path(workdir).absolute() / "checkpoints"
  return ocp.CheckpointManager(path, options=options,
                               item_names=("state", "data", "config"))


def save(mgr: ocp.CheckpointManager, step: int, state, data_iterator, config_dict: dict,
         force: bool = False) -> bool:
  args = {"state": ocp.args.StandardSave(state),
          "config": ocp.args.JsonSave(config_dict)}
  if data_iterator is not None:
    args["data"] = grain.PyGrainCheckpointSave(data_iterator)
  return mgr.save(step, args=ocp.args.Composite(**args), force=force)


def restore_latest(mgr: ocp.CheckpointManager, abstract_state, data_iterator):
  """Restores the newest readable checkpoint into `abstract_state`'s shardings.

  Returns (step, state) or (None, None) when there is none. The data iterator is
  restored in place. A checkpoint that fails to restore is skipped with a warning.
  """
  steps = sorted(mgr.all_steps(), reverse=True)
  for i, step in enumerate(steps):
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      args["data"] = grain.PyGrainCheckpointRestore(data_iterator)
    try:
      restored = mgr.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - any failure means: this checkpoint is unusable
      older = steps[i + 1] if i + 1 < len(steps) else None
      msg = (f"checkpoint at step {step} could not be restored ({type(e).__name__}: "
             f"{str(e)[:200]}); " + (f"falling back to step {older}" if older is not None
                                     else "no older checkpoint: starting fresh"))
      warnings.warn(msg)
      log.warning(msg)
      _move_aside(mgr, step)
      continue
    return step, restored["state"]
  return None, None


def _move_aside(mgr: ocp.CheckpointManager, step: int) -> None:
  """Moves an unreadable checkpoint to workdir/corrupt_checkpoints/ (kept for inspection)."""
  src = pathlib.Path(mgr.directory) / str(step)
  dst = pathlib.Path(mgr.directory).parent / "corrupt_checkpoints" / str(step)
  dst.parent.mkdir(parents=True, exist_ok=True)
  if dst.exists():
    shutil.rmtree(dst)
  shutil.move(str(src), str(dst))
  mgr.reload()


def read_config(workdir: str | pathlib.Path, step: int | None = None) -> dict:
  """The config saved with a checkpoint (the latest when step is None)."""
  root = pathlib.Path(workdir) / "checkpoints"
  steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())
  if not steps:
    raise FileNotFoundError(f"no checkpoints in {root}")
  step = steps[-1] if step is None else step
  return json.loads((root / str(step) / "config" / "metadata").read_text())


def restore_params(workdir: str | pathlib.Path, step: int | None = None, ema: bool = True):
  """(params, step) from a training checkpoint without the optimizer (for export)."""
  root = pathlib.Path(workdir).absolute() / "checkpoints"
  steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())
  if not steps:
    raise FileNotFoundError(f"no checkpoints in {root}")
  step = steps[-1] if step is None else step
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.restore(root / str(step) / "state")
  key = "ema_params" if ema else "params"
  return jax.tree_util.tree_map(lambda x: x, tree[key]), step
