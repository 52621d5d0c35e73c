"""Sana 1.6B at 4K (4096 px): positional embedding with interpolation 2.0, flow shift 6.0.
The 4K checkpoints were trained in fp16: enable `model.fp16_attn_clip` when running them in
fp32/bf16 (diffusers issue 10336)."""

from sana_jax.configs import common


def get_config():
  model = common.dit(
    hidden_size=2240,
    depth=20,
    cross_heads=20,
    cross_head_dim=112,
    sample_size=128,
    use_pe=True,
    pe_interpolation=2.0,
    fp16_attn_clip=True,
  )
  config = common.base_config(model, flow_shift=6.0, name="sana_1600m_4k", image_size=4096)
  return common.add_training(config, mesh=dict(data=1, fsdp=-1))
