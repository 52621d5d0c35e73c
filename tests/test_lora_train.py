"""LoRA training from the config (train.lora.*) and the EMA storage options (train.ema).

Only the adapters train (the frozen base stays bit-identical, the optimizer and EMA hold
only adapter leaves); the exported adapter file is the EMA adapters; a LoRA run learns; a
resumed run equals the uninterrupted one bit for bit; 8 sharded devices equal one; bad
train.lora / train.ema values are refused by name before anything is built.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sana_jax.configs import tiny
from sana_jax.diffusion import flow
from sana_jax.models import dit
from sana_jax.train import checkpoint
from sana_jax.train import loop
from sana_jax.train import state as state_lib
from sana_jax.train import step as step_lib
from sana_jax.weights import dit as dit_weights
from sana_jax.weights import io
from tests import train_fixtures

RANK, ALPHA = 4, 6.0


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return train_fixtures.write_tiny_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  """A tiny DiT folder (no adapters) with weights no seed of the run would draw."""
  cfg = dit.DiTConfig.coerce(tiny.get_config().model)
  params = jax.device_get(dit.init_params(cfg, jax.random.key(1234)))
  folder = tmp_path_factory.mktemp("base") / "transformer"
  dit_weights.save_flax(folder, params, cfg)
  return str(folder)


def _config(data_dir, base="", mesh=None, **train):
  config = tiny.get_config()
  config.data.dir = data_dir
  config.train.update(
    dict(lr=1e-2, warmup_steps=2, ema_decay=0.9, checkpoint_every=2, cfg_dropout=0.0)
  )
  config.train.lora.update(rank=RANK, alpha=ALPHA, base=base)
  config.train.update(train)
  config.mesh.update(mesh or dict(data=1, fsdp=1, num_devices=1))
  return config


def _run(config, workdir, steps):
  return jax.device_get(loop.train(config, str(workdir), max_steps=steps, progress=False))


@pytest.fixture(scope="module")
def run4(data_dir, base_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run4")
  return _run(_config(data_dir, base_dir), workdir, 4), workdir


def _flat(tree):
  return dit_weights.flatten(tree)


def test_only_the_adapters_train_and_the_base_is_bit_unchanged(run4, base_dir):
  state, workdir = run4
  base, _, _ = dit_weights.load_flax(base_dir)
  frozen = _flat(state.frozen)
  assert sorted(frozen) == sorted(_flat(base))  # the base's leaves, and no adapter leaf
  for k, v in _flat(base).items():
    np.testing.assert_array_equal(frozen[k], v, err_msg=k)
  # params, EMA: adapter leaves only, of the configured targets and rank.
  names = sorted(_flat(state.params))
  assert names == sorted(_flat(state.ema_params))
  assert names == [
    f"blocks/{t.replace('.', '/')}/{leaf}"
    for t in sorted(dit.DiTConfig().lora_targets)
    for leaf in ("lora_a", "lora_b")
  ]
  for k, v in _flat(state.params).items():
    assert v.shape[-1 if k.endswith("lora_a") else -2] == RANK, k
    assert np.any(v != 0), k  # lora_b starts at zero: it moved
  # the optimizer state holds only adapter-shaped arrays (no base-sized statistics)
  sizes = {v.size for v in _flat(state.params).values()}
  opt = [x for x in jax.tree_util.tree_leaves(state.opt_state) if np.ndim(x) > 0]
  assert opt and all(x.size <= max(sizes) for x in opt)
  assert sum(x.size for x in opt) <= 3 * sum(sizes)
  # the exported adapters are the EMA adapters, with what a reader needs in the header
  path = checkpoint.adapter_path(workdir)
  exported = io.read_safetensors(path)
  for k, v in _flat(state.ema_params).items():
    np.testing.assert_array_equal(exported[k], v, err_msg=k)
  assert sorted(exported) == names
  from safetensors import safe_open

  with safe_open(str(path), "np") as f:
    meta = f.metadata()
  assert meta["format"] == checkpoint.ADAPTER_FORMAT and meta["step"] == "4"
  assert (meta["rank"], float(meta["alpha"]), meta["weights"]) == (str(RANK), ALPHA, "ema")
  assert checkpoint.adapter_path(workdir, 2).is_file()


def _fixed_loss(config, params, data_dir):
  """Mean loss over the tiny set at 8 fixed (noise, timestep) draws."""
  from sana_jax.data import latents_tfds

  src = latents_tfds.open_dataset(data_dir)["train_4x6"]
  batch = {
    k: np.stack([np.asarray(src[i][k]) for i in range(len(src))])
    for k in ("latent", "caption", "caption_mask")
  }
  model = dit.SanaDiT(state_lib.model_config(config))

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

  return float(np.mean([loss(params, jax.random.key(100 + i)) for i in range(8)]))


def test_lora_overfits_the_tiny_set(data_dir, base_dir, tmp_path):
  config = _config(data_dir, base_dir, checkpoint_every=1000)
  state = _run(config, tmp_path, 40)
  base, _, _ = dit_weights.load_flax(base_dir)
  init = dit.init_params(state_lib.model_config(config), jax.random.key(config.train.seed))
  adapters0 = state_lib.split_adapters(jax.device_get(init))[0]  # B = 0: adds nothing yet
  start = _fixed_loss(config, state_lib.merge(adapters0, base), data_dir)
  end = _fixed_loss(config, state_lib.merge(state.params, state.frozen), data_dir)
  print(f"LoRA overfit: fixed-draw loss {start:.4f} -> {end:.4f} ({end / start:.3f}x)")
  assert int(state.skipped) == 0
  assert end < 0.8 * start


def test_resume_is_bit_identical(run4, data_dir, base_dir, tmp_path):
  want, want_dir = run4
  config = _config(data_dir, base_dir)
  _run(config, tmp_path, 2)
  got = _run(config, tmp_path, 4)  # resumes from step 2
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  a = io.read_safetensors(checkpoint.adapter_path(tmp_path))
  b = io.read_safetensors(checkpoint.adapter_path(want_dir))
  for k in b:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_eight_sharded_devices_equal_one(run4, data_dir, base_dir, tmp_path):
  want, _ = run4
  config = _config(data_dir, base_dir, mesh=dict(data=2, fsdp=4, num_devices=8))
  got = _run(config, tmp_path, 4)
  for a, b in zip(jax.tree_util.tree_leaves(got.frozen), jax.tree_util.tree_leaves(want.frozen)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree_util.tree_leaves(got.params), jax.tree_util.tree_leaves(want.params)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.max(np.abs(a - b)) <= 1e-5 * max(np.max(np.abs(b)), 1e-6)


def test_bf16_base_params_and_ema(data_dir, base_dir, tmp_path):
  """train.lora.base_dtype, train.param_dtype and train.ema in bf16 (one program)."""
  config = _config(data_dir, base_dir, ema="bf16", ema_decay=0.99, param_dtype="bfloat16")
  config.train.lora.base_dtype = "bfloat16"
  state = _run(config, tmp_path, 4)  # lora_a has a gradient from step 2 on (B = 0 before)
  assert all(v.dtype == jnp.bfloat16 for v in _flat(state.params).values())
  assert all(np.any(np.asarray(v) != 0) for k, v in _flat(state.params).items() if "lora_b" in k)
  # the optimizer state is that of fp32 parameters (same leaves, shapes and dtypes)
  config.train.param_dtype = "float32"
  tx = loop.optim_lib.make_optimizer(config.train)
  want = state_lib.abstract_state(state_lib.model_config(config), tx, config.train).opt_state
  kinds = lambda t: [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(t)]  # noqa: E731
  assert kinds(state.opt_state) == kinds(want)
  base, _, _ = dit_weights.load_flax(base_dir)
  for k, v in _flat(state.frozen).items():
    assert v.dtype == jnp.bfloat16, k
    np.testing.assert_array_equal(v, _flat(base)[k].astype(jnp.bfloat16), err_msg=k)
  assert all(v.dtype == jnp.bfloat16 for v in _flat(state.ema_params).values())
  # A 0.99 EMA step of lora_a (|a| ~ 0.1) is ~10x below bf16's resolution there: rounded
  # to nearest its EMA would stay at the bf16 initial value; rounded stochastically it moves.
  init = dit.init_params(state_lib.model_config(config), jax.random.key(config.train.seed))
  init_a = _flat(state_lib.split_adapters(init)[0])
  moved = [
    np.mean(np.asarray(v) != np.asarray(init_a[k].astype(jnp.bfloat16)))
    for k, v in _flat(state.ema_params).items()
    if k.endswith("lora_a")
  ]
  assert all(0 < m < 0.5 for m in moved), moved


def test_stochastic_bf16_rounding_is_unbiased_and_deterministic():
  x = jax.random.uniform(jax.random.key(0), (4096,), minval=1.0, maxval=2.0)
  steps = jnp.arange(256)
  draws = jax.vmap(lambda s: step_lib.stochastic_bf16(x, s, 7).astype(jnp.float32))(steps)
  ulp = 2.0**-7  # bf16 spacing in [1, 2): every draw is one of x's two neighbours
  assert bool(jnp.all((draws >= x - ulp) & (draws <= x + ulp)))
  bias_sr = float(jnp.mean(draws - x[None]))
  assert abs(bias_sr) < 0.01 * ulp  # unbiased on average
  err_each = jnp.abs(jnp.mean(draws, 0) - x)
  assert float(jnp.max(err_each)) < 0.25 * ulp  # each element's mean over steps too
  again = step_lib.stochastic_bf16(x, steps[3], 7)
  np.testing.assert_array_equal(np.asarray(again, np.float32), np.asarray(draws[3]))
  exact = x.astype(jnp.bfloat16).astype(jnp.float32)  # representable values stay put
  np.testing.assert_array_equal(np.asarray(step_lib.stochastic_bf16(exact, steps[5], 1)), exact)


@pytest.mark.parametrize(
  "field,value,named",
  [
    ("lora.rank", -1, "train.lora.rank=-1"),
    ("lora.rank", 2.5, "train.lora.rank=2.5"),
    ("lora.alpha", -3.0, "train.lora.alpha=-3.0"),
    ("lora.targets", ("self_attn.qkv", "attn.qv"), "unknown ['attn.qv']"),
    ("lora.targets", (), "train.lora.targets=[]"),
    ("lora.base_dtype", "float16", "train.lora.base_dtype='float16'"),
    ("lora.base", "/nonexistent/model", "train.lora.base=/nonexistent/model"),
    ("ema", "fp16", "train.ema='fp16'"),
    ("param_dtype", "float16", "train.param_dtype='float16'"),
    ("nonfinite_guard", "select", "train.nonfinite_guard='select'"),
    ("came_8bit_state", "small", "train.came_8bit_state must be one of ('compact', 'official')"),
    ("init_from", "/some/model", "train.init_from='/some/model'"),
  ],
)
def test_bad_lora_settings_are_named(data_dir, tmp_path, field, value, named):
  config = _config(data_dir)
  node = config.train
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  with node.ignore_type():
    node[leaf] = value
  with pytest.raises(loop.UsageError, match=None) as e:
    loop.prepare(config, tmp_path / "w")
  assert named in str(e.value), str(e.value)
  assert not (tmp_path / "w").exists()


def test_base_of_another_geometry_is_refused(data_dir, tmp_path):
  cfg = dit.DiTConfig.coerce(tiny.get_config().model).replace(depth=2)
  params = jax.device_get(dit.init_params(cfg, jax.random.key(0)))
  dit_weights.save_flax(tmp_path / "other", params, cfg)
  with pytest.raises(loop.UsageError) as e:
    loop.prepare(_config(data_dir, str(tmp_path / "other")), tmp_path / "w")
  assert "model.depth: 2 -> 3" in str(e.value)


def test_full_training_state_is_unchanged_by_the_lora_code():
  """rank 0: params is the whole tree, no frozen field, an fp32 EMA (the state train.py
  built before LoRA existed)."""
  config = tiny.get_config()
  cfg = state_lib.model_config(config)
  assert cfg == dit.DiTConfig.coerce(config.model)
  tx = loop.optim_lib.make_optimizer(config.train)
  abstract = state_lib.abstract_state(cfg, tx, config.train)
  assert abstract.frozen is None
  assert _flat(abstract.params).keys() == _flat(dit.abstract_params(cfg)).keys()
  assert jax.tree_util.tree_structure(abstract.ema_params) == jax.tree_util.tree_structure(
    abstract.params
  )
