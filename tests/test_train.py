"""Training: it learns, sharding is invisible, nothing is lost on a kill, bad configs fail early."""

import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sana_jax.configs import tiny
from sana_jax.diffusion import flow
from sana_jax.models import dit
from sana_jax.train import loop
from tests import train_fixtures

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return train_fixtures.write_tiny_dataset(tmp_path_factory.mktemp("data"))


def _config(data_dir, **train):
  config = tiny.get_config()
  config.data.dir = data_dir
  config.train.update(train)
  return config


def _fixed_loss(config, params, data_dir):
  """Mean loss over the whole set at 16 fixed (noise, timestep) draws."""
  from sana_jax.data import latents_tfds

  src = latents_tfds.open_dataset(data_dir)["train_4x6"]
  batch = {
    k: np.stack([np.asarray(src[i][k]) for i in range(len(src))])
    for k in ("latent", "caption", "caption_mask")
  }
  model = dit.SanaDiT(config.model)

  @jax.jit
  def loss(params, key):
    k1, k2 = jax.random.split(key)
    x0 = jnp.asarray(batch["latent"])
    noise = jax.random.normal(k1, x0.shape)
    ti = flow.training_inputs(x0, noise, jax.random.normal(k2, (x0.shape[0],)), config.flow_shift)
    pred = model.apply(
      {"params": params}, ti.x_t, ti.model_time, batch["caption"], batch["caption_mask"]
    )
    return flow.flow_loss(pred, x0, noise)

  return float(np.mean([loss(params, jax.random.key(100 + i)) for i in range(16)]))


def test_tiny_config_overfits(data_dir, tmp_path, optimized_compiles):
  config = _config(
    data_dir,
    steps=300,
    cfg_dropout=0.0,
    ema_decay=0.0,
    checkpoint_every=1000,
    lr=3e-3,
    warmup_steps=20,
  )
  # One device: learning is what this checks; sharding is test_sharding_is_invisible's job
  # (300 steps on 8 simulated devices of a 2-core machine cost ~3x the time).
  config.mesh.update(data=1, fsdp=1, num_devices=1)
  init = dit.init_params(config.model, jax.random.key(config.train.seed))
  start = _fixed_loss(config, init, data_dir)
  state = loop.train(config, str(tmp_path), progress=False)
  end = _fixed_loss(config, jax.device_get(state.params), data_dir)
  print(f"overfit: fixed-draw loss {start:.4f} -> {end:.4f} ({end / start:.3f}x)")
  assert int(state.skipped) == 0
  assert end < 0.2 * start


def _run(config, workdir, steps):
  state = loop.train(config, str(workdir), max_steps=steps, progress=False)
  return jax.device_get(state)


@pytest.mark.parametrize("mesh", [dict(data=2, fsdp=4), dict(data=8, fsdp=1)])
def test_sharding_is_invisible(data_dir, tmp_path, mesh):
  """Three steps on 8 simulated devices equal three single-device steps (CAME-8bit under
  the official state choices, which keep every first moment of the tiny model in fp32:
  exact arithmetic up to reduction order)."""
  single = _config(data_dir, checkpoint_every=1000, came_8bit_state="official")
  single.mesh.update(data=1, fsdp=1, num_devices=1)
  ref_state = _run(single, tmp_path / "single", 3)
  sharded = _config(data_dir, checkpoint_every=1000, came_8bit_state="official")
  sharded.mesh.update(num_devices=8, **mesh)
  state = _run(sharded, tmp_path / "sharded", 3)
  assert int(state.step) == int(ref_state.step) == 3
  assert not train_fixtures.eight_bit_codes(state.opt_state)
  train_fixtures.assert_same_training(state.params, ref_state.params, eight_bit=False)


