"""The SANA linear diffusion transformer (SANA 1.0 / 1.5), in Flax Linen.

Latents are NHWC. Blocks are stacked with `nn.scan`, so every block parameter has a
leading layer axis 0 (logical name 'layers'). Every parameter carries logical axis names;
`sana_jax.parallel` maps them to mesh axes.

Parameter tree (C hidden, H mlp hidden, Ci cross inner, Cy caption width, L depth):
  patch_embed/{kernel (p*p*cin, C), bias (C)}
  t_embedder_fc1 (256, C), t_embedder_fc2 (C, C), t_block/{kernel (C, 6C), bias}
  caption_proj_fc1 (Cy, C), caption_proj_fc2 (C, C), caption_norm (C)
  blocks/scale_shift_table (L, 6, C)
  blocks/self_attn/{qkv/kernel (L, C, 3, C), q_norm (L, C), k_norm (L, C), out/{kernel, bias}}
  blocks/cross_attn/{q/{kernel (L, C, Ci), bias}, kv/{kernel (L, C, 2, Ci), bias (L, 2, Ci)},
                     q_norm (L, Ci), k_norm (L, Ci), out/{kernel (L, Ci, C), bias}}
  blocks/mlp/{inverted/{kernel (L, C, 2, H), bias (L, 2, H)},
              depthwise_kernel (L, 3, 3, 2, H), depthwise_bias (L, 2, H), point/kernel (L, H, C)}
  final_scale_shift_table (2, C), final_linear/{kernel (C, p*p*cout), bias}
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sana_jax.models.dit_config import DiTConfig

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST

# Initialisers of the official model.
_xavier = nn.initializers.xavier_uniform()
_normal02 = nn.initializers.normal(0.02)
_torch_conv = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")  # torch default


def _part(init, names):
  return nn.with_logical_partitioning(init, names)


def _table_init(hidden: int):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, dtype) / math.sqrt(hidden)

  return init


def _constant_init(value: float):
  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.full(shape, value, dtype)

  return init


# ----------------------------------------------------------------------------- functions


def timestep_features(t: Array, dim: int = 256, max_period: float = 10000.0) -> Array:
  """Sinusoidal timestep features, cos half first. t: (B,) -> (B, dim) fp32."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_pos_embed(
  dim: int, height: int, width: int, base_size: int, interpolation: float
) -> np.ndarray:
  """2-D sin-cos positional embedding as the released models compute it.

  Returns (height * width, dim) float32, tokens row-major. The first half of the channels
  encodes the column (w) coordinate and the second half the row (h) coordinate, each half
  [sin, cos]; coordinates are arange(n) / (n / base_size) / interpolation (float64 math).
  """
  if dim % 4:
    raise ValueError(f"positional embedding needs hidden_size % 4 == 0, got {dim}")
  grid_h = np.arange(height, dtype=np.float64) / (height / base_size) / interpolation
  grid_w = np.arange(width, dtype=np.float64) / (width / base_size) / interpolation
  ww, hh = np.meshgrid(grid_w, grid_h)  # (height, width) each

  def one_axis(pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  return np.concatenate([one_axis(ww), one_axis(hh)], axis=1).astype(np.float32)


def rms_norm(x: Array, scale: Array, eps: float) -> Array:
  """x * rsqrt(mean(x^2) + eps) * scale over the last axis, in fp32; returns x's dtype."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


def layer_norm(x: Array, eps: float) -> Array:
  """LayerNorm without affine over the last axis, in fp32."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return (x32 - mean) * jax.lax.rsqrt(var + eps)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
  return x * (1 + scale) + shift


def linear_attention(q: Array, k: Array, v: Array, eps: float) -> Array:
  """ReLU linear attention, per head, in fp32.

  q, k: (B, N, heads, d) already ReLU'd; v: (B, N, heads, e).
  o_n = sum_m v_m (k_m . q_n) / (sum_m k_m . q_n + eps). Returns (B, N, heads, e) fp32.
  """
  q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
  kv = jnp.einsum("bmhd,bmhe->bhde", k, v, precision=_HIGHEST)
  k_sum = jnp.sum(k, axis=1)
  num = jnp.einsum("bnhd,bhde->bnhe", q, kv, precision=_HIGHEST)
  den = jnp.einsum("bnhd,bhd->bnh", q, k_sum, precision=_HIGHEST)
  return num / (den[..., None] + eps)


def depthwise_conv3x3(x: Array, kernel: Array, impl: str = "shift") -> Array:
  """Depthwise 3x3 convolution, stride 1, zero padding 1 (cross-correlation, like torch).

  x: (B, h, w, *C); kernel: (3, 3, *C). The channel axes may be several (e.g. (2, H)).
  "shift" sums nine shifted multiply-adds (fast on XLA:CPU); "conv" uses a grouped conv.
  """
  # The named scope tags its ops in the HLO metadata (benchmarks/profile_train_step.py).
  with jax.named_scope("depthwise_conv3x3"):
    return _depthwise_conv3x3(x, kernel, impl)


def _depthwise_conv3x3(x: Array, kernel: Array, impl: str) -> Array:
  b, h, w = x.shape[:3]
  chan = x.shape[3:]
  if impl == "conv":
    flat = x.reshape(b, h, w, -1)
    n = flat.shape[-1]
    out = jax.lax.conv_general_dilated(
      flat,
      kernel.reshape(3, 3, 1, n).astype(flat.dtype),
      (1, 1),
      ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=n,
    )
    return out.reshape(b, h, w, *chan)
  return _depthwise_shift(x, kernel)


def _shifted_sum(x: Array, kernel: Array) -> Array:
  """sum_ij pad(x)[:, i:i+h, j:j+w] * kernel[i, j]: the shift form, in x's dtype."""
  h, w = x.shape[1:3]
  xp = jnp.pad(x, [(0, 0), (1, 1), (1, 1)] + [(0, 0)] * (x.ndim - 3))
  out = None
  for i in range(3):
    for j in range(3):
      term = xp[:, i : i + h, j : j + w] * kernel[i, j].astype(x.dtype)
      out = term if out is None else out + term
  return out


@jax.custom_vjp
def _depthwise_shift(x: Array, kernel: Array) -> Array:
  return _shifted_sum(x, kernel)


def _depthwise_shift_fwd(x, kernel):
  return _shifted_sum(x, kernel), (x, kernel)


def _depthwise_shift_bwd(res, dy):
  # Autodiff of the shift form pads each of the nine products of dy to the padded shape and
  # adds them (slow loop fusions on XLA:CPU). The input gradient is the same correlation
  # with the kernel flipped, formed like the forward; the kernel gradient is
  # `_depthwise_kernel_grad` (accumulated in fp32).
  x, kernel = res
  dx = _shifted_sum(dy.astype(x.dtype), kernel[::-1, ::-1])
  return dx, _depthwise_kernel_grad(x, dy).astype(kernel.dtype)


# Row groups summed by explicit adds per kernel-gradient tap (see _depthwise_kernel_grad).
_KERNEL_GRAD_GROUPS = 16


def _depthwise_kernel_grad(x: Array, dy: Array) -> Array:
  """dk[i, j] = sum_p x[p] dy[p - (i - 1, j - 1)] over batch and positions, in fp32.

  x, dy: (B, h, w, *C) -> (3, 3, *C) fp32. The shifts are of dy, not of x, so the forward's
  shifted views of x have one consumer each and stay fused (not saved as residuals).
  A reduction of a shifted view makes XLA:CPU write the view out first (its reductions are
  library calls that read whole arrays): eight copies of dy, 0.55 of this gradient's time
  at the embedded model's shapes. So each image's h rows are split into k groups of h / k
  (k the largest divisor of h <= 16) and each tap's products are summed over the groups by
  explicit adds, an elementwise fusion that reads the shifted views in place; only the
  (9, B, h / k, w, *C) partial sums are reduced. The batch axis is left whole, so under a
  batch sharding this stays a local sum and one all-reduce. 4x faster than nine reductions
  of shifted copies at (32, 8, 8, 2, 320), 2.5x at (4, 32, 32, 2, 2880)
  (docs/train_speed.md).
  """
  b, h, w = x.shape[:3]
  chan = x.shape[3:]
  k = max(d for d in range(1, min(h, _KERNEL_GRAD_GROUPS) + 1) if h % d == 0)
  m = h // k
  dyp = jnp.pad(dy.astype(jnp.float32), [(0, 0), (1, 1), (1, 1)] + [(0, 0)] * len(chan))
  x32 = x.astype(jnp.float32)
  taps = []
  for i in range(3):
    for j in range(3):
      acc = None
      for g in range(k):
        rows = slice(g * m + 2 - i, g * m + 2 - i + m)
        term = x32[:, g * m : (g + 1) * m] * dyp[:, rows, 2 - j : 2 - j + w]
        acc = term if acc is None else acc + term
      taps.append(acc)
  return jnp.sum(jnp.stack(taps), axis=(1, 2, 3)).reshape(3, 3, *chan)


_depthwise_shift.defvjp(_depthwise_shift_fwd, _depthwise_shift_bwd)


def _dense_einsum(n_out: int) -> str:
  out = "jk"[:n_out]
  return f"...i,i{out}->...{out}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense_matmul(x: Array, kernel: Array, merge_out_axes: bool = True) -> Array:
  """x (..., in) times kernel (in, *out) -> (..., *out) (1 or 2 out axes), in their dtype.

  The einsum's product with its backward written out: dx as the einsum of dy and the
  kernel, dk as `dot(x, dy)` over the merged batch axes (leading, so a batch sharding
  carries over), in the kernel's (in, *out) layout; each only when its input is being
  differentiated (symbolic zeros), as autodiff would. Autodiff of the einsum forms dk as a
  transposed product, and XLA:CPU then writes the whole producer of dy in transposed
  layout (79 copies, 144 ms of the embedded step's op time); autodiff of the product on
  merged batch axes (`dense_matmul_autodiff`) avoids that, but made the 0.6B-width step
  slower than this form (3634 vs 2674 ms scanned, 2775 vs 2295 unrolled, alternating;
  docs/train_speed.md). A custom VJP hides its dots from remat policies, so blocks under a
  dot-saving policy use `dense_matmul_autodiff` (_Dense.written_backward).

  merge_out_axes: dx contracts dy and a kernel with two out axes over those axes merged
  into one. Over the two axes as they are, XLA:CPU copied the whole kernel to transposed
  layout for the product; over one merged minor axis it reads the kernel in place. The
  values are the same either way, to rounding. `_Dense` asks `merges_out_axes`.
  """
  del merge_out_axes  # the forward is the same either way
  return jnp.einsum(_dense_einsum(kernel.ndim - 1), x, kernel)


def _dense_matmul_fwd(x, kernel, merge_out_axes):
  # Leafless markers (static structure) of which inputs want a gradient.
  wanted = tuple(() if a.perturbed else None for a in (x, kernel))
  # The kernel itself is the residual (not a reshape of it): inside nn.scan a residual that
  # is the scanned input is read from it, anything else is stacked per block.
  y = dense_matmul(x.value, kernel.value, merge_out_axes)
  return y, (x.value, kernel.value, wanted)


def _dense_matmul_bwd(merge_out_axes, res, dy):
  x, kernel, (want_dx, want_dk) = res
  if isinstance(dy, jax.custom_derivatives.SymbolicZero):
    return None, None
  out = "jk"[: kernel.ndim - 1]
  dx = dk = None
  if want_dx is not None and merge_out_axes and kernel.ndim > 2:
    lead = dy.shape[: dy.ndim - (kernel.ndim - 1)]
    dy_flat, kernel_flat = dy.reshape(*lead, -1), kernel.reshape(kernel.shape[0], -1)
    dx = jnp.einsum("...o,io->...i", dy_flat, kernel_flat).astype(x.dtype)
  elif want_dx is not None:
    dx = jnp.einsum(f"...{out},i{out}->...i", dy, kernel).astype(x.dtype)
  if want_dk is not None:
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, *kernel.shape[1:])
    dk = jnp.einsum(f"ti,t{out}->i{out}", x2, dy2).astype(kernel.dtype)
  return dx, dk


