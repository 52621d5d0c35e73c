"""What a train step does after the gradient: norm, non-finite guard, optimizer, EMA.

Split from `step.py` so the gradient (what is trained, how the loss is formed) and the
update (passes over the whole parameter tree) can change independently.

The guard is a `lax.cond` around the optimizer and the EMA, not a `jnp.where` over every
new leaf: with the state donated, `where(finite, new, old)` reads each old buffer after the
fusion that overwrites it in place, so XLA copied every parameter and optimizer-state leaf
at the start of the step (110 full copies in the embedded model's step; the update took
2.5x as long, docs/train_speed.md). Inside the true branch each leaf is updated in place;
the false branch returns the state unchanged. A finite step computes exactly what the
unguarded update computes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from sana_jax.train import optimizer as optim_lib
from sana_jax.train import state as state_lib


def nonfinite_guard(tc) -> str:
  """train.nonfinite_guard: "cond" (default: the update skipped under a lax.cond, no copy of
  the state) or "where" (both results selected leaf by leaf: lower peak memory on XLA:CPU)."""
  return tc.get("nonfinite_guard", "cond") if hasattr(tc, "get") else "cond"


def apply_gradients(
  state: state_lib.TrainState,
  loss: jax.Array,
  grads,
  *,
  tx: optax.GradientTransformation,
  tc: ml_collections.ConfigDict,
) -> tuple[state_lib.TrainState, dict]:
  """One optimizer update of `state.params` with `grads` (a tree like it), and the EMA.

  A step whose loss or gradient norm is not finite changes nothing but the step and the
  skip counters. Returns the new state and {"loss", "grad_norm", "finite", "lr"} scalars.
  """
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  decay = tc.ema_decay

  # An optimizer from make_optimizer clips with the norm computed here (not a second pass).
  extra = {}
  if isinstance(tx, optax.GradientTransformationExtraArgs):
    extra = {"grad_norm": grad_norm, "grad_norm_of": grads}

  def update(params, opt_state, ema_params):
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    params = optax.apply_updates(params, updates)
    ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, ema_params, params)
    return params, opt_state, ema

  def keep(params, opt_state, ema_params):
    return params, opt_state, ema_params

  if nonfinite_guard(tc) == "where":
    # Both results formed, then selected leaf by leaf: XLA:CPU copies every donated leaf
    # first (slower), but the peak is lower than the cond's (docs/fine_tuning.md, memory).
    new = update(state.params, state.opt_state, state.ema_params)
    old = (state.params, state.opt_state, state.ema_params)
    params, opt_state, ema = jax.tree_util.tree_map(lambda a, c: jnp.where(finite, a, c), new, old)
  else:
    params, opt_state, ema = jax.lax.cond(
      finite, update, keep, state.params, state.opt_state, state.ema_params
    )
  new_state = state.replace(
    step=state.step + 1,
    params=params,
    opt_state=opt_state,
    ema_params=ema,
    skipped=state.skipped + (~finite).astype(jnp.int32),
    nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),
  )
  # The optimizer's schedule counts applied updates: a skipped step keeps its state (and
  # count), so the LR of this update is the schedule at step - skipped.
  metrics = {
    "loss": loss,
    "grad_norm": grad_norm,
    "finite": finite,
    "lr": optim_lib.learning_rate(tc)(state.step - state.skipped),
  }
  return new_state, metrics
