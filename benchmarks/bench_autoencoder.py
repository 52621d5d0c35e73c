"""Full DC-AE f32c32 decoder: our jitted JAX decode vs diffusers' (PyTorch) in the same run.

Random weights (same for both), fp32, batch 1. Runs alternate between the two models so
that load from other processes hits both alike; the table shows medians.

  python benchmarks/bench_autoencoder.py                 # 512 px, 3 runs each
  python benchmarks/bench_autoencoder.py --sizes 512 1024 --runs 5
  python benchmarks/bench_autoencoder.py --compare-upsample   # also the literal repeat+conv
  python benchmarks/bench_autoencoder.py --memory --sizes      # XLA memory: tile vs 4K, no run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402


def main():
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--sizes", type=int, nargs="+", default=[512])
  ap.add_argument("--runs", type=int, default=3)
  ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
  ap.add_argument("--compare-upsample", action="store_true")
  ap.add_argument(
    "--memory",
    action="store_true",
    help="only print XLA's compiled memory: one 1024 px tile vs a 4096 px decode",
  )
  args = ap.parse_args()
  if args.memory:
    return memory()

  import torch
  from diffusers.models.autoencoders.autoencoder_dc import Decoder as TorchDecoder

  from sana_jax.models import autoencoder as ae
  from sana_jax.weights import dcae

  torch.set_num_threads(args.threads)
  cfg = ae.dcae_f32c32_config()
  torch.manual_seed(0)
  ref = TorchDecoder(
    in_channels=cfg.in_channels,
    latent_channels=cfg.latent_channels,
    attention_head_dim=cfg.attention_head_dim,
    block_type=cfg.decoder_block_types,
    block_out_channels=cfg.decoder_block_out_channels,
    layers_per_block=cfg.decoder_layers_per_block,
    qkv_multiscales=cfg.decoder_qkv_multiscales,
    norm_type=cfg.decoder_norm_types,
    act_fn=cfg.decoder_act_fns,
    upsample_block_type=cfg.upsample_block_type,
    in_shortcut=cfg.decoder_in_shortcut,
    conv_act_fn=cfg.decoder_conv_act_fn,
  ).eval()
  sd = {f"decoder.{k}": v.numpy() for k, v in ref.state_dict().items()}
  params = dcae.convert_state_dict(sd, cfg, parts=("decoder",))
  del sd

  impls = ["subpixel"] + (["repeat"] if args.compare_upsample else [])
  rows = []
  for size in args.sizes:
    z = np.random.RandomState(0).randn(1, size // 32, size // 32, 32).astype(np.float32)
    zt = torch.from_numpy(z.transpose(0, 3, 1, 2).copy())
    zs = jax.numpy.asarray(z * cfg.scaling_factor)
    fns = {}
    compile_s = {}
    for impl in impls:
      c = cfg.replace(upsample_impl=impl)
      t = time.perf_counter()
      jax.block_until_ready(ae.decode(c, params, zs))
      compile_s[impl] = time.perf_counter() - t
      fns[impl] = lambda c=c: jax.block_until_ready(ae.decode(c, params, zs))
    with torch.no_grad():
      ref(zt)  # warm-up
    times = {k: [] for k in ["torch"] + impls}
    for _ in range(args.runs):
      t = time.perf_counter()
      with torch.no_grad():
        ref(zt)
      times["torch"].append(time.perf_counter() - t)
      for impl in impls:
        t = time.perf_counter()
        fns[impl]()
        times[impl].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for impl in impls:
      rows.append(
        (
          size,
          impl,
          med["torch"],
          med[impl],
          med[impl] / med["torch"],
          compile_s[impl],
          times["torch"],
          times[impl],
        )
      )

  print(
    f"\nDC-AE f32c32 decoder, fp32, batch 1, {args.runs} runs (median), "
    f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
    f"({args.threads} threads)"
  )
  print(
    f"{'px':>5} {'ours (impl)':>12} {'torch s':>9} {'ours s':>8} {'ratio':>6} "
    f"{'1st call s':>10}  runs torch / ours"
  )
  for size, impl, tt, tj, ratio, comp, rt, rj in rows:
    print(
      f"{size:>5} {impl:>12} {tt:>9.2f} {tj:>8.2f} {ratio:>6.2f} {comp:>10.1f}  "
      f"{[round(x, 2) for x in rt]} / {[round(x, 2) for x in rj]}"
    )


def memory():
  from sana_jax.models import autoencoder as ae
  from sana_jax.models import tiling

  cfg = ae.dcae_f32c32_config()
  shapes = ae.param_shapes(cfg)
  params = {"decoder": shapes["decoder"]}
  print("\nDC-AE f32c32 decoder, fp32, batch 1: XLA compiled memory (GiB)")
  print(f"{'decode':>28} {'temp':>8} {'params':>8} {'output':>8}")
  for name, lat in [("one tile, 1024 px (tiled)", 32), ("whole image, 4096 px", 128)]:
    m = tiling.tile_memory_bytes(cfg, params, (1, lat, lat))
    gib = {k: v / 2**30 for k, v in m.items()}
    print(f"{name:>28} {gib['temp']:>8.2f} {gib['argument']:>8.2f} {gib['output']:>8.2f}")


if __name__ == "__main__":
  main()
