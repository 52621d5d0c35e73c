"""The DiT's execution and numerics switches, each run against a reference.

compute_dtype="bfloat16" against diffusers in bf16 (bound from torch's own bf16-vs-fp32
gap); depthwise_impl "conv" == "shift" (and == torch's grouped conv); every remat_policy ==
"none" in values and gradients (and really rematerialises); fp16_attn_clip on an input that
reaches the clip, against the official formula clip(proj(o), -65504, 65504) applied to
diffusers' attention; an all-zero caption mask against diffusers / the official additive
-10000 path (every token attended).
"""

import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from benchmarks import bench_gemm
from sana_jax.models import dit
from sana_jax.models.dit_config import DiTConfig
from sana_jax.weights import dit as dit_weights
from tests import dit_reference as ref

# All dimensions differ: width 64 (4 x 16 self heads), cross 3 x 12, caption 28 x 11,
# latent 6 x 10, 2 blocks, qk/cross norm on.
CFG = DiTConfig(
  in_channels=6,
  out_channels=6,
  hidden_size=64,
  depth=2,
  self_head_dim=16,
  cross_heads=3,
  cross_head_dim=12,
  caption_channels=28,
  sample_size=6,
  qk_norm=True,
  cross_norm=True,
)
LATENT, LY = (6, 10), 11


def _inputs(cfg=CFG, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, *LATENT, cfg.in_channels)).astype(np.float32)
  y = rng.standard_normal((2, LY, cfg.caption_channels)).astype(np.float32)
  mask = np.ones((2, LY), np.int32)
  mask[0, LY - 4 :] = 0
  t = np.array([999.0, 37.0], np.float32)
  return x, t, y, mask


@pytest.fixture(scope="module")
def reference():
  cfg = CFG.diffusers_compatible()
  torch_model = ref.diffusers_model(cfg, seed=5)
  params = dit_weights.diffusers_to_params(ref.state_dict_numpy(torch_model), cfg)
  return cfg, torch_model, params


def _apply(cfg, params, *args, **kw):
  return np.asarray(jax.jit(dit.SanaDiT(cfg).apply)({"params": params}, *args, **kw))


# ----------------------------------------------------------------------------- bfloat16


def test_bfloat16_against_diffusers_in_bfloat16(reference):
  """Ours in bf16 is as close to the fp32 result as diffusers in bf16 is (ours keeps norms,
  softmax and the linear attention in fp32, so it may be closer; twice torch's gap is the
  bound), and close to diffusers' bf16 output; bf16 really changes the numbers."""
  cfg, torch_model, params = reference
  x, t, y, mask = _inputs(cfg)
  f32_theirs = ref.run_diffusers(torch_model, x, t, y, mask)
  bf16_model = ref.diffusers_model(cfg, seed=5).to(torch.bfloat16)
  with torch.no_grad():
    out = bf16_model(
      hidden_states=torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).bfloat16(),
      encoder_hidden_states=torch.from_numpy(y).bfloat16(),
      timestep=torch.from_numpy(t),
      encoder_attention_mask=torch.from_numpy(mask).float(),
      return_dict=False,
    )[0]
  bf16_theirs = out.float().numpy().transpose(0, 2, 3, 1)
  torch_gap = ref.rel_err(bf16_theirs, f32_theirs)
  ours_f32 = _apply(cfg, params, x, t, y, mask)
  ours_bf16 = _apply(cfg.replace(compute_dtype="bfloat16"), params, x, t, y, mask)
  assert ours_bf16.dtype == np.float32
  our_gap = ref.rel_err(ours_bf16, f32_theirs)
  print(
    f"\nbf16 vs fp32 diffusers: torch {torch_gap:.3g}, ours {our_gap:.3g}; "
    f"ours vs torch bf16 {ref.rel_err(ours_bf16, bf16_theirs):.3g}"
  )
  assert 1e-3 < torch_gap < 0.1  # torch's own bf16 rounding is visible, and modest
  assert ref.rel_err(ours_f32, f32_theirs) <= 1e-5
  assert our_gap > 1e-4  # the switch computes in bf16
  assert our_gap <= 2 * torch_gap
  assert ref.rel_err(ours_bf16, bf16_theirs) <= 2 * torch_gap


