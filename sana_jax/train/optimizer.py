"""The optimizer from the config: gradient clipping, warm-up, and CAME-8bit / CAME / AdamW."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import optax

from sana_jax import optim as came_lib

OPTIMIZERS = ("came_8bit", "came", "adamw")
# train.came_8bit_state: which of CAME-8bit's first moments are 8-bit, with what metadata.
# "compact": sana_jax.optim.COMPACT (1.0147 B/param on SANA-1.5 1.6B); "official": the
# official CAME-8bit's choices, came_8bit's defaults (1.0226). A config without the field
# (one written before it existed) means "official", the state those runs saved.
CAME_8BIT_STATES = {"compact": came_lib.COMPACT, "official": {}}
CAME_8BIT_STATE_ABSENT = "official"


def came_8bit_state(tc: ml_collections.ConfigDict) -> str:
  """train.came_8bit_state, or CAME_8BIT_STATE_ABSENT for a config without the field."""
  return tc.get("came_8bit_state", CAME_8BIT_STATE_ABSENT)


def learning_rate(tc: ml_collections.ConfigDict) -> optax.Schedule:
  """Constant LR after a linear warm-up from 0; optionally scaled by sqrt(batch / 256)."""
  lr = tc.lr * (math.sqrt(tc.global_batch / 256) if tc.sqrt_lr_scaling else 1.0)
  if tc.warmup_steps <= 0:
    return optax.constant_schedule(lr)
  return optax.linear_schedule(0.0, lr, tc.warmup_steps)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """optax.clip_by_global_norm's clip, in a form XLA fuses into the optimizer's passes.

  Gradients with global norm n > max_norm are scaled by max_norm / n, as optax does, but as
  one scalar factor times each leaf (optax divides each element by n, a pass that XLA:CPU
  writes out as a clipped copy of the whole gradient), so the product is recomputed inside
  the optimizer's moment updates instead of stored (equal to optax's up to rounding). The
  caller may pass the norm it has already computed, as the extra arguments ``grad_norm``
  (the norm) and ``grad_norm_of`` (the very tree it is the norm of; ``train/update.py``
  does), so the gradient is not read once more to form it. The norm is used only when
  ``grad_norm_of is updates``: placed after another transformation in a chain, the clip
  receives another tree and computes its own norm. The state is optax's (``EmptyState``),
  so checkpoints do not change.
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, grad_norm=None, grad_norm_of=None, **extra):
    del params, extra
    factor = _clip_factor(max_norm, updates, grad_norm, grad_norm_of)
    return jax.tree_util.tree_map(lambda g: g * factor.astype(g.dtype), updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _clip_factor(max_norm, updates, grad_norm, grad_norm_of) -> jax.Array:
  """min(1, max_norm / |updates|) (a scalar), with the given norm when it is of `updates`."""
  given = grad_norm is not None and grad_norm_of is updates
  norm = grad_norm if given else optax.tree.norm(updates)
  return jnp.where(norm < max_norm, 1.0, max_norm / norm)


def clip_folded_into(
  max_norm: float, inner: optax.GradientTransformationExtraArgs
) -> optax.GradientTransformationExtraArgs:
  """``optax.chain(clip_by_global_norm(max_norm), inner)`` for an ``inner`` that takes the
  extra argument ``grad_scale`` (sana_jax.optim's CAME and CAME-8bit): the clip factor is
  handed to ``inner`` instead of multiplied into the gradient, so the clipped gradient is
  never formed. CAME stores its input once for its several passes, so the chain's clipped
  copy would be one full-size write and read more per factored leaf. Equal to the chain up
  to rounding; the state is the chain's, ``(EmptyState(), inner's state)``, so checkpoints
  do not change. Takes the extra arguments ``grad_norm`` and ``grad_norm_of`` as
  :func:`clip_by_global_norm` does.
  """

  def init_fn(params):
    return (optax.EmptyState(), inner.init(params))

  def update_fn(updates, state, params=None, *, grad_norm=None, grad_norm_of=None, **extra):
    factor = _clip_factor(max_norm, updates, grad_norm, grad_norm_of)
    out, inner_state = inner.update(updates, state[1], params, grad_scale=factor, **extra)
    return out, (state[0], inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def make_optimizer(tc: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
  """tc: the config's `train` field. The chain takes the extra arguments ``grad_norm`` and
  ``grad_norm_of`` (the gradient's global norm and the gradient tree, if the caller has the
  norm) for its clip."""
  if tc.optimizer not in OPTIMIZERS:
    raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got {tc.optimizer!r}")
  state = came_8bit_state(tc)
  if state not in CAME_8BIT_STATES:
    raise ValueError(
      f"train.came_8bit_state must be one of {tuple(CAME_8BIT_STATES)}, got {state!r}"
    )
  schedule = learning_rate(tc)
  if tc.optimizer == "came_8bit":
    opt = came_lib.came_8bit(
      schedule, weight_decay=tc.weight_decay, spec=came_lib.sana_spec(), **CAME_8BIT_STATES[state]
    )
  elif tc.optimizer == "came":
    opt = came_lib.came(schedule, weight_decay=tc.weight_decay, spec=came_lib.sana_spec())
  else:
    opt = optax.adamw(schedule, weight_decay=tc.weight_decay)
  return clipped(tc, opt, fold=tc.optimizer in ("came_8bit", "came"))


def clipped(
  tc: ml_collections.ConfigDict, opt: optax.GradientTransformation, fold: bool = False
) -> optax.GradientTransformationExtraArgs:
  """opt behind the global-norm clip of tc.grad_clip (none when it is 0 or unset), as an
  optax chain that takes the extra arguments of make_optimizer's. fold: hand the clip to
  opt as its ``grad_scale`` (CAME and CAME-8bit: :func:`clip_folded_into`) instead of
  clipping the gradient before it."""
  if not (tc.grad_clip and tc.grad_clip > 0):
    return optax.chain(opt)
  if fold:
    return clip_folded_into(tc.grad_clip, opt)
  return optax.chain(clip_by_global_norm(tc.grad_clip), opt)
