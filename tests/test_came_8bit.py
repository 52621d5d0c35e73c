"""CAME-8bit: the block codec, the 8-bit step semantics, convergence against fp32 CAME."""

import functools
import importlib

import numpy as np
import optax
import pytest
import jax
import jax.numpy as jnp
from hypothesis import given, settings, strategies as st, HealthCheck

from sana_jax.optim import quant8

came_lib = importlib.import_module("sana_jax.optim.came")

F32_EPS = float(np.finfo(np.float32).eps)


# ----------------------------------------------------------------------------- codec


@functools.partial(jax.jit, static_argnums=1)
def _roundtrip(x, tile):
  qa = quant8.quantize(x, tile)
  return qa, quant8.dequantize(qa)


def _check_roundtrip(x, tile):
  qa, y = _roundtrip(jnp.asarray(x), tuple(tile))
  y = np.asarray(y, np.float64)
  assert np.all(np.isfinite(y)), "decode produced non-finite values"
  # per-element half step of its block, broadcast back to the tensor
  split = tuple(v for s, t in zip(x.shape, tile) for v in (s // t, t))
  half = np.asarray(qa.scale, np.float64) / 2
  half = half.reshape(tuple(v for n in half.shape for v in (n, 1)))
  half = np.broadcast_to(half, split).reshape(x.shape)
  # Half a step, plus float rounding of the fp32 encode/decode (a few ulps of |x|).
  tol = half + 4 * F32_EPS * np.abs(x.astype(np.float64)).max()
  err = np.abs(y - x.astype(np.float64))
  assert np.all(err <= tol), f"max excess {np.max(err - tol):.3g}"
  return qa, err, half


KINDS = ["random", "constant", "huge_range", "tiny_range", "mixed"]


@st.composite
def blocks(draw):
  # a few shapes (each new shape compiles), many values
  ta = draw(st.sampled_from([1, 3, 8]))
  tb = draw(st.sampled_from([1, 5, 16]))
  na = draw(st.sampled_from([1, 2]))
  nb = draw(st.sampled_from([1, 3]))
  lead = 2
  kind = draw(st.sampled_from(KINDS))
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  shape = (lead, na * ta, nb * tb)
  if kind == "random":
    x = rng.normal(size=shape) * 10.0 ** rng.uniform(-6, 6)
  elif kind == "constant":
    x = np.full(shape, rng.normal() * 10.0 ** rng.uniform(-10, 10))
  elif kind == "huge_range":  # magnitudes 1e-30 .. 1e30 with both signs
    x = rng.choice([-1, 1], size=shape) * 10.0 ** rng.uniform(-30, 30, size=shape)
  elif kind == "tiny_range":  # spread 1e-6 of the offset
    off = rng.normal() * 10.0 ** rng.uniform(-3, 3)
    x = off + abs(off) * 1e-6 * rng.normal(size=shape)
  else:  # some constant blocks, some random ones
    x = rng.normal(size=shape)
    x[:, :ta, :tb] = 3.25
  return x.astype(np.float32), (1, ta, tb)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks())
def test_roundtrip_error_at_most_half_a_step(case):
  x, tile = case
  _check_roundtrip(x, tile)


def test_constant_block_is_exact_and_finite():
  x = np.full((2, 8, 6), -7.5, np.float32)
  qa = quant8.quantize(jnp.asarray(x), (1, 4, 3))
  assert np.all(np.asarray(qa.scale) == 0)
  np.testing.assert_array_equal(quant8.dequantize(qa), x)
  zeros = quant8.quantize(jnp.zeros((4, 4)), (2, 2))
  np.testing.assert_array_equal(quant8.dequantize(zeros), 0.0)
  for a, b in zip(quant8.zeros((4, 4), (2, 2)), zeros):  # what init uses
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype


def test_half_step_bound_is_tight_and_levels_used():
  """A uniform ramp uses all 256 levels and reaches (close to) the half-step bound, so
  the property test above checks a bound that is attained, not a loose one."""
  x = np.linspace(-1.0, 3.0, 4096, dtype=np.float32).reshape(1, 4096)
  qa, err, half = _check_roundtrip(x, (1, 4096))
  assert len(np.unique(np.asarray(qa.q))) == 256
  assert err.max() > 0.9 * half.max()


def test_blocks_never_cross_a_layer():
  """Quantising a stacked (L, a, b) tensor equals quantising each layer alone: layer i's
  state is the slice [i] of every state array."""
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(3, 40, 24)) * np.array([1e-3, 1.0, 1e3])[:, None, None]).astype(np.float32)
  tile = (1,) + quant8.block_shape((40, 24), 128)
  qa = quant8.quantize(jnp.asarray(x), tile)
  for i in range(3):
    qi = quant8.quantize(jnp.asarray(x[i]), tile[1:])
    for a, b in zip(qi, qa):
      np.testing.assert_array_equal(a, b[i])


