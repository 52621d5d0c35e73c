"""CAME and CAME-8bit as optax transformations.

CAME (Luo et al. 2023, "Confidence-guided Adaptive Memory Efficient Optimization"), the
optimizer SANA trains with, and CAME-8bit (SANA-1.5, section 2.3): CAME with the first
moment stored in 8 bits per block. The algorithm per parameter (fp32, no bias correction):

    u = g^2 + eps1
    factored:  r = b2 r + (1-b2) mean_cols(u);  c = b2 c + (1-b2) mean_rows(u)
               U = g * rsqrt(r / mean(r))[:, None] * rsqrt(c)[None, :]
    otherwise: v = b2 v + (1-b2) u;  U = g * rsqrt(v)
    U = U / max(rms(U) / clip_threshold, 1)
    m = b1 m + (1-b1) U
    res = (U - m)^2 + eps2
    factored:  R, C = b3-EMAs of row / col means of res;
               step = m * rsqrt(R / mean(R))[:, None] * rsqrt(C)[None, :]
    otherwise: step = m
    p <- p - lr * wd * p - lr * step          (decoupled weight decay, as the reference)

How a parameter is treated is a :class:`LeafSpec`. Its axes split into ``batch_ndim``
leading axes (a stacked layer axis: independent tensors with their own statistics and RMS
clip) and the rest; a factored leaf further splits the rest into ``row_ndim`` row axes and
the column axes, i.e. it is a batch of (prod(rows), prod(cols)) matrices whose statistics
are kept in the unflattened axes (no reshapes, so sharded axes stay sharded). A stacked
``(L, in, out)`` kernel therefore behaves exactly like L independent ``(in, out)``
parameters, and a DenseGeneral ``(in, 3, C)`` kernel like the torch ``(3C, in)`` weight.
Factoring an (in, out) Flax kernel instead of the reference's (out, in) torch weight gives
the same update: U and step depend on r_i c_j / mean(r), and mean(r) == mean(c) (both are
the same EMA of mean(u)), so the expression is symmetric under transposition.

Only jax, optax and numpy are imported.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from sana_jax.optim import quant8

__all__ = [
  "LeafSpec",
  "reference_spec",
  "CameState",
  "FactoredMoments",
  "FullMoment",
  "scale_by_came",
  "came",
  "came_8bit",
  "state_sharding",
  "leaf_specs",
  "sana_spec",
  "stacked_spec",
  "find_stacked",
  "StackedLayoutWarning",
]


# ----------------------------------------------------------------------------- specs


class LeafSpec(NamedTuple):
  """How CAME treats one parameter of rank n.

  batch_ndim: leading axes that index independent tensors (stacked layers, or the size-1
    spatial axes of a 1x1 conv): each slice has its own statistics and RMS clip.
  factored: factor the second moments. Axes [batch_ndim, batch_ndim + row_ndim) are the
    rows, the remaining (at least one) axes the columns.
  row_ndim: number of row axes of a factored leaf.
  """

  factored: bool
  batch_ndim: int = 0
  row_ndim: int = 1


SpecFn = Callable[[str, Any], LeafSpec]


def reference_spec(
  stacked: Optional[Callable[[str], Union[bool, int]]] = None,
  matrix: Optional[Callable[[str, tuple], Optional[int]]] = None,
) -> SpecFn:
  """The official CAMEWrapper's classification, on Flax layouts.

  stacked(path) -> bool | int: how many leading axes of the parameter at ``path``
    ("blocks/self_attn/qkv/kernel") are layer axes (True = 1). Default: none.
  matrix(path, per_layer_shape) -> int | None: the number of row (input) axes if the
    parameter is a matrix to factor, else None. Default, on the per-layer shape s:
      - len(s) == 2 (a Dense kernel (in, out), a (6, C) table)          -> factored
      - len(s) >= 3 with all s[:-2] == 1 (a 1x1 conv kernel (1, 1, in, out)) -> factored
      - anything else (biases, norms, spatial and depthwise conv kernels) -> unfactored,
        one flattened tensor per layer (the reference flattens convs other than 1x1).
  """

  def spec(path: str, leaf) -> LeafSpec:
    shape = tuple(leaf.shape)
    k = int(stacked(path)) if stacked is not None else 0
    if not 0 <= k <= len(shape):
      raise ValueError(f"{path}: {k} stacked axes requested but the shape is {shape}")
    s = shape[k:]
    if matrix is not None:
      rows = matrix(path, s)
      return LeafSpec(True, k, int(rows)) if rows else LeafSpec(False, k)
    if len(s) == 2:
      return LeafSpec(True, k, 1)
    if len(s) > 2 and all(d == 1 for d in s[:-2]):
      return LeafSpec(True, len(shape) - 2, 1)
    return LeafSpec(False, k)

  return spec


def _sana_matrix(path: str, s: tuple) -> Optional[int]:
  name = path.rsplit("/", 1)[-1]
  if name == "kernel" and len(s) >= 2:  # Dense / DenseGeneral kernel (in, *out)
    return 1
  if name.endswith("scale_shift_table") and len(s) == 2:  # (6, C) / (2, C) tables
    return 1
  return None  # biases, norm scales, depthwise_kernel (3, 3, 2, H), depthwise_bias


def sana_spec() -> SpecFn:
  """The reference classification for the sana_jax DiT tree (``sana_jax.models.dit``).

  Blocks are scanned under "blocks/" (leading layer axis). Every ``kernel`` is a Dense /
  DenseGeneral kernel (in, *out) standing for the torch (prod(out), in) weight: factored
  with one row axis (qkv (C, 3, C) is the torch (3C, C) weight). The modulation tables
  are 2-D torch parameters: factored. Biases (also (2, H)-shaped ones), norm scales and
  the depthwise 3x3 conv (3, 3, 2, H) are unfactored, flattened per layer.
  """
  return reference_spec(stacked=lambda path: path.startswith("blocks/"), matrix=_sana_matrix)


def stacked_spec(
  prefixes: Union[str, Sequence[str]],
  matrix: Optional[Callable[[str, tuple], Optional[int]]] = None,
) -> SpecFn:
  """:func:`reference_spec` with one leading layer axis on every leaf under ``prefixes``
  (subtree paths such as "blocks", "encoder/layers"; "" is the whole tree): the layout of
  ``nn.scan``-stacked layers. :func:`find_stacked` proposes the prefixes."""
  if isinstance(prefixes, str):
    prefixes = (prefixes,)
  prefixes = tuple(p.strip("/") for p in prefixes)

  def under(path: str) -> bool:
    return any(p == "" or path == p or path.startswith(p + "/") for p in prefixes)

  return reference_spec(stacked=under, matrix=matrix)


def _path_str(path) -> str:
  parts = []
  for p in path:
    if isinstance(p, jax.tree_util.DictKey):
      parts.append(str(p.key))
    elif isinstance(p, jax.tree_util.GetAttrKey):
      parts.append(p.name)
    elif isinstance(p, jax.tree_util.SequenceKey):
      parts.append(str(p.idx))
    elif isinstance(p, jax.tree_util.FlattenedIndexKey):
      parts.append(str(p.key))
    else:
      parts.append(str(p))
  return "/".join(parts)


def leaf_specs(params, spec: Union[None, SpecFn, Any] = None) -> list[LeafSpec]:
  """The LeafSpec of every leaf of ``params`` (flatten order), validated."""
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  if spec is None:
    spec = reference_spec()
  if callable(spec):
    specs = [spec(_path_str(p), x) for p, x in path_leaves]
  else:
    specs = treedef.flatten_up_to(spec)
  for (p, x), s in zip(path_leaves, specs):
    if not isinstance(s, LeafSpec):
      raise ValueError(f"{_path_str(p)}: spec must be a LeafSpec, got {s!r}")
    nd = len(x.shape)
    if not 0 <= s.batch_ndim <= nd:
      raise ValueError(f"{_path_str(p)}: batch_ndim {s.batch_ndim} invalid for shape {x.shape}")
    if s.factored and not (s.row_ndim >= 1 and s.batch_ndim + s.row_ndim < nd):
      raise ValueError(
        f"{_path_str(p)}: factored needs batch_ndim + row_ndim < rank and row_ndim >= 1"
        f" (at least one row and one column axis), got {s} for shape {x.shape}"
      )
  return specs


class StackedLayoutWarning(UserWarning):
  """The default classification met a tree that looks like nn.scan-stacked layers."""


def find_stacked(params) -> list[str]:
  """Subtrees of ``params`` that look like ``nn.scan``-stacked layers.

  A subtree (a path prefix; "" is the root) qualifies when it holds at least two leaves,
  every one of rank >= 2 with the same leading size L >= 2, and at least one is a rank-3
  leaf that is not a 1x1 conv: a stacked (L, in, out) kernel, which the default rule takes
  for one unfactorable tensor. Convolution modules do not qualify (their biases are
  rank 1; their (kh, kw, in, out) kernels are rank 4). Only the outermost qualifying
  subtrees are returned, in flatten order.
  """
  path_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  items = [(_path_str(p).split("/") if p else [], tuple(x.shape)) for p, x in path_leaves]
  found: list[tuple[str, ...]] = []
  seen = set()
  for parts, _ in items:
    for k in range(len(parts)):
      prefix = tuple(parts[:k])
      if prefix in seen or any(prefix[: len(f)] == f for f in found):
        continue
      seen.add(prefix)
      under = [shape for p, shape in items if tuple(p[:k]) == prefix]
      if len(under) < 2 or any(len(sh) < 2 for sh in under):
        continue
      if len({sh[0] for sh in under}) != 1 or under[0][0] < 2:
        continue
      if any(len(sh) == 3 for sh in under):
        found.append(prefix)
  return ["/".join(f) for f in found]


def _state_nbytes(
  shape,
  spec: LeafSpec,
  quantize: bool,
  unfactored: bool,
  min_8bit_size: int,
  block_size: int,
  align: int,
  meta_dtype=jnp.bfloat16,
) -> int:
  """Bytes of the CAME state of one leaf (m, and v or the four factored statistics)."""
  n = math.prod(shape)
  if _use_8bit(shape, spec, quantize, unfactored, min_8bit_size):
    tile = _tile(shape, spec, block_size, align)
    mu = quant8.nbytes(shape, tile, jnp.dtype(meta_dtype).itemsize)
  else:
    mu = 4 * n
  if spec.factored:
    bn, rn = spec.batch_ndim, spec.row_ndim
    nu = 2 * 4 * (math.prod(shape[: bn + rn]) + math.prod(shape[:bn] + shape[bn + rn :]))
  else:
    nu = 4 * n
  return mu + nu


def _warn_if_stacked(params, specs, quantize, unfactored, min_8bit_size, block_size, align, *extra):
  mn = min_8bit_size
  """spec=None on a tree with stacked layers: say which leaves the default rule misreads
  and what it costs (one warning per init, all leaves named in it)."""
  prefixes = find_stacked(params)
  if not prefixes:
    return
  alt_fn = stacked_spec(prefixes)
  path_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  rows, total, total_alt, n_params = [], 0, 0, 0
  for (p, x), s in zip(path_leaves, specs):
    path, shape = _path_str(p), tuple(x.shape)
    alt = alt_fn(path, x)
    b = _state_nbytes(shape, s, quantize, unfactored, min_8bit_size, block_size, align, *extra)
    b_alt = _state_nbytes(
      shape, alt, quantize, unfactored, min_8bit_size, block_size, align, *extra
    )
    total, total_alt, n_params = total + b, total_alt + b_alt, n_params + math.prod(shape)
    if alt != s:
      what = (
        "factored as one matrix"
        if s.factored
        else "one unfactored tensor"
        + (", not quantized" if quantize and not _use_8bit(shape, s, True, unfactored, mn) else "")
      )
      rows.append(f"  {path} {shape}: {what}; {b:,} B (per-layer: {b_alt:,} B)")
  if not rows:
    return
  quoted = ", ".join(repr(p) for p in prefixes)
  warnings.warn(
    f"CAME with spec=None: {len(rows)} leaves under {quoted} share a leading axis like "
    f"nn.scan-stacked layers, but the default rule classifies each as one whole tensor "
    f"(stacked kernels unfactored, stacked vectors factored as matrices). Optimizer state "
    f"{total:,} B = {total / max(n_params, 1):.2f} B/param; with that axis as a layer axis "
    f"{total_alt:,} B = {total_alt / max(n_params, 1):.2f} B/param (reference rule per "
    f"layer; DenseGeneral kernels (in, k, out) stay unfactored unless a matrix= rule says "
    f"otherwise, as sana_spec() does for the sana_jax DiT). Pass "
    f"spec=stacked_spec([{quoted}]), sana_spec() for the sana_jax DiT, or any explicit "
    f"spec, to choose; the leaves (state bytes now, and per layer):\n" + "\n".join(rows),
    StackedLayoutWarning,
    stacklevel=3,
  )


# ----------------------------------------------------------------------------- state


class FactoredMoments(NamedTuple):
  """Statistics of a factored leaf of shape batch + rows + cols, fp32."""

  v_row: jax.Array  # batch + rows: EMA of the column-mean of g^2 + eps1
  v_col: jax.Array  # batch + cols: EMA of the row-mean of g^2 + eps1
  res_row: jax.Array  # batch + rows: same for the instability (U - m)^2 + eps2
  res_col: jax.Array  # batch + cols


class FullMoment(NamedTuple):
  """Second moment of an unfactored leaf, fp32, the leaf's shape."""

  v: jax.Array