# ----------------------------------------------------------------------------- depthwise


def test_depthwise_conv_equals_shift_and_torch():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 5, 7, 2, 9)).astype(np.float32)
  k = rng.standard_normal((3, 3, 2, 9)).astype(np.float32)
  shift = np.asarray(dit.depthwise_conv3x3(jnp.asarray(x), jnp.asarray(k), "shift"))
  conv = np.asarray(dit.depthwise_conv3x3(jnp.asarray(x), jnp.asarray(k), "conv"))
  tx = torch.from_numpy(x.reshape(2, 5, 7, 18).transpose(0, 3, 1, 2).copy())
  tk = torch.from_numpy(k.reshape(3, 3, 18).transpose(2, 0, 1)[:, None].copy())
  theirs = torch.nn.functional.conv2d(tx, tk, padding=1, groups=18).numpy()
  theirs = theirs.transpose(0, 2, 3, 1).reshape(x.shape)
  assert ref.rel_err(shift, theirs) <= 1e-6
  assert ref.rel_err(conv, theirs) <= 1e-6


def test_depthwise_conv_gradients_equal_shift():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 4, 6, 2, 5)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, 2, 5)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((2, 4, 6, 2, 5)), jnp.float32)
  grad = lambda impl: jax.grad(
    lambda a, b: jnp.sum(dit.depthwise_conv3x3(a, b, impl) * w), argnums=(0, 1)
  )(x, k)
  for a, b in zip(grad("conv"), grad("shift")):
    assert ref.rel_err(a, b) <= 1e-6


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_depthwise_shift_gradient_equals_autodiff_of_the_shift_form(dtype):
  """The shift form's hand-written VJP (flipped-kernel correlation, the kernel gradient's
  partial sums) against jax.grad of the same nine multiply-adds: equal to rounding in fp32;
  in bf16 the same dtypes, and no further from the fp32 gradient than autodiff's (the
  kernel gradient is accumulated in fp32, autodiff's in bf16)."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 5, 7, 2, 3)), dtype)
  k = jnp.asarray(rng.standard_normal((3, 3, 2, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((2, 5, 7, 2, 3)), dtype)

  def grad(f, x, w):
    return jax.grad(lambda a, b: jnp.sum((f(a, b) * w).astype(jnp.float32)), argnums=(0, 1))(x, k)

  ours, autodiff = grad(dit._depthwise_shift, x, w), grad(dit._shifted_sum, x, w)
  f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
  exact = grad(dit._shifted_sum, x.astype(jnp.float32), w.astype(jnp.float32))
  for a, b, e in zip(ours, autodiff, exact):
    assert a.dtype == b.dtype and a.shape == b.shape
    if dtype == jnp.float32:  # summation order differs (the kernel gradient's partial sums)
      assert ref.rel_err(f32(a), f32(b)) <= 1e-6
    else:
      assert ref.rel_err(f32(a), f32(e)) <= max(ref.rel_err(f32(b), f32(e)), 1e-2)


def _torch_depthwise_grads(x, k, w):
  """torch's grouped conv2d (float64) and its gradients (dx, dk) of sum(conv(x, k) * w):
  x, w (B, h, w, *C); k (3, 3, *C), channels flattened as the model's conv does."""
  b, h, wd = x.shape[:3]
  n = int(np.prod(x.shape[3:]))
  to_nchw = lambda a: torch.from_numpy(  # noqa: E731
    np.asarray(a, np.float64).reshape(b, h, wd, n).transpose(0, 3, 1, 2).copy()
  )
  tx = to_nchw(x).requires_grad_()
  tk = torch.from_numpy(
    np.asarray(k, np.float64).reshape(3, 3, n).transpose(2, 0, 1)[:, None].copy()
  )
  tk.requires_grad_()
  (torch.nn.functional.conv2d(tx, tk, padding=1, groups=n) * to_nchw(w)).sum().backward()
  dx = tx.grad.numpy().transpose(0, 2, 3, 1).reshape(x.shape)
  dk = tk.grad.numpy()[:, 0].transpose(1, 2, 0).reshape(k.shape)
  return dx, dk


