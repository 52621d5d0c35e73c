"""Mesh construction, logical-axis rules, and the multi-process helpers."""

from sana_jax.parallel.mesh import (
  LOGICAL_RULES,
  MESH_AXES,
  barrier,
  batch_sharding,
  fit_shardings,
  logical_sharding,
  make_mesh,
  maybe_initialize_distributed,
  mesh_shape,
  param_shardings,
)

__all__ = [
  "LOGICAL_RULES",
  "MESH_AXES",
  "barrier",
  "batch_sharding",
  "fit_shardings",
  "logical_sharding",
  "make_mesh",
  "maybe_initialize_distributed",
  "mesh_shape",
  "param_shardings",
]