class CameState(NamedTuple):
  """State of scale_by_came. Each field is a tree with the parameters' structure whose
  entries are per-parameter: ``mu`` an fp32 array or a :class:`quant8.QuantizedArray`;
  ``nu`` a :class:`FactoredMoments` or :class:`FullMoment`."""

  mu: Any
  nu: Any


def _use_8bit(shape, spec: LeafSpec, quantize: bool, unfactored: bool, min_8bit_size: int) -> bool:
  return (
    quantize
    and (spec.factored or unfactored)
    and math.prod(shape[spec.batch_ndim :]) > min_8bit_size
  )


def _tile(shape, spec: LeafSpec, block_size: int, align: int) -> tuple:
  """Blocks of one matrix: tile 1 on the batch axes, block_shape on the matrix axes."""
  bn = spec.batch_ndim
  return (1,) * bn + quant8.block_shape(tuple(shape[bn:]), block_size, align)


def _axes(spec: LeafSpec, nd: int):
  """(batch, rows, cols) axis tuples of a factored leaf."""
  bn, rn = spec.batch_ndim, spec.row_ndim
  return tuple(range(bn)), tuple(range(bn, bn + rn)), tuple(range(bn + rn, nd))


def _check_static_int(name, value):
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
    raise TypeError(
      f"{name} must be a Python int (it fixes array shapes), got {type(value).__name__};"
      f" with optax.inject_hyperparams pass static_args=({name!r}, ...)"
    )


