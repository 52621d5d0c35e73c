"""Sana 1.6B at 1024 px (Sana_1600M_img1024)."""

from sana_jax.configs import common


def get_config():
  model = common.dit(hidden_size=2240, depth=20, cross_heads=20, cross_head_dim=112, sample_size=32)
  config = common.base_config(model, flow_shift=3.0, name="sana_1600m", image_size=1024)
  return common.add_training(config, mesh=dict(data=1, fsdp=-1))