# Image rows h: 5 (summed in 5 groups), 8 (8 groups of 1), 7, 11, 26 (13 groups of 2), 34
# (2 x 17, above the 16-group cap: 2 groups of 17), 37 (prime: one group, the partial sums
# are the products).
@pytest.mark.parametrize(
  "shape",
  [
    (2, 5, 7, 2, 3),
    (3, 8, 8, 2, 5),
    (1, 7, 5, 1, 4),
    (3, 11, 4, 6),
    (2, 26, 3, 2),
    (1, 34, 3, 2),
    (1, 37, 3, 2),
  ],
)
def test_depthwise_shift_gradients_equal_torch(shape):
  rng = np.random.default_rng(sum(shape))
  x = rng.standard_normal(shape).astype(np.float32)
  k = rng.standard_normal((3, 3, *shape[3:])).astype(np.float32)
  w = rng.standard_normal(shape).astype(np.float32)
  ours = jax.grad(lambda a, b: jnp.sum(dit.depthwise_conv3x3(a, b, "shift") * w), argnums=(0, 1))(
    jnp.asarray(x), jnp.asarray(k)
  )
  for a, theirs in zip(ours, _torch_depthwise_grads(x, k, w)):
    assert a.shape == theirs.shape and a.dtype == jnp.float32
    assert ref.rel_err(np.asarray(a, np.float64), theirs) <= 1e-6


def test_depthwise_gradients_under_a_batch_sharding_move_only_the_partial_sums():
  """With the batch over 8 devices the kernel gradient is a local sum and one all-reduce (the
  row groups stay inside each image): no gathers or permutes, and the single-device values."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((16, 8, 6, 2, 5)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, 2, 5)), jnp.float32)
  grad = jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.sin(dit.depthwise_conv3x3(a, b))), (0, 1)))
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  ks = jax.device_put(k, NamedSharding(mesh, P()))
  hlo = grad.lower(xs, ks).compile().as_text()
  assert _COLLECTIVES.findall(hlo) == []
  assert len(re.findall(r"= \S+ all-reduce(-start)?\(", hlo)) == 1
  for a, b in zip(grad(xs, ks), grad(x, k)):
    assert ref.rel_err(np.asarray(a), np.asarray(b)) <= 1e-6


DENSE_PRODUCTS = {
  "dense_matmul": dit.dense_matmul,
  "dense_matmul_unmerged": lambda x, k: dit.dense_matmul(x, k, False),
  "dense_matmul_autodiff": dit.dense_matmul_autodiff,
}


@pytest.mark.parametrize("product", sorted(DENSE_PRODUCTS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("out_shape", [(7,), (2, 5)])
def test_dense_products_equal_the_einsum_and_its_gradient(product, dtype, out_shape):
  """The dense products (the custom VJP, with dx over merged or separate out axes, and the
  merged-batch form under autodiff) against the plain einsum, values and jax.grad, for a
  kernel with one and with two out axes (the qkv / kv layout) and three batch axes: the
  same values (fp32: to rounding of a differently ordered sum), dtypes and shapes."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((2, 3, 4, 6)), dtype)
  k = jnp.asarray(rng.standard_normal((6, *out_shape)), dtype)
  w = jnp.asarray(rng.standard_normal((2, 3, 4, *out_shape)), dtype)
  plain = lambda a, b: jnp.einsum(dit._dense_einsum(b.ndim - 1), a, b)  # noqa: E731
  fn = DENSE_PRODUCTS[product]

  def grad(f):
    return jax.grad(lambda a, b: jnp.sum((f(a, b) * w).astype(jnp.float32)), argnums=(0, 1))(x, k)

  assert np.array_equal(np.asarray(fn(x, k)), np.asarray(plain(x, k)))
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  for a, b in zip(grad(fn), grad(plain)):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert ref.rel_err(np.asarray(a, np.float32), np.asarray(b, np.float32)) <= tol
  # One input differentiated at a time (the custom VJP then forms only that gradient).
  for argnum in (0, 1):
    one = lambda f: jax.grad(
      lambda a, b: jnp.sum((f(a, b) * w).astype(jnp.float32)), argnums=argnum
    )  # noqa: E731
    a, b = one(fn)(x, k), one(plain)(x, k)
    assert (
      a.shape == b.shape
      and ref.rel_err(np.asarray(a, np.float32), np.asarray(b, np.float32)) <= tol
    )


