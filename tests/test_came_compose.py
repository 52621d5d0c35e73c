"""CAME / CAME-8bit composability with optax wrappers, dtypes, and FSDP sharding."""

import importlib

import numpy as np
import optax
import pytest
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sana_jax.optim import quant8

came_lib = importlib.import_module("sana_jax.optim.came")

SPEC = came_lib.reference_spec(
  stacked=lambda p: p.startswith("blocks/"), matrix=lambda p, s: 1 if p.endswith("kernel") else None
)


def _params(rng, dtype=jnp.float32):
  shapes = {
    "blocks": {"qkv": {"kernel": (2, 64, 3, 96)}, "bias": (2, 96), "dw": (2, 3, 3, 2, 40)},
    "out": {"kernel": (96, 200), "bias": (200,)},
    "norm": (24,),
  }
  return jax.tree.map(
    lambda s: jnp.asarray(rng.normal(size=s), dtype), shapes, is_leaf=lambda x: isinstance(x, tuple)
  )


def _grads(rng, params, n):
  return [
    jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params) for _ in range(n)
  ]


def _run(opt, params, grads, jit=True):
  state = opt.init(params)
  upd = jax.jit(opt.update) if jit else opt.update
  for g in grads:
    u, state = upd(g, state, params)
    params = optax.apply_updates(params, u)
  return params, state


OPTS = {
  "came": lambda **k: came_lib.came(1e-2, spec=SPEC, **k),
  "came_8bit": lambda **k: came_lib.came_8bit(
    1e-2, spec=SPEC, min_8bit_size=1000, block_size=256, **k
  ),
}


