"""Resume: on another topology, after harmless config changes; refused (nothing touched)
for changes the checkpoint cannot take; only unreadable checkpoints fall back.

One 8-device (fsdp 8) run writes checkpoints at steps 2 and 4 (module fixture); every test
works on copies of its workdir.
"""

import json
import logging
import shutil
import warnings

import jax
import numpy as np
import pytest

from sana_jax.configs import tiny
from sana_jax.train import checkpoint, loop
from tests import train_fixtures
from tests.cli_contract import assert_unchanged, snapshot

SHARDING_WARNING = "Sharding info not provided"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return train_fixtures.write_tiny_dataset(tmp_path_factory.mktemp("data"))


def _config(data_dir, **mesh):
  c = tiny.get_config()
  c.data.dir = data_dir
  c.train.update(steps=4, checkpoint_every=2, keep_checkpoints=5, log_every=2)
  c.mesh.update(**mesh)
  return c


@pytest.fixture(scope="module")
def run8(data_dir, tmp_path_factory):
  """(workdir, config) of 4 steps on 8 devices (fsdp 8), checkpoints at 2 and 4."""
  workdir = tmp_path_factory.mktemp("run8")
  config = _config(data_dir, data=1, fsdp=8, num_devices=8)
  loop.train(config, str(workdir), progress=False, verbose=False)
  assert checkpoint.saved_steps(workdir) == [2, 4]
  return workdir, config


def _copy(workdir, dst, steps=None):
  shutil.copytree(
    workdir,
    dst,
    ignore=None
    if steps is None
    else (
      lambda d, names: [
        n for n in names if d.endswith("checkpoints") and n.isdigit() and int(n) not in steps
      ]
    ),
  )
  return dst


@pytest.mark.parametrize(
  "mesh",
  [dict(data=2, fsdp=2, num_devices=4), dict(data=1, fsdp=1, num_devices=1)],
  ids=["4dev_data2_fsdp2", "1dev"],
)
def test_checkpoint_of_8_devices_resumes_on_another_topology(
  run8, data_dir, tmp_path, mesh, caplog
):
  workdir, _ = run8
  wd = _copy(workdir, tmp_path / "wd", steps={2})
  config = _config(data_dir, **mesh)
  caplog.set_level(logging.WARNING)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    restored = jax.device_get(loop.train(config, str(wd), max_steps=2, progress=False))
    saved, _ = checkpoint.restore_params(workdir, step=2, ema=False)
    assert int(restored.step) == 2
    for got, want in zip(jax.tree.leaves(restored.params), jax.tree.leaves(saved)):
      np.testing.assert_array_equal(got, want)  # restored bit-exactly onto the new mesh
    continued = jax.device_get(loop.train(config, str(wd), progress=False))
  messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
  assert not [m for m in messages if SHARDING_WARNING in m], messages
  assert not [m for m in messages if "could not be restored" in m], messages
  uninterrupted, _ = checkpoint.restore_params(workdir, step=4, ema=False)
  assert int(continued.step) == 4
  # another mesh may flip a compact 8-bit code by one level (train_fixtures)
  train_fixtures.assert_same_training(continued.params, uninterrupted, eight_bit=True)


@pytest.mark.parametrize(
  "override, fields",
  [
    (dict(model=dict(depth=4)), ["model.depth: 3 -> 4"]),
    (
      dict(model=dict(hidden_size=40, depth=2)),
      ["model.depth: 3 -> 2", "model.hidden_size: 48 -> 40"],
    ),
    (dict(model=dict(qk_norm=False)), ["model.qk_norm: True -> False"]),
    (dict(train=dict(optimizer="adamw")), ["train.optimizer: 'came_8bit' -> 'adamw'"]),
    (dict(train=dict(grad_clip=0.0, lr=0.1)), ["train.grad_clip: 1.0 -> 0.0"]),
    (
      dict(train=dict(global_batch=4), mesh=dict(fsdp=4, num_devices=4)),
      ["train.global_batch: 8 -> 4"],
    ),
    (dict(train=dict(seed=1)), ["train.seed: 0 -> 1"]),
  ],
)
def test_change_that_does_not_fit_the_checkpoint_is_refused_and_nothing_moves(
  run8, data_dir, tmp_path, override, fields
):
  workdir, _ = run8
  wd = _copy(workdir, tmp_path / "wd")
  config = _config(data_dir, data=1, fsdp=8, num_devices=8)
  for section, values in override.items():
    config[section].update(values)
  before = snapshot(wd)
  with pytest.raises(loop.IncompatibleCheckpoint, match="step 4") as e:
    loop.train(config, str(wd), progress=False)
  for f in fields:
    assert f in str(e.value)
  assert "train.lr" not in str(e.value)  # a harmless change beside it is not named
  assert_unchanged(before)


