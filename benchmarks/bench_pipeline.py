"""Prompt to image at the Sana 0.6B geometry: our SanaPipeline vs diffusers' SanaPipeline.

Same run, same CPU: Sana 0.6B DiT (depth 28, hidden 1152, cross 16 x 72) and DC-AE f32c32
decoder in fp32, Gemma-2-2B text encoder layers (26 x hidden 2304) with bf16 weights, all
random; one
prompt with diffusers' CHI, 512 x 512 px, 20 Flow DPM-Solver steps, CFG 4.5 on a batched
[null, cond] pass, batch 1. Both pipelines do the same work per image: encode the CHI +
prompt and the empty negative prompt with Gemma-2, 20 DiT passes at batch 2, one DC-AE
decode. Reported per framework: end-to-end seconds per image (median of --runs after one
warm-up call, which for JAX includes compilation) and its phases: encode, denoise (the
20-step loop, "denoiser-only"), decode.

Memory: in fp32 one framework would hold ~12 GB of weights (Gemma-2 2.0B + DiT 0.59B +
DC-AE 0.31B); on this shared 24 GB machine that was OOM-killed, so (1) each framework runs
in its own subprocess, one after the other, each with its own random weights (numerics
are tested separately at small size in tests/test_pipeline.py), and (2) the text encoder
stores bf16 weights (--text_encoder_dtype; SANA itself runs Gemma in bf16): transformers
then computes in bf16 (oneDNN, AVX512-BF16 on this CPU), and so does ours (matmul inputs
bf16, fp32 accumulation, norms and softmax; --text_encoder_compute float32 upcasts
instead). The Gemma vocabulary is cut to --vocab rows (16384 instead of 256000): the lookup costs nothing either way, the table would only take memory. Both
use the same word-level tokenizer built here (the real Gemma tokenizer cannot be
downloaded), so token counts match. Ours holds the DC-AE decoder only (as
sana_jax.bundle does: the encoder is read on first use), diffusers' SanaPipeline the whole
AutoencoderDC (as it does). --memory_trace logs RSS and peak after each piece.

  python benchmarks/bench_pipeline.py                      # 3 timed runs each
  python benchmarks/bench_pipeline.py --runs 2 --no_kv_cache
  python benchmarks/bench_pipeline.py --only ours          # one framework
  python benchmarks/bench_pipeline.py --plan               # compiled memory per piece

The machine is shared: load averages are printed with each framework's numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

PROMPT = "A cyberpunk cat with a neon sign that says Sana, in the rain at night"
GEMMA_PARAMS_NO_VOCAB = 2_024_000_000  # 26 layers + norms (from the Gemma-2-2B geometry)


def _tokenizer(folder: str):
  from sana_jax.bundle_from_diffusers import DIFFUSERS_CHI
  from sana_jax.data.tokenizer import build_word_level_tokenizer, words_of
  from sana_jax.models.prompts import load_tokenizer

  build_word_level_tokenizer(words_of(list(DIFFUSERS_CHI) + [PROMPT.lower()]), folder)
  return load_tokenizer(folder)


def _dit_config():
  from sana_jax.models.dit_config import DiTConfig

  return DiTConfig(sample_size=16).diffusers_compatible()  # Sana 0.6B geometry, 512 px


def _peak_rss_gb() -> float:
  import resource

  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _summary(first, phases, setup_s, seq_len, extra=None) -> dict:
  return {
    "setup_s": setup_s,
    "first_s": first,
    "phases": phases,
    "seq_len": seq_len,
    "peak_rss_gb": _peak_rss_gb(),
    "loadavg": os.getloadavg(),
    **(extra or {}),
  }


def _rss_gb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 2**20
  return float("nan")


def _log(what: str) -> None:
  print(
    f"  [{time.strftime('%H:%M:%S')}] {what} (RSS {_rss_gb():.2f} GB, peak {_peak_rss_gb():.2f} GB)",
    file=sys.stderr,
    flush=True,
  )


def _random_tree(shapes, seed: int, std: float = 0.02):
  """N(0, std) arrays shaped like `shapes` (ShapeDtypeStructs). Stacked (per-layer) leaves
  are filled one layer at a time into a donated buffer, so the peak is the weights plus
  one layer's temporaries (a 2 GB leaf drawn at once needs 2-3x that)."""
  import jax
  import jax.numpy as jnp

  fill = jax.jit(
    lambda buf, k, i: buf.at[i].set(std * jax.random.normal(k, buf.shape[1:], buf.dtype)),
    donate_argnums=0,
  )
  leaves, tree = jax.tree.flatten(shapes)
  out = []
  for n, s in enumerate(leaves):
    key = jax.random.fold_in(jax.random.key(seed), n)
    if len(s.shape) >= 3 and s.size > 2**24:
      buf = jnp.zeros(s.shape, s.dtype)
      for i in range(s.shape[0]):
        buf = fill(buf, jax.random.fold_in(key, i), i)
      out.append(jax.block_until_ready(buf))
    else:
      out.append(
        jax.block_until_ready(
          jax.jit(lambda k, s=s: std * jax.random.normal(k, s.shape, s.dtype))(key)
        )
      )
  return jax.tree.unflatten(tree, out)


