"""Pixel space as an "autoencoder": latents are the image itself, scaled.

Used by the embedded ShapesEval model, which diffuses 32x32 RGB directly with patch 4:
no autoencoder to train or ship, and the same DiT, samplers and pipeline code paths.
"""

from __future__ import annotations

import numpy as np


class PixelAutoencoder:
  """encode: images (B, H, W, 3) in [-1, 1] -> latents = images * scale; decode: inverse."""

  downsample = 1

  def __init__(self, channels: int = 3, scale: float = 1.0):
    self.latent_channels = channels
    self.scale = scale

  def encode(self, images):
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != self.latent_channels:
      raise ValueError(f"images must be (B, H, W, {self.latent_channels}), got {images.shape}")
    return images * self.scale

  def decode(self, latents):
    latents = np.asarray(latents, np.float32)
    if latents.ndim != 4 or latents.shape[-1] != self.latent_channels:
      raise ValueError(f"latents must be (B, h, w, {self.latent_channels}), got {latents.shape}")
    return np.clip(latents / self.scale, -1.0, 1.0)
