"""Training metrics: throughput, FLOPs and MFU estimates, TensorBoard and JSONL writers."""

from __future__ import annotations

import json
import pathlib
import time

from sana_jax.models.dit_config import DiTConfig


def dit_forward_flops(cfg: DiTConfig, h: int, w: int, caption_len: int) -> float:
  """Matmul FLOPs of one DiT forward on one latent of (h, w) (2 FLOPs per multiply-add)."""
  c, hid, ci = cfg.hidden_size, cfg.mlp_hidden, cfg.cross_inner
  n = (h // cfg.patch_size) * (w // cfg.patch_size)
  d = cfg.self_head_dim
  per_block = (
      2 * n * c * 3 * c            # qkv
      + 2 * 2 * n * c * d          # linear attention: k^T v and q (k^T v), per head total C*d
      + 2 * n * c * c              # out proj
      + 2 * n * c * ci             # cross q
      + 2 * caption_len * c * 2 * ci  # cross k, v
      + 2 * 2 * n * caption_len * ci  # logits and weighted sum
      + 2 * n * ci * c             # cross out
      + 2 * n * c * 2 * hid        # inverted conv
      + 2 * 9 * n * 2 * hid        # depthwise
      + 2 * n * hid * c)           # point conv
  head = 2 * n * cfg.patch_size**2 * cfg.in_channels * c + 2 * caption_len * (
      cfg.caption_channels * c + c * c) + 2 * n * c * cfg.patch_size**2 * cfg.out_channels
  return float(cfg.depth * per_block + head)


def train_step_flops(cfg: DiTConfig, h: int, w: int, caption_len: int, batch: int,
                     remat: bool) -> float:
  """Forward + backward (2x forward) + recomputation under remat (another forward)."""
  return batch * dit_forward_flops(cfg, h, w, caption_len) * (4.0 if remat else 3.0)


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
    self._jsonl.write(json.dumps({"step": step, "time": time.time(),
                                  **{k: float(v) for k, v in scalars.items()}}) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