def test_other_dataset_is_refused(run8, tmp_path):
  workdir, _ = run8
  wd = _copy(workdir, tmp_path / "wd")
  other = train_fixtures.write_tiny_dataset(tmp_path / "other", n=16)
  config = _config(other, data=1, fsdp=8, num_devices=8)
  before = snapshot(wd)
  with pytest.raises(loop.IncompatibleCheckpoint, match=r"data.dir \(dataset\).*train_4x6:8"):
    loop.train(config, str(wd), progress=False)
  assert_unchanged(before)


def test_harmless_changes_resume(run8, data_dir, tmp_path):
  """steps, lr, logging, checkpointing, data.dir (same data elsewhere), worker_count, mesh,
  remat: the run resumes from the latest checkpoint (the decision; the topology test
  above runs such a resume)."""
  workdir, _ = run8
  moved = shutil.copytree(data_dir, tmp_path / "moved_data")
  config = _config(str(moved), data=2, fsdp=2, num_devices=4)
  config.train.update(
    steps=50,
    lr=3e-4,
    warmup_steps=3,
    log_every=1,
    checkpoint_every=7,
    keep_checkpoints=2,
    async_checkpoints=False,
    ema_decay=0.9,
    cfg_dropout=0.2,
    grad_accum=2,
    peak_tflops=1.0,
  )
  config.data.worker_count = 2
  config.model.update(remat_policy="full", compute_dtype="bfloat16", depthwise_impl="conv")
  config.flow_shift = 4.0
  assert loop.prepare(config, workdir).resume_step == 4


def test_unreadable_checkpoint_falls_back_and_only_it_is_moved(run8, data_dir, tmp_path):
  workdir, _ = run8
  wd = _copy(workdir, tmp_path / "wd")
  (wd / "checkpoints" / "4" / "config" / "metadata").write_text("{not json")
  config = _config(data_dir, data=1, fsdp=8, num_devices=8)
  with pytest.warns(UserWarning, match="step 4 could not be restored.*falling back to step 2"):
    state = loop.train(config, str(wd), max_steps=2, progress=False)
  assert int(state.step) == 2
  assert sorted(p.name for p in (wd / "corrupt_checkpoints").iterdir()) == ["4"]
  assert checkpoint.saved_steps(wd) == [2]


def test_checkpoint_from_before_came_8bit_state_resumes_only_as_official(data_dir, tmp_path):
  """A checkpoint whose saved config has no train.came_8bit_state (code from before the
  field, which always kept the official state) is compared as "official": today's default
  ("compact", another state structure) is refused with the field named and nothing
  touched; the config that says "official" resumes it."""
  wd = tmp_path / "wd"
  old = _config(data_dir, data=1, fsdp=1, num_devices=1)
  old.train.update(steps=2, came_8bit_state="official")
  loop.train(old, str(wd), progress=False, verbose=False)
  for meta in (wd / "checkpoints").glob("*/config/metadata"):
    saved = json.loads(meta.read_text())
    del saved["train"]["came_8bit_state"]
    meta.write_text(json.dumps(saved))
  new = _config(data_dir, data=1, fsdp=1, num_devices=1)
  assert new.train.came_8bit_state == "compact"
  before = snapshot(wd)
  with pytest.raises(loop.IncompatibleCheckpoint) as e:
    loop.train(new, str(wd), progress=False)
  assert "train.came_8bit_state: 'official' -> 'compact'" in str(e.value)
  assert_unchanged(before)
  new.train.came_8bit_state = "official"
  assert int(loop.train(new, str(wd), progress=False, verbose=False).step) == 4
