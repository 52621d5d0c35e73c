"""Gemma-2-2B encoding one prompt: our jitted JAX encoder vs transformers' Gemma2Model.

Full Gemma-2-2B geometry (26 layers, hidden 2304, vocab 256000), random weights, batch 1,
one `--length`-token prompt (300 by default, all real tokens), fp32 or (`--dtype
bfloat16`, what the pipeline runs) bf16 weights computed in bf16 by both. transformers
runs eager attention (its only choice for Gemma-2 here: sdpa is rejected because of the
attention softcap).

Also printed: the compiled encoder's temporary memory (XLA's memory analysis), for the
parameters as the pipeline passes them (`text_encoder.pack_params`: bf16 kernels as uint16
views) and as plain bf16 arrays (before: XLA:CPU made an fp32 copy of the layer stack);
`--with_unpacked` also times the plain form (needs that copy: ~8 GB more at bf16).

Both models use the *same* weights and only one copy of them is in memory: the JAX
parameters are created first and transformers' parameters are zero-copy DLPack views of
them (per-layer slices, torch Linear weight = kernel.T view; a transposed view runs as
fast as a contiguous weight in torch's linear, measured). So the run also checks parity at
the full geometry, and the timed runs alternate (JAX, torch, JAX, torch, ...) so load from
other processes hits both alike. Peak memory about 11 GB (vocab 256000).

  python benchmarks/bench_text_encoder.py                 # 3 timed runs each
  python benchmarks/bench_text_encoder.py --runs 5 --length 495
  python benchmarks/bench_text_encoder.py --dtype bfloat16 --vocab 16384 --length 495
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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sana_jax.models import text_encoder as te  # noqa: E402
from sana_jax.weights import gemma as gw  # noqa: E402


def random_params(cfg, ids, mask, seed=0):
  """N(0, 0.02) leaves (norm scales too: keeps activations O(1)); a stacked layer leaf is
  filled one layer at a time into a donated buffer, so the peak is the weights plus one
  layer's temporaries."""
  shapes = te.nn.meta.unbox(
    jax.eval_shape(te.Gemma2Encoder(cfg).init, jax.random.PRNGKey(seed), ids, mask)["params"]
  )
  fill = jax.jit(
    lambda buf, k, i: buf.at[i].set(0.02 * jax.random.normal(k, buf.shape[1:], buf.dtype)),
    donate_argnums=0,
  )
  leaves, tree = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  vals = []
  for k, s in zip(keys, leaves):
    if len(s.shape) == 3:
      buf = jnp.zeros(s.shape, s.dtype)
      for i in range(s.shape[0]):
        buf = fill(buf, jax.random.fold_in(k, i), i)
      vals.append(jax.block_until_ready(buf))
    else:
      normal = jax.jit(lambda k, s=s: 0.02 * jax.random.normal(k, s.shape, s.dtype))
      vals.append(jax.block_until_ready(normal(k)))
  return jax.tree.unflatten(tree, vals)


def torch_model_on(params, cfg):
  """transformers Gemma2Model whose parameters are zero-copy views of `params`."""
  import torch
  from transformers import Gemma2Config, Gemma2Model

  hc = Gemma2Config(
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.hidden_size,
    intermediate_size=cfg.intermediate_size,
    num_hidden_layers=cfg.num_layers,
    num_attention_heads=cfg.num_heads,
    num_key_value_heads=cfg.num_kv_heads,
    head_dim=cfg.head_dim,
    sliding_window=cfg.sliding_window,
    query_pre_attn_scalar=int(cfg.query_pre_attn_scalar),
    attn_logit_softcapping=cfg.attn_logit_softcapping,
    layer_types=list(cfg.resolved_layer_types),
  )
  hc._attn_implementation = "eager"
  with torch.device("meta"):
    model = Gemma2Model(hc).eval()

  def view(path):
    node = params
    for p in path.split("/"):
      node = node[p]
    return torch.from_dlpack(node)

  def put(module_path, tensor):
    *parents, leaf = module_path.split(".")
    mod = model
    for p in parents:
      mod = getattr(mod, p)
    mod._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)

  for hf_name, path, kind in gw._GLOBAL_TABLE:
    put(hf_name, view(path))
  for hf_name, path, kind in gw._LAYER_TABLE:
    stacked = view(f"layers/{path}")
    for i in range(cfg.num_layers):
      put(f"layers.{i}.{hf_name}", stacked[i].T if kind == "linear" else stacked[i])
  # Non-persistent buffers were created on 'meta': rebuild them on the CPU.
  inv_freq, _ = model.rotary_emb.compute_default_rope_parameters(hc)
  model.rotary_emb.inv_freq = inv_freq
  model.rotary_emb.original_inv_freq = inv_freq.clone()
  model.embed_tokens.embed_scale = torch.tensor(cfg.hidden_size**0.5)
  leftovers = [
    n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta
  ]
  if leftovers:
    raise RuntimeError(f"tensors left on meta: {leftovers}")
  return model