# ----------------------------------------------------------------------------- math


def _approx_rsqrt(row, col, spec: LeafSpec, nd: int):
  """(rsqrt(row / mean_rows(row)), rsqrt(col)), shaped to broadcast against
  batch + rows + cols (two small factors, not their full-size product)."""
  _, rows, cols = _axes(spec, nd)
  r = jax.lax.rsqrt(row / jnp.mean(row, axis=rows, keepdims=True))
  r = r.reshape(r.shape + (1,) * len(cols))
  c = jax.lax.rsqrt(col)
  c = c.reshape(c.shape[: spec.batch_ndim] + (1,) * len(rows) + c.shape[spec.batch_ndim :])
  return r, c


def _copies(n: int, *xs) -> list:
  """n copies of the arrays ``xs`` that XLA cannot merge (one optimization_barrier, so
  nothing is copied at run time).

  A full-size pass that rebuilds its elementwise operand from its own copy of the inputs
  gets that operand fused in. Without the copies, common-subexpression elimination merges
  the operands (even a broadcast of a small factor) into one full-size value read by
  several fusions, which XLA writes to a temporary: on XLA:CPU a fresh full-size
  temporary costs more per step than the recomputation (page faults; see docs/came.md).
  """
  return list(jax.lax.optimization_barrier(tuple(xs for _ in range(n))))