@pytest.mark.parametrize("shape,bs", [((2240, 3, 2240), 2048), ((2240, 32), 2048), ((202, 202), 2048),
                                      ((5600, 2240), 2048), ((3, 3, 2, 5600), 2048), ((7, 13), 4)])
def test_block_shape(shape, bs):
  tile = quant8.block_shape(shape, bs)
  assert all(s % t == 0 for s, t in zip(shape, tile))
  n = np.prod(tile)
  assert n <= 2 * bs
  for s, t in zip(shape, tile):
    if s % 8 == 0:
      assert (s // t) % 8 == 0, (shape, tile)  # shard-local blocks on 8 devices


# ----------------------------------------------------------------------------- 8-bit step


def _tree(rng, L=2):
  return {
      "blocks": {"kernel": jnp.asarray(rng.normal(size=(L, 96, 2, 100)), jnp.float32),
                 "bias": jnp.asarray(rng.normal(size=(L, 100)), jnp.float32),
                 "dw": jnp.asarray(rng.normal(size=(L, 3, 3, 2, 1000)), jnp.float32)},
      "small": {"kernel": jnp.asarray(rng.normal(size=(30, 20)), jnp.float32)},
  }


SPEC = came_lib.reference_spec(
    stacked=lambda p: p.startswith("blocks/"),
    matrix=lambda p, s: 1 if p.endswith("kernel") else None)


def test_which_leaves_are_quantized():
  p = _tree(np.random.default_rng(0))
  mu = came_lib.came_8bit(1e-3, spec=SPEC, min_8bit_size=16384).init(p)[0].mu
  assert isinstance(mu["blocks"]["kernel"], quant8.QuantizedArray)  # 96*200 > 16384 per layer
  assert mu["blocks"]["kernel"].minimum.shape[0] == 2  # per-layer blocks
  assert not isinstance(mu["small"]["kernel"], quant8.QuantizedArray)  # 600 elements
  assert not isinstance(mu["blocks"]["dw"], quant8.QuantizedArray)  # unfactored (reference)
  assert not isinstance(mu["blocks"]["bias"], quant8.QuantizedArray)
  mu = came_lib.came_8bit(1e-3, spec=SPEC, quantize_unfactored=True).init(p)[0].mu
  assert isinstance(mu["blocks"]["dw"], quant8.QuantizedArray)  # 18000 per layer
  assert not isinstance(mu["blocks"]["bias"], quant8.QuantizedArray)


@pytest.mark.parametrize("unfactored", [False, True])
def test_step_uses_fp32_m_and_stores_requantized(unfactored):
  """came_8bit == fp32 came whose m is replaced by dequantize(quantize(m)) after every
  step: m is decoded, updated in fp32, used in fp32 for this step, stored requantised."""
  rng = np.random.default_rng(1)
  params = _tree(rng)
  grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
           for _ in range(8)]
  kw = dict(spec=SPEC, block_size=256)
  o8 = came_lib.scale_by_came(quantize_mu=True, quantize_unfactored=unfactored, **kw)
  o32 = came_lib.scale_by_came(**kw)
  s8, s32 = o8.init(params), o32.init(params)
  is_q = lambda x: isinstance(x, quant8.QuantizedArray)
  u8_fn, u32_fn = jax.jit(o8.update), jax.jit(o32.update)
  for i, g in enumerate(grads):
    u8, s8 = u8_fn(g, s8)
    u32, s32 = u32_fn(g, s32)
    for a, b in zip(jax.tree.leaves(u8), jax.tree.leaves(u32)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6 * float(np.abs(b).max()))
    if i == 0:  # m starts at exactly 0 in both: the first step is identical
      for a, b in zip(jax.tree.leaves(u8), jax.tree.leaves(u32)):
        np.testing.assert_array_equal(a, b)
    # what was stored is the requantised fp32 m of this step (codes equal up to a rare
    # one-level flip where float rounding of the encode lands on a rounding boundary) ...
    for m8, m32 in zip(jax.tree.leaves(s8.mu, is_leaf=is_q), jax.tree.leaves(s32.mu, is_leaf=is_q)):
      if is_q(m8):
        ref = quant8.quantize(m32, m8.tile)
        np.testing.assert_allclose(m8.minimum, ref.minimum, rtol=1e-6)
        dq = np.abs(np.asarray(m8.q, np.int32) - np.asarray(ref.q, np.int32))
        assert dq.max() <= 1 and np.mean(dq) < 1e-3
    # ... and the next step starts from its decode: continue the fp32 run from it
    mu = jax.tree.map(lambda m8, m32: quant8.dequantize(m8) if is_q(m8) else m32,
                      s8.mu, s32.mu, is_leaf=is_q)
    s32 = s32._replace(mu=mu)
  n_q = sum(is_q(x) for x in jax.tree.leaves(s8.mu, is_leaf=is_q))
  assert n_q == (2 if unfactored else 1)


