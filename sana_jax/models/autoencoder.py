"""DC-AE (deep compression autoencoder) in Flax Linen, as diffusers' `AutoencoderDC`.

Layout is NHWC everywhere. Images are float (B, H, W, in_channels) in [-1, 1]; latents are
(B, H / f, W / f, latent_channels) with f = 2 ** (len(block_out_channels) - 1) (32 for
f32c32). `AutoencoderDC.encode` returns latents already multiplied by `scaling_factor`;
`AutoencoderDC.decode` divides by it first (diffusers' AutoencoderDC leaves both to the
pipeline; we fold them in).

The parameter tree mirrors diffusers' module tree: diffusers key
`decoder.up_blocks.3.1.attn.to_qkv_multiscale.0.proj_in.weight` is the Flax path
`decoder/up_blocks_3_1/attn/to_qkv_multiscale_0/proj_in/kernel` (numeric parts are merged
into the preceding name). Leaf layouts: full convs `kernel` (kh, kw, in, out); 1x1 convs
and linears `kernel` (in, out); depthwise convs `kernel` (kh, kw, channels); grouped 1x1
convs `kernel` (groups, in_per_group, out_per_group); norms `scale`, `bias` (and `mean`,
`var` for eval-mode batch norm, stored with the parameters: this model is inference-only).
`sana_jax.weights.dcae` holds the transposes.

Performance (XLA:CPU, see docs/autoencoder.md): depthwise convs are shifted multiply-adds
(a grouped `feature_group_count` conv is 5-15x slower there), grouped 1x1 convs are
einsums over groups, and "nearest 2x upsample then 3x3 conv" is computed as four 2x2 convs
on the low-resolution input followed by a pixel shuffle (2.25x fewer FLOPs, same result up
to rounding).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
NORM_TYPES = ("rms_norm", "batch_norm")
ACT_FNS = ("silu", "swish", "relu", "gelu", "mish")


# ----------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------


def _tuple_per_stage(value, n: int, name: str) -> tuple:
  """A string (same for all stages) or a sequence of length n -> tuple of length n."""
  if isinstance(value, str):
    return (value,) * n
  value = tuple(value)
  if len(value) != n:
    raise ValueError(f"{name} has {len(value)} entries, expected one per stage ({n}).")
  return value


@dataclasses.dataclass(frozen=True)
class DCAEConfig:
  """Geometry of an AutoencoderDC; field names and defaults are diffusers' `config.json`.

  Per-stage fields accept a single string (every stage) or one value per stage; they are
  normalised to tuples in `__post_init__`, so the config is hashable.
  """

  in_channels: int = 3
  latent_channels: int = 32
  attention_head_dim: int = 32
  encoder_block_types: Any = "ResBlock"
  decoder_block_types: Any = "ResBlock"
  encoder_block_out_channels: Sequence[int] = (128, 256, 512, 512, 1024, 1024)
  decoder_block_out_channels: Sequence[int] = (128, 256, 512, 512, 1024, 1024)
  encoder_layers_per_block: Sequence[int] = (2, 2, 2, 3, 3, 3)
  decoder_layers_per_block: Sequence[int] = (3, 3, 3, 3, 3, 3)
  encoder_qkv_multiscales: Sequence[Sequence[int]] = ((), (), (), (5,), (5,), (5,))
  decoder_qkv_multiscales: Sequence[Sequence[int]] = ((), (), (), (5,), (5,), (5,))
  upsample_block_type: str = "pixel_shuffle"  # "interpolate" = nearest 2x + 3x3 conv
  downsample_block_type: str = "pixel_unshuffle"  # anything else = stride-2 3x3 conv
  decoder_norm_types: Any = "rms_norm"
  decoder_act_fns: Any = "silu"
  encoder_out_shortcut: bool = True
  decoder_in_shortcut: bool = True
  decoder_conv_act_fn: str = "relu"
  scaling_factor: float = 1.0
  # Execution (not in diffusers' config).
  compute_dtype: str = "float32"  # convs / matmuls; norms and linear attention in fp32
  upsample_impl: str = "subpixel"  # subpixel | repeat: how nearest-2x + conv is computed

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)
    for side in ("encoder", "decoder"):
      ch = tuple(int(c) for c in getattr(self, f"{side}_block_out_channels"))
      n = len(ch)
      set_(f"{side}_block_out_channels", ch)
      layers = tuple(int(c) for c in getattr(self, f"{side}_layers_per_block"))
      if len(layers) != n:
        raise ValueError(f"{side}_layers_per_block has {len(layers)} entries, expected {n}.")
      set_(f"{side}_layers_per_block", layers)
      set_(
        f"{side}_block_types",
        _tuple_per_stage(getattr(self, f"{side}_block_types"), n, f"{side}_block_types"),
      )
      ms = tuple(tuple(int(k) for k in s) for s in getattr(self, f"{side}_qkv_multiscales"))
      if len(ms) != n:
        raise ValueError(f"{side}_qkv_multiscales has {len(ms)} entries, expected {n}.")
      set_(f"{side}_qkv_multiscales", ms)
      for t in getattr(self, f"{side}_block_types"):
        if t not in BLOCK_TYPES:
          raise ValueError(
            f"{side} block type {t!r} is not supported; expected one of {BLOCK_TYPES}."
          )
    n = len(self.decoder_block_out_channels)
    set_("decoder_norm_types", _tuple_per_stage(self.decoder_norm_types, n, "decoder_norm_types"))
    set_("decoder_act_fns", _tuple_per_stage(self.decoder_act_fns, n, "decoder_act_fns"))
    for t in self.decoder_norm_types:
      if t not in NORM_TYPES:
        raise ValueError(f"norm type {t!r} is not supported; expected one of {NORM_TYPES}.")
    for a in self.decoder_act_fns + (self.decoder_conv_act_fn,):
      if a not in ACT_FNS:
        raise ValueError(f"activation {a!r} is not supported; expected one of {ACT_FNS}.")
    if len(self.encoder_block_out_channels) != len(self.decoder_block_out_channels):
      raise ValueError("encoder and decoder must have the same number of stages.")
    if self.upsample_impl not in ("subpixel", "repeat"):
      raise ValueError(f"upsample_impl must be 'subpixel' or 'repeat', got {self.upsample_impl!r}.")

  @property
  def spatial_compression_ratio(self) -> int:
    return 2 ** (len(self.encoder_block_out_channels) - 1)

  def replace(self, **kw) -> "DCAEConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_diffusers(cls, d: Mapping[str, Any], **overrides) -> "DCAEConfig":
    """From a diffusers `config.json` dict. `_`-prefixed keys are ignored; unknown keys warn.

    The legacy shared key `block_out_channels` sets both encoder and decoder channels.
    """
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    if "block_out_channels" in d:
      shared = d.pop("block_out_channels")
      d.setdefault("encoder_block_out_channels", shared)
      d.setdefault("decoder_block_out_channels", shared)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      warnings.warn(f"DC-AE config keys ignored (not used by AutoencoderDC): {unknown}")
    kw = {k: v for k, v in d.items() if k in names}
    kw.update(overrides)
    return cls(**kw)

  def to_diffusers(self) -> dict:
    """The diffusers `config.json` fields (lists for tuples), for `AutoencoderDC(**cfg)`."""
    out = {}
    for f in dataclasses.fields(self):
      if f.name in ("compute_dtype", "upsample_impl"):
        continue
      v = getattr(self, f.name)
      if isinstance(v, tuple):
        v = [list(x) if isinstance(x, tuple) else x for x in v]
      out[f.name] = v
    return out


def dcae_f32c32_config(**overrides) -> DCAEConfig:
  """`mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers` (also SANA-1.5 / sana-1.1): 312M params.

  ResBlock x3 stages then EfficientViT x3 stages per side, channels (128, 256, 512, 512,
  1024, 1024), encoder layers (2, 2, 2, 3, 3, 3), decoder (3, 3, 3, 3, 3, 3), multiscale
  (5,) in the ViT stages, stride-2 conv downsample, nearest-interpolate upsample, RMSNorm +
  SiLU in the decoder, ReLU before the last conv, scaling factor 0.41407.
  """
  vit = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
  ms = ((), (), (), (5,), (5,), (5,))
  cfg = dict(
    in_channels=3,
    latent_channels=32,
    attention_head_dim=32,
    encoder_block_types=vit,
    decoder_block_types=vit,
    encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
    decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
    encoder_qkv_multiscales=ms,
    decoder_qkv_multiscales=ms,
    upsample_block_type="interpolate",
    downsample_block_type="Conv",
    decoder_norm_types="rms_norm",
    decoder_act_fns="silu",
    encoder_out_shortcut=True,
    decoder_in_shortcut=True,
    decoder_conv_act_fn="relu",
    scaling_factor=0.41407,
  )
  cfg.update(overrides)
  return DCAEConfig(**cfg)


# ----------------------------------------------------------------------------------------
# Layers.
# ----------------------------------------------------------------------------------------


def activation(name: str) -> Callable[[Array], Array]:
  return {
    "silu": nn.silu,
    "swish": nn.silu,
    "relu": nn.relu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "mish": lambda x: x * jnp.tanh(nn.softplus(x)),
  }[name]


def pixel_unshuffle(x: Array, r: int = 2) -> Array:
  """(B, H*r, W*r, C) -> (B, H, W, C*r*r), channel order c*r*r + i*r + j as torch."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // r, r, w // r, r, c).transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(b, h // r, w // r, c * r * r)


