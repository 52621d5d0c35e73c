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
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from sana_jax import bundle as bundle_lib
from sana_jax.diffusion import samplers
from sana_jax.models import dit

# diffusers' SANA / PixArt resolution bins (ASPECT_RATIO_{512,1024,2048,4096}_BIN): every
# table is base/16 times these (h, w) unit pairs, keyed by round(h / w, 2); the 512 and
# 1024 tables lack the ratios in _SMALL_BASE_DROPS. Tested against diffusers' tables.
_BIN_UNITS = (
  (8, 32),
  (8, 31),
  (8, 30),
  (8, 29),
  (9, 28),
  (9, 27),
  (9, 26),
  (10, 25),
  (10, 24),
  (11, 23),
  (11, 22),
  (11, 21),
  (12, 21),
  (12, 20),
  (13, 19),
  (13, 18),
  (14, 18),
  (14, 17),
  (15, 17),
  (15, 16),
  (16, 16),
  (16, 15),
  (17, 15),
  (17, 14),
  (18, 14),
  (18, 13),
  (19, 13),
  (20, 12),
  (21, 12),
  (22, 11),
  (23, 11),
  (24, 10),
  (25, 10),
  (26, 9),
  (27, 9),
  (28, 9),
  (29, 8),
  (30, 8),
  (31, 8),
  (32, 8),
)
_SMALL_BASE_DROPS = (0.26, 0.27, 2.89, 3.11, 3.62, 3.75, 3.88)
ASPECT_RATIOS = tuple(round(h / w, 2) for h, w in _BIN_UNITS)

_progress_bar = {"bar": None}


def _progress_hook(step: int, total: int) -> None:
  bar = _progress_bar["bar"]
  if bar is not None:
    bar.total = total
    bar.update(1)


def resolution_bins(base: int, multiple: int) -> dict[float, tuple[int, int]]:
  """{aspect ratio h/w: (h, w)} bins of about base*base pixels, multiples of `multiple`.

  For base 512 / 1024 / 2048 / 4096 (and multiple dividing base/16) these are exactly
  diffusers' ASPECT_RATIO_*_BIN tables; other bases scale the same unit pairs.
  """
  drops = _SMALL_BASE_DROPS if base < 2048 else ()
  bins = {}
  for (uh, uw), r in zip(_BIN_UNITS, ASPECT_RATIOS):
    if r in drops:
      continue
    h = max(multiple, round(uh * base / 16 / multiple) * multiple)
    w = max(multiple, round(uw * base / 16 / multiple) * multiple)
    bins[r] = (h, w)
  return bins


def nearest_bin(height: int, width: int, bins) -> tuple[int, int]:
  """The bin whose ratio key is nearest to height / width (first on ties, as diffusers'
  classify_height_width_bin). bins: {ratio: (h, w)} or a list of (h, w)."""
  if not isinstance(bins, dict):
    bins = {h / w: (h, w) for h, w in bins}
  ratio = height / width
  return bins[min(bins, key=lambda r: abs(float(r) - ratio))]


