"""The DiT's configuration: every field that differs between released SANA models.

`DiTConfig` is a frozen dataclass (hashable, usable as a static jit argument). Configs in
`configs/` are ml_collections; `DiTConfig.coerce` turns their `model` field into one and
rejects unknown fields by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


# The block projections an adapter may target, by the module path inside a block. The
# self-attention's q, k, v are one fused (in, 3, C) kernel; its adapter has one (A, B) per slice.
LORA_TARGETS = (
  "self_attn.qkv",
  "self_attn.out",
  "cross_attn.q",
  "cross_attn.kv",
  "cross_attn.out",
  "mlp.inverted",
  "mlp.point",
)
# diffusers' DreamBooth LoRA script for Sana: to_q, to_k, to_v of self- and cross-attention.
DEFAULT_LORA_TARGETS = ("self_attn.qkv", "cross_attn.q", "cross_attn.kv")


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """Geometry and numerics of a SANA linear DiT.

  Official-vs-diffusers differences are fields; `diffusers_compatible()` returns a copy
  with diffusers' choices (see docs/dit.md for the list).
  """

  # Geometry.
  in_channels: int = 32
  out_channels: int = 32
  patch_size: int = 1
  hidden_size: int = 1152
  depth: int = 28
  self_head_dim: int = 32  # self-attention heads = hidden_size // self_head_dim
  cross_heads: int = 16
  cross_head_dim: int = 72
  caption_channels: int = 2304
  caption_len: int = 300  # max caption tokens (the null-caption buffer length)
  mlp_ratio: float = 2.5
  sample_size: int = 32  # base latent size; positional-embedding base = sample_size // patch_size

  # SANA-1.5 switches.
  qk_norm: bool = False  # RMSNorm over C on self-attention q and k
  qk_norm_eps: float = 1e-5
  cross_norm: bool = False  # RMSNorm over the cross inner dim on cross-attention q and k
  cross_norm_eps: float = 1e-6  # official 1e-6; diffusers 1e-5
  caption_norm: bool = True  # attention_y_norm / caption_norm
  caption_norm_eps: float = 1e-5
  # Initial caption_norm weight = the official y_norm_scale_factor (0.01 in the released
  # configs, 1.0 the class default). 0.01 starts the caption pathway at 1/100; a small model
  # trained for a few thousand steps never opens it (configs/shapes.py uses 1.0).
  caption_norm_init: float = 0.01

  # Numerics.
  norm_eps: float = 1e-6  # LayerNorm (no affine) in blocks and final layer
  linear_attn_eps: float = 1e-8  # official 1e-8; diffusers 1e-15
  cross_mask: str = "exact"  # "exact": masked logits -> -inf; "additive": -10000 (diffusers);
  # an all-zero mask keeps every token in both (official)
  floor_timestep: bool = True  # official `timestep.long()`; diffusers does not floor
  fp16_attn_clip: bool = False  # clip self-attention output to +-65504 (fp16-trained checkpoints)

  # Positional embedding (2K / 4K models).
  use_pe: bool = False
  pe_interpolation: float = 1.0

  # Execution.
  compute_dtype: str = "float32"  # dtype of matmuls/convs; norms, softmax, linear attention in fp32
  remat_policy: str = "none"  # none | full | dots | dots_no_batch
  depthwise_impl: str = "shift"  # shift (nine multiply-adds) | conv (grouped lax conv)
  # Blocks per iteration of the depth scan (nn.scan's unroll): 1 keeps one block in the
  # program (compile time independent of depth); depth unrolls the stack.
  scan_unroll: int = 1

  # Low-rank adapters (LoRA) on the blocks' projections: y += (alpha / rank) * (x A) B, with
  # A (in, [g,] rank) and B ([g,] rank, out) per block ("lora_a" / "lora_b" leaves beside the
  # kernel, stacked on the layer axis). rank 0 = no adapters. alpha 0 means alpha = rank.
  lora_rank: int = 0
  lora_alpha: float = 0.0
  lora_targets: tuple = DEFAULT_LORA_TARGETS

  # Fields that change how the model is computed, not what it is: a resume, init_from or a
  # model folder may differ in them.
  EXECUTION_FIELDS = ("compute_dtype", "remat_policy", "depthwise_impl", "scan_unroll")

  def __post_init__(self):
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
    unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
    if unknown:
      raise ValueError(f"unknown lora_targets {unknown}; allowed: {list(LORA_TARGETS)}")
    if self.lora_rank < 0 or self.lora_alpha < 0:
      raise ValueError(
        f"lora_rank and lora_alpha must be >= 0, got {self.lora_rank}, {self.lora_alpha}"
      )
    if self.hidden_size % self.self_head_dim:
      raise ValueError(
        f"hidden_size={self.hidden_size} is not a multiple of self_head_dim={self.self_head_dim}"
      )
    if self.cross_mask not in ("exact", "additive"):
      raise ValueError(f"cross_mask must be 'exact' or 'additive', got {self.cross_mask!r}")
    if self.remat_policy not in ("none", "full", "dots", "dots_no_batch"):
      raise ValueError(f"unknown remat_policy {self.remat_policy!r}")
    if self.depthwise_impl not in ("shift", "conv"):
      raise ValueError(f"depthwise_impl must be 'shift' or 'conv', got {self.depthwise_impl!r}")
    if self.depth < 1:
      raise ValueError(f"depth must be >= 1, got {self.depth}")
    if not 1 <= self.scan_unroll:
      raise ValueError(f"scan_unroll must be >= 1, got {self.scan_unroll}")

  @property
  def self_heads(self) -> int:
    return self.hidden_size // self.self_head_dim

  @property
  def cross_inner(self) -> int:
    return self.cross_heads * self.cross_head_dim

  @property
  def mlp_hidden(self) -> int:
    return int(self.hidden_size * self.mlp_ratio)

  def lora_rank_for(self, target: str) -> int:
    """The adapter rank of one block projection (0 when it has no adapter)."""
    return self.lora_rank if target in self.lora_targets else 0

  @property
  def lora_scale(self) -> float:
    """alpha / rank, the factor on (x A) B."""
    return (self.lora_alpha or self.lora_rank) / max(self.lora_rank, 1)

  @classmethod
  def coerce(cls, config: Any) -> "DiTConfig":
    """Accepts a DiTConfig, a mapping or an ml_collections ConfigDict."""
    if isinstance(config, cls):
      return config
    if hasattr(config, "to_dict"):
      config = config.to_dict()
    if not isinstance(config, Mapping):
      raise TypeError(f"cannot build a DiTConfig from {type(config).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - names)
    if unknown:
      raise ValueError(f"unknown DiT config fields: {unknown}")
    return cls(**dict(config))

  def replace(self, **changes) -> "DiTConfig":
    return dataclasses.replace(self, **changes)

  def diffusers_compatible(self) -> "DiTConfig":
    """The same model with diffusers' numerical choices (for parity with diffusers)."""
    return self.replace(
      linear_attn_eps=1e-15, cross_norm_eps=1e-5, cross_mask="additive", floor_timestep=False
    )

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)
