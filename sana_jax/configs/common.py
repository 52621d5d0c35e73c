"""Shared pieces of the model configs."""

import ml_collections

from sana_jax.models.dit_config import DEFAULT_LORA_TARGETS, DiTConfig


def dit(**overrides) -> ml_collections.ConfigDict:
  """A DiT config dict: DiTConfig defaults (Sana 0.6B at 1024 px) with overrides."""
  return ml_collections.ConfigDict(DiTConfig(**overrides).to_dict())


def base_config(
  model: ml_collections.ConfigDict, *, flow_shift: float, name: str, image_size: int
) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = name
  config.model = model
  config.image_size = image_size  # pixels; latent = image_size / 32
  config.vae_downsample = 32
  config.flow_shift = flow_shift
  config.sampler = ml_collections.ConfigDict(dict(name="dpm_solver", steps=20, guidance_scale=4.5))
  return config


def train_config(**overrides) -> ml_collections.ConfigDict:
  """Training defaults of the official recipe (REFERENCE.md section 4)."""
  tc = ml_collections.ConfigDict(
    dict(
      steps=100_000,
      global_batch=256,
      grad_accum=1,
      optimizer="came_8bit",
      # Which CAME-8bit first moments are 8-bit: "compact" (every leaf of more than 1024
      # values per layer, bf16 block metadata: 1.0147 B/param) or "official" (the official
      # CAME-8bit's choices: factored matrices of more than 16384 values per layer, fp32
      # metadata: 1.0226). docs/came.md, "API".
      came_8bit_state="compact",
      lr=1e-4,
      weight_decay=0.0,
      warmup_steps=2000,
      sqrt_lr_scaling=False,
      grad_clip=0.1,
      ema_decay=0.9999,
      # EMA storage: "fp32"; "bf16" (half the memory; stochastically rounded updates);
      # "off" (no EMA: export/sample the raw weights).
      ema="fp32",
      # "bfloat16": the trained parameters stored in bf16 (updates computed in fp32 and
      # stochastically rounded; no fp32 master copy): half the parameter and gradient memory.
      param_dtype="float32",
      # How a non-finite step keeps the old state: "cond" (faster: the update is skipped,
      # nothing copied) or "where" (lower peak memory on XLA:CPU, docs/fine_tuning.md).
      nonfinite_guard="cond",
      cfg_dropout=0.1,
      timestep_sampler="logit_normal",
      seed=0,
      log_every=10,
      checkpoint_every=1000,
      keep_checkpoints=3,
      async_checkpoints=True,
      max_consecutive_nonfinite=20,
      peak_tflops=0.0,
      init_from="",
      # LoRA fine-tuning (rank 0 = off, train the whole model): adapters on `targets` (see
      # sana_jax.models.dit_config.LORA_TARGETS) are the only trained parameters; the rest of
      # the model is frozen (from `base`: a DiT or pipeline folder or a training workdir;
      # empty = the seed's random init), stored in `base_dtype` ("float32" / "bfloat16").
      # alpha 0 means alpha = rank (scale 1). The adapters are written to
      # WORKDIR/lora/adapter.safetensors at every checkpoint.
      lora=dict(rank=0, alpha=0.0, targets=DEFAULT_LORA_TARGETS, base="", base_dtype="float32"),
    )
  )
  tc.update(overrides)
  return tc


def add_training(
  config: ml_collections.ConfigDict, *, data_dir: str = "", mesh=None, **train_overrides
) -> ml_collections.ConfigDict:
  config.train = train_config(**train_overrides)
  # worker_count: grain reader processes (0 reads in the training process; a GPU that
  # steps faster than one process decodes needs several).
  config.data = ml_collections.ConfigDict(dict(dir=data_dir, num_epochs=1000, worker_count=0))
  config.mesh = ml_collections.ConfigDict(
    {**dict(data=-1, fsdp=1, tensor=1, num_devices=-1), **(mesh or {})}
  )
  return config