def pixel_shuffle(x: Array, r: int = 2) -> Array:
  """(B, H, W, C*r*r) -> (B, H*r, W*r, C), inverse of `pixel_unshuffle` (torch order)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, c // (r * r), r, r).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, h * r, w * r, c // (r * r))


class Conv(nn.Module):
  """Full k x k conv, torch padding k // 2. kernel (k, k, in, out)."""

  features: int
  kernel_size: int = 3
  stride: int = 1
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k, p = self.kernel_size, self.kernel_size // 2
    kernel = self.param(
      "kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features), jnp.float32
    )
    y = jax.lax.conv_general_dilated(
      x.astype(self.dtype),
      kernel.astype(self.dtype),
      (self.stride,) * 2,
      ((p, p), (p, p)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
      y = y + bias.astype(y.dtype)
    return y


class UpsampleConv(nn.Module):
  """Nearest 2x upsample followed by a 3x3 conv (padding 1); kernel (3, 3, in, out).

  impl "subpixel": output pixel (2i+a, 2j+b) only sees input rows i-1..i+1 through 2 distinct
  taps per axis, so the 3x3 kernel folds into four 2x2 kernels on the low-resolution input
  (2.25x fewer FLOPs), then a pixel shuffle. impl "repeat": literal upsample + conv.
  """

  features: int
  impl: str = "subpixel"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param(
      "kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features), jnp.float32
    )
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    dn = ("NHWC", "HWIO", "NHWC")
    if self.impl == "repeat":
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      y = jax.lax.conv_general_dilated(
        x.astype(self.dtype),
        kernel.astype(self.dtype),
        (1, 1),
        ((1, 1), (1, 1)),
        dimension_numbers=dn,
      )
      return y + bias.astype(y.dtype)
    # Fold taps per axis: phase 0 uses input offsets (-1, 0) with weights (w0, w1 + w2);
    # phase 1 uses offsets (0, +1) with weights (w0 + w1, w2).
    fold = [lambda w: jnp.stack([w[0], w[1] + w[2]]), lambda w: jnp.stack([w[0] + w[1], w[2]])]
    kernels = []
    for a in range(2):
      ka = fold[a](kernel)  # (2, 3, I, O)
      for b in range(2):
        kernels.append(fold[b](ka.swapaxes(0, 1)).swapaxes(0, 1))  # (2, 2, I, O)
    b_, h, w, _ = x.shape
    xd = x.astype(self.dtype)
    outs = []
    for a in range(2):
      for b in range(2):
        pad = ((1 - a, a), (1 - b, b))
        outs.append(
          jax.lax.conv_general_dilated(
            xd, kernels[2 * a + b].astype(self.dtype), (1, 1), pad, dimension_numbers=dn
          )
        )
    y = jnp.stack(outs, axis=-1)  # (B, H, W, O, 4) = (.., O, a, b)
    y = pixel_shuffle(y.reshape(b_, h, w, self.features * 4), 2)
    return y + bias.astype(y.dtype)


class DepthwiseConv(nn.Module):
  """Depthwise k x k conv as k*k shifted multiply-adds (fast on XLA:CPU). kernel (k, k, C)."""

  kernel_size: int
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k, p = self.kernel_size, self.kernel_size // 2
    c = x.shape[-1]
    kernel = self.param(
      "kernel", nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2), (k, k, c), jnp.float32
    ).astype(self.dtype)
    _, h, w, _ = x.shape
    xp = jnp.pad(x.astype(self.dtype), ((0, 0), (p, p), (p, p), (0, 0)))
    y = None
    for i in range(k):
      for j in range(k):
        t = xp[:, i : i + h, j : j + w] * kernel[i, j]
        y = t if y is None else y + t
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (c,), jnp.float32).astype(y.dtype)
    return y