def _input_gradient_hlo(product, x, kernel, w) -> str:
  """The compiled gradient of sum(product(x, kernel[l]) * w[l]) over a scan of the stacked
  kernel's blocks, with respect to x (a block stack's input gradient)."""

  def loss(x, kernels):
    def block(total, kw):
      return total + jnp.sum(product(x, kw[0]) * kw[1]), None

    return jax.lax.scan(block, 0.0, (kernels, w))[0]

  return jax.jit(jax.grad(loss)).lower(x, kernel).compile().as_text()


def test_grouped_kernels_input_gradient_reads_the_kernel_in_place(optimized_compiles):
  """dx of a kernel with two out axes (in, 2, out), merged: no transposed copy of the kernel
  (an (2 * out, in) or (2, out, in) array) in the compiled program; over separate out axes
  XLA:CPU makes one per block (the copy this form removes: 310 ms of op time per 0.6B-width
  step, docs/train_speed.md)."""
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((4, 16, 48)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 48, 2, 40)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 4, 16, 2, 40)), jnp.float32)
  transposed = re.compile(r"= f32\[(80,48|2,40,48)\]")
  merged = _input_gradient_hlo(dit.dense_matmul, x, kernel, w)
  separate = _input_gradient_hlo(DENSE_PRODUCTS["dense_matmul_unmerged"], x, kernel, w)
  assert transposed.search(separate), "the test no longer sees the copy it guards against"
  assert not transposed.search(merged), transposed.findall(merged)


_COLLECTIVES = re.compile(r"= \S+ (all-gather|all-to-all|collective-permute)(-start)?\(")


