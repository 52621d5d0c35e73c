"""The optimizer from the config: gradient clipping, warm-up, and CAME-8bit / CAME / AdamW."""

from __future__ import annotations

import math

import ml_collections
import optax

from sana_jax import optim as came_lib

OPTIMIZERS = ("came_8bit", "came", "adamw")


def learning_rate(tc: ml_collections.ConfigDict) -> optax.Schedule:
  """Constant LR after a linear warm-up from 0; optionally scaled by sqrt(batch / 256)."""
  lr = tc.lr * (math.sqrt(tc.global_batch / 256) if tc.sqrt_lr_scaling else 1.0)
  if tc.warmup_steps <= 0:
    return optax.constant_schedule(lr)
  return optax.linear_schedule(0.0, lr, tc.warmup_steps)


def make_optimizer(tc: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """tc: the config's `train` field."""
  if tc.optimizer not in OPTIMIZERS:
    raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got {tc.optimizer!r}")
  schedule = learning_rate(tc)
  if tc.optimizer == "came_8bit":
    opt = came_lib.came_8bit(schedule, weight_decay=tc.weight_decay, spec=came_lib.sana_spec())
  elif tc.optimizer == "came":
    opt = came_lib.came(schedule, weight_decay=tc.weight_decay, spec=came_lib.sana_spec())
  else:
    opt = optax.adamw(schedule, weight_decay=tc.weight_decay)
  chain = [opt]
  if tc.grad_clip and tc.grad_clip > 0:
    chain.insert(0, optax.clip_by_global_norm(tc.grad_clip))
  return optax.chain(*chain)
