"""SANA-1.5 4.8B at 1024 px: 60 blocks of the 1.6B width, qk_norm and cross_norm."""

from sana_jax.configs import common


def get_config():
  # remat "full": the TPU compiler's plan (docs/tpu_plans.md) fits batch 1 per v5e chip
  # (16 GB) at 9.4 GB with it; without remat the temporaries alone are 39.5 GB.
  model = common.dit(
    hidden_size=2240,
    depth=60,
    cross_heads=20,
    cross_head_dim=112,
    sample_size=32,
    qk_norm=True,
    cross_norm=True,
    remat_policy="full",
  )
  config = common.base_config(model, flow_shift=3.0, name="sana15_4800m", image_size=1024)
  return common.add_training(config, mesh=dict(data=1, fsdp=-1))
