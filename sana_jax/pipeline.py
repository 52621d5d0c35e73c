"""Prompts -> images: encode (text encoder), sample (DiT + flow solver + CFG), decode.

  pipe = SanaPipeline.from_folder("sana_jax/assets/shapes_model")
  images = pipe(["a red circle"], num_images_per_prompt=4, seed=0)   # uint8 (4, H, W, 3)

Each image has its own seed (seed + index), so image k is the same whether it is sampled
alone or in a batch; batches are sharded over the local devices. Sizes that are not a
supported resolution are binned to the nearest aspect-ratio bin and resized back, as
diffusers does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from sana_jax import bundle as bundle_lib
from sana_jax.diffusion import samplers
from sana_jax.models import dit

# Aspect ratios (h / w) of diffusers' SANA resolution bins.
ASPECT_RATIOS = (0.25, 0.26, 0.27, 0.28, 0.32, 0.33, 0.35, 0.4, 0.42, 0.48, 0.5, 0.52, 0.57,
                 0.6, 0.68, 0.72, 0.78, 0.82, 0.88, 0.94, 1.0, 1.07, 1.13, 1.21, 1.29, 1.38,
                 1.46, 1.67, 1.75, 2.0, 2.09, 2.4, 2.5, 2.89, 3.0, 3.11, 3.62, 3.75, 3.88, 4.0)

_progress_bar = {"bar": None}


def _progress_hook(step: int, total: int) -> None:
  bar = _progress_bar["bar"]
  if bar is not None:
    bar.total = total
    bar.update(1)


def resolution_bins(base: int, multiple: int) -> list[tuple[int, int]]:
  """(h, w) bins of about base*base pixels for ASPECT_RATIOS, multiples of `multiple`."""
  bins = []
  for r in ASPECT_RATIOS:
    h = max(multiple, round(base * math.sqrt(r) / multiple) * multiple)
    w = max(multiple, round(base / math.sqrt(r) / multiple) * multiple)
    bins.append((h, w))
  return bins


def nearest_bin(height: int, width: int, bins: Sequence[tuple[int, int]]) -> tuple[int, int]:
  ratio = height / width
  return min(bins, key=lambda b: abs(b[0] / b[1] - ratio))


def resize_and_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Scale to cover (height, width), then centre-crop (diffusers' resize_and_crop)."""
  if image.shape[:2] == (height, width):
    return image
  img = Image.fromarray(image)
  scale = max(height / img.height, width / img.width)
  img = img.resize((max(width, round(img.width * scale)), max(height, round(img.height * scale))),
                   Image.BICUBIC)
  left, top = (img.width - width) // 2, (img.height - height) // 2
  return np.asarray(img.crop((left, top, left + width, top + height)))


@dataclasses.dataclass
class SamplingOptions:
  height: int | None = None
  width: int | None = None
  steps: int | None = None
  guidance_scale: float | None = None
  sampler: str | None = None
  flow_shift: float | None = None
  guidance_interval: tuple[float, float] | None = None
  resolution_binning: bool = True


