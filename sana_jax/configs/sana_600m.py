"""Sana 0.6B at 1024 px (Sana_600M_img1024). Flow shift 4.0 in the official config
(diffusers' pipeline uses 3.0)."""

from sana_jax.configs import common


def get_config():
  model = common.dit(hidden_size=1152, depth=28, cross_heads=16, cross_head_dim=72, sample_size=32)
  config = common.base_config(model, flow_shift=4.0, name="sana_600m", image_size=1024)
  return common.add_training(config, mesh=dict(data=1, fsdp=-1))
