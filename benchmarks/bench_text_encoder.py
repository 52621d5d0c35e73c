"""Gemma-2-2B geometry encoding one prompt: our jitted JAX encoder vs transformers (eager).

Random weights, fp32, batch 1, a `--length`-token prompt (300 by default, all real
tokens). transformers' Gemma-2 only supports eager attention here (sdpa is rejected
because of the attention softcap). The two models run in separate subprocesses, one after
the other, so only one 2B-parameter fp32 copy lives in memory at a time. The vocabulary is
cut to 32000 rows by default (the embedding lookup costs nothing; `--vocab 256000` for the
real table, +2 GB per process).

  python benchmarks/bench_text_encoder.py                 # 3 timed runs each
  python benchmarks/bench_text_encoder.py --runs 5 --length 495 --vocab 256000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))


def geometry(vocab):
    from sana_jax.models.text_encoder import gemma2_2b

    return gemma2_2b(vocab_size=vocab)


def worker_jax(args):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sana_jax.models import text_encoder as te

    cfg = geometry(args.vocab)
    t0 = time.perf_counter()
    model = te.Gemma2Encoder(cfg)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, args.vocab, (1, args.length)),
                      jnp.int32)
    mask = jnp.ones_like(ids)

    # One jitted normal per leaf keeps peak memory at params + one leaf's temporaries.
    shapes = te.nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), ids,
                                             mask)["params"])
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    vals = []
    for k, s in zip(keys, leaves):  # std 0.02 keeps activations O(1) through 26 layers
        normal = jax.jit(lambda k, s=s: 0.02 * jax.random.normal(k, s.shape, s.dtype))
        vals.append(jax.block_until_ready(normal(k)))
    params = jax.tree.unflatten(tree, vals)
    t_init = time.perf_counter() - t0
    fn = te.make_encode_fn(cfg)
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(params, ids, mask))
    t_first = time.perf_counter() - t0
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params, ids, mask))
        times.append(time.perf_counter() - t0)
    return dict(name="sana_jax (jit)", init=t_init, first=t_first, times=times,
                finite=bool(np.isfinite(np.asarray(out)).all()))


def worker_torch(args):
    import numpy as np
    import torch
    from transformers import Gemma2Config, Gemma2Model

    torch.set_num_threads(args.threads)
    c = geometry(args.vocab)
    hc = Gemma2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                      intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                      num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                      head_dim=c.head_dim, sliding_window=c.sliding_window,
                      query_pre_attn_scalar=int(c.query_pre_attn_scalar),
                      attn_logit_softcapping=c.attn_logit_softcapping)
    hc._attn_implementation = "eager"
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = Gemma2Model(hc).eval()
    t_init = time.perf_counter() - t0
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, args.vocab, (1, args.length)))
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        t_first = time.perf_counter() - t0
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=mask)
            times.append(time.perf_counter() - t0)
    return dict(name="transformers eager", init=t_init, first=t_first, times=times,
                finite=bool(torch.isfinite(out).all()))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--length", type=int, default=300)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="torch intra-op threads")
    ap.add_argument("--only", choices=["jax", "torch"], help="run one side only")
    ap.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        res = (worker_jax if args.worker == "jax" else worker_torch)(args)
        print("RESULT " + json.dumps(res), flush=True)
        return

    results = {}
    for side in ("torch", "jax"):
        if args.only and side != args.only:
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", side,
               "--runs", str(args.runs), "--length", str(args.length),
               "--vocab", str(args.vocab), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"{side} worker failed (rc={proc.returncode})")
        results[side] = json.loads(lines[-1][len("RESULT "):])

    print(f"Gemma-2-2B geometry (26 layers, hidden 2304, vocab {args.vocab}), fp32, "
          f"batch 1 x {args.length} tokens, {os.cpu_count()} CPU cores, {args.runs} runs")
    print(f"{'implementation':<20} {'init s':>8} {'1st call s':>11} {'median s':>9} "
          f"{'min s':>7} {'finite':>7}")
    for r in results.values():
        print(f"{r['name']:<20} {r['init']:8.1f} {r['first']:11.2f} "
              f"{statistics.median(r['times']):9.2f} {min(r['times']):7.2f} "
              f"{str(r['finite']):>7}")
    if len(results) == 2:
        j, t = results["jax"]["times"], results["torch"]["times"]
        print(f"ratio ours/theirs: median {statistics.median(j) / statistics.median(t):.2f}x, "
              f"min {min(j) / min(t):.2f}x   (goal <= 0.8x)")


if __name__ == "__main__":
    main()
