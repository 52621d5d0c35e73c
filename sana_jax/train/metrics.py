"""Training metrics: throughput, FLOPs and MFU estimates, TensorBoard and JSONL writers."""

from __future__ import annotations

import json
import pathlib
import time

from sana_jax.models.dit_config import DiTConfig


def _block_flops(cfg: DiTConfig, n: int, caption_len: int) -> dict:
  """Matmul FLOPs of one block's forward on n tokens, by part (2 FLOPs per multiply-add)."""
  c, hid, ci, d = cfg.hidden_size, cfg.mlp_hidden, cfg.cross_inner, cfg.self_head_dim
  return {
    "qkv": 2 * n * c * 3 * c,
    # Linear attention per head: k^T v (d x d), q (k^T v), and the normaliser q . sum_m k_m;
    # over all heads (heads * d = C): 2 * (N C d) * 2 + 2 N C.
    "linear_attention": 2 * 2 * n * c * d + 2 * n * c,
    "self_out": 2 * n * c * c,
    "cross_q": 2 * n * c * ci,
    "cross_kv": 2 * caption_len * c * 2 * ci,
    "cross_attention": 2 * 2 * n * caption_len * ci,  # logits and the weighted sum
    "cross_out": 2 * n * ci * c,
    "inverted": 2 * n * c * 2 * hid,
    "depthwise": 2 * 9 * n * 2 * hid,  # 3x3 depthwise conv on 2H channels: 9 MACs each
    "point": 2 * n * hid * c,
  }


def _head_flops(cfg: DiTConfig, n: int, caption_len: int) -> dict:
  """Matmul FLOPs outside the blocks, per example (timestep MLP and t_block included)."""
  c, p = cfg.hidden_size, cfg.patch_size
  return {
    "patch_embed": 2 * n * p * p * cfg.in_channels * c,
    "t_fc1": 2 * 256 * c,
    "t_fc2_block": 2 * (c * c + c * 6 * c),
    "caption_fc1": 2 * caption_len * cfg.caption_channels * c,
    "caption_fc2": 2 * caption_len * c * c,
    "final": 2 * n * c * p * p * cfg.out_channels,
  }


# Layers whose input is data (latents, timestep features, caption embeddings): the backward
# computes only their weight gradient, never the input gradient.
_INPUT_LAYERS = ("patch_embed", "t_fc1", "caption_fc1")

# Batched matmuls (those with batch dimensions: attention) that `dots_no_batch` recomputes.
_BATCHED = ("linear_attention", "cross_attention")


def _tokens(cfg: DiTConfig, h: int, w: int) -> int:
  if h % cfg.patch_size or w % cfg.patch_size:
    raise ValueError(f"latent size {h}x{w} is not a multiple of patch_size {cfg.patch_size}")
  return (h // cfg.patch_size) * (w // cfg.patch_size)


def dit_forward_flops(cfg: DiTConfig, h: int, w: int, caption_len: int) -> float:
  """Matmul FLOPs of one DiT forward on one latent of (h, w) (2 FLOPs per multiply-add;
  the depthwise 3x3 conv counted as its 9 multiply-adds per output)."""
  n = _tokens(cfg, h, w)
  return float(
    cfg.depth * sum(_block_flops(cfg, n, caption_len).values())
    + sum(_head_flops(cfg, n, caption_len).values())
  )


def train_step_flops(
  cfg: DiTConfig, h: int, w: int, caption_len: int, batch: int, remat: bool | str
) -> float:
  """Matmul FLOPs of one training step on `batch` latents of (h, w).

  Forward + backward: the backward of every matmul takes two of its forward (input and
  weight gradients), except the data-input layers (weight gradient only). `remat` adds
  what rematerialisation recomputes: a remat_policy name ("none"; "full": the blocks'
  forward again; "dots": no matmul, the depthwise conv only in its "shift" form;
  "dots_no_batch": the attention matmuls and the depthwise conv), or a bool (True =
  "full"). Model FLOPs (for MFU by the usual definition) are remat="none".
  """
  policy = {False: "none", True: "full"}.get(remat, remat) if isinstance(remat, bool) else remat
  if policy not in ("none", "full", "dots", "dots_no_batch"):
    raise ValueError(f"remat must be a bool or one of none|full|dots|dots_no_batch, got {remat!r}")
  n = _tokens(cfg, h, w)
  block = _block_flops(cfg, n, caption_len)
  head = _head_flops(cfg, n, caption_len)
  fwd = dit_forward_flops(cfg, h, w, caption_len)
  bwd = 2 * fwd - sum(head[k] for k in _INPUT_LAYERS)
  # The depthwise conv is saved by "dots" (conv counts as a dot there) unless it is the
  # "shift" form (elementwise: recomputed); "dots_no_batch" saves no conv.
  depthwise = 0 if policy == "dots" and cfg.depthwise_impl == "conv" else block["depthwise"]
  recompute = {
    "none": 0.0,
    "dots": depthwise,
    "full": sum(block.values()),
    "dots_no_batch": sum(block[k] for k in _BATCHED) + depthwise,
  }[policy]
  recompute *= cfg.depth
  return float(batch * (fwd + bwd + recompute))


def mfu(step_flops: float, seconds_per_step: float, peak_tflops: float, devices: int) -> float:
  """Model FLOPs utilisation: achieved FLOP/s over the peak of all devices (peak_tflops
  per device, TFLOP/s)."""
  if not peak_tflops > 0 or not seconds_per_step > 0 or devices < 1:
    raise ValueError(
      f"mfu needs peak_tflops > 0, seconds_per_step > 0 and devices >= 1, got "
      f"{peak_tflops}, {seconds_per_step}, {devices}"
    )
  return step_flops / seconds_per_step / (peak_tflops * 1e12 * devices)


class Writer:
  """Writes scalars to TensorBoard event files (tensorboardX) and metrics.jsonl."""

  def __init__(self, workdir: str | pathlib.Path, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    if enabled:
      workdir = pathlib.Path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(workdir / "tensorboard"))
      self._jsonl = open(workdir / "metrics.jsonl", "a")

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    for k, v in scalars.items():
      self._tb.add_scalar(k, float(v), step)
    self._jsonl.write(
      json.dumps({"step": step, "time": time.time(), **{k: float(v) for k, v in scalars.items()}})
      + "\n"
    )
    self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