# ------------------------------------------------------------------------------- workers


def _warm_up_and_time(run, runs: int):
  """One warm-up call (compiles), then `runs` timed ones: (image, warm-up s, [timings])."""
  t0 = time.perf_counter()
  img, _ = run()
  first = time.perf_counter() - t0
  _log(f"warm-up call {first:.1f} s")
  phases = []
  for _ in range(runs):
    phases.append(run()[1])
    _log(f"run {phases[-1]['e2e_s']:.1f} s")
  return img, first, phases


def worker_ours(args) -> dict:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import numpy as np

  from sana_jax import bundle as bundle_lib
  from sana_jax.bundle_from_diffusers import DIFFUSERS_CHI
  from sana_jax.models import autoencoder as ae
  from sana_jax.models import dit
  from sana_jax.models import text_encoder as te
  from sana_jax.models.prompts import PromptConfig, PromptEncoder
  from sana_jax.pipeline import SamplingOptions, SanaPipeline

  t0 = time.perf_counter()
  # The DC-AE decoder only, as sana_jax.bundle holds it (the encoder is read on first use;
  # text to image never calls it). Drawn first, so the encoder half made and dropped here
  # does not add to the peak.
  vcfg = ae.dcae_f32c32_config()
  vparams = {"decoder": ae.init_params(vcfg, 2)["decoder"]}
  _log("DC-AE decoder params")
  tok = _tokenizer(tempfile.mkdtemp(prefix="bench_tok_"))
  gcfg = te.gemma2_2b(
    vocab_size=args.vocab,
    param_dtype=args.text_encoder_dtype,
    dtype=args.text_encoder_compute or args.text_encoder_dtype,
  )
  dummy = jax.numpy.zeros((1, 8), jax.numpy.int32)
  gparams = _random_tree(
    te.nn.meta.unbox(
      jax.eval_shape(te.Gemma2Encoder(gcfg).init, jax.random.key(0), dummy, dummy)["params"]
    ),
    0,
  )
  _log("text encoder params")
  cfg = _dit_config()
  # Drawn in the pipeline's per-block form (SanaPipeline.params), so the weights exist once.
  dparams = _random_tree(jax.eval_shape(dit.unstack_blocks, dit.abstract_params(cfg)), 1)
  _log("DiT params")
  encoder = PromptEncoder.from_params(
    tok, gcfg, gparams, PromptConfig(max_length=300, chi=DIFFUSERS_CHI, lowercase=True)
  )
  settings = {
    "format": bundle_lib.FORMAT,
    "image_size": 512,
    "flow_shift": 3.0,
    "sampler": {
      "name": "dpm_solver",
      "steps": args.steps,
      "guidance_scale": 4.5,
      "use_null_mask": True,
    },
    "prompt": {},
    "autoencoder": {"kind": "dcae"},
  }
  autoencoder = bundle_lib.Autoencoder(
    "dcae",
    vcfg.spatial_compression_ratio,
    vcfg.latent_channels,
    None,  # not used by text to image (the bundle reads the encoder on first use)
    lambda z: np.asarray(ae.decode(vcfg, vparams, z)),
  )
  b = bundle_lib.Bundle(None, settings, cfg, dparams, None, encoder, autoencoder)
  pipe = SanaPipeline(b, cache_caption_kv=not args.no_kv_cache)
  setup_s = time.perf_counter() - t0
  opts = SamplingOptions(height=args.size, width=args.size, steps=args.steps, guidance_scale=4.5)

  def run():
    t = {}
    start = time.perf_counter()
    img = pipe.generate([PROMPT], [0], opts, output="float", timings=t)
    t["e2e_s"] = time.perf_counter() - start
    return img, t

  _log("built pipeline")
  if args.memory_trace:  # peak memory of each piece, before the timed calls
    encoder.encode([PROMPT])
    _log("text encoder, prompt")
    encoder.encode_null(1)
    _log("text encoder, null prompt")
    lat = pipe.generate([PROMPT], [0], opts, output="latent")
    _log("denoise")
    autoencoder.decode(lat)
    _log("decode")
  img, first, phases = _warm_up_and_time(run, args.runs)
  from sana_jax.models.prompts import tokenize

  seq_len = int(tokenize(tok, [PROMPT], encoder.config)[0].shape[1])
  return _summary(
    first,
    phases,
    setup_s,
    seq_len,
    {
      "finite": bool(np.isfinite(img).all()),
      "shape": list(img.shape),
      "kv_cache": not args.no_kv_cache,
    },
  )


