"""Device mesh ('data', 'fsdp', 'tensor') and the one table of logical-axis rules.

Parameters carry logical names ('embed', 'heads', 'mlp', 'layers', ...) and activations
'act_*' names; `LOGICAL_RULES` maps both to mesh axes. The same program runs on one CPU,
8 simulated CPU devices, a GPU box or a TPU pod by changing only the mesh shape.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Parameters: FSDP shards the model width, tensor parallelism the heads / MLP hidden.
# Activations: batch over (data, fsdp); their width replicated.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("mlp", "tensor"),
  ("caption", None),
  ("patch", None),
  ("embed_out", None),
  ("layers", None),
  ("act_batch", ("data", "fsdp")),
  ("act_length", None),
  ("act_height", None),
  ("act_width", None),
  ("act_embed", None),
)


def mesh_shape(n_devices: int, data: int = -1, fsdp: int = 1, tensor: int = 1) -> tuple:
  """Resolves one -1 entry so that data * fsdp * tensor == n_devices; clear errors."""
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(
      f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}"
    )
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh axis sizes must be positive or -1, got {sizes}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if n_devices % known:
      raise ValueError(f"mesh axes {dict(zip(MESH_AXES, sizes))} do not divide {n_devices} devices")
    sizes[sizes.index(-1)] = n_devices // known
  if int(np.prod(sizes)) != n_devices:
    raise ValueError(
      f"mesh {dict(zip(MESH_AXES, sizes))} has {int(np.prod(sizes))} "
      f"devices, but {n_devices} are available"
    )
  return tuple(sizes)


def make_mesh(
  data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(len(devices), data, fsdp, tensor)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_sharding(logical_specs: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
  """Tree of PartitionSpecs over logical names -> tree of NamedShardings on `mesh`.

  An axis whose size a mesh axis does not divide stays replicated (jit would reject it).
  """
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def fit_shardings(shardings: Any, shapes: Any) -> Any:
  """Drops mesh axes from dimensions they do not divide (small or odd-sized tensors)."""

  def fit(sharding, shape):
    spec = list(sharding.spec) + [None] * (len(shape.shape) - len(sharding.spec))
    mesh = sharding.mesh
    for i, axes in enumerate(spec):
      if axes is None:
        continue
      names = axes if isinstance(axes, tuple) else (axes,)
      size = int(np.prod([mesh.shape[a] for a in names]))
      if shape.shape[i] % size:
        spec[i] = None
    return NamedSharding(mesh, P(*spec))

  return jax.tree_util.tree_map(fit, shardings, shapes)


def param_shardings(model_config: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
  """NamedShardings for the DiT parameters on `mesh`."""
  from sana_jax.models import dit

  specs = dit.param_logical_axes(model_config)
  return fit_shardings(logical_sharding(specs, mesh, rules), dit.abstract_params(model_config))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) axis over ('data', 'fsdp'); the rest replicated."""
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def maybe_initialize_distributed() -> bool:
  """Calls jax.distributed.initialize() when the environment describes several processes;
  a no-op when it already ran. Returns whether jax.distributed is up.

  Recognised: JAX_COORDINATOR_ADDRESS (host:port of process 0) with JAX_NUM_PROCESSES and
  JAX_PROCESS_ID (any machine, e.g. several local CPU processes: add JAX_NUM_CPU_DEVICES=n;
  CPU collectives use gloo), or SANA_JAX_DISTRIBUTED=1 on a cluster jax detects by itself
  (TPU pod slices, SLURM, Open MPI). Call it before anything touches a device.
  """
  from jax._src import distributed as _dist  # is_initialized is not public in every jax

  if _dist.global_state.client is not None:
    return True
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in os.environ]
    if missing:
      raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {missing} are not")
    jax.distributed.initialize(
      coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
      num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
      process_id=int(os.environ["JAX_PROCESS_ID"]),
    )
    return True
  if os.environ.get("SANA_JAX_DISTRIBUTED") == "1":
    jax.distributed.initialize()
    return True
  return False


def barrier(name: str, timeout_s: int = 3600) -> None:
  """Waits until every process reaches `name` (jax.distributed's coordination service, no
  device collective); a no-op with one process.

  Processes compile at different speeds; a collective then waits for the slowest, and
  gloo (CPU) gives up after 30 s. Meeting here first keeps that wait out of collectives."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed as _dist

  _dist.global_state.client.wait_at_barrier(name, timeout_s * 1000)