def _dense_layer_gradients(mesh_shape: tuple, merge=None) -> tuple[list, bool]:
  """A (48 -> 2 x 40) dense layer's compiled gradient with the kernel's logical names of
  the qkv / kv layers, under `jax.set_mesh` and the project's logical rules on a mesh of
  the 8 devices (data, fsdp, tensor): (the gather-like collectives in it, sorted; whether
  the layer merged the out axes). `merge` True / False replaces dit.merges_out_axes's
  answer (so the layer merges, or not, regardless of the mesh)."""
  from sana_jax import parallel

  mesh = jax.make_mesh(mesh_shape, parallel.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  layer = dit._Dense((2, 40), ("embed", None, "heads"))
  params = layer.init(jax.random.key(0), jnp.zeros((1, 48)))
  params = jax.device_put(
    nn.unbox(params), parallel.logical_sharding(nn.get_partition_spec(params), mesh)
  )
  x = jnp.asarray(np.random.default_rng(7).standard_normal((8, 16, 48)), jnp.float32)
  x = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
  loss = lambda p, x: jnp.sum(jnp.sin(layer.apply(p, x)))  # noqa: E731
  merges = dit.merges_out_axes
  if merge is not None:
    dit.merges_out_axes = lambda names: merge
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
      hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()
      merged = dit.merges_out_axes(layer.names)
  finally:
    dit.merges_out_axes = merges
  return sorted(m.group(1) for m in _COLLECTIVES.finditer(hlo)), merged


def test_dense_layers_merge_out_axes_only_for_unsharded_kernels():
  """_Dense merges the out axes for dx only where the kernel is not sharded. On a
  tensor-parallel mesh (heads over 'tensor') and on an FSDP mesh (its in axis over 'fsdp')
  its gradient has the collectives of the unmerged form, fewer than merged (GSPMD gathers
  the merged kernel apart); on a data-parallel mesh it merges. No mesh: merged (CPU)."""
  names = ("embed", None, "heads")
  assert dit.merges_out_axes(names)
  for mesh_shape in ((2, 2, 2), (2, 4, 1)):
    gathers, merged = _dense_layer_gradients(mesh_shape)
    assert not merged, mesh_shape
    assert gathers == _dense_layer_gradients(mesh_shape, merge=False)[0]
    assert len(gathers) < len(_dense_layer_gradients(mesh_shape, merge=True)[0]), mesh_shape
  gathers, merged = _dense_layer_gradients((8, 1, 1))
  assert merged and gathers == _dense_layer_gradients((8, 1, 1), merge=False)[0] == []


def test_dense_layers_merge_out_axes_only_on_cpu():
  """On a TPU topology's mesh (AOT compiles, tpu_plan.py) the out axes stay unmerged:
  the merge is an XLA:CPU measure."""
  pytest.importorskip("libtpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # test_tpu_plan may hold libtpu
  from jax.experimental import topologies

  from sana_jax import parallel

  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
  mesh = parallel.make_mesh(data=1, fsdp=4, devices=list(devices))
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
    assert not dit.merges_out_axes(("embed", None, "heads"))
  with jax.set_mesh(parallel.make_mesh(data=8)), nn.logical_axis_rules(parallel.LOGICAL_RULES):
    assert dit.merges_out_axes(("embed", None, "heads"))


def _dots_in_custom_vjps(jaxpr, inside=False) -> tuple[int, int]:
  """(dot_generals inside custom_vjp calls, dot_generals outside them), recursively."""
  hidden = seen = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      hidden, seen = hidden + inside, seen + (not inside)
    for sub in bench_gemm.sub_jaxprs(eqn.params):
      h, v = _dots_in_custom_vjps(sub, inside or eqn.primitive.name.startswith("custom_vjp"))
      hidden, seen = hidden + h, seen + v
  return hidden, seen


@pytest.mark.parametrize("policy", ["none", "full", "dots", "dots_no_batch"])
def test_dense_products_are_visible_to_dot_saving_remat_policies(policy):
  """The custom-VJP product hides its dots from remat policies (they see a custom_vjp
  call, not a dot_general, and recompute it): blocks under a dot-saving policy must use
  the plain-autodiff form, the others the custom VJP; the layers outside the blocks (never
  rematerialised) always use the custom VJP. Counted on the model's jaxpr."""
  cfg = RCFG.replace(remat_policy=policy)
  params = dit.init_params(cfg, jax.random.key(0))
  p = cfg.patch_size
  x = jnp.zeros((1, 2 * p, 2 * p, cfg.in_channels))
  y, m = jnp.zeros((1, 3, cfg.caption_channels)), jnp.ones((1, 3), jnp.int32)
  loss = lambda q: jnp.sum(dit.SanaDiT(cfg).apply({"params": q}, x, jnp.zeros((1,)), y, m))  # noqa: E731
  hidden, seen = _dots_in_custom_vjps(jax.make_jaxpr(loss)(params).jaxpr)
  in_block = 7  # qkv, out; q, kv, out; inverted, point (the scan body is traced once)
  outside = 7  # patch, 3 timestep and 2 caption layers, the final linear
  if policy in ("dots", "dots_no_batch"):
    assert hidden == outside and seen >= in_block
  else:
    assert hidden == outside + in_block and seen > 0  # (the attention products)


def test_scan_unroll_equals_the_scan_and_unrolls(remat_base):
  """Unrolled blocks (scan_unroll = depth) compute what the scan computes, values and
  gradients, and the option reaches lax.scan (an ignored option would pass the equality)."""
  params, (base, base_jaxpr) = remat_base
  got, jaxpr = _loss_and_grads(RCFG.replace(scan_unroll=RCFG.depth), params)
  _assert_same(got, base, 1e-6)
  unrolls = lambda jp: [  # noqa: E731
    e.params["unroll"] for e in jp.jaxpr.eqns if e.primitive.name == "scan"
  ]
  assert unrolls(base_jaxpr) == [1] and unrolls(jaxpr) == [RCFG.depth]
  with pytest.raises(ValueError, match="scan_unroll"):
    RCFG.replace(scan_unroll=0)


def test_depthwise_impl_conv_equals_shift_in_the_model(reference):
  """Forward only: the grouped conv's gradient is very slow on XLA:CPU (DESIGN.md); its
  gradient is checked on the function above."""
  cfg, _, params = reference
  args = _inputs(cfg)
  conv_cfg = cfg.replace(depthwise_impl="conv")
  conv = _apply(conv_cfg, params, *args)
  assert ref.rel_err(conv, _apply(cfg, params, *args)) <= 1e-5
  # and the option is honoured: only "conv" lowers to a grouped convolution
  jaxpr = lambda c: str(
    jax.make_jaxpr(lambda p: dit.SanaDiT(c).apply({"params": p}, *args))(params)
  )
  assert f"feature_group_count={2 * cfg.mlp_hidden}" in jaxpr(conv_cfg)
  assert "conv_general_dilated" not in jaxpr(cfg)


# Remat runs on a smaller twin (the gradient compile dominates): width 32, 1 block.
RCFG = DiTConfig(
  in_channels=3,
  out_channels=3,
  hidden_size=32,
  depth=1,
  self_head_dim=8,
  cross_heads=2,
  cross_head_dim=10,
  caption_channels=12,
  qk_norm=True,
  cross_norm=True,
)
RLATENT = (3, 5)


def _loss_and_grads(cfg, params):
  rng = np.random.default_rng(9)
  x = rng.standard_normal((2, *RLATENT, cfg.in_channels)).astype(np.float32)
  y = rng.standard_normal((2, 4, cfg.caption_channels)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.int32)
  t = np.array([500.0, 3.0], np.float32)
  w = rng.standard_normal((2, *RLATENT, cfg.out_channels)).astype(np.float32)

  def loss(p, lat):
    out = dit.SanaDiT(cfg).apply({"params": p}, lat, t, y, mask)
    return jnp.mean(out * w), out

  (value, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
    params, jnp.asarray(x)
  )
  jaxpr = jax.make_jaxpr(lambda p: loss(p, x)[0])(params)
  return (np.asarray(out), float(value), grads), jaxpr


def _assert_same(a, b, tol):
  out_a, va, ga = a
  out_b, vb, gb = b
  assert ref.rel_err(out_a, out_b) <= tol
  assert abs(va - vb) <= tol * float(np.mean(np.abs(out_b)))  # a mean with cancellation
  flat_a = jax.tree_util.tree_flatten_with_path(ga)[0]
  for (path, x), y in zip(flat_a, jax.tree.leaves(gb)):
    assert ref.rel_err(x, y) <= tol, jax.tree_util.keystr(path)


def _remat_policies(jaxpr):
  """Policies of every remat (checkpoint) equation, searched through nested jaxprs."""
  found = []

  def visit(jp):
    for eqn in jp.eqns:
      if eqn.primitive.name in ("remat2", "checkpoint", "remat"):
        found.append(eqn.params.get("policy"))
      for v in eqn.params.values():
        for sub in v if isinstance(v, (list, tuple)) else [v]:
          if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
            visit(sub.jaxpr)
          elif hasattr(sub, "eqns"):
            visit(sub)

  visit(jaxpr.jaxpr)
  return found


@pytest.fixture(scope="module")
def remat_base():
  params = ref.random_params(RCFG, seed=4)
  return params, _loss_and_grads(RCFG, params)


# ----------------------------------------------------------------------------- remat

_POLICIES = {
  "full": None,
  "dots": jax.checkpoint_policies.dots_saveable,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_policy_equals_none(remat_base, policy):
  """Same values and gradients as without remat, and the forward really holds a
  checkpoint with that policy (an ignored option would pass the equality alone)."""
  params, (base, base_jaxpr) = remat_base
  got, jaxpr = _loss_and_grads(RCFG.replace(remat_policy=policy), params)
  _assert_same(got, base, 1e-5)
  assert _remat_policies(base_jaxpr) == []
  policies = _remat_policies(jaxpr)
  assert policies and all(p is _POLICIES[policy] for p in policies), policies


# ----------------------------------------------------------------------------- fp16 clip


def test_sana_4k_config_turns_the_clip_on():
  from sana_jax.configs import sana_1600m_4k

  assert DiTConfig.coerce(sana_1600m_4k.get_config().model).fp16_attn_clip


def test_fp16_attn_clip_against_the_official_formula(reference):
  """Self-attention outputs scaled past 65504 (attn1.to_out x 1e6 in both models). The
  reference is diffusers with the official clip(proj(o), -65504, 65504) hooked onto every
  attn1 output (diffusers itself clips only fp16 tensors)."""
  cfg, torch_model, _ = reference
  sd = ref.state_dict_numpy(torch_model)
  for k in sd:
    if "attn1.to_out.0." in k:
      sd[k] = sd[k] * np.float32(1e6)
  from diffusers import SanaTransformer2DModel

  config = dit_weights.to_diffusers_config(cfg)
  config.pop("_class_name")
  big = SanaTransformer2DModel(**config).eval()
  big.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
  params = dit_weights.diffusers_to_params(sd, cfg)
  x, t, y, mask = _inputs(cfg)
  reached = []

  def clip(module, inputs, output):
    reached.append(float((output.abs() > 65504).float().mean()))
    return output.clip(-65504, 65504)

  unclipped = ref.run_diffusers(big, x, t, y, mask)
  hooks = [b.attn1.register_forward_hook(clip) for b in big.transformer_blocks]
  try:
    clipped = ref.run_diffusers(big, x, t, y, mask)
  finally:
    for h in hooks:
      h.remove()
  assert min(reached) > 0.01, reached  # every block's attention output hits the clip
  ours = _apply(cfg.replace(fp16_attn_clip=True), params, x, t, y, mask)
  ours_off = _apply(cfg, params, x, t, y, mask)
  assert ref.rel_err(ours, clipped) <= 1e-5
  assert ref.rel_err(ours_off, unclipped) <= 1e-5
  assert ref.rel_err(ours_off, clipped) > 1e-2  # the clip changes the output


# ----------------------------------------------------------------------------- all-zero mask


@pytest.mark.parametrize("mode", ["exact", "additive"])
def test_all_zero_caption_mask_attends_to_every_token(reference, mode):
  """A caption whose mask is all zeros: the official / diffusers additive -10000 shifts
  every logit alike, so the softmax runs over all tokens. Ours does the same in both mask
  modes: "exact" equals the all-ones mask, "additive" equals diffusers (the -10000 rounds
  fp32 logits to ~1e-3, which bounds the distance between the two)."""
  cfg, torch_model, params = reference
  cfg = cfg.replace(cross_mask=mode)
  x, t, y, mask = _inputs(cfg)
  zero = mask.copy()
  zero[0] = 0  # sample 0 all masked, sample 1 full
  ones = np.ones_like(mask)
  ours = _apply(cfg, params, x, t, y, zero)
  theirs = ref.run_diffusers(torch_model, x, t, y, zero)
  all_kept = ref.run_diffusers(torch_model, x, t, y, ones)
  if mode == "exact":  # exactly the all-ones result; diffusers within its -10000 rounding
    assert ref.rel_err(ours, _apply(cfg, params, x, t, y, ones)) <= 1e-5
    assert ref.rel_err(ours, all_kept) <= 1e-5
    assert ref.rel_err(ours, theirs) <= 1e-3
  else:  # diffusers' arithmetic (summation order moves the rounded -10000 logits: 2e-5)
    assert ref.rel_err(ours, theirs) <= 1e-4
    assert ref.rel_err(ours, all_kept) <= 1e-3
  assert ref.rel_err(theirs, all_kept) <= 1e-3  # the reference behaviour itself
  # and a partly masked caption is still masked (not affected by the all-zero rule)
  assert (
    ref.rel_err(_apply(cfg, params, x, t, y, mask), ref.run_diffusers(torch_model, x, t, y, mask))
    <= 1e-5
  )