def worker_diffusers(args) -> dict:
  import numpy as np
  import torch
  import diffusers
  from transformers import Gemma2Config, Gemma2Model

  from sana_jax.models import autoencoder as ae
  from sana_jax.weights import dit as dit_weights

  torch.set_num_threads(args.threads)
  t0 = time.perf_counter()
  tok = _tokenizer(tempfile.mkdtemp(prefix="bench_tok_"))
  hc = Gemma2Config(
    vocab_size=args.vocab,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    sliding_window=4096,
    query_pre_attn_scalar=256,
    attn_logit_softcapping=50.0,
  )
  hc._attn_implementation = "eager"  # sdpa rejects the softcap
  torch.manual_seed(0)
  default = torch.get_default_dtype()
  torch.set_default_dtype(getattr(torch, args.text_encoder_dtype))  # no fp32 copy first
  try:
    text_encoder = Gemma2Model(hc).eval()
  finally:
    torch.set_default_dtype(default)
  _log("text encoder")
  tcfg = dit_weights.to_diffusers_config(_dit_config())
  tcfg.pop("_class_name")
  transformer = diffusers.SanaTransformer2DModel(**tcfg).eval()
  vae = diffusers.AutoencoderDC(**ae.dcae_f32c32_config().to_diffusers()).eval()
  scheduler = diffusers.DPMSolverMultistepScheduler(
    use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"
  )
  pipe = diffusers.SanaPipeline(
    tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
  )
  pipe.set_progress_bar_config(disable=True)
  setup_s = time.perf_counter() - t0

  log = []  # (what, start, end) of every text-encoder / DiT / decoder call

  def timed(what, fn):
    def wrapper(*a, **k):
      start = time.perf_counter()
      out = fn(*a, **k)
      log.append((what, start, time.perf_counter()))
      return out

    return wrapper

  text_encoder.forward = timed("encode", text_encoder.forward)
  transformer.forward = timed("dit", transformer.forward)
  vae.decode = timed("decode", vae.decode)

  def run():
    log.clear()
    start = time.perf_counter()
    img = pipe(
      PROMPT,
      negative_prompt="",
      num_inference_steps=args.steps,
      guidance_scale=4.5,
      height=args.size,
      width=args.size,
      use_resolution_binning=False,
      output_type="np",
      generator=torch.Generator().manual_seed(0),
    ).images
    e2e = time.perf_counter() - start
    dit = [c for c in log if c[0] == "dit"]
    t = {
      "e2e_s": e2e,
      "encode_s": sum(e - s for w, s, e in log if w == "encode"),
      "denoise_s": dit[-1][2] - dit[0][1],  # first DiT call start .. last DiT call end
      "decode_s": sum(e - s for w, s, e in log if w == "decode"),
    }
    return img, t

  _log("built pipeline")
  img, first, phases = _warm_up_and_time(run, args.runs)
  from sana_jax.bundle_from_diffusers import DIFFUSERS_CHI
  from sana_jax.models.prompts import PromptConfig, tokenize

  seq_len = int(
    tokenize(tok, [PROMPT], PromptConfig(chi=DIFFUSERS_CHI, lowercase=True))[0].shape[1]
  )
  return _summary(
    first,
    phases,
    setup_s,
    seq_len,
    {
      "finite": bool(np.isfinite(img).all()),
      "shape": list(img.shape),
      "threads": torch.get_num_threads(),
    },
  )


# --------------------------------------------------------------------- compiled memory