class SanaPipeline:
  """A loaded model folder (sana_jax.bundle) and the jitted pieces to sample from it."""

  def __init__(self, bundle: bundle_lib.Bundle):
    self.bundle = bundle
    self.model = dit.SanaDiT(bundle.dit_config)
    self.params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32),
                                         bundle.dit_params)
    self.settings = bundle.settings
    self._apply = jax.jit(self.model.apply)

  @classmethod
  def from_folder(cls, folder, compute_dtype: str | None = None) -> "SanaPipeline":
    return cls(bundle_lib.load(folder, compute_dtype))

  @property
  def multiple(self) -> int:
    """Image sizes must be multiples of this (autoencoder downsampling x patch size)."""
    return self.bundle.autoencoder.downsample * self.bundle.dit_config.patch_size

  def resolve(self, opts: SamplingOptions) -> dict:
    """Fills defaults from pipeline.json and validates every option (clear errors)."""
    s = self.settings
    h = opts.height or s["image_size"]
    w = opts.width or s["image_size"]
    steps = s["sampler"]["steps"] if opts.steps is None else opts.steps
    scale = s["sampler"]["guidance_scale"] if opts.guidance_scale is None else opts.guidance_scale
    solver = opts.sampler or s["sampler"]["name"]
    if steps < 1:
      raise ValueError(f"steps must be >= 1, got {steps}")
    if scale < 0:
      raise ValueError(f"guidance scale must be >= 0, got {scale}")
    if solver not in samplers.SOLVERS:
      raise ValueError(f"sampler must be one of {samplers.SOLVERS}, got {solver!r}")
    m = self.multiple
    if h % m or w % m:
      raise ValueError(f"image size {h}x{w} is not a multiple of {m} (autoencoder "
                       f"downsampling {self.bundle.autoencoder.downsample} x patch "
                       f"{self.bundle.dit_config.patch_size})")
    gen_h, gen_w = h, w
    if opts.resolution_binning and (h, w) != (s["image_size"],) * 2:
      gen_h, gen_w = nearest_bin(h, w, resolution_bins(s["image_size"], m))
    return {"height": h, "width": w, "gen_height": gen_h, "gen_width": gen_w, "steps": steps,
            "guidance_scale": float(scale), "solver": solver,
            "flow_shift": s["flow_shift"] if opts.flow_shift is None else opts.flow_shift,
            "guidance_interval": opts.guidance_interval}

  def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(caption (B, L, Cy), mask (B, L), null caption (L, Cy))."""
    if not prompts or any(not isinstance(p, str) for p in prompts):
      raise ValueError("prompts must be a non-empty list of strings")
    emb, mask = self.bundle.prompt_encoder.encode(list(prompts))
    null = self.bundle.null_caption
    if null is None:
      null = self.bundle.prompt_encoder.encode_null(1)[0][0]
    return emb, mask, np.asarray(null, np.float32)

  def noise(self, seeds: Sequence[int], h: int, w: int) -> np.ndarray:
    """Initial latents, one key per seed: (len(seeds), h/f, w/f, C) float32."""
    f = self.bundle.autoencoder.downsample
    shape = (h // f, w // f, self.bundle.dit_config.in_channels)
    return np.stack([np.asarray(jax.random.normal(jax.random.key(int(s)), shape))
                     for s in seeds])

  def _sampler(self, r: dict):
    apply = _apply_fn_for(self.model)
    return samplers.make_sampler(apply, num_steps=r["steps"], shift=r["flow_shift"],
                                 solver=r["solver"], guidance_scale=r["guidance_scale"],
                                 guidance_interval=r["guidance_interval"],
                                 progress=_progress_hook)

  def generate(self, prompts: Sequence[str], seeds: Sequence[int],
               opts: SamplingOptions = SamplingOptions(), progress: bool = False,
               batch_size: int | None = None) -> np.ndarray:
    """One image per (prompt, seed) pair: prompts and seeds of equal length.

    Returns uint8 (N, height, width, 3).
    """
    if len(prompts) != len(seeds):
      raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    r = self.resolve(opts)
    emb, mask, null = self.encode(prompts)
    noise = self.noise(seeds, r["gen_height"], r["gen_width"])
    run = self._sampler(r)
    n = len(prompts)
    batch_size = batch_size or n
    out = []
    import tqdm
    bar = tqdm.tqdm(total=r["steps"] * math.ceil(n / batch_size), desc="sampling",
                    disable=not progress, unit="step")
    _progress_bar["bar"] = bar if progress else None
    try:
      for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        args = _shard_batch(noise[sl], emb[sl], mask[sl])
        latents = run(self.params, *args, null)
        out.append(np.asarray(jax.device_get(latents)))
      jax.effects_barrier()
    finally:
      _progress_bar["bar"] = None
      bar.close()
    images = self.bundle.autoencoder.decode(np.concatenate(out))
    images = np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    if (r["gen_height"], r["gen_width"]) != (r["height"], r["width"]):
      images = np.stack([resize_and_crop(im, r["height"], r["width"]) for im in images])
    return images

  def __call__(self, prompts: Sequence[str] | str, num_images_per_prompt: int = 1,
               seed: int = 0, progress: bool = False, **options) -> np.ndarray:
    """Images for each prompt: (len(prompts) * num_images_per_prompt, H, W, 3) uint8,
    grouped by prompt; image k uses seed + k."""
    if isinstance(prompts, str):
      prompts = [prompts]
    if num_images_per_prompt < 1:
      raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
    flat = [p for p in prompts for _ in range(num_images_per_prompt)]
    seeds = [seed + k for k in range(len(flat))]
    return self.generate(flat, seeds, SamplingOptions(**options), progress=progress)

  def generate_fn(self, **options) -> Callable[[str, list[int]], list[np.ndarray]]:
    """The best-of-N seam: (prompt, seeds) -> list of uint8 images."""
    opts = SamplingOptions(**options)
    return lambda prompt, seeds: list(self.generate([prompt] * len(seeds), list(seeds), opts))


_APPLY_FNS: dict = {}


def _apply_fn_for(model: dit.SanaDiT):
  """One apply function object per model config, so compiled samplers are reused."""
  key = model.cfg
  if key not in _APPLY_FNS:
    _APPLY_FNS[key] = lambda params, x, t, c, m: model.apply({"params": params}, x, t, c, m)
  return _APPLY_FNS[key]


def _shard_batch(noise, emb, mask):
  """Puts the batch over the local devices along axis 0 (largest device count dividing it)."""
  devices = jax.local_devices()
  n = max(k for k in range(1, len(devices) + 1) if noise.shape[0] % k == 0)
  mesh = jax.sharding.Mesh(np.asarray(devices[:n]), ("data",))
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data", *([None] * (a.ndim - 1)))))  # noqa: E731
  return put(noise), put(emb), put(mask)


def make_generate_fn(config=None, model: str | None = None, **options):
  """For sana_jax.scaling.best_of_n_cli: a generate_fn over a model folder."""
  from sana_jax.shapes_model import DEFAULT_MODEL
  pipe = SanaPipeline.from_folder(model or DEFAULT_MODEL)
  return pipe.generate_fn(**options)