dense_matmul.defvjp(_dense_matmul_fwd, _dense_matmul_bwd, symbolic_zeros=True)


def merges_out_axes(names: tuple) -> bool:
  """Whether `_Dense` has dense_matmul merge the out axes of a kernel with these logical
  axis names for dx. Only on XLA:CPU, where the merge removes a transposed copy of the
  kernel from the backward (on TPU the compiler's plan for the 1.6B step had 2.8% more
  bytes accessed merged: docs/train_speed.md), and only for a kernel that is not sharded:
  under flax's current logical axis rules no name maps onto an axis of size > 1 of the
  current mesh (`jax.set_mesh`). A merged sharded kernel made GSPMD gather it once more
  (its out axes: the merged axis is not a tiling; its in axis: the reshape is a value of its
  own, gathered apart from the forward's). A kernel sharded without those rules (by hand)
  counts as unsharded. With no mesh set, the default backend decides."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return jax.default_backend() == "cpu"
  if mesh.abstract_device.platform != "cpu":
    return False
  for axes in nn.logical_to_mesh_axes(names):
    for axis in axes if isinstance(axes, tuple) else (axes,):
      if axis is not None and mesh.shape.get(axis, 1) > 1:
        return False
  return True


def dense_matmul_autodiff(x: Array, kernel: Array) -> Array:
  """dense_matmul's product under plain autodiff (batch axes merged first, so the kernel
  gradient is a plain `dot(x, dy)`): remat policies that save dots see these."""
  y = jnp.einsum(
    _dense_einsum(kernel.ndim - 1).replace("...", "t"), x.reshape(-1, x.shape[-1]), kernel
  )
  return y.reshape(*x.shape[:-1], *kernel.shape[1:])


def patchify(x: Array, p: int) -> Array:
  """(B, H, W, c) -> (B, (H/p)*(W/p), p*p*c), patches in (p, p, c) order."""
  b, hh, ww, c = x.shape
  x = x.reshape(b, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (hh // p) * (ww // p), p * p * c)


def unpatchify(x: Array, h: int, w: int, p: int) -> Array:
  """(B, h*w, p*p*c) -> (B, h*p, w*p, c)."""
  b = x.shape[0]
  c = x.shape[-1] // (p * p)
  x = x.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * p, w * p, c)


# ----------------------------------------------------------------------------- modules


class _Dense(nn.Module):
  """Dense layer with logical axis names; kernel (in, *out_shape)."""

  out_shape: tuple
  names: tuple
  use_bias: bool = True
  kernel_init: Any = _xavier
  dtype: Any = jnp.float32
  lora_rank: int = 0  # > 0: add (lora_scale * (x A) B); A (in, *groups, r), B (*groups, r, out)
  lora_scale: float = 1.0
  # dense_matmul (the backward written out, faster; its dots are hidden from remat
  # policies) or dense_matmul_autodiff (for blocks under a dot-saving policy).
  written_backward: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_dim = x.shape[-1]
    kernel = self.param(
      "kernel", _part(self._kernel_init(), self.names), (in_dim, *self.out_shape), jnp.float32
    )
    xc, kc = x.astype(self.dtype), kernel.astype(self.dtype)
    if self.written_backward:
      y = dense_matmul(xc, kc, merges_out_axes(self.names))
    else:
      y = dense_matmul_autodiff(xc, kc)
    if self.use_bias:
      bias = self.param(
        "bias", _part(nn.initializers.zeros, self.names[1:]), self.out_shape, jnp.float32
      )
      y = y + bias.astype(self.dtype)
    if self.lora_rank:
      y = y + self._lora(x, in_dim)
    return y

  def _lora(self, x: Array, in_dim: int) -> Array:
    """The adapter's term. Grouped kernels (in, g, out) get one (A, B) pair per group."""
    groups, out = self.out_shape[:-1], self.out_shape[-1]
    g = "g"[: len(groups)]
    free = (None,) * len(groups)
    # PEFT's initialisation: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform, a=sqrt(5)), B = 0.
    bound = 1.0 / math.sqrt(in_dim)
    a_init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(
      key, shape, dtype, -bound, bound
    )
    a = self.param(
      "lora_a", _part(a_init, (self.names[0], *free, None)), (in_dim, *groups, self.lora_rank)
    )
    b = self.param(
      "lora_b",
      _part(nn.initializers.zeros, (*free, None, self.names[-1])),
      (*groups, self.lora_rank, out),
    )
    h = jnp.einsum(f"...i,i{g}r->...{g}r", x.astype(self.dtype), a.astype(self.dtype))
    return self.lora_scale * jnp.einsum(f"...{g}r,{g}ro->...{g}o", h, b.astype(self.dtype))

  def _kernel_init(self):
    if len(self.out_shape) == 1:
      return self.kernel_init
    # Initialise a (in, k, out) kernel like the torch (k*out, in) weight it stands for.
    base = self.kernel_init

    def init(key, shape, dtype=jnp.float32):
      flat = base(key, (shape[0], int(np.prod(shape[1:]))), dtype)
      return flat.reshape(shape)

    return init


