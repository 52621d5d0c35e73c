"""The embedded default model: a small SANA trained on ShapesEval at 32 px.

Same code paths as the released models: the DiT (qk_norm, cross_norm), a Gemma-2-
architecture text encoder (tiny, pre-trained by `sana_jax.shapes_encoder` so that word
order survives position-free cross-attention, then frozen like SANA's Gemma; word-level
tokenizer over the ShapesEval vocabulary, no CHI), flow matching with CAME-8bit,
DPM-Solver++ with CFG.
Pixel space with patch 4 (64 tokens per 32x32 image) instead of an autoencoder: a DC-AE
at f32 would leave a 1x1 latent, and training one first would cost the CPU budget the
DiT needs. See docs/shapes_model.md for the choices and the
experiments behind them.

  python -m sana_jax.shapes_model init --out MODEL            # tokenizer + text encoder
  python -m sana_jax.data.preprocess --model MODEL --out DATA --num 50000
  python train.py --config configs/shapes.py --workdir RUN --config.data.dir=DATA
  python -m sana_jax.shapes_model export --workdir RUN --model MODEL --raw

The shipped weights: these steps (stage 1, one H100, ~4 min), then 21,665 more with
--config.train.init_from=MODEL/transformer (stage 2; optimizer and EMA restart); raw
weights of stage 2's last step, chosen on validation prompts (docs/shapes_model.md).
"""

import ml_collections

from sana_jax.configs import common


def get_config():
  model = common.dit(
    in_channels=3,
    out_channels=3,
    patch_size=4,
    hidden_size=128,
    depth=6,
    # The six blocks unrolled, not scanned: on XLA:CPU the scan's stacked residuals (written
    # each iteration, zero-filled each step) cost more than the blocks' matmuls; the
    # unrolled step takes ~0.7x the time (docs/train_speed.md), compiling a little longer.
    scan_unroll=6,
    self_head_dim=32,
    cross_heads=4,
    cross_head_dim=32,
    caption_channels=64,
    caption_len=24,
    mlp_ratio=2.5,
    sample_size=32,
    qk_norm=True,
    cross_norm=True,
  )
  config = common.base_config(model, flow_shift=1.0, name="shapes", image_size=32)
  config.vae_downsample = 1
  config.autoencoder = "pixels"
  config.sampler = ml_collections.ConfigDict(dict(name="dpm_solver", steps=20, guidance_scale=3.0))
  # embed_scale multiplies Gemma's random token table (std 1) before pre-training. A
  # random encoder is nearly context-free (`python -m sana_jax.shapes_model probe`).
  # pretrain: `sana_jax.shapes_encoder` trains the encoder so that a position-free
  # readout recovers every word and each token names the 6 words before it; steps=0
  # keeps the random weights.
  config.text_encoder = ml_collections.ConfigDict(
    dict(
      kind="gemma2_tiny",
      hidden_size=64,
      num_layers=2,
      seed=0,
      embed_scale=1.0,
      pretrain=dict(
        steps=1000,
        batch=128,
        lr=3e-3,
        num_prompts=20000,
        readout_heads=4,
        readout_width=64,
        context_words=6,
        seed=0,
      ),
    )
  )
  config.prompt = ml_collections.ConfigDict(dict(max_length=24, chi=None, lowercase=True))
  config.dataset = ml_collections.ConfigDict(dict(num_train=50000, seed=0))
  return common.add_training(
    config,
    steps=15915,
    global_batch=64,
    optimizer="came_8bit",
    lr=3e-4,
    warmup_steps=200,
    grad_clip=1.0,
    ema_decay=0.999,
    cfg_dropout=0.1,
    log_every=25,
    checkpoint_every=250,
    keep_checkpoints=2,
  )