# ----------------------------------------------------------------------------- convergence


def _regression_data():
  """A real regression problem: predict a terrain elevation profile (matplotlib's
  Jacksboro fault DEM) 6 rows ahead of the current one: X, Y (338, 202), standardised.
  Without matplotlib, a fixed random linear-plus-noise problem of the same shape."""
  try:
    import matplotlib.cbook as cbook
    z = cbook.get_sample_data("jacksboro_fault_dem.npz")["elevation"].astype(np.float32)
    source = "jacksboro DEM"
  except Exception:  # pragma: no cover - matplotlib is optional
    rng = np.random.default_rng(0)
    z = np.cumsum(rng.normal(size=(344, 404)), axis=0).astype(np.float32)
    source = "synthetic random walk"
  z = (z - z.mean()) / z.std()
  return z[:-6, ::2], z[6:, ::2], source


def _train(opt, X, Y, steps):
  def loss(p):
    return jnp.mean((X @ p["w"] + p["b"] - Y) ** 2)

  p = {"w": jnp.zeros((X.shape[1], Y.shape[1])), "b": jnp.zeros(Y.shape[1])}
  s = opt.init(p)

  @jax.jit
  def step(p, s):
    g = jax.grad(loss)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  for _ in range(steps):
    p, s = step(p, s)
  return float(loss(p))


def test_convergence_8bit_within_2_percent_of_came():
  X, Y, source = _regression_data()
  X, Y = jnp.asarray(X), jnp.asarray(Y)
  steps = 300
  lr = optax.cosine_decay_schedule(3e-3, steps)
  f32 = _train(came_lib.came(lr), X, Y, steps)
  f8 = _train(came_lib.came_8bit(lr), X, Y, steps)  # W is 202 x 202 = 40804 > 16384
  f8u = _train(came_lib.came_8bit(lr, quantize_unfactored=True, min_8bit_size=100), X, Y, steps)
  print(f"\n{source}: final loss after {steps} steps: came {f32:.6f}  came_8bit {f8:.6f} "
        f"({(f8 - f32) / f32:+.2%})  came_8bit+unfactored {f8u:.6f} ({(f8u - f32) / f32:+.2%})")
  assert f32 < 0.1  # it did learn (the initial loss is about 1)
  assert abs(f8 - f32) <= 0.02 * f32
  assert abs(f8u - f32) <= 0.02 * f32