def main():
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--runs", type=int, default=3)
  ap.add_argument("--length", type=int, default=300)
  ap.add_argument("--vocab", type=int, default=256000)
  ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  ap.add_argument("--layers", type=int, default=26, help=argparse.SUPPRESS)  # smoke tests
  ap.add_argument("--with_unpacked", action="store_true", help="also time plain bf16 params")
  args = ap.parse_args()

  import torch

  torch.set_num_threads(args.threads)
  cfg = te.gemma2_2b(
    vocab_size=args.vocab, dtype=args.dtype, param_dtype=args.dtype, num_layers=args.layers
  )
  ids_np = np.random.default_rng(0).integers(0, args.vocab, (1, args.length))
  ids, mask = jnp.asarray(ids_np, jnp.int32), jnp.ones((1, args.length), jnp.int32)

  t0 = time.perf_counter()
  params = random_params(cfg, ids, mask)
  model = torch_model_on(params, cfg)
  t_init = time.perf_counter() - t0
  fn = te.make_encode_fn(cfg)
  tids, tmask = torch.from_numpy(ids_np), torch.ones(1, args.length, dtype=torch.long)
  temps = {
    form: fn.jitted.lower(p, ids, mask).compile().memory_analysis().temp_size_in_bytes / 2**30
    for form, p in (("packed", te.pack_params(params)), ("plain", params))
  }

  def run_jax():
    return jax.block_until_ready(fn(params, ids, mask))

  def run_plain():
    return jax.block_until_ready(fn.jitted(params, ids, mask))

  def run_torch():
    with torch.inference_mode():
      return model(input_ids=tids, attention_mask=tmask).last_hidden_state.float()

  runners = [("jax", run_jax), ("torch", run_torch)]
  if args.with_unpacked:
    runners.append(("plain", run_plain))
  first, times, outs = {}, {name: [] for name, _ in runners}, {}
  for name, f in runners:  # compile / warm up
    t0 = time.perf_counter()
    outs[name] = np.asarray(f(), np.float32)
    first[name] = time.perf_counter() - t0
  for _ in range(args.runs):
    for name, f in runners:
      t0 = time.perf_counter()
      f()
      times[name].append(time.perf_counter() - t0)

  ref = outs["torch"]
  err = float((np.abs(outs["jax"] - ref).max(-1) / np.abs(ref).max(-1)).max())
  labels = {
    "jax": "sana_jax (jit)",
    "torch": "transformers eager",
    "plain": "sana_jax, plain bf16",
  }
  print(
    f"Gemma-2-2B geometry ({cfg.num_layers} layers, hidden 2304, vocab {args.vocab}), {args.dtype} "
    "weights and compute, batch 1 "
    f"x {args.length} tokens, {os.cpu_count()} CPU cores, {args.runs} alternating runs, "
    f"same weights (setup {t_init:.0f} s)"
  )
  print(f"{'implementation':<20} {'1st call s':>11} {'median s':>9} {'min s':>7}  runs")
  for name in [n for n in ("torch", "jax", "plain") if n in times]:
    ts = times[name]
    print(
      f"{labels[name]:<20} {first[name]:11.2f} {statistics.median(ts):9.2f} "
      f"{min(ts):7.2f}  " + " ".join(f"{t:.2f}" for t in ts)
    )
  j, t = times["jax"], times["torch"]
  print(
    f"ratio ours/theirs: median {statistics.median(j) / statistics.median(t):.2f}x, "
    f"min {min(j) / min(t):.2f}x   (goal <= 0.8x)"
  )
  print(f"parity at full geometry: max per-token relative error {err:.2e}")
  print(
    "compiled encoder temporaries: "
    + ", ".join(f"{form} params {gb:.2f} GB" for form, gb in temps.items())
    + f" (weights {sum(x.nbytes for x in jax.tree.leaves(params)) / 2**30:.2f} GB)"
  )


if __name__ == "__main__":
  main()