def test_sharding_flips_few_compact_8bit_codes(data_dir, tmp_path):
  """The default state (train.came_8bit_state="compact": 12 of the tiny model's 35 first
  moments 8-bit) on 8 devices against 1, 3 steps: a last-bit difference of m (reduction
  order) may flip a code by one level in a step, which m's EMA carries on, so the codes
  are at most 3 levels apart (measured: 1) and at most 0.1% differ (measured: 0.013%);
  the parameters agree to train_fixtures.assert_same_training's 8-bit bound (measured:
  within 5e-5 of their scale 1; docs/came.md)."""
  single = _config(data_dir, checkpoint_every=1000)
  single.mesh.update(data=1, fsdp=1, num_devices=1)
  ref_state = _run(single, tmp_path / "single", 3)
  sharded = _config(data_dir, checkpoint_every=1000)
  sharded.mesh.update(num_devices=8, data=2, fsdp=4)
  state = _run(sharded, tmp_path / "sharded", 3)
  codes = train_fixtures.eight_bit_codes(state.opt_state)
  ref_codes = train_fixtures.eight_bit_codes(ref_state.opt_state)
  assert len(codes) == len(ref_codes) == 12
  flipped, levels = train_fixtures.code_flips(list(codes.values()), list(ref_codes.values()))
  print(f"compact across meshes: {flipped:.4%} of the codes differ")
  assert levels <= 3  # one level per step at most
  assert flipped <= 1e-3
  train_fixtures.assert_same_training(state.params, ref_state.params, eight_bit=True)


def _train_cmd(workdir, data_dir, steps):
  return [
    sys.executable,
    str(REPO / "train.py"),
    "--config",
    str(REPO / "configs/tiny.py"),
    "--workdir",
    str(workdir),
    f"--config.data.dir={data_dir}",
    f"--config.train.steps={steps}",
    "--config.train.checkpoint_every=10",
    "--config.train.keep_checkpoints=5",
    "--config.mesh.num_devices=1",
    "--config.mesh.data=1",
    "--no_progress",
  ]


def _final_params(workdir):
  from sana_jax.train import checkpoint

  params, step = checkpoint.restore_params(workdir, ema=False)
  return params, step