def _unfactored_update(g, mu, nu, spec: LeafSpec, b1, b2, eps, clip_threshold, grad_scale):
  """The unfactored leaves (biases, norms, depthwise conv): few parameters, plain form."""
  out_dtype = g.dtype
  g = g.astype(jnp.float32)
  if grad_scale is not None:
    g = g * grad_scale
  u = g * g + eps[0]
  v = b2 * nu.v + (1.0 - b2) * u
  upd = g * jax.lax.rsqrt(v)
  clip_axes = tuple(range(spec.batch_ndim, g.ndim))
  rms = jnp.sqrt(jnp.mean(upd * upd, axis=clip_axes, keepdims=True))
  upd = upd / jnp.maximum(rms / clip_threshold, 1.0)
  quantized = isinstance(mu, quant8.QuantizedArray)
  m = quant8.dequantize(mu) if quantized else mu
  m = b1 * m + (1.0 - b1) * upd
  new_mu = quant8.quantize(m, mu.tile, mu.minimum.dtype) if quantized else m
  return m.astype(out_dtype), new_mu, FullMoment(v)


def _leaf_update(g, mu, nu, spec: LeafSpec, b1, b2, b3, eps, clip_threshold, grad_scale=None):
  """One leaf's CAME step: (step in g's dtype, new m, new second-moment statistics), of
  the gradient grad_scale * g (grad_scale: None or an fp32 scalar).

  The factored form is laid out for XLA's fusion (docs/came.md, "Update time"): the row,
  column and RMS means read g directly (each from its own copy, see :func:`_copies`, and
  eps1 added after the mean, so no full-size constant enters them; grad_scale enters as
  grad_scale^2 times the means and as a factor of the column factor, so the scaled
  gradient is never formed either); U is never stored
  (the clip is folded into the row factor and each consumer recomputes g * r * c); the
  updated m is the one full-size value shared by the later passes (it is the new state
  when m is fp32), and the instability (U - m)^2 the only other one, read by its row and
  column means.
  """
  if not spec.factored:
    return _unfactored_update(g, mu, nu, spec, b1, b2, eps, clip_threshold, grad_scale)
  out_dtype = g.dtype
  nd = g.ndim
  _, rows, cols = _axes(spec, nd)
  clip_axes = tuple(range(spec.batch_ndim, nd))
  quantized = isinstance(mu, quant8.QuantizedArray)
  g = g.astype(jnp.float32)
  (g_r,), (g_c,) = _copies(2, g)
  # mean(g^2 + eps1) computed as mean(g^2) + eps1; mean((s g)^2) as s^2 mean(g^2).
  s2 = 1.0 if grad_scale is None else grad_scale * grad_scale
  v_row = b2 * nu.v_row + (1.0 - b2) * (jnp.mean(g_r * g_r, axis=cols) * s2 + eps[0])
  v_col = b2 * nu.v_col + (1.0 - b2) * (jnp.mean(g_c * g_c, axis=rows) * s2 + eps[0])
  r, c = _approx_rsqrt(v_row, v_col, spec, nd)
  if grad_scale is not None:  # (s g) r c = g r (c s): every later use of g goes through c
    c = c * grad_scale
  (g_s, r_s, c_s), (g_m, _, c_m), (g_d, _, c_d) = _copies(3, g, r, c)
  upd = g_s * r_s * c_s
  rms = jnp.sqrt(jnp.mean(upd * upd, axis=clip_axes, keepdims=True))
  # U = g * (r / max(rms / clip, 1)) * c: the clip folded into the row factor.
  r = r / jnp.maximum(rms / clip_threshold, 1.0)
  (r_m,), (r_d,) = _copies(2, r)
  m = quant8.dequantize(mu) if quantized else mu
  m = b1 * m + (1.0 - b1) * (g_m * r_m * c_m)
  # (U - m)^2, stored once for its two means; mean(res + eps2) as mean(res) + eps2.
  res = (g_d * r_d * c_d - m) ** 2
  res_a, res_b = jax.lax.optimization_barrier((res, res))
  res_row = b3 * nu.res_row + (1.0 - b3) * (jnp.mean(res_a, axis=cols) + eps[1])
  res_col = b3 * nu.res_col + (1.0 - b3) * (jnp.mean(res_b, axis=rows) + eps[1])
  rr, cc = _approx_rsqrt(res_row, res_col, spec, nd)
  step = m * rr * cc
  new_mu = quant8.quantize(m, mu.tile, mu.minimum.dtype) if quantized else m
  new_nu = FactoredMoments(v_row, v_col, res_row, res_col)
  return step.astype(out_dtype), new_mu, new_nu