def _close(a, b, rtol=1e-5, flips_ok=False):
  """Leafwise allclose. flips_ok (8-bit runs of differently compiled programs): float
  rounding differences of ~1e-7 in m (e.g. sharded partial sums) can move a value across a
  rounding boundary of the quantiser, changing one code by one level; allow that for at
  most 0.1% of the elements."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    atol = rtol * float(np.abs(y).max())
    if flips_ok:
      bad = np.abs(x - y) > atol + rtol * np.abs(y)
      assert np.mean(bad) <= 1e-3, f"{np.mean(bad):.2%} of elements differ"
    else:
      np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", list(OPTS))
def test_jit_equals_eager_and_chain(name):
  rng = np.random.default_rng(0)
  p = _params(rng)
  gs = _grads(rng, p, 2)
  a, _ = _run(OPTS[name](), p, gs, jit=True)
  b, _ = _run(OPTS[name](), p, gs, jit=False)
  _close(a, b)
  # inside a chain, after gradient clipping that does nothing at this norm
  c, _ = _run(optax.chain(optax.clip_by_global_norm(1e9), OPTS[name]()), p, gs)
  _close(a, c)


def test_inject_hyperparams_matches_and_changes_lr():
  rng = np.random.default_rng(1)
  p = _params(rng)
  gs = _grads(rng, p, 3)
  # injected betas become fp32 arrays: compare with the same fp32-rounded betas
  f32 = lambda x: float(np.float32(x))
  betas = dict(b1=f32(0.9), b2=f32(0.999), b3=f32(0.9999))
  ref, _ = _run(OPTS["came"](**betas), p, gs)
  opt = optax.inject_hyperparams(came_lib.came, static_args=("spec",))(
    learning_rate=1e-2, spec=SPEC
  )
  got, state = _run(opt, p, gs)
  _close(got, ref)
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(1e-2)
  # came_8bit: shape arguments must be static
  opt8 = optax.inject_hyperparams(
    came_lib.came_8bit, static_args=("spec", "block_size", "min_8bit_size", "align")
  )(learning_rate=1e-2, spec=SPEC, min_8bit_size=1000, block_size=256)
  got8, _ = _run(opt8, p, gs)
  ref8, _ = _run(OPTS["came_8bit"](**betas), p, gs)
  _close(got8, ref8, flips_ok=True)
  with pytest.raises(TypeError, match="static_args"):
    optax.inject_hyperparams(came_lib.came_8bit, static_args=("spec",))(
      learning_rate=1e-2, spec=SPEC
    ).init(p)


@pytest.mark.parametrize("name", list(OPTS))
def test_multisteps_accumulates(name):
  """MultiSteps(k=2) on (g1, g2) == one step on their mean."""
  rng = np.random.default_rng(2)
  p = _params(rng)
  g1, g2 = _grads(rng, p, 2)
  ms = optax.MultiSteps(OPTS[name](), every_k_schedule=2)
  got, _ = _run(ms, p, [g1, g2])
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  ref, _ = _run(OPTS[name](), p, [mean])
  _close(got, ref)


@pytest.mark.parametrize("name", list(OPTS))
def test_masked_only_touches_masked_leaves(name):
  rng = np.random.default_rng(3)
  p = _params(rng)
  gs = _grads(rng, p, 2)
  mask = jax.tree.map(lambda _: False, p)
  mask["blocks"]["qkv"]["kernel"] = True
  mask["out"]["bias"] = True
  got, _ = _run(optax.masked(OPTS[name](), mask), p, gs)
  sub = {
    "blocks": {"qkv": {"kernel": p["blocks"]["qkv"]["kernel"]}},
    "out": {"bias": p["out"]["bias"]},
  }
  sub_g = [
    {"blocks": {"qkv": {"kernel": g["blocks"]["qkv"]["kernel"]}}, "out": {"bias": g["out"]["bias"]}}
    for g in gs
  ]
  ref, _ = _run(OPTS[name](), sub, sub_g)
  _close(got["blocks"]["qkv"]["kernel"], ref["blocks"]["qkv"]["kernel"])
  _close(got["out"]["bias"], ref["out"]["bias"])
  # masked-out leaves: optax.masked passes their gradient through unchanged
  np.testing.assert_allclose(got["norm"], p["norm"] + gs[0]["norm"] + gs[1]["norm"], rtol=1e-6)


@pytest.mark.parametrize("name", list(OPTS))
def test_apply_if_finite_skips_nan_step(name):
  rng = np.random.default_rng(4)
  p = _params(rng)
  g1, g2 = _grads(rng, p, 2)
  bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), g1)
  got, state = _run(optax.apply_if_finite(OPTS[name](), max_consecutive_errors=3), p, [g1, bad, g2])
  ref, _ = _run(OPTS[name](), p, [g1, g2])
  _close(got, ref)
  assert int(state.total_notfinite) == 1
  assert all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in jax.tree.leaves(state))


@pytest.mark.parametrize("name", list(OPTS))
def test_bf16_params_keep_dtype_stats_fp32(name):
  rng = np.random.default_rng(5)
  p = _params(rng, jnp.bfloat16)
  gs = _grads(rng, p, 3)
  out, state = _run(OPTS[name](), p, gs)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))
  came_state = state[0]
  is_q = lambda x: isinstance(x, quant8.QuantizedArray)
  for x in jax.tree.leaves(came_state.mu, is_leaf=is_q):
    if is_q(x):
      # codes uint8; block min/scale in the default metadata dtype, fp32
      assert x.q.dtype == jnp.uint8 and x.minimum.dtype == x.scale.dtype == jnp.float32
    else:
      assert x.dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(came_state.nu))
  # same trajectory as fp32 params fed the same (bf16-valued) gradients, to bf16 precision
  p32 = jax.tree.map(lambda x: x.astype(jnp.float32), p)
  out32, _ = _run(OPTS[name](), p32, [jax.tree.map(lambda x: x.astype(jnp.float32), g) for g in gs])
  _close(out, out32, rtol=2e-2)


# ----------------------------------------------------------------------------- sharding


def _fsdp(mesh, x):
  """Shard the largest axis divisible by the mesh size (FSDP); else replicate."""
  n = mesh.devices.size
  cands = [i for i, d in enumerate(x.shape) if d % n == 0]
  if not cands:
    return NamedSharding(mesh, P())
  i = max(cands, key=lambda i: x.shape[i])
  spec = [None] * x.ndim
  spec[i] = "fsdp"
  return NamedSharding(mesh, P(*spec))


@pytest.mark.parametrize("name", list(OPTS))
def test_state_shards_like_params_and_sharded_update_matches(name):
  devices = jax.devices()
  if len(devices) < 8:
    pytest.skip("needs 8 (simulated) devices")
  mesh = Mesh(np.array(devices[:8]), ("fsdp",))
  rng = np.random.default_rng(6)
  p = _params(rng)
  # add leaves sharded on their last axis and on the layer axis
  p["blocks"]["rows"] = {"kernel": jnp.asarray(rng.normal(size=(2, 160, 24)), jnp.float32)}
  p["blocks"]["layers"] = {"kernel": jnp.asarray(rng.normal(size=(16, 12, 10)), jnp.float32)}
  p["lastaxis"] = {"kernel": jnp.asarray(rng.normal(size=(24, 3, 160)), jnp.float32)}
  gs = _grads(rng, p, 3)
  p_sh = jax.tree.map(lambda x: _fsdp(mesh, x), p)
  assert not p_sh["blocks"]["qkv"]["kernel"].is_fully_replicated
  opt = OPTS[name]()

  abstract = jax.eval_shape(opt.init, p)
  s_sh = came_lib.state_sharding(abstract, p_sh)
  params = jax.device_put(p, p_sh)
  state = jax.jit(opt.init, in_shardings=(p_sh,), out_shardings=s_sh)(params)

  # every per-parameter state leaf is sharded wherever its parameter is
  came_state = state[0]
  is_entry = lambda x: isinstance(
    x, (quant8.QuantizedArray, came_lib.FactoredMoments, came_lib.FullMoment)
  )
  pflat = jax.tree_util.tree_flatten_with_path(p_sh)[0]
  mu = jax.tree_util.tree_flatten_with_path(came_state.mu, is_leaf=is_entry)[0]
  nu = jax.tree_util.tree_flatten_with_path(came_state.nu, is_leaf=is_entry)[0]
  n_checked = 0
  for (path, ps), (_, m), (_, v) in zip(pflat, mu, nu):
    leaves = jax.tree.leaves(m) + jax.tree.leaves(v)
    for leaf in leaves:
      if not ps.is_fully_replicated:
        assert not leaf.sharding.is_fully_replicated, (jax.tree_util.keystr(path), leaf.shape)
        n_checked += 1
  assert n_checked >= 20

  @jax.jit
  def step(params, state, g):
    u, state = opt.update(g, state, params)
    return optax.apply_updates(params, u), state

  step_sh = jax.jit(step.__wrapped__, in_shardings=(p_sh, s_sh, p_sh), out_shardings=(p_sh, s_sh))
  ref_p, ref_s = p, opt.init(p)
  for g in gs:
    params, state = step_sh(params, state, jax.device_put(g, p_sh))
    ref_p, ref_s = step(ref_p, ref_s, g)
  _close(params, ref_p, rtol=1e-5, flips_ok=name == "came_8bit")
  # the state keeps its shardings through updates
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(s_sh)):
    assert a.sharding.is_equivalent_to(b, a.ndim)
