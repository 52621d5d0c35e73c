"""Optimizers as optax transformations: CAME and CAME-8bit (needs only jax, optax, numpy)."""

from sana_jax.optim import quant8
from sana_jax.optim.came import (
    CameState,
    FactoredMoments,
    FullMoment,
    LeafSpec,
    came,
    came_8bit,
    leaf_specs,
    reference_spec,
    sana_spec,
    scale_by_came,
    state_sharding,
)

__all__ = [
    "CameState", "FactoredMoments", "FullMoment", "LeafSpec", "came", "came_8bit",
    "leaf_specs", "quant8", "reference_spec", "sana_spec", "scale_by_came", "state_sharding",
]
