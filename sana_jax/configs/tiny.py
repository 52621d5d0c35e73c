"""A tiny SANA-1.5-style DiT for tests: every dimension differs from the others.

Training: `python train.py --config configs/tiny.py --workdir W --config.data.dir=DATA`.
"""

from sana_jax.configs import common


def get_config():
  model = common.dit(
    in_channels=4,
    out_channels=4,
    hidden_size=48,
    depth=3,
    self_head_dim=8,
    cross_heads=4,
    cross_head_dim=10,
    caption_channels=20,
    caption_len=12,
    mlp_ratio=2.5,
    sample_size=8,
    qk_norm=True,
    cross_norm=True,
  )
  config = common.base_config(model, flow_shift=3.0, name="tiny", image_size=256)
  return common.add_training(
    config,
    steps=200,
    global_batch=8,
    optimizer="came_8bit",
    lr=1e-3,
    warmup_steps=10,
    grad_clip=1.0,
    ema_decay=0.99,
    log_every=10,
    checkpoint_every=50,
    async_checkpoints=True,
  )
