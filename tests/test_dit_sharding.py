"""The DiT forward with FSDP-sharded parameters on 8 simulated devices equals 1 device."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from sana_jax.configs import tiny
from sana_jax import parallel
from sana_jax.models import dit
from tests import dit_reference as ref


@pytest.mark.parametrize("mesh_axes", [dict(data=1, fsdp=8), dict(data=2, fsdp=4)])
def test_sharded_forward_equals_single_device(mesh_axes):
  assert jax.device_count() == 8
  cfg = dit.DiTConfig.coerce(tiny.get_config().model)
  params = dit.init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((8, 4, 6, cfg.in_channels)).astype(np.float32)
  t = rng.integers(0, 1000, 8).astype(np.float32)
  y = rng.standard_normal((8, 5, cfg.caption_channels)).astype(np.float32)
  mask = (np.arange(5)[None] < rng.integers(1, 6, 8)[:, None]).astype(np.int32)
  single = jax.jit(dit.SanaDiT(cfg).apply)({"params": params}, x, t, y, mask)

  mesh = parallel.make_mesh(**mesh_axes)
  shardings = parallel.param_shardings(cfg, mesh)
  sharded_params = jax.device_put(params, shardings)
  # Width-sharded parameters really are split over fsdp.
  qkv = sharded_params["blocks"]["self_attn"]["qkv"]["kernel"]
  assert qkv.sharding.spec[1] == "fsdp"
  assert len({str(s.index) for s in qkv.addressable_shards}) == mesh.shape["fsdp"]
  batch = parallel.batch_sharding(mesh, 4)
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
    fwd = jax.jit(
      dit.SanaDiT(cfg).apply,
      in_shardings=(
        {"params": shardings},
        batch,
        parallel.batch_sharding(mesh, 1),
        parallel.batch_sharding(mesh, 3),
        parallel.batch_sharding(mesh, 2),
      ),
    )
    out = fwd({"params": sharded_params}, x, t, y, mask)
  # Sharded reductions sum in another order: compare relative to the output's scale.
  assert ref.rel_err(out, single) <= 1e-6


def test_mesh_shape_errors():
  assert parallel.mesh_shape(8, data=-1, fsdp=4) == (2, 4, 1)
  with pytest.raises(ValueError, match="do not divide"):
    parallel.mesh_shape(8, data=-1, fsdp=3)
  with pytest.raises(ValueError, match="at most one"):
    parallel.mesh_shape(8, data=-1, fsdp=-1)
  with pytest.raises(ValueError, match="available"):
    parallel.mesh_shape(8, data=2, fsdp=2)
