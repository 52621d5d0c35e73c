"""Gemma-2 decoder stack used as a text encoder (SANA's caption encoder).

The model maps token ids (B, L) and a right-padding mask (B, L) to the last hidden state
after the final RMSNorm, (B, L, hidden) float32 -- what transformers' `Gemma2Model` returns
as `last_hidden_state`. The language-model head and the final-logit softcap are not part
of it (SANA never uses them).

Gemma-2 specifics (REFERENCE.md section 3):
  * embeddings scaled by sqrt(hidden) (the scale is cast to the compute dtype first);
  * RMSNorm  x * rsqrt(mean(x^2) + eps) * (1 + w), computed in float32;
  * four norms per layer: input, post-attention, pre-feed-forward, post-feed-forward;
  * grouped-query attention, head_dim independent of hidden / heads, scale
    query_pre_attn_scalar^-0.5, logits soft-capped with cap * tanh(logits / cap);
  * layers alternate sliding-window and full causal attention (`layer_types`); a key k is
    visible from query q iff k <= q, q - k < sliding_window (sliding layers only) and
    the key is not padding;
  * RoPE (rotate-half convention) with base `rope_theta`; GELU(tanh) gated MLP.

Layers are stacked with `nn.scan`: every layer parameter has a leading layer axis 0, and
the per-layer attention kind is a scanned boolean input, so any `layer_types` pattern
works with one compiled layer body.

Parameter tree (plain nested dict after `init_params`; N = layers, D = hidden,
H = heads, K = kv heads, d = head_dim, F = intermediate, V = vocab):
  embed/embedding                 (V, D)
  layers/input_norm/scale         (N, D)     and post_attn_norm, pre_ffw_norm, post_ffw_norm
  layers/attn/q/kernel            (N, D, H*d)
  layers/attn/k/kernel            (N, D, K*d)    layers/attn/v/kernel  (N, D, K*d)
  layers/attn/o/kernel            (N, H*d, D)
  layers/mlp/gate/kernel          (N, D, F)      layers/mlp/up/kernel  (N, D, F)
  layers/mlp/down/kernel          (N, F, D)
  final_norm/scale                (D,)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SLIDING = "sliding_attention"
FULL = "full_attention"
_ACTIVATIONS = {
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class Gemma2Config:
  """Geometry and numerics of a Gemma-2 encoder. Defaults: Gemma-2-2B(-IT).

  `layer_types=None` means transformers' default pattern: sliding, full, sliding, ...
  `dtype` is the compute dtype (activations and matmul inputs); norms, softmax and the
  returned hidden states are float32. `param_dtype` is the storage dtype of parameters.
  """

  vocab_size: int = 256000
  hidden_size: int = 2304
  intermediate_size: int = 9216
  num_layers: int = 26
  num_heads: int = 8
  num_kv_heads: int = 4
  head_dim: int = 256
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  query_pre_attn_scalar: float = 256.0
  sliding_window: int | None = 4096
  attn_logit_softcapping: float | None = 50.0
  hidden_activation: str = "gelu_pytorch_tanh"
  layer_types: tuple[str, ...] | None = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    if self.layer_types is not None:
      object.__setattr__(self, "layer_types", tuple(self.layer_types))
    errors = []
    if self.num_heads % self.num_kv_heads:
      errors.append(
        f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
      )
    if self.head_dim % 2:
      errors.append(f"head_dim={self.head_dim} must be even for RoPE")
    if self.hidden_activation not in _ACTIVATIONS:
      errors.append(f"hidden_activation={self.hidden_activation!r} not in {sorted(_ACTIVATIONS)}")
    types = self.resolved_layer_types
    if len(types) != self.num_layers:
      errors.append(f"len(layer_types)={len(types)} != num_layers={self.num_layers}")
    bad = sorted(set(types) - {SLIDING, FULL})
    if bad:
      errors.append(f"unknown layer types {bad}; expected {SLIDING!r} or {FULL!r}")
    if SLIDING in types and not self.sliding_window:
      errors.append("sliding_attention layers need a positive sliding_window")
    if errors:
      raise ValueError("invalid Gemma2Config: " + "; ".join(errors))

  @property
  def resolved_layer_types(self) -> tuple[str, ...]:
    if self.layer_types is not None:
      return self.layer_types
    return tuple(SLIDING if i % 2 == 0 else FULL for i in range(self.num_layers))

  @property
  def sliding_flags(self) -> np.ndarray:
    """(num_layers,) bool: True where the layer uses sliding-window attention."""
    return np.array([t == SLIDING for t in self.resolved_layer_types], dtype=bool)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["layer_types"] = list(self.resolved_layer_types)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Gemma2Config":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown Gemma2Config fields {unknown}; known: {sorted(names)}")
    return cls(**d)


def gemma2_2b(**overrides) -> Gemma2Config:
  """Gemma-2-2B(-IT) geometry (SANA's text encoder); overrides e.g. dtype='bfloat16'."""
  return dataclasses.replace(Gemma2Config(), **overrides)


def gemma2_tiny(vocab_size: int, **overrides) -> Gemma2Config:
  """A small Gemma-2-architecture encoder (tests, the shapes task): hidden 64, 2 layers
  (sliding, full; window 16), 4 heads x 16 with 2 kv heads, MLP 128."""
  base = Gemma2Config(
    vocab_size=vocab_size,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    query_pre_attn_scalar=16,
    sliding_window=16,
  )
  return dataclasses.replace(base, **overrides)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """Gemma RMSNorm in float32: x * rsqrt(mean(x^2) + eps) * (1 + w); returns x.dtype."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (y * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


class RMSNorm(nn.Module):
  eps: float
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    w = self.param(
      "scale",
      nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
      (x.shape[-1],),
      self.param_dtype,
    )
    return rms_norm(x, w, self.eps)


def rope_tables(length: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos, sin of shape (length, head_dim), float32, rotate-half layout (freqs repeated)."""
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  freqs = jnp.arange(length, dtype=jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x (B, L, heads, d); cos/sin (L, d) float32 -> rotated x in x.dtype."""
  half = x.shape[-1] // 2
  rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos = cos[None, :, None, :].astype(x.dtype)
  sin = sin[None, :, None, :].astype(x.dtype)
  return x * cos + rot * sin


def attention_masks(attention_mask: jax.Array, sliding_window: int | None):
  """Boolean masks (B, 1, 1, L, L) [query, key] for full and sliding-window layers.

  attention_mask: (B, L), nonzero for real tokens (right padding).
  """
  length = attention_mask.shape[1]
  q = jnp.arange(length)[:, None]
  k = jnp.arange(length)[None, :]
  causal = k <= q
  keys = attention_mask.astype(bool)[:, None, None, None, :]
  full = causal[None, None, None] & keys
  if sliding_window:
    sliding = (causal & (q - k < sliding_window))[None, None, None] & keys
  else:
    sliding = full
  return full, sliding


class _Dense(nn.Module):
  """A bias-free Dense (kernel (in, out)) that accumulates in and returns float32, then
  rounds to `dtype`: torch's bf16 Linear numerics, and on XLA:CPU a bf16 x bf16 -> fp32 dot
  runs ~2.5x faster than one with a bf16 result (Gemma-2-2B encode at 495 tokens, this
  2-core CPU).

  The kernel may arrive as uint16, the bit pattern of a bfloat16 kernel (`pack_params`):
  it is bit-cast back here, after `nn.scan` has sliced out this layer. XLA:CPU cannot
  slice a bf16 array inside a loop, so it converts a bf16 stack to an fp32 copy of the
  whole stack before the loop and back to bf16 per layer (Gemma-2-2B: an 8.2 GB temporary
  and that much memory traffic on every call); a uint16 stack is sliced as it is."""

  features: int
  dtype: Any
  param_dtype: Any
  kernel_init: Any

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
    if kernel.dtype == jnp.uint16:
      kernel = jax.lax.bitcast_convert_type(kernel, jnp.bfloat16)
    y = jax.lax.dot_general(
      x.astype(self.dtype),
      kernel.astype(self.dtype),
      (((x.ndim - 1,), (0,)), ((), ())),
      preferred_element_type=jnp.float32,
    )
    return y.astype(self.dtype)


def _dense(features, names, dtype, param_dtype, name):
  init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)
  return _Dense(features, dtype, param_dtype, init, name=name)


class Attention(nn.Module):
  config: Gemma2Config

  @nn.compact
  def __call__(self, x, mask, cos, sin):
    """x (B, L, D) compute dtype; mask (B, 1, 1, L, L) bool -> (B, L, D)."""
    c = self.config
    dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    b, length, _ = x.shape
    groups = c.num_heads // c.num_kv_heads
    q = _dense(c.num_heads * c.head_dim, ("embed", "heads"), dt, pdt, "q")(x)
    k = _dense(c.num_kv_heads * c.head_dim, ("embed", "kv"), dt, pdt, "k")(x)
    v = _dense(c.num_kv_heads * c.head_dim, ("embed", "kv"), dt, pdt, "v")(x)
    q = apply_rope(q.reshape(b, length, c.num_heads, c.head_dim), cos, sin)
    k = apply_rope(k.reshape(b, length, c.num_kv_heads, c.head_dim), cos, sin)
    v = v.reshape(b, length, c.num_kv_heads, c.head_dim)
    # Head h = kv_head * groups + g, as transformers' repeat_kv.
    q = q.reshape(b, length, c.num_kv_heads, groups, c.head_dim)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
    logits = logits * (float(c.query_pre_attn_scalar) ** -0.5)
    if c.attn_logit_softcapping:
      cap = float(c.attn_logit_softcapping)
      logits = jnp.tanh(logits / cap) * cap
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v, preferred_element_type=jnp.float32).astype(dt)
    out = out.reshape(b, length, c.num_heads * c.head_dim)
    return _dense(x.shape[-1], ("heads", "embed"), dt, pdt, "o")(out)


class MLP(nn.Module):
  config: Gemma2Config

  @nn.compact
  def __call__(self, x):
    c = self.config
    dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    gate = _dense(c.intermediate_size, ("embed", "mlp"), dt, pdt, "gate")(x)
    up = _dense(c.intermediate_size, ("embed", "mlp"), dt, pdt, "up")(x)
    h = _ACTIVATIONS[c.hidden_activation](gate) * up
    return _dense(x.shape[-1], ("mlp", "embed"), dt, pdt, "down")(h)


class DecoderLayer(nn.Module):
  """One Gemma-2 layer; signature fits nn.scan: (carry, is_sliding, ...) -> (carry, None)."""

  config: Gemma2Config

  @nn.compact
  def __call__(self, x, is_sliding, mask_full, mask_sliding, cos, sin):
    c = self.config
    pdt = jnp.dtype(c.param_dtype)
    mask = jnp.where(is_sliding, mask_sliding, mask_full)
    h = RMSNorm(c.rms_norm_eps, pdt, name="input_norm")(x)
    h = Attention(c, name="attn")(h, mask, cos, sin)
    x = x + RMSNorm(c.rms_norm_eps, pdt, name="post_attn_norm")(h)
    h = RMSNorm(c.rms_norm_eps, pdt, name="pre_ffw_norm")(x)
    h = MLP(c, name="mlp")(h)
    x = x + RMSNorm(c.rms_norm_eps, pdt, name="post_ffw_norm")(h)
    return x, None


class Gemma2Encoder(nn.Module):
  """Gemma-2 decoder as an encoder.

  __call__(input_ids (B, L) int, attention_mask (B, L) {0,1} or bool, right padding)
    -> last hidden state after the final norm, (B, L, hidden_size) float32.
  """

  config: Gemma2Config

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None):
    c = self.config
    dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, dtype=bool)
    if attention_mask.shape != input_ids.shape:
      raise ValueError(
        f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}"
      )
    embed = nn.Embed(
      c.vocab_size,
      c.hidden_size,
      dtype=dt,
      param_dtype=pdt,
      embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
      name="embed",
    )
    x = embed(input_ids) * jnp.asarray(math.sqrt(c.hidden_size), dtype=dt)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    mask_full, mask_sliding = attention_masks(attention_mask, c.sliding_window)
    cos, sin = rope_tables(input_ids.shape[1], c.head_dim, c.rope_theta)
    layer_cls = nn.remat(DecoderLayer, prevent_cse=False) if c.remat else DecoderLayer
    stack = nn.scan(
      layer_cls,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
      length=c.num_layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )(c, name="layers")
    x, _ = stack(x, jnp.asarray(c.sliding_flags), mask_full, mask_sliding, cos, sin)
    x = RMSNorm(c.rms_norm_eps, pdt, name="final_norm")(x)
    return x.astype(jnp.float32)


def init_params(config: Gemma2Config, rng: jax.Array | int = 0, length: int = 8) -> dict:
  """Random parameters as a plain nested dict (logical-partitioning boxes removed)."""
  if isinstance(rng, int):
    rng = jax.random.PRNGKey(rng)
  ids = jnp.zeros((1, length), jnp.int32)
  variables = jax.jit(Gemma2Encoder(config).init)(rng, ids)
  return nn.meta.unbox(variables["params"])


def encode(config: Gemma2Config, params: dict, input_ids, attention_mask) -> jax.Array:
  """Un-jitted convenience: Gemma2Encoder(config).apply({'params': params}, ...)."""
  return Gemma2Encoder(config).apply(
    {"params": params}, jnp.asarray(input_ids), jnp.asarray(attention_mask)
  )


def _packable(leaf) -> bool:
  """A bf16 array whose bits can be viewed as uint16 without a copy: numpy, or a jax array
  on one CPU device (np.asarray of it is a view, jax.device_put of the view is one too)."""
  if isinstance(leaf, np.ndarray):
    return leaf.dtype == jnp.bfloat16
  if not isinstance(leaf, jax.Array) or isinstance(leaf, jax.core.Tracer):
    return False
  if leaf.dtype != jnp.bfloat16 or not leaf.is_fully_addressable:
    return False
  devices = leaf.sharding.device_set
  return len(devices) == 1 and next(iter(devices)).platform == "cpu"


def pack_params(params: dict) -> dict:
  """The stacked bf16 kernels under 'layers' as uint16 views of the same memory (no copy
  where `_packable`; others unchanged): `_Dense` bit-casts them back per layer, so XLA:CPU
  never makes an fp32 copy of the stack (see `_Dense`). Same numbers, same tree."""

  def pack(path, leaf):
    if path[-1].key != "kernel" or not _packable(leaf):
      return leaf
    view = np.asarray(leaf).view(np.uint16)
    return view if isinstance(leaf, np.ndarray) else jax.device_put(view, leaf.sharding)

  layers = jax.tree_util.tree_map_with_path(pack, params["layers"])
  return {**params, "layers": layers}


def make_encode_fn(config: Gemma2Config):
  """(params, input_ids (B, L), attention_mask (B, L)) -> (B, L, D) float32, jitted; bf16
  layer kernels are passed to the compiled function as uint16 views (`pack_params`)."""
  model = Gemma2Encoder(config)

  @jax.jit
  def fn(params, input_ids, attention_mask):
    return model.apply({"params": params}, input_ids, attention_mask)

  def encode_fn(params, input_ids, attention_mask):
    if isinstance(params, dict) and isinstance(params.get("layers"), dict):
      params = pack_params(params)
    return fn(params, input_ids, attention_mask)

  encode_fn.jitted = fn
  return encode_fn