def _block_dense_args(cfg: DiTConfig, target: str) -> dict:
  """A block's _Dense options: its LoRA adapter, and the written-out backward unless the
  blocks are rematerialised with a policy that saves dots, which must see them."""
  return {
    "lora_rank": cfg.lora_rank_for(target),
    "lora_scale": cfg.lora_scale,
    "written_backward": cfg.remat_policy not in _DOT_SAVING_POLICIES,
  }


class SelfAttention(nn.Module):
  """LiteLA: ReLU linear self-attention over all tokens."""

  cfg: DiTConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    c, dt = cfg.hidden_size, jnp.dtype(cfg.compute_dtype)
    b, n, _ = x.shape
    qkv = _Dense(
      (3, c),
      ("embed", None, "heads"),
      use_bias=False,
      dtype=dt,
      name="qkv",
      **_block_dense_args(cfg, "self_attn.qkv"),
    )(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if cfg.qk_norm:
      q = rms_norm(
        q, self.param("q_norm", _part(nn.initializers.ones, ("heads",)), (c,)), cfg.qk_norm_eps
      )
      k = rms_norm(
        k, self.param("k_norm", _part(nn.initializers.ones, ("heads",)), (c,)), cfg.qk_norm_eps
      )
    heads = cfg.self_heads
    q, k, v = (a.reshape(b, n, heads, cfg.self_head_dim) for a in (q, k, v))
    out = linear_attention(jax.nn.relu(q), jax.nn.relu(k), v, cfg.linear_attn_eps)
    out = out.reshape(b, n, c).astype(dt)
    out = _Dense(
      (c,), ("heads", "embed"), dtype=dt, name="out", **_block_dense_args(cfg, "self_attn.out")
    )(out)
    if cfg.fp16_attn_clip:
      out = jnp.clip(out, -65504.0, 65504.0)
    return out


class CrossAttention(nn.Module):
  """Softmax cross-attention from image tokens to caption tokens.

  Masked caption tokens get -inf ("exact") or an additive -10000 ("additive", diffusers).
  A caption whose mask is all zeros attends to every one of its tokens in both modes,
  which is what the official code computes (its additive -10000 cancels in the softmax);
  Gemma's start token makes such masks unreachable from prompts, cached embeddings may not.
  """

  cfg: DiTConfig

  def caption_kv(self, y: Array) -> Array:
    """y: (B, Ly, C) -> keys/values (B, Ly, 2, Ci), k-norm applied."""
    cfg = self.cfg
    kv = _Dense(
      (2, cfg.cross_inner),
      ("embed", None, "heads"),
      dtype=jnp.dtype(cfg.compute_dtype),
      name="kv",
      **_block_dense_args(cfg, "cross_attn.kv"),
    )(y)
    if cfg.cross_norm:
      k = rms_norm(
        kv[:, :, 0],
        self.param("k_norm", _part(nn.initializers.ones, ("heads",)), (cfg.cross_inner,)),
        cfg.cross_norm_eps,
      )
      kv = jnp.stack([k, kv[:, :, 1]], axis=2)
    return kv

  @nn.compact
  def __call__(self, x: Array, y: Array | None, mask: Array, kv: Array | None = None) -> Array:
    cfg = self.cfg
    dt = jnp.dtype(cfg.compute_dtype)
    b, n, _ = x.shape
    if kv is None:
      kv = self.caption_kv(y)
    q = _Dense(
      (cfg.cross_inner,),
      ("embed", "heads"),
      dtype=dt,
      name="q",
      **_block_dense_args(cfg, "cross_attn.q"),
    )(x)
    if cfg.cross_norm:
      q = rms_norm(
        q,
        self.param("q_norm", _part(nn.initializers.ones, ("heads",)), (cfg.cross_inner,)),
        cfg.cross_norm_eps,
      )
    hd = cfg.cross_head_dim
    q = q.reshape(b, n, cfg.cross_heads, hd)
    k = kv[:, :, 0].reshape(b, -1, cfg.cross_heads, hd)
    v = kv[:, :, 1].reshape(b, -1, cfg.cross_heads, hd)
    logits = jnp.einsum("bnhd,blhd->bhnl", q, k, preferred_element_type=jnp.float32) / math.sqrt(hd)
    keep = mask.astype(bool)[:, None, None, :]
    if cfg.cross_mask == "additive":
      logits = logits + jnp.where(keep, 0.0, -10000.0)
      probs = jax.nn.softmax(logits, axis=-1)
    else:
      # A caption with no kept token attends to all its tokens, as the official plain-torch
      # path does (an additive -10000 on every logit cancels in the softmax).
      keep = keep | ~jnp.any(keep, axis=-1, keepdims=True)
      probs = jax.nn.softmax(jnp.where(keep, logits, -jnp.inf), axis=-1)
    out = jnp.einsum("bhnl,blhd->bnhd", probs.astype(dt), v.astype(dt)).reshape(b, n, -1)
    return _Dense(
      (cfg.hidden_size,),
      ("heads", "embed"),
      dtype=dt,
      name="out",
      **_block_dense_args(cfg, "cross_attn.out"),
    )(out)


class MixFFN(nn.Module):
  """GLUMBConv: 1x1 up to 2H + SiLU, depthwise 3x3, GLU with SiLU gate, 1x1 down.

  x: (B, h, w, C) -> (B, h, w, C).
  """

  cfg: DiTConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    dt = jnp.dtype(cfg.compute_dtype)
    hid = cfg.mlp_hidden
    h = _Dense(
      (2, hid),
      ("embed", None, "mlp"),
      kernel_init=_torch_conv,
      dtype=dt,
      name="inverted",
      **_block_dense_args(cfg, "mlp.inverted"),
    )(x)
    h = jax.nn.silu(h)
    dw_kernel = self.param(
      "depthwise_kernel", _part(self._depthwise_init, (None, None, None, "mlp")), (3, 3, 2, hid)
    )
    dw_bias = self.param("depthwise_bias", _part(self._depthwise_init, (None, "mlp")), (2, hid))
    h = depthwise_conv3x3(h, dw_kernel, cfg.depthwise_impl) + dw_bias.astype(dt)
    h = h[..., 0, :] * jax.nn.silu(h[..., 1, :])
    return _Dense(
      (cfg.hidden_size,),
      ("mlp", "embed"),
      use_bias=False,
      kernel_init=_torch_conv,
      dtype=dt,
      name="point",
      **_block_dense_args(cfg, "mlp.point"),
    )(h)

  @staticmethod
  def _depthwise_init(key, shape, dtype=jnp.float32):
    bound = 1.0 / 3.0  # torch default for a depthwise 3x3: 1/sqrt(fan_in=9)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class Block(nn.Module):
  """One SANA block; scanned over depth. Carry: x (B, h, w, C) fp32."""

  cfg: DiTConfig
  return_cosine: bool = False

  @nn.compact
  def __call__(self, x, t0, y, mask, kv):
    cfg = self.cfg
    b, hh, ww, c = x.shape
    table = self.param("scale_shift_table", _part(_table_init(c), (None, "embed")), (6, c))
    mod = (table[None] + t0)[:, :, None, None, :]  # (B, 6, 1, 1, C)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (mod[:, i] for i in range(6))
    x_in = x
    h = modulate(layer_norm(x, cfg.norm_eps), shift_msa, scale_msa).reshape(b, hh * ww, c)
    attn = SelfAttention(cfg, name="self_attn")(h).astype(jnp.float32)
    x = x + gate_msa * attn.reshape(b, hh, ww, c)
    cross = CrossAttention(cfg, name="cross_attn")(x.reshape(b, hh * ww, c), y, mask, kv)
    x = x + cross.astype(jnp.float32).reshape(b, hh, ww, c)
    h = modulate(layer_norm(x, cfg.norm_eps), shift_mlp, scale_mlp)
    x = x + gate_mlp * MixFFN(cfg, name="mlp")(h).astype(jnp.float32)
    x = nn.with_logical_constraint(x, ("act_batch", "act_height", "act_width", "act_embed"))
    if self.return_cosine:
      return x, token_cosine(x_in.reshape(b, hh * ww, c), x.reshape(b, hh * ww, c))
    return x, None


def token_cosine(a: Array, b: Array) -> Array:
  """Mean over tokens of cos(a_n, b_n). a, b: (B, N, C) -> (B,) fp32."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  num = jnp.sum(a * b, axis=-1)
  den = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
  return jnp.mean(num / jnp.maximum(den, 1e-12), axis=-1)


_REMAT_POLICIES = {
  "full": None,
  "dots": jax.checkpoint_policies.dots_saveable,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
_DOT_SAVING_POLICIES = ("dots", "dots_no_batch")


def _block_stack(cfg: DiTConfig, return_cosine: bool, name: str = "blocks"):
  block = Block
  if cfg.remat_policy != "none":
    block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
  return nn.scan(
    block,
    variable_axes={"params": 0},
    split_rngs={"params": True},
    in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
    length=cfg.depth,
    unroll=min(cfg.scan_unroll, cfg.depth),
    metadata_params={nn.PARTITION_NAME: "layers"},
  )(cfg, return_cosine, name=name)


class SanaDiT(nn.Module):
  """SANA linear DiT.

  __call__(latents (B, H, W, in_ch), timestep (B,), caption (B, Ly, Cy), caption_mask (B, Ly))
    -> velocity (B, H, W, out_ch) float32. H, W must be multiples of patch_size.
  caption_mask: nonzero for kept tokens; an all-zero row keeps every token, as the official
  model does (see CrossAttention).
  `config` is a DiTConfig, a mapping or a ConfigDict with DiTConfig's fields.
  """

  config: Any
  return_block_cosine: bool = False

  @property
  def cfg(self) -> DiTConfig:
    return DiTConfig.coerce(self.config)

  def setup(self):
    cfg = self.cfg
    c, dt = cfg.hidden_size, jnp.dtype(cfg.compute_dtype)
    p = cfg.patch_size
    self.patch_embed = _Dense((c,), ("patch", "embed"), dtype=dt)
    self.t_fc1 = _Dense((c,), (None, "embed"), kernel_init=_normal02, name="t_embedder_fc1")
    self.t_fc2 = _Dense((c,), ("embed", "embed_out"), kernel_init=_normal02, name="t_embedder_fc2")
    self.t_block = _Dense((6 * c,), ("embed", "embed_out"), kernel_init=_normal02)
    self.y_fc1 = _Dense(
      (c,), ("caption", "embed"), kernel_init=_normal02, dtype=dt, name="caption_proj_fc1"
    )
    self.y_fc2 = _Dense(
      (c,), ("embed", "embed_out"), kernel_init=_normal02, dtype=dt, name="caption_proj_fc2"
    )
    if cfg.caption_norm:
      self.caption_norm_scale = self.param(
        "caption_norm", _part(_constant_init(cfg.caption_norm_init), ("embed",)), (c,)
      )
    self.final_table = self.param(
      "final_scale_shift_table", _part(_table_init(c), (None, "embed")), (2, c)
    )
    self.final_linear = _Dense(
      (p * p * cfg.out_channels,), ("embed", None), dtype=dt, name="final_linear"
    )
    self.blocks = _block_stack(cfg, self.return_block_cosine)

  def timestep_embedding(self, timestep: Array) -> tuple[Array, Array]:
    """(B,) -> (t (B, C), t0 (B, 6, C)), both fp32."""
    cfg = self.cfg
    if cfg.floor_timestep:
      timestep = jnp.floor(timestep)
    t = self.t_fc2(jax.nn.silu(self.t_fc1(timestep_features(timestep))))
    t0 = self.t_block(jax.nn.silu(t)).reshape(-1, 6, cfg.hidden_size)
    return t, t0

  def encode_caption(self, caption: Array) -> Array:
    """Caption projection + norm: (B, Ly, Cy) -> (B, Ly, C)."""
    cfg = self.cfg
    if caption.shape[-1] != cfg.caption_channels:
      raise ValueError(
        f"caption width {caption.shape[-1]} != caption_channels {cfg.caption_channels}"
      )
    y = self.y_fc2(jax.nn.gelu(self.y_fc1(caption), approximate=True))
    if cfg.caption_norm:
      y = rms_norm(y.astype(jnp.float32), self.caption_norm_scale, cfg.caption_norm_eps)
    return y.astype(jnp.dtype(cfg.compute_dtype))

  def __call__(
    self,
    latents: Array,
    timestep: Array,
    caption: Array,
    caption_mask: Array,
    caption_kv: Array | None = None,
  ):
    """See class docstring. With `return_block_cosine`, returns (velocity, cos (L, B))."""
    _check_inputs(self.cfg, latents, caption, caption_mask)
    x, t, t0, y = self.embed(latents, timestep, caption, caption_kv is not None)
    x, cosine = self.blocks(x, t0, y, caption_mask, caption_kv)
    out = self.head(x, t)
    if self.return_block_cosine:
      return out, cosine
    return out

  def embed(self, latents: Array, timestep: Array, caption: Array, cached_kv: bool = False):
    """What the blocks take: x (B, h, w, C) fp32 tokens, t (B, C), t0 (B, 6, C), and the
    projected caption y (B, Ly, C) (None when cached_kv: the blocks get K/V instead)."""
    cfg = self.cfg
    p = cfg.patch_size
    b, hh, ww, _ = latents.shape
    h, w = hh // p, ww // p
    x = self.patch_embed(patchify(latents, p)).astype(jnp.float32)
    if cfg.use_pe:
      x = x + sincos_pos_embed(cfg.hidden_size, h, w, cfg.sample_size // p, cfg.pe_interpolation)
    x = x.reshape(b, h, w, cfg.hidden_size)
    x = nn.with_logical_constraint(x, ("act_batch", "act_height", "act_width", "act_embed"))
    timestep = jnp.broadcast_to(jnp.asarray(timestep), (b,))
    t, t0 = self.timestep_embedding(timestep)
    y = None if cached_kv else self.encode_caption(caption)
    return x, t, t0, y

  def head(self, x: Array, t: Array) -> Array:
    """The blocks' output x (B, h, w, C) and t (B, C) -> velocity (B, h*p, w*p, out_ch) fp32."""
    cfg = self.cfg
    p = cfg.patch_size
    b, h, w, _ = x.shape
    x = x.reshape(b, h * w, cfg.hidden_size)
    table = self.final_table[None] + t[:, None]
    shift, scale = table[:, 0:1], table[:, 1:2]
    x = modulate(layer_norm(x, cfg.norm_eps), shift, scale)
    out = self.final_linear(x).astype(jnp.float32)
    return unpatchify(out, h, w, p)

  def precompute_caption_kv(self, caption: Array) -> Array:
    """Per-block cross-attention keys/values for a fixed caption.

    caption (B, Ly, Cy) -> (L, B, Ly, 2, Ci). Pass the result as `caption_kv` to reuse it
    across denoising steps (the caption does not change between steps).
    """
    y = self.encode_caption(caption)
    cfg = self.cfg
    blocks = self.variables["params"]["blocks"]["cross_attn"]
    k_norm = blocks.get("k_norm", jnp.ones((cfg.depth, cfg.cross_inner)))
    one = functools.partial(_caption_kv_one, cfg, y)
    return jax.vmap(one)(nn.meta.unbox(blocks["kv"]), nn.meta.unbox(k_norm))


def _check_inputs(cfg: DiTConfig, latents: Array, caption: Array, caption_mask: Array) -> None:
  """Refuses inputs the forward would misread (channels, patch multiple, mask shape)."""
  p = cfg.patch_size
  _, hh, ww, cin = latents.shape
  if cin != cfg.in_channels:
    raise ValueError(f"latents have {cin} channels, the model expects {cfg.in_channels}")
  if hh % p or ww % p:
    raise ValueError(f"latent size {hh}x{ww} is not a multiple of patch_size {p}")
  if caption_mask.shape != caption.shape[:2]:
    raise ValueError(
      f"caption_mask shape {caption_mask.shape} != caption shape[:2] {caption.shape[:2]}"
    )


def _caption_kv_one(cfg: DiTConfig, y: Array, kv_params: dict, k_norm: Array) -> Array:
  """One block's cross-attention K/V of the projected caption y (B, Ly, C) -> (B, Ly, 2, Ci)."""
  kv = jnp.einsum("bli,ikj->blkj", y, kv_params["kernel"].astype(y.dtype)) + kv_params["bias"]
  if "lora_a" in kv_params:
    h = jnp.einsum("bli,igr->blgr", y, kv_params["lora_a"].astype(y.dtype))
    kv = kv + cfg.lora_scale * jnp.einsum("blgr,gro->blgo", h, kv_params["lora_b"].astype(y.dtype))
  if cfg.cross_norm:
    k = rms_norm(kv[:, :, 0], k_norm, cfg.cross_norm_eps)
    kv = jnp.stack([k, kv[:, :, 1]], axis=2)
  return kv


# ----------------------------------------------------------------------------- helpers


def unstack_blocks(params: dict, dtype=None) -> dict:
  """A DiT tree with its stacked blocks (every leaf (L, ...)) -> {"rest": the tree without
  "blocks", "layers": a tuple of L per-block trees}: each block's weights their own buffers,
  for `apply_layers`. New device arrays (in `dtype` if given), made one block at a time, so
  a memory-mapped or bf16 tree never exists whole in fp32 next to them."""
  blocks = params["blocks"]
  depth = jax.tree_util.tree_leaves(blocks)[0].shape[0]
  put = lambda a: jnp.asarray(a, dtype)  # noqa: E731
  layers = tuple(jax.tree_util.tree_map(lambda a: put(a[i]), blocks) for i in range(depth))
  rest = {k: jax.tree_util.tree_map(put, v) for k, v in params.items() if k != "blocks"}
  return {"rest": rest, "layers": layers}


def caption_kv_layers(config: Any, unstacked: dict, caption: Array) -> Array:
  """SanaDiT.precompute_caption_kv from `unstack_blocks`' trees: caption (B, Ly, Cy) ->
  (L, B, Ly, 2, Ci), for apply_layers' caption_kv."""
  cfg = DiTConfig.coerce(config)
  y = SanaDiT(cfg).apply({"params": unstacked["rest"]}, caption, method="encode_caption")
  ones = jnp.ones((cfg.cross_inner,))
  return jnp.stack(
    [
      _caption_kv_one(cfg, y, layer["cross_attn"]["kv"], layer["cross_attn"].get("k_norm", ones))
      for layer in unstacked["layers"]
    ]
  )


def apply_layers(
  config: Any,
  unstacked: dict,
  latents: Array,
  timestep: Array,
  caption: Array,
  caption_mask: Array,
  caption_kv: Array | None = None,
) -> Array:
  """SanaDiT(config).apply with the parameters of `unstack_blocks`: the same velocity (bit
  for bit on XLA:CPU), the blocks applied one after another from their own buffers.

  Why: inside the scan (or its unrolled form) every block's weights are sliced out of the
  stacked arrays, and XLA:CPU copies each slice (all the DiT's weights once per forward)
  and runs the fusions that read per-block vectors through a dynamic index: at the Sana
  0.6B geometry, 512 px, the forward took 1.87 s this way against 2.61 s (`bench_dit.py
  --impls shift,per_layer`, docs/sampling.md). Inference only (no remat, no block
  cosines); caption_kv (L, B, Ly, 2, Ci) as for __call__. Same input checks as __call__.
  """
  cfg = DiTConfig.coerce(config)
  _check_inputs(cfg, latents, caption, caption_mask)
  model, block = SanaDiT(cfg), Block(cfg)
  rest = {"params": unstacked["rest"]}
  x, t, t0, y = model.apply(
    rest, latents, timestep, caption, caption_kv is not None, method="embed"
  )
  for i, layer in enumerate(unstacked["layers"]):
    kv = None if caption_kv is None else caption_kv[i]
    x, _ = block.apply({"params": layer}, x, t0, y, caption_mask, kv)
  return model.apply(rest, x, t, method="head")


def _dummy_inputs(cfg: DiTConfig):
  p = cfg.patch_size
  return (
    jnp.zeros((1, 2 * p, 2 * p, cfg.in_channels)),
    jnp.zeros((1,)),
    jnp.zeros((1, 2, cfg.caption_channels)),
    jnp.ones((1, 2), jnp.int32),
  )


def init_boxed(config: Any, rng: Array) -> dict:
  """Parameters with their logical-axis metadata (nn.LogicallyPartitioned leaves)."""
  cfg = DiTConfig.coerce(config)
  return SanaDiT(cfg).init(rng, *_dummy_inputs(cfg))["params"]


def init_params(config: Any, rng: Array) -> dict:
  """Fresh parameters as a plain nested dict of fp32 arrays."""
  return nn.meta.unbox(init_boxed(config, rng))


def abstract_params(config: Any) -> dict:
  """jax.ShapeDtypeStruct tree of the parameters; allocates nothing."""
  return jax.eval_shape(functools.partial(init_params, DiTConfig.coerce(config)), jax.random.key(0))


def param_logical_axes(config: Any) -> dict:
  """Tree of jax.sharding.PartitionSpec over logical axis names, like the parameters."""
  boxed = jax.eval_shape(functools.partial(init_boxed, DiTConfig.coerce(config)), jax.random.key(0))
  return nn.get_partition_spec(boxed)


def count_params(params: dict) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
