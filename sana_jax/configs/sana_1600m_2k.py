"""Sana 1.6B at 2K (2048 px): adds the 2-D sin-cos positional embedding, interpolation 1.0."""

from sana_jax.configs import common


def get_config():
  model = common.dit(
    hidden_size=2240,
    depth=20,
    cross_heads=20,
    cross_head_dim=112,
    sample_size=64,
    use_pe=True,
    pe_interpolation=1.0,
  )
  config = common.base_config(model, flow_shift=3.0, name="sana_1600m_2k", image_size=2048)
  return common.add_training(config, mesh=dict(data=1, fsdp=-1))
