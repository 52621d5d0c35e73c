"""The train state and its shardings."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sana_jax import parallel
from sana_jax.models import dit
from sana_jax import optim as came_lib


class TrainState(flax.struct.PyTreeNode):
  """step: int32 scalar; params / ema_params: DiT trees (fp32); opt_state: optax state;
  skipped: steps skipped for non-finite loss or gradients; nonfinite_run: the current run
  of consecutive skipped steps."""

  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  skipped: jax.Array
  nonfinite_run: jax.Array


def create(params, tx) -> TrainState:
  zero = jnp.zeros((), jnp.int32)
  return TrainState(
    step=zero,
    params=params,
    opt_state=tx.init(params),
    ema_params=jax.tree_util.tree_map(jnp.copy, params),
    skipped=zero,
    nonfinite_run=zero,
  )


def abstract_state(model_cfg, tx) -> TrainState:
  params = dit.abstract_params(model_cfg)
  return jax.eval_shape(lambda p: create(p, tx), params)


def state_shardings(model_cfg, tx, mesh: Mesh) -> TrainState:
  """NamedShardings for every leaf: params / EMA by the logical rules, the optimizer state
  like its parameter (CAME statistics on the parameter's remaining axes), scalars replicated."""
  p_sh = parallel.param_shardings(model_cfg, mesh)
  abstract = abstract_state(model_cfg, tx)
  replicated = NamedSharding(mesh, P())
  return TrainState(
    step=replicated,
    params=p_sh,
    opt_state=came_lib.state_sharding(abstract.opt_state, p_sh),
    ema_params=p_sh,
    skipped=replicated,
    nonfinite_run=replicated,
  )
