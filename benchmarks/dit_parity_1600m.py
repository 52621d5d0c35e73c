"""SANA-1.5 1.6B (20 blocks, width 2240, qk_norm + cross_norm) converted from a random
diffusers SanaTransformer2DModel matches it: prints the max relative error.

The 1.6B twin of tests/test_dit_full_geometry.py (too slow and too big for the suite): fp32,
diffusers-compatible numerics, integer timestep, batch 1, 300 caption tokens of width 2304
with the last 120 padded, 512 px (16x16 latent) by default. Random weights are diffusers'
own initialisation with every tensor perturbed by 0.2x its std (see the test's docstring
for why not absolute noise). Mostly one copy of the weights in memory at a time: the
torch model runs, its tensors are written to .npy files under a temporary folder and the
model is dropped; the converter reads them memory-mapped, and our parameters go to the
device leaf by leaf (measured max RSS 15 GB, memory-mapped pages included; 3 min).

  python benchmarks/dit_parity_1600m.py                 # 512 px
  python benchmarks/dit_parity_1600m.py --latent 32     # 1024 px
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from sana_jax.models import dit  # noqa: E402
from sana_jax.models.dit_config import DiTConfig  # noqa: E402
from sana_jax.weights import dit as dit_weights  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--latent", type=int, default=16, help="latent side (16 = 512 px)")
  ap.add_argument("--timestep", type=float, default=500.0)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--seed", type=int, default=0)
  a = ap.parse_args()
  import torch

  from sana_jax.configs import sana15_1600m
  from tests import dit_reference as ref

  torch.set_num_threads(a.threads)
  jax.config.update("jax_default_matmul_precision", "highest")

  cfg = DiTConfig.coerce(sana15_1600m.get_config().model).diffusers_compatible()
  assert cfg.qk_norm and cfg.cross_norm, "SANA-1.5 1.6B has qk_norm and cross_norm"
  t0 = time.perf_counter()
  model = ref.diffusers_model(cfg, seed=a.seed, relative_scale=0.2)
  n_torch = sum(p.numel() for p in model.parameters())
  print(
    f"SANA-1.5 1.6B: depth {cfg.depth}, width {cfg.hidden_size}, cross {cfg.cross_heads}x"
    f"{cfg.cross_head_dim}, {n_torch / 1e9:.3f} B params; built in "
    f"{time.perf_counter() - t0:.0f} s"
  )

  rng = np.random.default_rng(a.seed)
  n = a.latent
  x = rng.standard_normal((1, n, n, cfg.in_channels)).astype(np.float32)
  y = rng.standard_normal((1, 300, cfg.caption_channels)).astype(np.float32)
  mask = np.ones((1, 300), np.int32)
  mask[:, 180:] = 0
  t = np.array([a.timestep], np.float32)

  t0 = time.perf_counter()
  theirs = ref.run_diffusers(model, x, t, y, mask)
  print(f"diffusers forward {time.perf_counter() - t0:.1f} s")

  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="sana_parity_") as tmp:
    names = {}
    for i, (k, v) in enumerate(model.state_dict().items()):
      names[k] = os.path.join(tmp, f"{i}.npy")
      np.save(names[k], v.detach().numpy())
    del model, v
    gc.collect()
    sd = {k: np.load(f, mmap_mode="r") for k, f in names.items()}
    flat = dit_weights.flatten(dit_weights.diffusers_to_params(sd, cfg))
    del sd
  for k in list(flat):  # to the device one leaf at a time
    flat[k] = jax.device_put(np.asarray(flat.pop(k)))
  params = dit_weights.unflatten(flat)
  del flat
  gc.collect()
  assert dit.count_params(params) == n_torch
  print(f"converted in {time.perf_counter() - t0:.1f} s")

  t0 = time.perf_counter()
  ours = np.asarray(jax.jit(dit.SanaDiT(cfg).apply)({"params": params}, x, t, y, mask))
  print(f"our forward (with compile) {time.perf_counter() - t0:.1f} s")
  err = float(np.max(np.abs(ours.astype(np.float64) - theirs)) / np.max(np.abs(theirs)))
  print(
    f"\nSANA-1.5 1.6B, {n * 32} px ({n}x{n} latent), t={a.timestep:g}: max |ours - "
    f"diffusers| / max |diffusers| = {err:.3e}  ({'<=' if err <= 1e-5 else '>'} 1e-5)"
  )
  print(f"load average: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
  return 0 if err <= 1e-5 else 1


if __name__ == "__main__":
  sys.exit(main())
