"""One declarative table: official key <-> diffusers key(s) <-> Flax path, with the transform.

Both directions use the same rows. A row with several diffusers keys means the official
tensor is their concatenation along axis 0 (qkv -> to_q/to_k/to_v, kv -> to_k/to_v).
Block rows hold `{i}`; their Flax leaf stacks the blocks along axis 0.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from sana_jax.models.dit_config import DiTConfig


@dataclasses.dataclass(frozen=True)
class Row:
  flax: str  # '/'-joined path in our parameter tree
  official: str  # official key ('{i}' in block rows)
  diffusers: tuple[str, ...]  # diffusers key(s)
  kind: str  # see TRANSFORMS
  when: Callable[[DiTConfig], bool] = lambda cfg: True

  @property
  def in_block(self) -> bool:
    return "{i}" in self.official


# --------------------------------------------------------------------------- transforms
# Each kind: torch (official layout) -> flax, and flax -> torch; plus the torch shape of a
# flax shape (for strict shape checks without allocating).


def _linear_split_to_flax(t, k):  # (k*out, in) -> (in, k, out)
  out = t.shape[0] // k
  return t.reshape(k, out, t.shape[1]).transpose(2, 0, 1)


def _linear_split_to_torch(f):  # (in, k, out) -> (k*out, in)
  return f.transpose(1, 2, 0).reshape(f.shape[1] * f.shape[2], f.shape[0])


TRANSFORMS = {
  # kind: (to_flax(t, cfg), to_torch(f, cfg), torch_shape(flax_shape, cfg))
  "vector": (lambda t, c: t, lambda f, c: f, lambda s, c: s),
  "linear": (lambda t, c: t.T, lambda f, c: f.T, lambda s, c: s[::-1]),
  "linear_split": (
    lambda t, c: _linear_split_to_flax(t, c["k"]),
    lambda f, c: _linear_split_to_torch(f),
    lambda s, c: (s[1] * s[2], s[0]),
  ),
  "bias_split": (
    lambda t, c: t.reshape(c["k"], -1),
    lambda f, c: f.reshape(-1),
    lambda s, c: (s[0] * s[1],),
  ),
  "conv1x1": (
    lambda t, c: t[:, :, 0, 0].T,
    lambda f, c: f.T[:, :, None, None],
    lambda s, c: (s[1], s[0], 1, 1),
  ),
  "conv1x1_split": (
    lambda t, c: _linear_split_to_flax(t[:, :, 0, 0], c["k"]),
    lambda f, c: _linear_split_to_torch(f)[:, :, None, None],
    lambda s, c: (s[1] * s[2], s[0], 1, 1),
  ),
  "depthwise_split": (
    lambda t, c: t[:, 0].reshape(c["k"], -1, 3, 3).transpose(2, 3, 0, 1),
    lambda f, c: f.transpose(2, 3, 0, 1).reshape(f.shape[2] * f.shape[3], 1, 3, 3),
    lambda s, c: (s[2] * s[3], 1, 3, 3),
  ),
  "patch": (  # conv (C, cin, p, p) -> dense on (p, p, cin) patches
    lambda t, c: t.transpose(2, 3, 1, 0).reshape(-1, t.shape[0]),
    lambda f, c: f.reshape(c["p"], c["p"], -1, f.shape[1]).transpose(3, 2, 0, 1),
    lambda s, c: (s[1], s[0] // (c["p"] * c["p"]), c["p"], c["p"]),
  ),
}


def kind_args(row: Row, cfg: DiTConfig) -> dict:
  return {"k": max(len(row.diffusers), 2 if "split" in row.kind else 1), "p": cfg.patch_size}


def to_flax(row: Row, tensor: np.ndarray, cfg: DiTConfig) -> np.ndarray:
  return np.ascontiguousarray(TRANSFORMS[row.kind][0](tensor, kind_args(row, cfg)))


def to_torch_layout(row: Row, array: np.ndarray, cfg: DiTConfig) -> np.ndarray:
  return np.ascontiguousarray(TRANSFORMS[row.kind][1](array, kind_args(row, cfg)))


def torch_shape(row: Row, flax_shape: tuple, cfg: DiTConfig) -> tuple:
  return tuple(TRANSFORMS[row.kind][2](tuple(flax_shape), kind_args(row, cfg)))


# --------------------------------------------------------------------------------- rows


def _lin(flax, official, diffusers, when=lambda cfg: True, bias=True):
  rows = [Row(f"{flax}/kernel", f"{official}.weight", (f"{diffusers}.weight",), "linear", when)]
  if bias:
    rows.append(Row(f"{flax}/bias", f"{official}.bias", (f"{diffusers}.bias",), "vector", when))
  return rows


_qk = lambda cfg: cfg.qk_norm  # noqa: E731
_cross = lambda cfg: cfg.cross_norm  # noqa: E731

GLOBAL_ROWS: tuple[Row, ...] = tuple(
  [
    Row("patch_embed/kernel", "x_embedder.proj.weight", ("patch_embed.proj.weight",), "patch"),
    Row("patch_embed/bias", "x_embedder.proj.bias", ("patch_embed.proj.bias",), "vector"),
    *_lin("t_embedder_fc1", "t_embedder.mlp.0", "time_embed.emb.timestep_embedder.linear_1"),
    *_lin("t_embedder_fc2", "t_embedder.mlp.2", "time_embed.emb.timestep_embedder.linear_2"),
    *_lin("t_block", "t_block.1", "time_embed.linear"),
    *_lin("caption_proj_fc1", "y_embedder.y_proj.fc1", "caption_projection.linear_1"),
    *_lin("caption_proj_fc2", "y_embedder.y_proj.fc2", "caption_projection.linear_2"),
    Row(
      "caption_norm",
      "attention_y_norm.weight",
      ("caption_norm.weight",),
      "vector",
      lambda cfg: cfg.caption_norm,
    ),
    Row(
      "final_scale_shift_table", "final_layer.scale_shift_table", ("scale_shift_table",), "vector"
    ),
    *_lin("final_linear", "final_layer.linear", "proj_out"),
  ]
)

_B, _D = "blocks.{i}", "transformer_blocks.{i}"
BLOCK_ROWS: tuple[Row, ...] = tuple(
  [
    Row(
      "blocks/scale_shift_table", f"{_B}.scale_shift_table", (f"{_D}.scale_shift_table",), "vector"
    ),
    Row(
      "blocks/self_attn/qkv/kernel",
      f"{_B}.attn.qkv.weight",
      (f"{_D}.attn1.to_q.weight", f"{_D}.attn1.to_k.weight", f"{_D}.attn1.to_v.weight"),
      "linear_split",
    ),
    Row(
      "blocks/self_attn/q_norm",
      f"{_B}.attn.q_norm.weight",
      (f"{_D}.attn1.norm_q.weight",),
      "vector",
      _qk,
    ),
    Row(
      "blocks/self_attn/k_norm",
      f"{_B}.attn.k_norm.weight",
      (f"{_D}.attn1.norm_k.weight",),
      "vector",
      _qk,
    ),
    *_lin("blocks/self_attn/out", f"{_B}.attn.proj", f"{_D}.attn1.to_out.0"),
    *_lin("blocks/cross_attn/q", f"{_B}.cross_attn.q_linear", f"{_D}.attn2.to_q"),
    Row(
      "blocks/cross_attn/kv/kernel",
      f"{_B}.cross_attn.kv_linear.weight",
      (f"{_D}.attn2.to_k.weight", f"{_D}.attn2.to_v.weight"),
      "linear_split",
    ),
    Row(
      "blocks/cross_attn/kv/bias",
      f"{_B}.cross_attn.kv_linear.bias",
      (f"{_D}.attn2.to_k.bias", f"{_D}.attn2.to_v.bias"),
      "bias_split",
    ),
    Row(
      "blocks/cross_attn/q_norm",
      f"{_B}.cross_attn.q_norm.weight",
      (f"{_D}.attn2.norm_q.weight",),
      "vector",
      _cross,
    ),
    Row(
      "blocks/cross_attn/k_norm",
      f"{_B}.cross_attn.k_norm.weight",
      (f"{_D}.attn2.norm_k.weight",),
      "vector",
      _cross,
    ),
    *_lin("blocks/cross_attn/out", f"{_B}.cross_attn.proj", f"{_D}.attn2.to_out.0"),
    Row(
      "blocks/mlp/inverted/kernel",
      f"{_B}.mlp.inverted_conv.conv.weight",
      (f"{_D}.ff.conv_inverted.weight",),
      "conv1x1_split",
    ),
    Row(
      "blocks/mlp/inverted/bias",
      f"{_B}.mlp.inverted_conv.conv.bias",
      (f"{_D}.ff.conv_inverted.bias",),
      "bias_split",
    ),
    Row(
      "blocks/mlp/depthwise_kernel",
      f"{_B}.mlp.depth_conv.conv.weight",
      (f"{_D}.ff.conv_depth.weight",),
      "depthwise_split",
    ),
    Row(
      "blocks/mlp/depthwise_bias",
      f"{_B}.mlp.depth_conv.conv.bias",
      (f"{_D}.ff.conv_depth.bias",),
      "bias_split",
    ),
    Row(
      "blocks/mlp/point/kernel",
      f"{_B}.mlp.point_conv.conv.weight",
      (f"{_D}.ff.conv_point.weight",),
      "conv1x1",
    ),
  ]
)

# Official keys that carry no parameters of ours.
OFFICIAL_BUFFERS = {"y_embedder.y_embedding": "null_caption_embedding"}
OFFICIAL_DROPPED_PREFIXES = ("pos_embed", "logvar_linear.")


def rows_for(cfg: DiTConfig) -> list[Row]:
  return [r for r in GLOBAL_ROWS + BLOCK_ROWS if r.when(cfg)]
