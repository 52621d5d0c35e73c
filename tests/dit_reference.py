"""Builds small random diffusers SanaTransformer2DModels and our converted twins (test oracle)."""

from __future__ import annotations

import numpy as np
import torch

from sana_jax.models.dit_config import DiTConfig
from sana_jax.weights import dit as dit_weights


def diffusers_model(cfg: DiTConfig, seed: int = 0, relative_scale: float | None = None):
  """A diffusers SanaTransformer2DModel with cfg's geometry, every tensor perturbed.

  The perturbation makes norm weights, biases and tables non-trivial so that a mapping
  that swaps or drops one of them changes the output. Default: 0.05 absolute noise (small
  widths). relative_scale: noise of that many times each tensor's own std (or absolute for
  constant tensors), which keeps full-width, many-block networks well-conditioned.
  """
  from diffusers import SanaTransformer2DModel

  config = dit_weights.to_diffusers_config(cfg)
  config.pop("_class_name")
  torch.manual_seed(seed)
  model = SanaTransformer2DModel(**config).eval()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for p in model.parameters():
      if relative_scale is None:
        scale = 0.05
      else:
        std = float(p.std()) if p.numel() > 1 else 0.0
        scale = relative_scale * (std if std > 0 else 1.0)
      p.add_(scale * torch.randn(p.shape, generator=gen))
  return model


def state_dict_numpy(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def run_diffusers(model, latents_nhwc, timestep, caption, mask) -> np.ndarray:
  """Diffusers forward on NHWC numpy inputs; returns NHWC numpy."""
  with torch.no_grad():
    out = model(
      hidden_states=torch.from_numpy(np.ascontiguousarray(latents_nhwc.transpose(0, 3, 1, 2))),
      encoder_hidden_states=torch.from_numpy(caption),
      timestep=torch.from_numpy(np.asarray(timestep, np.float32)),
      encoder_attention_mask=torch.from_numpy(mask.astype(np.float32)),
      return_dict=False,
    )[0]
  return out.numpy().transpose(0, 2, 3, 1)


def rel_err(ours, ref) -> float:
  """max |ours - ref| / max |ref|."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def random_params(cfg, seed):
  """Random parameters of cfg's shapes (no init compile): kernels N(0, 1/fan_in), depthwise
  N(0, 1/9), norm weights 1 + N(0, 0.1^2), tables N(0, 0.3^2), biases N(0, 0.05^2)."""
  rng = np.random.default_rng(seed)

  def one(path, a):
    names = [str(getattr(k, "key", k)) for k in path]
    shape = a.shape
    per = shape[1:] if names[0] == "blocks" else shape
    z = rng.standard_normal(shape)
    if names[-1] in ("q_norm", "k_norm", "caption_norm"):
      v = 1 + 0.1 * z
    elif "table" in names[-1]:
      v = 0.3 * z
    elif names[-1] in ("bias", "depthwise_bias"):
      v = 0.05 * z
    elif names[-1] == "depthwise_kernel":
      v = z / 3
    else:
      v = z / np.sqrt(per[0])
    return v.astype(np.float32)

  from sana_jax.models import dit
  import jax

  return jax.tree_util.tree_map_with_path(one, dit.abstract_params(cfg))
