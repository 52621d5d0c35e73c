"""Shared pieces of the model configs."""

import ml_collections

from sana_jax.models.dit_config import DiTConfig


def dit(**overrides) -> ml_collections.ConfigDict:
  """A DiT config dict: DiTConfig defaults (Sana 0.6B at 1024 px) with overrides."""
  return ml_collections.ConfigDict(DiTConfig(**overrides).to_dict())


def base_config(model: ml_collections.ConfigDict, *, flow_shift: float, name: str,
                image_size: int) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = name
  config.model = model
  config.image_size = image_size          # pixels; latent = image_size / 32
  config.vae_downsample = 32
  config.flow_shift = flow_shift
  config.sampler = ml_collections.ConfigDict(dict(
      name="dpm_solver", steps=20, guidance_scale=4.5))
  return config
