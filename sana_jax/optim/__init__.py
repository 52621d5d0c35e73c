"""Optimizers as optax transformations: CAME and CAME-8bit (needs only jax, optax, numpy)."""

from sana_jax.optim import quant8
from sana_jax.optim.came import (
  COMPACT,
  CameState,
  FactoredMoments,
  FullMoment,
  LeafSpec,
  StackedLayoutWarning,
  came,
  came_8bit,
  find_stacked,
  leaf_specs,
  reference_spec,
  sana_spec,
  scale_by_came,
  stacked_spec,
  state_sharding,
)

__all__ = [
  "COMPACT",
  "CameState",
  "FactoredMoments",
  "FullMoment",
  "LeafSpec",
  "StackedLayoutWarning",
  "came",
  "came_8bit",
  "find_stacked",
  "leaf_specs",
  "quant8",
  "reference_spec",
  "sana_spec",
  "scale_by_came",
  "stacked_spec",
  "state_sharding",
]