def plan(args) -> int:
  """Compile-only memory of each piece at the benchmark's geometry (XLA's memory analysis;
  no weights are allocated): what the peak is made of. Weights resident throughout, then
  per stage its temporaries; the text encoder with its bf16 kernels as the pipeline passes
  them (uint16 views, text_encoder.pack_params) and as plain bf16 arrays (before)."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import math

  import jax
  import jax.numpy as jnp

  from sana_jax import pipeline as pl
  from sana_jax.diffusion import samplers
  from sana_jax.models import autoencoder as ae
  from sana_jax.models import dit
  from sana_jax.models import text_encoder as te

  S, gib = jax.ShapeDtypeStruct, 2**30
  gcfg = te.gemma2_2b(vocab_size=args.vocab, param_dtype="bfloat16", dtype="bfloat16")
  ids = S((1, 495), jnp.int32)
  gshapes = te.nn.meta.unbox(
    jax.eval_shape(te.Gemma2Encoder(gcfg).init, jax.random.key(0), ids, ids)["params"]
  )
  as_u16 = lambda p, s: S(s.shape, jnp.uint16) if p[-1].key == "kernel" else s  # noqa: E731
  packed = {**gshapes, "layers": jax.tree_util.tree_map_with_path(as_u16, gshapes["layers"])}
  cfg = _dit_config()
  model, dparams = dit.SanaDiT(cfg), dit.abstract_params(cfg)
  layers = jax.eval_shape(dit.unstack_blocks, dparams)  # the pipeline's per-block weights
  vcfg = ae.dcae_f32c32_config()
  vshapes = ae.param_shapes(vcfg)
  nbytes = lambda tree: sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
  print(f"{'resident weights':<44}{'GB':>8}")
  for name, tree in (
    ("Gemma-2 (bf16)", gshapes),
    ("DiT (fp32)", dparams),
    ("DC-AE decoder (fp32)", vshapes["decoder"]),
    ("DC-AE encoder (fp32; not held by ours)", vshapes["encoder"]),
  ):
    print(f"{name:<44}{nbytes(tree) / gib:8.2f}")
  enc = te.make_encode_fn(gcfg).jitted
  f = args.size // vcfg.spatial_compression_ratio
  depth_kv = cfg.depth * 2 * cfg.cross_inner
  run = samplers.make_sampler(
    pl._apply_fn_for(model, True),
    num_steps=args.steps,
    shift=3.0,
    solver="dpm_solver",
    guidance_scale=4.5,
    use_null_mask=True,
  )
  lat = S((1, f, f, cfg.in_channels), jnp.float32)
  stages = [
    ("text encoder 495 tokens, plain bf16 (before)", enc, (gshapes, ids, ids)),
    ("text encoder 495 tokens, uint16 views (now)", enc, (packed, ids, ids)),
    (
      "caption K/V",
      pl._kv_fn_for(model),
      (layers, S((1, 300, cfg.caption_channels), jnp.float32)),
    ),
    (
      "sampler step (CFG; run once per step)",
      run.step,
      (
        layers,
        (lat, lat),
        S((1, 300, depth_kv), jnp.float32),
        S((1, 300), jnp.int32),
        S((300, depth_kv), jnp.float32),
        S((300,), jnp.int32),
        run.step_inputs[0],
      ),
    ),
    (
      f"DC-AE decode {args.size} px",
      ae._jitted(vcfg, "decode"),
      ({"decoder": vshapes["decoder"]}, S((1, f, f, vcfg.latent_channels), jnp.float32)),
    ),
  ]
  print(f"{'stage (compiled)':<44}{'temp GB':>8}")
  for name, fn, fargs in stages:
    m = fn.lower(*fargs).compile().memory_analysis()
    print(f"{name:<44}{m.temp_size_in_bytes / gib:8.2f}", flush=True)
  return 0


# -------------------------------------------------------------------------------- driver


def _mem_available_gb() -> float:
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) / 2**20
  return float("inf")


def _spawn(which: str, args) -> dict:
  te_bytes = 2 if args.text_encoder_dtype == "bfloat16" else 4
  need = ((GEMMA_PARAMS_NO_VOCAB + args.vocab * 2304) * te_bytes + (592e6 + 312e6) * 4) / 2**30
  need += 1.0
  waited = 0
  while _mem_available_gb() < need and waited < args.wait_memory:
    print(
      f"[{which}] waiting for memory: {_mem_available_gb():.1f} GB available, "
      f"~{need:.1f} GB needed",
      file=sys.stderr,
      flush=True,
    )
    time.sleep(30)
    waited += 30
  if _mem_available_gb() < need:
    raise SystemExit(
      f"not enough memory for {which}: {_mem_available_gb():.1f} GB available, "
      f"~{need:.1f} GB needed (lower --vocab, or wait)"
    )
  cmd = (
    [
      sys.executable,
      os.path.abspath(__file__),
      "--worker",
      which,
      "--runs",
      str(args.runs),
      "--steps",
      str(args.steps),
      "--size",
      str(args.size),
      "--vocab",
      str(args.vocab),
      "--threads",
      str(args.threads),
      "--text_encoder_dtype",
      args.text_encoder_dtype,
    ]
    + (["--text_encoder_compute", args.text_encoder_compute] if args.text_encoder_compute else [])
    + (["--no_kv_cache"] if args.no_kv_cache else [])
    + (["--memory_trace"] if args.memory_trace else [])
  )
  load_before = os.getloadavg()
  print(f"[{which}] running (load average {load_before[0]:.1f})", file=sys.stderr, flush=True)
  proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
  if proc.returncode:
    raise SystemExit(f"{which} worker failed (exit {proc.returncode})")
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  res = json.loads(line[len("RESULT ") :])
  res["load_before"] = load_before
  return res


def _median(res, key):
  return statistics.median(p[key] for p in res["phases"])


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--runs", type=int, default=3, help="timed runs after the warm-up")
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--size", type=int, default=512)
  ap.add_argument("--vocab", type=int, default=16384, help="Gemma embedding rows")
  ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
  ap.add_argument(
    "--text_encoder_dtype",
    choices=("bfloat16", "float32"),
    default="bfloat16",
    help="Gemma-2 weight storage; torch computes in it, and so does ours "
    "unless --text_encoder_compute says otherwise",
  )
  ap.add_argument(
    "--text_encoder_compute",
    choices=("bfloat16", "float32"),
    default=None,
    help="ours: Gemma-2 matmul input dtype (norms, softmax and the output "
    "stay fp32); default: the storage dtype",
  )
  ap.add_argument(
    "--no_kv_cache", action="store_true", help="ours: recompute caption K/V at every step"
  )
  ap.add_argument("--only", choices=("ours", "diffusers"), default=None)
  ap.add_argument(
    "--memory_trace",
    action="store_true",
    help="ours: log peak memory after each piece before the timed calls",
  )
  ap.add_argument(
    "--wait_memory",
    type=int,
    default=600,
    help="seconds to wait for free memory before a worker starts",
  )
  ap.add_argument(
    "--plan",
    action="store_true",
    help="only print the compiled memory of each piece (no weights, no runs)",
  )
  ap.add_argument("--worker", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.plan:
    return plan(args)

  if args.worker:
    res = (worker_ours if args.worker == "ours" else worker_diffusers)(args)
    print("RESULT " + json.dumps(res), flush=True)
    return 0

  order = [args.only] if args.only else ["diffusers", "ours"]
  results = {w: _spawn(w, args) for w in order}
  print(
    f"Sana 0.6B DiT + DC-AE f32c32 (fp32) + Gemma-2-2B layers (vocab {args.vocab}, "
    f"{args.text_encoder_dtype} weights), random weights; {args.size} px, {args.steps} DPM-Solver steps, CFG 4.5, batch 1; "
    f"{os.cpu_count()} CPU cores; median of {args.runs} runs after a warm-up call"
  )
  seq = next(iter(results.values()))["seq_len"]
  print(f"text encoder tokens: {seq} (CHI + prompt) and 300 (negative prompt)")
  hdr = (
    f"{'pipeline':<22}{'setup s':>8}{'1st call':>9}{'e2e s':>8}{'encode':>8}"
    f"{'denoise':>8}{'decode':>8}  {'e2e runs':<22}{'load avg 1/5/15 min':>20}"
    f"{'peak GB':>8}"
  )
  print(hdr)
  names = {
    "diffusers": "diffusers SanaPipeline",
    "ours": "sana_jax" + (" (no K/V cache)" if args.no_kv_cache else ""),
  }
  for w, r in results.items():
    runs = " ".join(f"{p['e2e_s']:.1f}" for p in r["phases"])
    la = "/".join(f"{v:.1f}" for v in r["loadavg"])
    print(
      f"{names[w]:<22}{r['setup_s']:8.0f}{r['first_s']:9.1f}{_median(r, 'e2e_s'):8.1f}"
      f"{_median(r, 'encode_s'):8.1f}{_median(r, 'denoise_s'):8.1f}"
      f"{_median(r, 'decode_s'):8.1f}  {runs:<22}{la:>20}{r['peak_rss_gb']:8.1f}"
    )
    if not r["finite"]:
      print(f"  warning: {w} produced non-finite pixels")
  if len(results) == 2:
    o, d = results["ours"], results["diffusers"]
    print(
      f"ratio ours/diffusers: end-to-end {_median(o, 'e2e_s') / _median(d, 'e2e_s'):.2f}x, "
      f"denoiser-only {_median(o, 'denoise_s') / _median(d, 'denoise_s'):.2f}x "
      f"(goal <= 0.8x)"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
