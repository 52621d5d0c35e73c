"""A model folder: everything prompt-to-image needs, in our formats.

  MODEL/
    pipeline.json    {"format": "sana_jax.pipeline", "image_size", "flow_shift", "sampler",
                      "prompt": PromptConfig fields, "autoencoder": {"kind": "pixels",
                      "channels"} or {"kind": "dcae"}}
    transformer/     the DiT (sana_jax.weights.dit.save_flax; extras hold the null caption)
    text_encoder/    Gemma-2 (sana_jax.weights.gemma.save_params)
    tokenizer/       a transformers tokenizer folder
    vae/             DC-AE (sana_jax.weights.dcae.save_params), when kind is "dcae"

`convert/` writes each part from the released PyTorch weights (see docs/sampling.md).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import numpy as np

from sana_jax.models.dit_config import DiTConfig

FORMAT = "sana_jax.pipeline"
PIPELINE_FILE = "pipeline.json"


class BundleError(ValueError):
  """A model folder that is missing or incomplete."""


@dataclasses.dataclass
class Autoencoder:
  """encode(images [-1, 1] NHWC) -> scaled latents; decode(latents) -> images [-1, 1]."""

  kind: str
  downsample: int
  latent_channels: int
  encode: Any
  decode: Any


@dataclasses.dataclass
class Bundle:
  folder: pathlib.Path
  settings: dict
  dit_config: DiTConfig
  dit_params: dict
  null_caption: np.ndarray | None
  prompt_encoder: Any
  autoencoder: Autoencoder


def check_folder(folder: str | pathlib.Path) -> tuple[pathlib.Path, dict]:
  """Raises BundleError naming every missing part; returns (path, pipeline.json)."""
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise BundleError(f"model folder {folder} does not exist")
  if not (folder / PIPELINE_FILE).exists():
    raise BundleError(f"{folder} is not a sana_jax model folder (no {PIPELINE_FILE})")
  try:
    settings = json.loads((folder / PIPELINE_FILE).read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BundleError(f"{folder / PIPELINE_FILE}: malformed JSON: {e}") from None
  if not isinstance(settings, dict) or settings.get("format") != FORMAT:
    settings = settings if isinstance(settings, dict) else {}
    raise BundleError(
      f"{folder}/{PIPELINE_FILE}: format {settings.get('format')!r}, expected {FORMAT!r}"
    )
  need = {
    "transformer": ["config.json", "params.safetensors"],
    "text_encoder": ["config.json", "params.safetensors"],
    "tokenizer": [],
  }
  if settings["autoencoder"]["kind"] == "dcae":
    need["vae"] = ["config.json"]
  missing = [
    f"{part}/{f}" if f else f"{part}/"
    for part, files in need.items()
    for f in (files or [""])
    if not (folder / part / f).exists()
  ]
  if missing:
    raise BundleError(f"model folder {folder} is incomplete; missing: {missing}")
  return folder, settings


def _autoencoder(folder: pathlib.Path, spec: dict) -> Autoencoder:
  if spec["kind"] == "pixels":
    from sana_jax.models.pixels import PixelAutoencoder

    px = PixelAutoencoder(spec.get("channels", 3), spec.get("scale", 1.0))
    return Autoencoder("pixels", 1, px.latent_channels, px.encode, px.decode)
  if spec["kind"] == "dcae":
    from sana_jax.models import autoencoder as ae
    from sana_jax.models import tiling
    from sana_jax.weights import dcae

    # Text to image needs only the decoder: the encoder (half the DC-AE weights) is read
    # on the first encode call.
    _, params, cfg = dcae.load_autoencoder(folder / "vae", parts=("decoder",))
    tile = spec.get("tile_latents", 32)
    encoder: dict = {}

    def encode(images):
      if not encoder:
        encoder.update(dcae.load_autoencoder(folder / "vae", parts=("encoder",))[1])
      return np.asarray(ae.encode(cfg, encoder, images))

    def decode(latents):
      latents = np.asarray(latents, np.float32)
      if max(latents.shape[1:3]) > tile:  # large images: tiled, bounded memory
        return tiling.decode_tiled(cfg, params, latents, tile=tile)
      return np.asarray(ae.decode(cfg, params, latents))

    return Autoencoder(
      "dcae",
      cfg.spatial_compression_ratio,
      cfg.latent_channels,
      encode,
      decode,
    )
  raise BundleError(f"unknown autoencoder kind {spec['kind']!r} (pixels or dcae)")


def load(folder: str | pathlib.Path, compute_dtype: str | None = None) -> Bundle:
  """Loads a model folder (strict: every part checked against its config)."""
  from sana_jax.models.prompts import PromptConfig, PromptEncoder
  from sana_jax.weights import dit as dit_weights

  folder, settings = check_folder(folder)
  params, dit_cfg, extras = dit_weights.load_flax(folder / "transformer")
  if compute_dtype:
    dit_cfg = dit_cfg.replace(compute_dtype=compute_dtype)
  p = settings["prompt"]
  prompt_cfg = PromptConfig(
    max_length=p["max_length"],
    chi=tuple(p["chi"]) if p.get("chi") else None,
    lowercase=p.get("lowercase", False),
    null_prompt=p.get("null_prompt", ""),
  )
  encoder = PromptEncoder.from_folders(
    str(folder / "tokenizer"), str(folder / "text_encoder"), prompt_cfg
  )
  null = extras.get("null_caption_embedding")
  return Bundle(
    folder, settings, dit_cfg, params, null, encoder, _autoencoder(folder, settings["autoencoder"])
  )


def write_settings(
  folder: str | pathlib.Path,
  *,
  image_size: int,
  flow_shift: float,
  sampler: dict,
  prompt: dict,
  autoencoder: dict,
  overwrite: bool = True,
) -> None:
  """Writes FOLDER/pipeline.json whole (a temporary sibling renamed into place); an existing
  one raises FileExistsError unless `overwrite`."""
  from sana_jax.weights import io

  folder = pathlib.Path(folder)
  settings = {
    "format": FORMAT,
    "image_size": image_size,
    "flow_shift": flow_shift,
    "sampler": sampler,
    "prompt": prompt,
    "autoencoder": autoencoder,
  }
  text = json.dumps(settings, indent=2)
  with io.atomic_output(folder / PIPELINE_FILE, is_dir=False, overwrite=overwrite) as tmp:
    tmp.write_text(text)