class GroupedDense(nn.Module):
  """1x1 conv with `groups` groups, as an einsum. kernel (groups, in/groups, out/groups)."""

  features: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c, g = x.shape[-1], self.groups
    init = nn.initializers.lecun_normal(in_axis=1, out_axis=2, batch_axis=(0,))
    kernel = self.param("kernel", init, (g, c // g, self.features // g), jnp.float32)
    xg = x.reshape(x.shape[:-1] + (g, c // g)).astype(self.dtype)
    y = jnp.einsum("...gi,gio->...go", xg, kernel.astype(self.dtype))
    return y.reshape(x.shape[:-1] + (self.features,))


class Norm(nn.Module):
  """Channel-last norm, computed in fp32: "rms_norm" (scale, bias; diffusers RMSNorm with
  bias) or "batch_norm" (eval mode: scale, bias, mean, var)."""

  norm_type: str = "rms_norm"
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    dtype = x.dtype
    x = x.astype(jnp.float32)
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    if self.norm_type == "rms_norm":
      x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    elif self.norm_type == "batch_norm":
      mean = self.param("mean", nn.initializers.zeros, (c,), jnp.float32)
      var = self.param("var", nn.initializers.ones, (c,), jnp.float32)
      x = (x - mean) * jax.lax.rsqrt(var + self.eps)
    else:
      raise ValueError(f"unknown norm_type {self.norm_type!r}")
    return (x * scale + bias).astype(dtype)


# ----------------------------------------------------------------------------------------
# Blocks.
# ----------------------------------------------------------------------------------------


class ResBlock(nn.Module):
  """x + norm(conv2(act(conv1(x)))); conv2 has no bias."""

  norm_type: str = "rms_norm"
  act_fn: str = "silu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    h = Conv(c, dtype=self.dtype, name="conv1")(x)
    h = activation(self.act_fn)(h)
    h = Conv(c, use_bias=False, dtype=self.dtype, name="conv2")(h)
    h = Norm(self.norm_type, name="norm")(h)
    return (h + x).astype(x.dtype)


def _linear_attention(q: Array, k: Array, v: Array, eps: float) -> Array:
  """ReLU linear attention per group; q, k, v (B, N, G, d) fp32 -> (B, N, G, d).

  out_n = sum_m v_m (k_m . q_n) / (sum_m k_m . q_n + eps), computed as (v^T k) q.
  """
  kv = jnp.einsum("bmgf,bmge->bgfe", k, v)
  num = jnp.einsum("bngf,bgfe->bnge", q, kv)
  den = jnp.einsum("bngf,bgf->bng", q, jnp.sum(k, axis=1))
  return num / (den[..., None] + eps)


def _quadratic_attention(q: Array, k: Array, v: Array, eps: float) -> Array:
  """diffusers' path for N <= head_dim: scores k_m . q_n normalised over m, then v."""
  s = jnp.einsum("bmgf,bngf->bgmn", k, q)
  s = s / (jnp.sum(s, axis=2, keepdims=True) + eps)
  return jnp.einsum("bmge,bgmn->bnge", v, s)


class MultiscaleLinearAttention(nn.Module):
  """diffusers `SanaMultiscaleLinearAttention` (residual, mult 1): (B, H, W, C) -> same.

  q, k, v = Dense(C -> heads*d) each, concatenated; for each kernel size a depthwise k x k
  conv then a grouped 1x1 (3*heads groups) of that; channels are then read as
  (groups, [q | k | v], d) with groups = (1 + len(scales)) * heads, exactly as the
  reference's reshape(B, -1, 3*d, N) (q/k/v of a group come from consecutive channels).
  """

  attention_head_dim: int
  kernel_sizes: tuple = (5,)
  norm_type: str = "rms_norm"
  eps: float = 1e-15
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, core_mask: Array | None = None) -> Array:
    """core_mask (gh, gw), optional: for tiled runs. The layer then stores the attention
    sums over the masked (core) tokens in collection 'attn_partial' (when mutable), and uses
    global sums from collection 'attn_global' when present (see `sana_jax.models.tiling`)."""
    b, h, w, c = x.shape
    d = self.attention_head_dim
    heads = c // d
    inner = heads * d
    dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.dtype, name=name)
    qkv = jnp.concatenate(
      [dense(inner, "to_q")(x), dense(inner, "to_k")(x), dense(inner, "to_v")(x)], axis=-1
    )
    scales = [qkv]
    for i, ks in enumerate(self.kernel_sizes):
      mod = _MultiscaleProjection(ks, 3 * heads, dtype=self.dtype, name=f"to_qkv_multiscale_{i}")
      scales.append(mod(qkv))
    t = jnp.concatenate(scales, axis=-1).astype(jnp.float32)
    t = t.reshape(b, h * w, -1, 3, d)
    q, k, v = nn.relu(t[:, :, :, 0]), nn.relu(t[:, :, :, 1]), t[:, :, :, 2]
    if core_mask is not None and self.is_mutable_collection("attn_partial"):
      rep = h // core_mask.shape[0]
      m = jnp.repeat(jnp.repeat(core_mask, rep, axis=0), rep, axis=1).reshape(1, h * w, 1, 1)
      km = k * m.astype(k.dtype)
      self.put_variable("attn_partial", "kv", jnp.einsum("bmgf,bmge->bgfe", km, v))
      self.put_variable("attn_partial", "ksum", jnp.sum(km, axis=1))
    if self.has_variable("attn_global", "kv"):
      kv = self.get_variable("attn_global", "kv")
      ksum = self.get_variable("attn_global", "ksum")
      num = jnp.einsum("bngf,bgfe->bnge", q, kv)
      den = jnp.einsum("bngf,bgf->bng", q, ksum)
      o = num / (den[..., None] + self.eps)
    elif h * w > d:
      o = _linear_attention(q, k, v, self.eps)
    else:
      o = _quadratic_attention(q, k, v, self.eps)
    o = o.reshape(b, h, w, -1).astype(self.dtype)
    o = nn.Dense(c, use_bias=False, dtype=self.dtype, name="to_out")(o)
    o = Norm(self.norm_type, name="norm_out")(o)
    return (o + x).astype(x.dtype)


class _MultiscaleProjection(nn.Module):
  """Depthwise k x k (no bias) then grouped 1x1 (no bias): diffusers
  `SanaMultiscaleAttentionProjection` (proj_in, proj_out)."""

  kernel_size: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = DepthwiseConv(self.kernel_size, use_bias=False, dtype=self.dtype, name="proj_in")(x)
    return GroupedDense(x.shape[-1], self.groups, dtype=self.dtype, name="proj_out")(x)


class GLUMBConv(nn.Module):
  """x + rms(point(h * silu(g))), [h | g] = depthwise3x3(silu(inverted(x))); expand 4."""

  expand_ratio: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    hidden = int(self.expand_ratio * c)
    h = nn.Dense(2 * hidden, dtype=self.dtype, name="conv_inverted")(x)
    h = nn.silu(h)
    h = DepthwiseConv(3, use_bias=True, dtype=self.dtype, name="conv_depth")(h)
    h, gate = h[..., :hidden], h[..., hidden:]
    h = h * nn.silu(gate)
    h = nn.Dense(c, use_bias=False, dtype=self.dtype, name="conv_point")(h)
    h = Norm("rms_norm", name="norm")(h)
    return (h + x).astype(x.dtype)


class EfficientViTBlock(nn.Module):
  attention_head_dim: int
  qkv_multiscales: tuple = (5,)
  norm_type: str = "rms_norm"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, core_mask: Array | None = None) -> Array:
    x = MultiscaleLinearAttention(
      self.attention_head_dim, self.qkv_multiscales, self.norm_type, dtype=self.dtype, name="attn"
    )(x, core_mask)
    return GLUMBConv(dtype=self.dtype, name="conv_out")(x)


class DownBlock(nn.Module):
  """diffusers `DCDownBlock2d`: stride-2 conv, or conv to out/4 + pixel-unshuffle; shortcut =
  channel-group mean of the pixel-unshuffled input."""

  out_channels: int
  pixel_unshuffle: bool
  shortcut: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.pixel_unshuffle:
      y = pixel_unshuffle(Conv(self.out_channels // 4, dtype=self.dtype, name="conv")(x), 2)
    else:
      y = Conv(self.out_channels, stride=2, dtype=self.dtype, name="conv")(x)
    if self.shortcut:
      s = pixel_unshuffle(x, 2)
      group = s.shape[-1] // self.out_channels
      s = s.reshape(s.shape[:-1] + (self.out_channels, group)).astype(jnp.float32).mean(-1)
      y = y + s.astype(y.dtype)
    return y


class UpBlock(nn.Module):
  """diffusers `DCUpBlock2d`: nearest-2x + conv, or conv to out*4 + pixel-shuffle; shortcut =
  channel repeat_interleave then pixel-shuffle."""

  out_channels: int
  interpolate: bool
  shortcut: bool = True
  upsample_impl: str = "subpixel"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.interpolate:
      y = UpsampleConv(self.out_channels, self.upsample_impl, dtype=self.dtype, name="conv")(x)
    else:
      y = pixel_shuffle(Conv(self.out_channels * 4, dtype=self.dtype, name="conv")(x), 2)
    if self.shortcut:
      repeats = self.out_channels * 4 // x.shape[-1]
      y = y + pixel_shuffle(jnp.repeat(x, repeats, axis=-1), 2).astype(y.dtype)
    return y


# ----------------------------------------------------------------------------------------
# Encoder / decoder / autoencoder.
# ----------------------------------------------------------------------------------------


def _block(
  x, core_mask, block_type, attention_head_dim, norm_type, act_fn, multiscales, dtype, name
):
  if block_type == "ResBlock":
    return ResBlock(norm_type, act_fn, dtype=dtype, name=name)(x)
  return EfficientViTBlock(attention_head_dim, multiscales, norm_type, dtype=dtype, name=name)(
    x, core_mask
  )


class Encoder(nn.Module):
  """(B, H, W, in_channels) -> (B, H/f, W/f, latent_channels), unscaled. core_mask: see
  `MultiscaleLinearAttention` (latent-grid resolution)."""

  config: DCAEConfig

  @nn.compact
  def __call__(self, x: Array, core_mask: Array | None = None) -> Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.compute_dtype)
    ch, layers = cfg.encoder_block_out_channels, cfg.encoder_layers_per_block
    unshuffle = cfg.downsample_block_type == "pixel_unshuffle"
    if layers[0] > 0:
      x = Conv(ch[0], dtype=dtype, name="conv_in")(x)
    else:
      x = DownBlock(ch[1], unshuffle, shortcut=False, dtype=dtype, name="conv_in")(x)
    for i, (c, n) in enumerate(zip(ch, layers)):
      for j in range(n):
        x = _block(
          x,
          core_mask,
          cfg.encoder_block_types[i],
          cfg.attention_head_dim,
          "rms_norm",
          "silu",
          cfg.encoder_qkv_multiscales[i],
          dtype,
          f"down_blocks_{i}_{j}",
        )
      if i < len(ch) - 1 and n > 0:
        x = DownBlock(ch[i + 1], unshuffle, dtype=dtype, name=f"down_blocks_{i}_{n}")(x)
    y = Conv(cfg.latent_channels, dtype=dtype, name="conv_out")(x)
    if cfg.encoder_out_shortcut:
      g = x.shape[-1] // cfg.latent_channels
      s = x.reshape(x.shape[:-1] + (cfg.latent_channels, g)).astype(jnp.float32).mean(-1)
      y = y + s.astype(y.dtype)
    return y


class Decoder(nn.Module):
  """(B, h, w, latent_channels) unscaled -> (B, h*f, w*f, in_channels). core_mask: see
  `MultiscaleLinearAttention`."""

  config: DCAEConfig

  @nn.compact
  def __call__(self, z: Array, core_mask: Array | None = None) -> Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.compute_dtype)
    ch, layers = cfg.decoder_block_out_channels, cfg.decoder_layers_per_block
    interpolate = cfg.upsample_block_type == "interpolate"
    x = Conv(ch[-1], dtype=dtype, name="conv_in")(z)
    if cfg.decoder_in_shortcut:
      x = x + jnp.repeat(z, ch[-1] // cfg.latent_channels, axis=-1).astype(x.dtype)
    for i in reversed(range(len(ch))):
      n = layers[i]
      j = 0
      if i < len(ch) - 1 and n > 0:
        x = UpBlock(
          ch[i], interpolate, upsample_impl=cfg.upsample_impl, dtype=dtype, name=f"up_blocks_{i}_0"
        )(x)
        j = 1
      for k in range(n):
        x = _block(
          x,
          core_mask,
          cfg.decoder_block_types[i],
          cfg.attention_head_dim,
          cfg.decoder_norm_types[i],
          cfg.decoder_act_fns[i],
          cfg.decoder_qkv_multiscales[i],
          dtype,
          f"up_blocks_{i}_{j + k}",
        )
    x = Norm("rms_norm", name="norm_out")(x)
    x = activation(cfg.decoder_conv_act_fn)(x)
    if layers[0] > 0:
      return Conv(cfg.in_channels, dtype=dtype, name="conv_out")(x)
    return UpBlock(
      cfg.in_channels,
      interpolate,
      shortcut=False,
      upsample_impl=cfg.upsample_impl,
      dtype=dtype,
      name="conv_out",
    )(x)


class AutoencoderDC(nn.Module):
  """The DC-AE. Parameters: {'encoder': ..., 'decoder': ...}.

  Methods (use with `module.apply({'params': p}, x, method=...)`):
    encode(images)  (B, H, W, in_channels) in [-1, 1] -> latents * scaling_factor (fp32).
    decode(latents) scaled latents (B, h, w, latent_channels) -> images, unclipped (fp32).
    __call__(images) -> decode(encode(images)).
  Shapes are checked at trace time (ValueError).
  """

  config: DCAEConfig

  def setup(self):
    self.encoder = Encoder(self.config)
    self.decoder = Decoder(self.config)

  def encode(self, images: Array, core_mask: Array | None = None) -> Array:
    check_images(self.config, images.shape)
    z = self.encoder(images, core_mask).astype(jnp.float32)
    return z * self.config.scaling_factor

  def decode(self, latents: Array, core_mask: Array | None = None) -> Array:
    check_latents(self.config, latents.shape)
    return self.decoder(latents / self.config.scaling_factor, core_mask).astype(jnp.float32)

  def __call__(self, images: Array) -> Array:
    return self.decode(self.encode(images))


def check_images(config: DCAEConfig, shape) -> None:
  """ValueError unless shape is (B, H, W, in_channels) with H, W multiples of the ratio."""
  f = config.spatial_compression_ratio
  if len(shape) != 4 or shape[-1] != config.in_channels:
    raise ValueError(
      f"images must be NHWC (B, H, W, {config.in_channels}), got shape {tuple(shape)}."
    )
  if shape[1] % f or shape[2] % f or shape[1] == 0 or shape[2] == 0:
    raise ValueError(
      f"image height and width must be positive multiples of {f} (the DC-AE "
      f"downsampling factor), got {shape[1]} x {shape[2]}; pad or crop first."
    )


def check_latents(config: DCAEConfig, shape) -> None:
  """ValueError unless shape is (B, h, w, latent_channels)."""
  if len(shape) != 4 or shape[-1] != config.latent_channels:
    raise ValueError(
      f"latents must be NHWC (B, h, w, {config.latent_channels}) for this DC-AE, "
      f"got shape {tuple(shape)}."
    )


# ----------------------------------------------------------------------------------------
# Functional API.
# ----------------------------------------------------------------------------------------


def init_params(config: DCAEConfig, rng: Array | int = 0) -> dict:
  """Random parameters (a plain nested dict of fp32 arrays) for `AutoencoderDC(config)`.

  Shapes come from `jax.eval_shape(module.init)`; values are drawn here directly (kernels
  normal with std 1/sqrt(fan_in), norm scales 1, biases 0, batch-norm mean 0 / var 1), since
  running Flax `init` compiles the whole forward pass (over a minute on a small CPU).
  """
  seed = int(jax.random.randint(rng, (), 0, 2**31 - 1)) if not isinstance(rng, int) else rng
  gen = np.random.default_rng(seed)

  def leaf(path, sds):
    name = path[-1].key
    shape = sds.shape
    if name == "kernel":
      owner = path[-2].key
      if len(shape) == 3 and owner in ("proj_in", "conv_depth"):  # depthwise (k, k, C)
        fan_in = shape[0] * shape[1]
      elif len(shape) == 3:  # grouped (G, in, out)
        fan_in = shape[1]
      else:
        fan_in = math.prod(shape[:-1])
      return jnp.asarray(gen.standard_normal(shape, np.float32) / np.sqrt(fan_in))
    if name in ("scale", "var"):
      return jnp.ones(shape, jnp.float32)
    return jnp.zeros(shape, jnp.float32)

  return jax.tree_util.tree_map_with_path(leaf, param_shapes(config))


def param_shapes(config: DCAEConfig) -> dict:
  """Shapes/dtypes of every parameter, without allocating or compiling (jax.eval_shape)."""
  f = config.spatial_compression_ratio
  x = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
  return jax.eval_shape(AutoencoderDC(config).init, jax.random.PRNGKey(0), x)["params"]


_JITTED: dict = {}


def _jitted(config: DCAEConfig, method: str):
  key = (config, method)
  if key not in _JITTED:
    module = AutoencoderDC(config)
    fn = getattr(AutoencoderDC, method)
    _JITTED[key] = jax.jit(lambda p, x: module.apply({"params": p}, x, method=fn))
  return _JITTED[key]


def encode(config: DCAEConfig, params, images: Array) -> Array:
  """Jitted encode: images (B, H, W, C) in [-1, 1] -> latents * scaling_factor."""
  check_images(config, jnp.shape(images))
  return _jitted(config, "encode")(params, jnp.asarray(images, jnp.float32))


def decode(config: DCAEConfig, params, latents: Array) -> Array:
  """Jitted decode: scaled latents (B, h, w, latent_channels) -> images (B, 32h, 32w, C)."""
  check_latents(config, jnp.shape(latents))
  return _jitted(config, "decode")(params, jnp.asarray(latents, jnp.float32))


def num_params(params) -> int:
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))
