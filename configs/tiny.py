"""A tiny SANA-1.5-style DiT for tests: every dimension differs from the others."""

from configs import common


def get_config():
  model = common.dit(in_channels=4, out_channels=4, hidden_size=48, depth=3, self_head_dim=8,
                     cross_heads=4, cross_head_dim=10, caption_channels=20, caption_len=12,
                     mlp_ratio=2.5, sample_size=8, qk_norm=True, cross_norm=True)
  config = common.base_config(model, flow_shift=3.0, name="tiny", image_size=256)
  config.vae_downsample = 32
  return config