def resize_and_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Scale to cover (height, width), then centre-crop (diffusers' resize_and_crop).

  image: (H, W, C) uint8, or float (resized per channel in float, same dtype back)."""
  if image.shape[:2] == (height, width):
    return image
  h0, w0 = image.shape[:2]
  scale = max(height / h0, width / w0)
  size = (max(width, round(w0 * scale)), max(height, round(h0 * scale)))
  left, top = (size[0] - width) // 2, (size[1] - height) // 2
  box = (left, top, left + width, top + height)
  if image.dtype == np.uint8:
    return np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC).crop(box))
  chans = [
    np.asarray(
      Image.fromarray(np.asarray(image[..., c], np.float32), mode="F")
      .resize(size, Image.BICUBIC)
      .crop(box)
    )
    for c in range(image.shape[-1])
  ]
  return np.stack(chans, -1).astype(image.dtype)


def folder_geometry(folder) -> dict:
  """What sizes a model folder can sample, read from its json files only (no weights):
  {"image_size": base size in pixels (pipeline.json), "multiple": sizes must be multiples
  of this (autoencoder downsampling x DiT patch), "downsample", "patch_size"}."""
  import json

  folder, settings = bundle_lib.check_folder(folder)
  meta = json.loads((folder / "transformer" / "config.json").read_text())
  patch = int(meta.get("model", {}).get("patch_size", 1))
  ae = settings["autoencoder"]
  if ae["kind"] == "dcae":
    from sana_jax.weights import dcae

    down = int(dcae.config_from_folder(folder / "vae").spatial_compression_ratio)
  else:
    down = 1
  return {
    "image_size": int(settings["image_size"]),
    "multiple": down * patch,
    "downsample": down,
    "patch_size": patch,
  }


def generation_size(
  height: int, width: int, image_size: int, multiple: int, binning: bool = True
) -> tuple[int, int]:
  """The size the DiT samples at for a requested (height, width): the request itself
  without binning or at the model's own size, else the nearest aspect-ratio bin of
  `image_size` (diffusers' resolution binning; the images are resized back afterwards).
  Raises ValueError for sizes < 1 or not multiples of `multiple`."""
  if height < 1 or width < 1:
    raise ValueError(f"image size {height}x{width}: height and width must be >= 1")
  if height % multiple or width % multiple:
    raise ValueError(f"image size {height}x{width} is not a multiple of {multiple}")
  if not binning or (height, width) == (image_size, image_size):
    return height, width
  return nearest_bin(height, width, resolution_bins(image_size, multiple))


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
  # Mask of the null (unconditional) half under CFG: False = the conditional mask (official
  # Sana), True = the null caption's own mask (diffusers' SanaPipeline; the null caption is
  # then always "" encoded by the text encoder). None: pipeline.json sampler.use_null_mask.
  use_null_mask: bool | None = None


class SanaPipeline:
  """A loaded model folder (sana_jax.bundle) and the jitted pieces to sample from it."""

  def __init__(self, bundle: bundle_lib.Bundle, cache_caption_kv: bool = True):
    """cache_caption_kv: compute the cross-attention keys/values of the [null, cond]
    captions once per batch instead of at every denoising step (same numbers)."""
    self.bundle = bundle
    self.model = dit.SanaDiT(bundle.dit_config)
    self.params = bundle.dit_params
    # One copy of the DiT weights: the loaded ones (memory-mapped file pages, or bf16) are
    # released once placed; the bundle keeps the placed per-block fp32 ones.
    bundle.dit_params = self.params
    self.settings = bundle.settings
    self.cache_caption_kv = cache_caption_kv
    self._null_encoded = None  # (null caption, its mask) from the text encoder, once

  @property
  def params(self) -> dict:
    """The DiT weights as the sampler runs them: `dit.unstack_blocks`' {"rest", "layers"},
    fp32, each block's weights in their own buffers (the scan's per-step copies of the
    stacked weights made the 0.6B forward 1.4x slower; docs/sampling.md)."""
    return self._params

  @params.setter
  def params(self, tree: dict) -> None:
    """A DiT tree as loaded (stacked blocks) or as `params` returns it."""
    if "layers" in tree:
      self._params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), tree)
    else:
      self._params = dit.unstack_blocks(tree, jnp.float32)

  @classmethod
  def from_folder(
    cls, folder, compute_dtype: str | None = None, cache_caption_kv: bool = True
  ) -> "SanaPipeline":
    return cls(bundle_lib.load(folder, compute_dtype), cache_caption_kv=cache_caption_kv)

  @property
  def multiple(self) -> int:
    """Image sizes must be multiples of this (autoencoder downsampling x patch size)."""
    return self.bundle.autoencoder.downsample * self.bundle.dit_config.patch_size

  def resolve(self, opts: SamplingOptions) -> dict:
    """Fills defaults from pipeline.json and validates every option (clear errors)."""
    s = self.settings
    h = s["image_size"] if opts.height is None else opts.height
    w = s["image_size"] if opts.width is None else opts.width
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
    try:
      gen_h, gen_w = generation_size(h, w, s["image_size"], m, opts.resolution_binning)
    except ValueError as e:
      raise ValueError(
        f"{e} (autoencoder downsampling {self.bundle.autoencoder.downsample}"
        f" x patch {self.bundle.dit_config.patch_size})"
      ) from None
    use_null_mask = (
      s["sampler"].get("use_null_mask", False) if opts.use_null_mask is None else opts.use_null_mask
    )
    return {
      "height": h,
      "width": w,
      "gen_height": gen_h,
      "gen_width": gen_w,
      "steps": steps,
      "guidance_scale": float(scale),
      "solver": solver,
      "flow_shift": s["flow_shift"] if opts.flow_shift is None else opts.flow_shift,
      "guidance_interval": opts.guidance_interval,
      "use_null_mask": bool(use_null_mask),
    }

  def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(caption (B, L, Cy), mask (B, L), null caption (L, Cy))."""
    if not prompts or any(not isinstance(p, str) for p in prompts):
      raise ValueError("prompts must be a non-empty list of strings")
    emb, mask = self.bundle.prompt_encoder.encode(list(prompts))
    return emb, mask, self.null_caption(False)[0]

  def null_caption(self, use_null_mask: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(null caption (L, Cy), its mask (L,) or None). With use_null_mask (diffusers) the
    null prompt is encoded by the text encoder (once per pipeline: it does not change) and
    its own mask returned; otherwise the folder's stored null embedding is used when it
    has one (official)."""
    if use_null_mask:  # the same every call: encoded once per pipeline
      if self._null_encoded is None:
        emb, mask = self.bundle.prompt_encoder.encode_null(1)
        self._null_encoded = (np.asarray(emb[0], np.float32), np.asarray(mask[0]))
      return self._null_encoded
    null = self.bundle.null_caption
    if null is None:
      null = self.bundle.prompt_encoder.encode_null(1)[0][0]
    return np.asarray(null, np.float32), None

  def noise(self, seeds: Sequence[int], h: int, w: int) -> np.ndarray:
    """Initial latents, one key per seed: (len(seeds), h/f, w/f, C) float32."""
    f = self.bundle.autoencoder.downsample
    shape = (h // f, w // f, self.bundle.dit_config.in_channels)
    return np.stack([np.asarray(jax.random.normal(jax.random.key(int(s)), shape)) for s in seeds])

  def _sampler(self, r: dict):
    apply = _apply_fn_for(self.model, self.cache_caption_kv)
    return samplers.make_sampler(
      apply,
      num_steps=r["steps"],
      shift=r["flow_shift"],
      solver=r["solver"],
      guidance_scale=r["guidance_scale"],
      guidance_interval=r["guidance_interval"],
      use_null_mask=r["use_null_mask"],
      progress=_progress_hook,
    )

  def _caption_inputs(self, caption, null):
    """What the sampler gets as captions: the captions themselves, or (cache_caption_kv)
    their per-block cross-attention K/V packed as (B, L, depth * 2 * Ci) / (L, ...)."""
    if not self.cache_caption_kv:
      return caption, null
    kv_fn = _kv_fn_for(self.model)
    kv = kv_fn(self.params, caption)
    null_kv = kv_fn(self.params, jnp.asarray(null)[None])[0]
    return kv, null_kv

  def generate(
    self,
    prompts: Sequence[str],
    seeds: Sequence[int],
    opts: SamplingOptions = SamplingOptions(),
    progress: bool = False,
    batch_size: int | None = None,
    *,
    latents: np.ndarray | None = None,
    output: str = "uint8",
    devices: Sequence | None = None,
    timings: dict | None = None,
  ) -> np.ndarray:
    """One image per (prompt, seed) pair: prompts and seeds of equal length.

    latents: optional initial noise (N, gen_height/f, gen_width/f, C) float32 (NHWC) in
      place of the seeded noise (diffusers' `latents=` argument, transposed to NHWC).
    output: "uint8" -> (N, height, width, 3) uint8; "float" -> float32 in [0, 1] (diffusers'
      output_type="np"); "latent" -> the final latents (N, h, w, C) float32, not decoded.
    devices: shard each batch over these (default: all local devices).
    timings: if a dict, receives "encode_s", "denoise_s", "decode_s" (wall seconds).
    """
    if len(prompts) != len(seeds):
      raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if output not in ("uint8", "float", "latent"):
      raise ValueError(f"output must be 'uint8', 'float' or 'latent', got {output!r}")
    r = self.resolve(opts)
    n = len(prompts)
    f = self.bundle.autoencoder.downsample
    shape = (n, r["gen_height"] // f, r["gen_width"] // f, self.bundle.dit_config.in_channels)
    if latents is not None and tuple(np.shape(latents)) != shape:
      raise ValueError(
        f"latents must have shape {shape} (N, h, w, C), got {tuple(np.shape(latents))}"
      )
    if not prompts or any(not isinstance(p, str) for p in prompts):
      raise ValueError("prompts must be a non-empty list of strings")
    clock = time.perf_counter()
    emb, mask = self.bundle.prompt_encoder.encode(list(prompts))
    null, null_mask = self.null_caption(r["use_null_mask"])
    tick = time.perf_counter()
    noise = (
      self.noise(seeds, r["gen_height"], r["gen_width"])
      if latents is None
      else np.asarray(latents, np.float32)
    )
    run = self._sampler(r)
    batch_size = batch_size or n
    out = []
    import tqdm

    bar = tqdm.tqdm(
      total=r["steps"] * math.ceil(n / batch_size),
      desc="sampling",
      disable=not progress,
      unit="step",
    )
    _progress_bar["bar"] = bar if progress else None
    try:
      for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        x, c, m = _shard_batch(noise[sl], emb[sl], mask[sl], devices)
        c, null_c = self._caption_inputs(c, null)
        lat = run(self.params, x, c, m, null_c, null_mask)
        out.append(np.asarray(jax.device_get(lat)))
      jax.effects_barrier()
    finally:
      _progress_bar["bar"] = None
      bar.close()
    tock = time.perf_counter()
    lat = np.concatenate(out)
    if output == "latent":
      images = lat
    else:
      images = np.asarray(self.bundle.autoencoder.decode(lat), np.float32)
      if output == "float":
        images = np.clip(images / 2.0 + 0.5, 0.0, 1.0)
      else:
        images = np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
      if (r["gen_height"], r["gen_width"]) != (r["height"], r["width"]):
        images = np.stack([resize_and_crop(im, r["height"], r["width"]) for im in images])
        if output == "float":  # bicubic overshoot
          images = np.clip(images, 0.0, 1.0)
    if timings is not None:
      timings.update(
        encode_s=tick - clock, denoise_s=tock - tick, decode_s=time.perf_counter() - tock
      )
    return images

  def __call__(
    self,
    prompts: Sequence[str] | str,
    num_images_per_prompt: int = 1,
    seed: int = 0,
    progress: bool = False,
    **options,
  ) -> np.ndarray:
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
_KV_FNS: dict = {}


def _apply_fn_for(model: dit.SanaDiT, cached_kv: bool = False):
  """One apply function object per (model config, caption form), so compiled samplers are
  reused; it takes SanaPipeline.params (per-block buffers, dit.apply_layers). cached_kv:
  the caption argument is packed K/V from `_kv_fn_for`."""
  key = (model.cfg, cached_kv)
  if key not in _APPLY_FNS:
    cfg = model.cfg
    if not cached_kv:
      _APPLY_FNS[key] = lambda params, x, t, c, m: dit.apply_layers(cfg, params, x, t, c, m)
    else:

      def apply(params, x, t, c, m):
        b, l, _ = c.shape
        kv = c.reshape(b, l, cfg.depth, 2, cfg.cross_inner).transpose(2, 0, 1, 3, 4)
        return dit.apply_layers(cfg, params, x, t, c, m, caption_kv=kv)

      _APPLY_FNS[key] = apply
  return _APPLY_FNS[key]


def _kv_fn_for(model: dit.SanaDiT):
  """jitted (params (SanaPipeline.params), caption (B, L, Cy)) -> packed cross-attention K/V
  (B, L, depth*2*Ci)."""
  key = model.cfg
  if key not in _KV_FNS:

    def kv(params, caption):
      out = dit.caption_kv_layers(model.cfg, params, caption)
      b, l = caption.shape[:2]
      return out.transpose(1, 2, 0, 3, 4).reshape(b, l, -1)  # (depth, B, L, 2, Ci) -> packed

    _KV_FNS[key] = jax.jit(kv)
  return _KV_FNS[key]


def _shard_batch(noise, emb, mask, devices=None):
  """Puts the batch over the devices (default: all local ones) along axis 0, using the
  largest device count that divides it."""
  devices = list(jax.local_devices() if devices is None else devices)
  n = max(k for k in range(1, len(devices) + 1) if noise.shape[0] % k == 0)
  mesh = jax.sharding.Mesh(np.asarray(devices[:n]), ("data",))
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data", *([None] * (a.ndim - 1)))))  # noqa: E731
  return put(noise), put(emb), put(mask)


def make_generate_fn(model: str | None = None, **options):
  """For sana_jax.scaling.best_of_n_cli: a generate_fn over a model folder (default: the
  embedded ShapesEval model)."""
  from sana_jax.embedded import EMBEDDED_MODEL as DEFAULT_MODEL

  pipe = SanaPipeline.from_folder(model or DEFAULT_MODEL)
  return pipe.generate_fn(**options)