def test_sigkill_and_resume_is_bit_identical(data_dir, tmp_path):
  steps = 30
  full = subprocess.run(
    _train_cmd(tmp_path / "full", data_dir, steps),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert full.returncode == 0, full.stderr[-2000:]
  proc = subprocess.Popen(
    _train_cmd(tmp_path / "killed", data_dir, steps),
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  ckpt = tmp_path / "killed" / "checkpoints" / "10"
  deadline = time.time() + 500
  while not (ckpt / "state").exists() and time.time() < deadline and proc.poll() is None:
    time.sleep(0.2)
  time.sleep(0.5)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = sorted(
    int(p.name) for p in (tmp_path / "killed" / "checkpoints").iterdir() if p.name.isdigit()
  )
  assert done and done[-1] < steps, f"the run was not killed mid-way: {done}"
  resumed = subprocess.run(
    _train_cmd(tmp_path / "killed", data_dir, steps),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  a, sa = _final_params(tmp_path / "full")
  b, sb = _final_params(tmp_path / "killed")
  assert sa == sb == steps
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_corrupt_latest_checkpoint_falls_back(data_dir, tmp_path):
  config = _config(data_dir, checkpoint_every=5, keep_checkpoints=5, async_checkpoints=False)
  config.mesh.update(data=1, num_devices=1)
  _run(config, tmp_path, 10)
  state_dir = tmp_path / "checkpoints" / "10" / "state"
  for f in state_dir.rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  with pytest.warns(UserWarning, match="step 10 could not be restored.*falling back to step 5"):
    state = _run(config, tmp_path, 12)
  assert int(state.step) == 12


def _fast_fail(fn, match, exc=ValueError):
  t = time.perf_counter()
  with pytest.raises(exc, match=match):
    fn()
  assert time.perf_counter() - t < 10, "the error should come before any compile"


def test_bad_configuration_fails_before_compile(data_dir, tmp_path):
  c = _config(data_dir)
  c.mesh.update(data=-1, fsdp=3)
  _fast_fail(lambda: loop.train(c, str(tmp_path)), "do not divide")
  c = _config(data_dir, global_batch=12)
  _fast_fail(lambda: loop.train(c, str(tmp_path)), "not divisible by the batch axes")
  c = _config(str(tmp_path / "nowhere"))
  _fast_fail(lambda: loop.train(c, str(tmp_path)), "dataset not found", FileNotFoundError)
  c = _config(data_dir)
  c.model.in_channels = 3
  _fast_fail(lambda: loop.train(c, str(tmp_path)), "4 channels, model.in_channels=3")
  c = _config(data_dir)
  c.model.caption_channels = 24
  _fast_fail(lambda: loop.train(c, str(tmp_path)), "20 wide, model.caption_channels=24")
  c = _config(data_dir, optimizer="sgd")
  _fast_fail(lambda: loop.train(c, str(tmp_path)), "train.optimizer")


def test_init_from_casts_stored_fp16_to_the_training_dtype(tmp_path):
  """train.init_from on a shipped folder (fp16 storage) gives fp32 masters, values kept."""
  from sana_jax.models import dit
  from sana_jax.models.dit_config import DiTConfig
  from sana_jax.train.loop import init_params_from
  from sana_jax.weights import dit as dit_weights

  cfg = DiTConfig(
    in_channels=3,
    out_channels=3,
    hidden_size=32,
    depth=2,
    self_head_dim=8,
    cross_heads=2,
    cross_head_dim=16,
    caption_channels=12,
    sample_size=4,
  )
  fresh = dit.init_params(cfg, jax.random.key(0))
  stored = jax.tree.map(lambda x: np.asarray(x).astype(np.float16), fresh)
  dit_weights.save_flax(tmp_path / "transformer", stored, cfg)
  params = init_params_from(str(tmp_path / "transformer"), cfg, fresh)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(stored)):
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want.astype(np.float32))
  with pytest.raises(ValueError, match="does not fit"):
    init_params_from(str(tmp_path / "transformer"), cfg.replace(depth=3), fresh)


def test_dataset_larger_than_tfds_memory_buffer_writes_without_tensorflow(tmp_path, monkeypatch):
  # TFDS spills a split over its in-memory limit (1 GB) to temporary files through
  # tf.io.gfile; lower the limit so 40 small examples cross it, and read every one back.
  import importlib.util
  from tensorflow_datasets.core import shuffle
  from sana_jax.data import latents_tfds

  assert importlib.util.find_spec("tensorflow") is None, "this checks the TensorFlow-free path"
  monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 5_000)
  monkeypatch.setattr(shuffle, "tf", shuffle.tf)  # undo the epath stand-in afterwards
  out = train_fixtures.write_tiny_dataset(tmp_path, n=40, seed=3)
  src = latents_tfds.open_dataset(out)["train_4x6"]
  rng = np.random.default_rng(3)
  latents = rng.standard_normal((40, 4, 6, 4)).astype(np.float32)
  assert len(src) == 40
  np.testing.assert_array_equal(np.stack([src[i]["latent"] for i in range(40)]), latents)
  assert [src[i]["text"] for i in (0, 39)] == [b"example 0", b"example 39"]


def test_loader_worker_processes_give_the_same_batches(data_dir):
  # data.worker_count > 0 (a GPU steps faster than one process decodes) must not change
  # which examples a step sees.
  from sana_jax.data import input_pipeline

  def first_batches(workers):
    loader, _ = input_pipeline.make_loader(data_dir, 4, seed=5, num_epochs=3, worker_count=workers)
    it = iter(loader)
    return [next(it) for _ in range(5)]

  for a, b in zip(first_batches(0), first_batches(2)):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_loader_from_a_batch_continues_the_plan(data_dir):
  # A run resumed at step s reads the plan from global batch s on (one batch per step),
  # with any worker count: the same batches the uninterrupted loader gives from s on.
  from sana_jax.data import input_pipeline

  loader, plan = input_pipeline.make_loader(data_dir, 4, seed=5, num_epochs=4)
  it = iter(loader)
  full = [next(it) for _ in range(6)]
  for workers in (0, 2):
    loader, _ = input_pipeline.make_loader(
      data_dir, 4, seed=5, num_epochs=4, worker_count=workers, start_batch=3
    )
    it = iter(loader)
    for want in full[3:]:
      got = next(it)
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  half, _ = input_pipeline.make_loader(data_dir, 4, seed=5, num_epochs=4, rows=(1, 3))
  np.testing.assert_array_equal(next(iter(half))["latent"], full[0]["latent"][1:3])
  assert plan.batches_per_epoch == 2 and len(plan) == 8