# ----------------------------------------------------------------------------- transforms


# The smallest state: every m of more than 1024 elements per layer 8-bit, bf16 block
# metadata (1.0147 B/param on SANA-1.5 1.6B). Pass as came_8bit(lr, **COMPACT).
COMPACT = dict(min_8bit_size=1024, quantize_unfactored=True, meta_dtype=jnp.bfloat16)


def scale_by_came(
  b1: float = 0.9,
  b2: float = 0.999,
  b3: float = 0.9999,
  eps: tuple[float, float] = (1e-30, 1e-16),
  clip_threshold: float = 1.0,
  spec: Union[None, SpecFn, Any] = None,
  quantize_mu: bool = False,
  block_size: int = 2048,
  min_8bit_size: int = 16384,
  align: int = 8,
  quantize_unfactored: bool = False,
  meta_dtype: Any = jnp.float32,
) -> optax.GradientTransformationExtraArgs:
  """CAME's preconditioned direction (without learning rate or weight decay).

  Args:
    b1, b2, b3: EMA rates of the first moment, the squared gradient and the instability.
    eps: (eps1, eps2) added to g^2 and to the instability (U - m)^2.
    clip_threshold: the update U is divided by max(rms(U) / clip_threshold, 1), per
      ``batch_ndim`` slice.
    spec: None (:func:`reference_spec` without stacked axes; ``init`` warns with a
      :class:`StackedLayoutWarning` naming the leaves when the tree looks nn.scan-stacked,
      see :func:`find_stacked`), a callable
      ``(path: str, leaf) -> LeafSpec``, or a tree of LeafSpec matching the parameters.
      (With ``optax.inject_hyperparams``, list a callable spec in ``static_args``.)
    quantize_mu: store m in 8 bits (CAME-8bit) for factored leaves with more than
      ``min_8bit_size`` elements per matrix (default 16384, the official code's),
      in blocks of about ``block_size`` elements that never cross a matrix.
    align: prefer block counts per axis that are multiples of this (see quant8.block_shape).
    quantize_unfactored: also store m in 8 bits for unfactored leaves with more than
      ``min_8bit_size`` elements per ``batch_ndim`` slice (depthwise conv, biases, norms;
      default off, as in the official code). Their second moment v stays fp32.
    meta_dtype: dtype of the per-block min and scale, ``jnp.float32`` (default) or
      ``jnp.bfloat16`` (min rounded down, scale up, see quant8.quantize).
    ``COMPACT`` (min_8bit_size=1024, quantize_unfactored=True, meta_dtype=bfloat16) is the
    smallest state (1.0147 B/param on SANA-1.5 1.6B against 1.0226): every m of more than
    1024 elements is 8-bit. The more leaves are 8-bit, the more a last-bit difference in m
    (another mesh, another reduction order) can flip a code: runs on different meshes then
    agree to the quantisation step, not to fp32 rounding (docs/came.md).

  Returns:
    An optax.GradientTransformationExtraArgs with :class:`CameState`. Updates keep the
    gradients' dtype; all statistics are fp32. ``update`` takes the optional extra argument
    ``grad_scale`` (an fp32 scalar, e.g. a global-norm clip factor): the step is then the
    one for ``grad_scale * updates`` (equal up to rounding), computed without forming that
    product, which XLA would otherwise store as a full-size copy of every factored leaf's
    gradient (see ``sana_jax.train.optimizer.clip_folded_into``).
  """
  for name, val in (
    ("block_size", block_size),
    ("min_8bit_size", min_8bit_size),
    ("align", align),
  ):
    _check_static_int(name, val)
  meta_dtype = jnp.dtype(meta_dtype)
  if meta_dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f"meta_dtype must be float32 or bfloat16, got {meta_dtype}")
  if len(eps) != 2:
    raise ValueError(f"eps must be a pair (eps1, eps2), got {eps!r}")

  def init_fn(params):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    specs = leaf_specs(params, spec)
    if spec is None:
      _warn_if_stacked(
        params,
        specs,
        quantize_mu,
        quantize_unfactored,
        min_8bit_size,
        block_size,
        align,
        meta_dtype,
      )
    mus, nus = [], []
    for p, s in zip(leaves, specs):
      shape = tuple(p.shape)
      zeros = jnp.zeros(shape, jnp.float32)
      if _use_8bit(shape, s, quantize_mu, quantize_unfactored, min_8bit_size):
        tile = _tile(shape, s, block_size, align)
        mus.append(quant8.zeros(shape, tile, meta_dtype))
      else:
        mus.append(zeros)
      if s.factored:
        bn, rn = s.batch_ndim, s.row_ndim
        row = jnp.zeros(shape[: bn + rn], jnp.float32)
        col = jnp.zeros(shape[:bn] + shape[bn + rn :], jnp.float32)
        nus.append(FactoredMoments(row, col, row, col))
      else:
        nus.append(FullMoment(zeros))
    return CameState(mu=treedef.unflatten(mus), nu=treedef.unflatten(nus))

  def update_fn(updates, state, params=None, *, grad_scale=None, **extra):
    del params, extra
    if grad_scale is not None:
      grad_scale = jnp.asarray(grad_scale, jnp.float32)
      if grad_scale.shape != ():
        raise ValueError(f"grad_scale must be a scalar, got shape {grad_scale.shape}")
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    specs = leaf_specs(updates, spec)
    mus = treedef.flatten_up_to(state.mu)
    nus = treedef.flatten_up_to(state.nu)
    out_u, out_mu, out_nu = [], [], []
    for g, mu, nu, s in zip(leaves, mus, nus, specs):
      u, mu, nu = _leaf_update(g, mu, nu, s, b1, b2, b3, eps, clip_threshold, grad_scale)
      out_u.append(u)
      out_mu.append(mu)
      out_nu.append(nu)
    return treedef.unflatten(out_u), CameState(treedef.unflatten(out_mu), treedef.unflatten(out_nu))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def came(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  b3: float = 0.9999,
  eps: tuple[float, float] = (1e-30, 1e-16),
  clip_threshold: float = 1.0,
  weight_decay: float = 0.0,
  weight_decay_mask: Any = None,
  spec: Union[None, SpecFn, Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """CAME: scale_by_came, decoupled weight decay (times lr), then -learning_rate.

  ``learning_rate`` and ``weight_decay`` may be schedules (callables of the step count).
  ``update`` takes scale_by_came's extra argument ``grad_scale``.
  """
  return optax.chain(
    scale_by_came(b1, b2, b3, eps, clip_threshold, spec=spec),
    optax.add_decayed_weights(weight_decay, weight_decay_mask),
    optax.scale_by_learning_rate(learning_rate),
  )


def came_8bit(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  b3: float = 0.9999,
  eps: tuple[float, float] = (1e-30, 1e-16),
  clip_threshold: float = 1.0,
  weight_decay: float = 0.0,
  weight_decay_mask: Any = None,
  spec: Union[None, SpecFn, Any] = None,
  block_size: int = 2048,
  min_8bit_size: int = 16384,
  align: int = 8,
  quantize_unfactored: bool = False,
  meta_dtype: Any = jnp.float32,
) -> optax.GradientTransformationExtraArgs:
  """CAME-8bit: as :func:`came`, with m stored in 8 bits.

  Each step dequantises m, updates it in fp32, uses that fp32 m for the step and stores it
  requantised. ``block_size`` counts elements per block (not rows as in the official code);
  blocks never cross a matrix (or a layer). The defaults are the official code's choices
  (m of factored matrices with more than 16384 elements per layer 8-bit, fp32 block
  min/scale: 1.0226 B/param on SANA-1.5 1.6B); ``**COMPACT`` gives 1.0147 (see
  :func:`scale_by_came` and docs/came.md for the bytes, the loss and the cross-mesh
  agreement of each).
  """
  return optax.chain(
    scale_by_came(
      b1,
      b2,
      b3,
      eps,
      clip_threshold,
      spec=spec,
      quantize_mu=True,
      block_size=block_size,
      min_8bit_size=min_8bit_size,
      align=align,
      quantize_unfactored=quantize_unfactored,
      meta_dtype=meta_dtype,
    ),
    optax.add_decayed_weights(weight_decay, weight_decay_mask),
    optax.scale_by_learning_rate(learning_rate),
  )


# ----------------------------------------------------------------------------- sharding


def _axis_size(mesh, entry) -> int:
  if entry is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh.shape[n] for n in names)


def _fit(mesh, entries, shape):
  """Drop spec entries whose mesh size does not divide the dimension."""
  return tuple(
    e if e is not None and shape[i] % _axis_size(mesh, e) == 0 else None
    for i, e in enumerate(entries)
  )


def _reduced_spec(mesh, entries, shape, keep_axes, dropped_axes):
  """Spec of a reduction of an array sharded as ``entries``: kept axes keep their entry;
  the mesh axes of dropped axes move onto a kept axis that is unsharded and divisible, so
  the statistic stays sharded where the parameter is."""
  out = [entries[i] for i in keep_axes]
  out_shape = [shape[i] for i in keep_axes]
  out = list(_fit(mesh, out, out_shape))
  for d in dropped_axes:
    e = entries[d]
    if e is None:
      continue
    for j in reversed(range(len(out))):
      if out[j] is None and out_shape[j] % _axis_size(mesh, e) == 0:
        out[j] = e
        break
  return tuple(out)


def _named(mesh, entries):
  return NamedSharding(mesh, PartitionSpec(*entries))


def _came_leaf_shardings(sharding: NamedSharding, mu, nu):
  mesh = sharding.mesh
  shape = tuple(mu.shape)
  nd = len(shape)
  entries = tuple(sharding.spec) + (None,) * (nd - len(sharding.spec))
  if isinstance(mu, quant8.QuantizedArray):
    mshape = tuple(mu.minimum.shape)
    ms = _named(mesh, _fit(mesh, entries, mshape))
    mu_s = quant8.QuantizedArray(sharding, ms, ms)
  else:
    mu_s = sharding
  if isinstance(nu, FactoredMoments):
    bn = nu.v_row.ndim - (nd - nu.v_col.ndim)  # v_row: batch + rows, v_col: batch + cols
    rows = list(range(bn, nu.v_row.ndim))
    cols = list(range(nu.v_row.ndim, nd))
    batch = list(range(bn))
    row = _named(mesh, _reduced_spec(mesh, entries, shape, batch + rows, cols))
    col = _named(mesh, _reduced_spec(mesh, entries, shape, batch + cols, rows))
    nu_s = FactoredMoments(row, col, row, col)
  else:
    nu_s = FullMoment(sharding)
  return mu_s, nu_s


def state_sharding(state, param_shardings):
  """Shardings for an optimizer state (concrete or from ``jax.eval_shape(opt.init, ...)``).

  ``param_shardings``: a tree of NamedSharding matching the parameters. Every CameState
  anywhere in ``state`` (inside optax.chain, MultiSteps, masked, inject_hyperparams, ...)
  gets per-parameter shardings: m (and its uint8 codes) exactly like its parameter, block
  min/scale along the same axes where the block counts divide, row/column statistics on
  the parameter's remaining axes (a mesh axis of the reduced dimension moves onto a free
  divisible one). Any other state leaf whose key path ends with a parameter's key path and
  has its shape gets that parameter's sharding (e.g. MultiSteps' accumulators); all else
  (step counts, hyperparameters) is replicated.
  """
  p_leaves = jax.tree_util.tree_flatten_with_path(param_shardings)[0]
  if not p_leaves:
    raise ValueError("param_shardings has no leaves")
  by_path = {tuple(p): s for p, s in p_leaves}
  mesh = p_leaves[0][1].mesh
  replicated = NamedSharding(mesh, PartitionSpec())

  def param_of(path):
    for k in range(len(path)):
      s = by_path.get(tuple(path[k:]))
      if s is not None:
        return s
    return None

  def for_came(st: CameState):
    is_entry = lambda x: isinstance(x, (quant8.QuantizedArray, FactoredMoments, FullMoment))
    mu_leaves, mu_def = jax.tree_util.tree_flatten_with_path(st.mu, is_leaf=is_entry)
    nu_leaves = mu_def.flatten_up_to(st.nu)
    mu_out, nu_out = [], []
    for (path, mu), nu in zip(mu_leaves, nu_leaves):
      s = by_path.get(tuple(path))
      if s is None:
        raise ValueError(f"no parameter sharding for CameState entry {_path_str(path)}")
      a, b = _came_leaf_shardings(s, mu, nu)
      mu_out.append(a)
      nu_out.append(b)
    return CameState(mu_def.unflatten(mu_out), mu_def.unflatten(nu_out))

  def visit(path, node):
    if isinstance(node, CameState):
      return for_came(node)
    s = param_of(path)
    if s is not None and len(s.spec) <= len(node.shape):
      return s
    return replicated

  return jax.tree_util.tree_map_with_path(visit, state, is_leaf=lambda x: isinstance(x, CameState))
