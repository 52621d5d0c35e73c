"""One command for the GPU: sana_jax against PyTorch (diffusers, came-pytorch) in one run.

Three parts, random weights at the released geometries, each framework in its own
subprocess (so peak device memory is its own), one table at the end:

  forward   DiT forward, bf16, SANA-1.5 1.6B, 1024 px, batch 1 and 8: ours (jit) vs
            diffusers SanaTransformer2DModel (bf16, default attention; --torch_compile adds
            a torch.compile'd row): median ms.
  pipeline  text to image, 20 Flow DPM-Solver steps, CFG 4.5, 1024 px: Gemma-2-2B geometry
            + SANA-1.5 1.6B + DC-AE f32c32, all bf16: our SanaPipeline vs diffusers'
            SanaPipeline: latency at batch 1, images/s at batch 8, peak device memory.
  train     train step, SANA-1.5 1.6B, 1024 px, bf16 compute, CAME-8bit (ours: the real
            jit_train_step with EMA and the non-finite guard) vs a PyTorch step of the same
            model (diffusers model, came-pytorch CAME, bf16 autocast, gradient
            checkpointing, EMA) at per-device batch 4 and 8: step ms, images/s, TFLOP/s and
            MFU (FLOPs from sana_jax.train.metrics.train_step_flops), peak memory.

  python benchmarks/gpu_suite.py                     # the GPU machine: everything, ~6 min
  python benchmarks/gpu_suite.py --only forward,train --policies full,dots
  python benchmarks/gpu_suite.py --tiny              # same code paths, tiny models, CPU

The device machine lacks diffusers (and ml-collections, grain): carry their wheels (see
docs/benchmarks.md). --tiny runs every code path on tiny geometries in one process in
seconds (tests/test_gpu_suite.py), so the script cannot rot where there is no GPU.
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
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # bf16 dense (REFERENCE.md 11)


# ------------------------------------------------------------------------------ geometry


def geometry(tiny: bool) -> dict:
  """Model configs and sizes: the released ones, or tiny ones with the same code paths."""
  from sana_jax.models import autoencoder as ae
  from sana_jax.models import text_encoder as te
  from sana_jax.models.dit_config import DiTConfig

  if not tiny:
    from sana_jax.configs import sana15_1600m

    dit_cfg = DiTConfig.coerce(sana15_1600m.get_config().model)
    return dict(
      dit=dit_cfg.replace(compute_dtype="bfloat16"),
      gemma=te.gemma2_2b(vocab_size=16384, param_dtype="bfloat16", dtype="bfloat16"),
      dcae=ae.dcae_f32c32_config(compute_dtype="bfloat16"),
      size=1024,
      steps=20,
      max_length=300,
      chi=True,
      runs=5,
      forward_batches=(1, 8),
      pipeline_batches=(1, 8),
      train_batches=(4, 8),
      train_steps=5,
    )
  dit_cfg = DiTConfig(
    hidden_size=64,
    depth=2,
    self_head_dim=16,
    cross_heads=2,
    cross_head_dim=16,
    caption_channels=48,
    caption_len=24,
    sample_size=8,
    qk_norm=True,
    cross_norm=True,
    compute_dtype="bfloat16",
  )
  vit = ("ResBlock", "ResBlock", "EfficientViTBlock")
  dcae = ae.dcae_f32c32_config(
    attention_head_dim=8,
    encoder_block_types=vit,
    decoder_block_types=vit,
    encoder_block_out_channels=(8, 16, 32),
    decoder_block_out_channels=(8, 16, 32),
    encoder_layers_per_block=(1, 1, 1),
    decoder_layers_per_block=(1, 1, 1),
    encoder_qkv_multiscales=((), (), (5,)),
    decoder_qkv_multiscales=((), (), (5,)),
    compute_dtype="bfloat16",
  )
  return dict(
    dit=dit_cfg,
    gemma=None,
    dcae=dcae,
    size=32,
    steps=2,
    max_length=24,
    chi=False,
    runs=1,
    forward_batches=(2,),
    pipeline_batches=(2,),
    train_batches=(2,),
    train_steps=1,
  )


def _latent(g) -> int:
  return g["size"] // g["dcae"].spatial_compression_ratio


def _tokenizer_and_gemma(g, folder: str):
  """A word-level tokenizer over the CHI + prompt words, and the Gemma-2 geometry over it."""
  from sana_jax.bundle_from_diffusers import DIFFUSERS_CHI
  from sana_jax.data.tokenizer import build_word_level_tokenizer, words_of
  from sana_jax.models import text_encoder as te
  from sana_jax.models.prompts import load_tokenizer

  words = words_of(list(DIFFUSERS_CHI) + [PROMPT.lower()])
  build_word_level_tokenizer(words, folder)
  tok = load_tokenizer(folder)
  gemma = g["gemma"] or te.gemma2_tiny(
    len(words) + 8, hidden_size=g["dit"].caption_channels, dtype="bfloat16", param_dtype="bfloat16"
  )
  return tok, gemma


# ---------------------------------------------------------------------------- measuring


def _median_ms(fn, runs: int, sync) -> tuple[float, float]:
  """(first-call seconds, median ms of `runs` further calls); sync() waits for the device."""
  t = time.perf_counter()
  sync(fn())
  first = time.perf_counter() - t
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    sync(fn())
    times.append(1e3 * (time.perf_counter() - t))
  return first, statistics.median(times)


def _jax_peak_gb():
  import jax

  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 1e9


def _torch_device():
  import torch

  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _torch_peak_gb():
  import torch

  return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None


def _jax_sync(x):
  import jax

  return jax.block_until_ready(x)


def _torch_sync(x):
  import torch

  if torch.cuda.is_available():
    torch.cuda.synchronize()
  return x


def _diffusers_dit(cfg, device, dtype):
  import torch
  from diffusers import SanaTransformer2DModel
  from sana_jax.weights import dit as dit_weights

  config = dit_weights.to_diffusers_config(cfg.diffusers_compatible())
  config.pop("_class_name")
  torch.manual_seed(0)
  with torch.device(device):
    return SanaTransformer2DModel(**config).to(dtype)


def _random_tree(shapes, seed: int):
  """N(0, 0.02) arrays shaped like `shapes` (ShapeDtypeStructs): small leaves from numpy
  (no compile per leaf shape), big ones on the device (bench_pipeline's layer-wise fill)."""
  import jax
  import numpy as np
  from benchmarks.bench_pipeline import _random_tree as device_random_tree

  rng = np.random.default_rng(seed)
  leaves, tree = jax.tree.flatten(shapes)
  out = [
    device_random_tree(s, seed + i)
    if s.size > 2**22
    else jax.numpy.asarray((0.02 * rng.standard_normal(s.shape)).astype(np.float32), s.dtype)
    for i, s in enumerate(leaves)
  ]
  return jax.tree.unflatten(tree, out)


def _random_dit_params(cfg, dtype: str):
  import jax
  from sana_jax.models import dit

  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), dit.abstract_params(cfg))
  return _random_tree(shapes, 1)


def _forward_inputs(g, batch: int):
  import numpy as np

  rng = np.random.default_rng(0)
  h = _latent(g)
  m = g["dit"]
  return (
    rng.standard_normal((batch, h, h, m.in_channels)).astype(np.float32),
    np.full((batch,), 500.0, np.float32),
    rng.standard_normal((batch, m.caption_len, m.caption_channels)).astype(np.float32),
    np.ones((batch, m.caption_len), np.int32),
  )


# ------------------------------------------------------------------------------- workers


def forward_ours(g, args) -> list[dict]:
  import jax
  import jax.numpy as jnp
  from sana_jax.models import dit

  cfg = g["dit"]
  params = _random_dit_params(cfg, "bfloat16")
  model = dit.SanaDiT(cfg)
  fwd = jax.jit(lambda p, x, t, y, m: model.apply({"params": p}, x, t, y, m))
  rows = []
  for b in g["forward_batches"]:
    x, t, y, m = (jnp.asarray(a) for a in _forward_inputs(g, b))
    y = y.astype(jnp.bfloat16)
    first, ms = _median_ms(lambda: fwd(params, x, t, y, m), g["runs"], _jax_sync)
    rows.append(
      dict(
        part="forward",
        case=f"batch {b}",
        framework="sana_jax",
        ms=ms,
        first_s=first,
        peak_gb=_jax_peak_gb(),
      )
    )
  return rows


def forward_torch(g, args) -> list[dict]:
  import torch

  dev = _torch_device()
  model = _diffusers_dit(g["dit"], dev, torch.bfloat16).eval()
  variants = [("diffusers", model)]
  if args.torch_compile:
    variants.append(("diffusers+compile", torch.compile(model)))
  rows = []
  for name, net in variants:
    for b in g["forward_batches"]:
      x, t, y, m = (torch.from_numpy(a).to(dev) for a in _forward_inputs(g, b))
      x = x.permute(0, 3, 1, 2).contiguous().to(torch.bfloat16)
      y = y.to(torch.bfloat16)

      def run():
        with torch.inference_mode():
          return net(
            hidden_states=x,
            encoder_hidden_states=y,
            timestep=t,
            encoder_attention_mask=m,
            return_dict=False,
          )[0]

      first, ms = _median_ms(run, g["runs"], _torch_sync)
      rows.append(
        dict(
          part="forward",
          case=f"batch {b}",
          framework=name,
          ms=ms,
          first_s=first,
          peak_gb=_torch_peak_gb(),
        )
      )
  return rows


def pipeline_ours(g, args) -> list[dict]:
  import jax
  import numpy as np
  from sana_jax import bundle as bundle_lib
  from sana_jax.bundle_from_diffusers import DIFFUSERS_CHI
  from sana_jax.models import autoencoder as ae
  from sana_jax.models import text_encoder as te
  from sana_jax.models.prompts import PromptConfig, PromptEncoder
  from sana_jax.pipeline import SamplingOptions, SanaPipeline

  tok, gcfg = _tokenizer_and_gemma(g, tempfile.mkdtemp(prefix="gpu_suite_tok_"))
  dummy = jax.numpy.zeros((1, 8), jax.numpy.int32)
  gparams = _random_tree(
    te.nn.meta.unbox(
      jax.eval_shape(te.Gemma2Encoder(gcfg).init, jax.random.key(0), dummy, dummy)["params"]
    ),
    0,
  )
  dparams = _random_dit_params(g["dit"], "bfloat16")
  vcfg = g["dcae"]
  vshapes = jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s.shape, "bfloat16"),
    jax.eval_shape(lambda: ae.init_params(vcfg, 2)),
  )
  vparams = _random_tree(vshapes, 2)
  encoder = PromptEncoder.from_params(
    tok,
    gcfg,
    gparams,
    PromptConfig(
      max_length=g["max_length"], chi=DIFFUSERS_CHI if g["chi"] else None, lowercase=True
    ),
  )
  settings = {
    "format": bundle_lib.FORMAT,
    "image_size": g["size"],
    "flow_shift": 3.0,
    "sampler": {
      "name": "dpm_solver",
      "steps": g["steps"],
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
    lambda x: np.asarray(ae.encode(vcfg, vparams, x)),
    lambda z: np.asarray(ae.decode(vcfg, vparams, z)),
  )
  pipe = SanaPipeline(
    bundle_lib.Bundle(None, settings, g["dit"], dparams, None, encoder, autoencoder)
  )
  opts = SamplingOptions(height=g["size"], width=g["size"], steps=g["steps"], guidance_scale=4.5)
  rows = []
  for b in g["pipeline_batches"]:
    run = lambda b=b: pipe.generate([PROMPT] * b, list(range(b)), opts, output="float")  # noqa: E731
    first, ms = _median_ms(run, max(1, g["runs"] // 2), lambda x: x)
    rows.append(
      dict(
        part="pipeline",
        case=f"batch {b}",
        framework="sana_jax",
        ms=ms,
        first_s=first,
        images_per_s=b / (ms / 1e3),
        peak_gb=_jax_peak_gb(),
        finite=bool(np.isfinite(run()).all()),
      )
    )
  return rows


def pipeline_torch(g, args) -> list[dict]:
  import numpy as np
  import torch
  import diffusers
  from transformers import Gemma2Config, Gemma2Model
  from sana_jax.bundle_from_diffusers import DIFFUSERS_CHI

  dev = _torch_device()
  tok, gcfg = _tokenizer_and_gemma(g, tempfile.mkdtemp(prefix="gpu_suite_tok_"))
  hc = Gemma2Config(
    vocab_size=gcfg.vocab_size,
    hidden_size=gcfg.hidden_size,
    intermediate_size=gcfg.intermediate_size,
    num_hidden_layers=gcfg.num_layers,
    num_attention_heads=gcfg.num_heads,
    num_key_value_heads=gcfg.num_kv_heads,
    head_dim=gcfg.head_dim,
    sliding_window=gcfg.sliding_window,
    query_pre_attn_scalar=gcfg.query_pre_attn_scalar,
    attn_logit_softcapping=50.0,
  )
  hc._attn_implementation = "eager"  # sdpa rejects the softcap
  with torch.device(dev):
    text_encoder = Gemma2Model(hc).to(torch.bfloat16).eval()
    vae = diffusers.AutoencoderDC(**g["dcae"].to_diffusers()).to(torch.bfloat16).eval()
  transformer = _diffusers_dit(g["dit"], dev, torch.bfloat16).eval()
  scheduler = diffusers.DPMSolverMultistepScheduler(
    use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"
  )
  pipe = diffusers.SanaPipeline(
    tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
  )
  pipe.set_progress_bar_config(disable=True)
  rows = []
  for b in g["pipeline_batches"]:

    def run(b=b):
      return pipe(
        [PROMPT] * b,
        negative_prompt="",
        num_inference_steps=g["steps"],
        guidance_scale=4.5,
        height=g["size"],
        width=g["size"],
        use_resolution_binning=False,
        output_type="np",
        complex_human_instruction=list(DIFFUSERS_CHI) if g["chi"] else None,
        max_sequence_length=g["max_length"],
        generator=torch.Generator(dev).manual_seed(0),
      ).images

    first, ms = _median_ms(run, max(1, g["runs"] // 2), _torch_sync)
    rows.append(
      dict(
        part="pipeline",
        case=f"batch {b}",
        framework="diffusers",
        ms=ms,
        first_s=first,
        images_per_s=b / (ms / 1e3),
        peak_gb=_torch_peak_gb(),
        finite=bool(np.isfinite(run()).all()),
      )
    )
  return rows


def _train_flops(g, batch: int, remat: bool) -> float:
  from sana_jax.train import metrics

  h = _latent(g)
  return metrics.train_step_flops(g["dit"], h, h, g["dit"].caption_len, batch, remat)


def train_ours(g, args) -> list[dict]:
  import jax
  import ml_collections
  import numpy as np
  from sana_jax.configs import common
  from sana_jax import parallel
  from sana_jax.train import optimizer as optim_lib
  from sana_jax.train import state as state_lib
  from sana_jax.train import step as step_lib

  rows = []
  h = _latent(g)
  m = g["dit"]
  devices = jax.local_devices()[:1]
  for policy in args.policies.split(","):
    for b in g["train_batches"]:
      config = ml_collections.ConfigDict()
      config.model = ml_collections.ConfigDict(m.replace(remat_policy=policy).to_dict())
      config.flow_shift = 3.0
      config.train = common.train_config(global_batch=b, optimizer="came_8bit", lr=2e-5)
      mesh = parallel.make_mesh(1, 1, 1, devices=devices)
      tx = optim_lib.make_optimizer(config.train)
      row = dict(part="train", case=f"batch {b}, remat {policy}", framework="sana_jax")
      try:
        shardings = state_lib.state_shardings(config.model, tx, mesh)
        state = step_lib.init_state(config, tx, mesh, shardings)
        step_fn = step_lib.jit_train_step(config, tx, mesh, shardings)
        rng = np.random.default_rng(0)
        batch = {
          "latent": rng.standard_normal((b, h, h, m.in_channels)).astype(np.float32),
          "caption": rng.standard_normal((b, m.caption_len, m.caption_channels)).astype(np.float32),
          "caption_mask": np.ones((b, m.caption_len), np.int32),
        }
        batch = {k: jax.device_put(v, step_fn.batch_shardings[k]) for k, v in batch.items()}
        null = jax.device_put(np.zeros((m.caption_len, m.caption_channels), np.float32))
        holder = {"state": state}

        def run():
          holder["state"], metrics = step_fn(holder["state"], batch, null)
          return metrics["loss"]

        first, ms = _median_ms(run, g["train_steps"], _jax_sync)
        row.update(
          ms=ms, first_s=first, peak_gb=_jax_peak_gb(), flops=_train_flops(g, b, policy != "none")
        )
        holder = state = None  # free the state before the next case compiles
      except Exception as e:  # noqa: BLE001 - an out-of-memory case is a result, not a crash
        row.update(error=f"{type(e).__name__}: {str(e)[:120]}")
      rows.append(row)
  return rows


def train_torch(g, args) -> list[dict]:
  import numpy as np
  import torch
  from came_pytorch import CAME

  dev = _torch_device()
  h = _latent(g)
  m = g["dit"]
  rows = []
  for b in g["train_batches"]:
    row = dict(part="train", case=f"batch {b}, grad ckpt", framework="torch+came-pytorch")
    try:
      model = _diffusers_dit(m, dev, torch.float32).train()
      model.enable_gradient_checkpointing()
      ema = [p.detach().clone() for p in model.parameters()]
      opt = CAME(
        model.parameters(),
        lr=2e-5,
        weight_decay=0.0,
        betas=(0.9, 0.999, 0.9999),
        eps=(1e-30, 1e-16),
      )
      rng = np.random.default_rng(0)
      x0 = torch.from_numpy(rng.standard_normal((b, m.in_channels, h, h)).astype(np.float32)).to(
        dev
      )
      y = torch.from_numpy(
        rng.standard_normal((b, m.caption_len, m.caption_channels)).astype(np.float32)
      ).to(dev)
      mask = torch.ones((b, m.caption_len), device=dev)
      gen = torch.Generator(dev).manual_seed(0)

      def run():
        sigma = torch.sigmoid(torch.randn((b,), generator=gen, device=dev))
        sigma = 3.0 * sigma / (1 + 2.0 * sigma)  # flow shift 3
        noise = torch.randn(x0.shape, generator=gen, device=dev)
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        with torch.autocast(dev.type, dtype=torch.bfloat16):
          pred = model(
            hidden_states=x_t,
            encoder_hidden_states=y,
            timestep=torch.floor(1000 * sigma),
            encoder_attention_mask=mask,
            return_dict=False,
          )[0]
        loss = torch.nn.functional.mse_loss(pred.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        with torch.no_grad():
          torch._foreach_lerp_(ema, list(model.parameters()), 1 - 0.9999)
        return loss

      first, ms = _median_ms(run, g["train_steps"], _torch_sync)
      row.update(ms=ms, first_s=first, peak_gb=_torch_peak_gb(), flops=_train_flops(g, b, True))
      model = opt = ema = None  # free before the next batch builds its model
    except Exception as e:  # noqa: BLE001
      row.update(error=f"{type(e).__name__}: {str(e)[:120]}")
    if torch.cuda.is_available():
      torch.cuda.empty_cache()
      torch.cuda.reset_peak_memory_stats()
    rows.append(row)
  return rows


WORKERS = {
  "forward:ours": forward_ours,
  "forward:torch": forward_torch,
  "pipeline:ours": pipeline_ours,
  "pipeline:torch": pipeline_torch,
  "train:ours": train_ours,
  "train:torch": train_torch,
}


# -------------------------------------------------------------------------------- driver


def _device_name() -> str:
  try:
    out = subprocess.run(
      ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
      capture_output=True,
      text=True,
      timeout=20,
    )
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 else "cpu"
  except (OSError, IndexError, subprocess.TimeoutExpired):
    return "cpu"


def _peak_tflops(device: str, override: float) -> float | None:
  if override:
    return override
  return next((v for k, v in PEAK_TFLOPS.items() if k in device), None)


def _spawn(worker: str, args) -> list[dict]:
  cmd = [
    sys.executable,
    os.path.abspath(__file__),
    "--worker",
    worker,
    "--policies",
    args.policies,
  ] + (["--torch_compile"] if args.torch_compile else [])
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  t = time.perf_counter()
  try:
    proc = subprocess.run(
      cmd, stdout=subprocess.PIPE, text=True, env=env, timeout=args.worker_timeout
    )
  except subprocess.TimeoutExpired:
    return [
      dict(
        part=worker.split(":")[0],
        case="-",
        framework=worker,
        error=f"timed out after {args.worker_timeout} s",
      )
    ]
  print(f"[{worker}] {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode or not lines:
    return [
      dict(
        part=worker.split(":")[0],
        case="-",
        framework=worker,
        error=f"worker exit {proc.returncode}",
      )
    ]
  return json.loads(lines[-1][len("RESULT ") :])


def _fmt(v, spec: str) -> str:
  """format(v, spec), or a right-aligned "-" of the same width when v is None."""
  return format(v, spec) if v is not None else "-".rjust(int(spec.split(".")[0] or 0))


def table(rows: list[dict], peak_tflops: float | None) -> str:
  """The printed table: one line per (part, case, framework), ratios ours / PyTorch."""
  ref = {}
  for r in rows:
    if r["framework"] != "sana_jax" and "ms" in r:
      ref.setdefault((r["part"], r["case"].split(",")[0]), r)
  out = [
    f"{'part':<9}{'case':<22}{'framework':<20}{'ms':>9}{'1st s':>7}{'img/s':>8}"
    f"{'TFLOP/s':>9}{'MFU':>6}{'peak GB':>8}{'ours/torch':>11}"
  ]
  for r in rows:
    if "error" in r:
      out.append(f"{r['part']:<9}{r['case']:<22}{r['framework']:<20}  {r['error']}")
      continue
    batch = int(r["case"].split()[1].rstrip(","))
    ips = r.get("images_per_s", batch / (r["ms"] / 1e3) if r["part"] == "train" else None)
    tflops = r["flops"] / (r["ms"] / 1e3) / 1e12 if "flops" in r else None
    mfu = tflops / peak_tflops if tflops is not None and peak_tflops else None
    other = ref.get((r["part"], r["case"].split(",")[0]))
    ratio = r["ms"] / other["ms"] if r["framework"] == "sana_jax" and other else None
    out.append(
      f"{r['part']:<9}{r['case']:<22}{r['framework']:<20}{r['ms']:9.1f}"
      f"{r['first_s']:7.1f}{_fmt(ips, '8.2f')}{_fmt(tflops, '9.1f')}"
      f"{_fmt(None if mfu is None else 100 * mfu, '5.0f')}{'%' if mfu is not None else ' '}"
      f"{_fmt(r.get('peak_gb'), '8.1f')}{_fmt(ratio, '10.2f')}{'x' if ratio is not None else ' '}"
    )
  return "\n".join(out)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument(
    "--tiny",
    action="store_true",
    help="tiny geometries, every worker in this process (CPU; default: off)",
  )
  ap.add_argument(
    "--only",
    default="forward,pipeline,train",
    help="comma-separated parts (default: forward,pipeline,train)",
  )
  ap.add_argument(
    "--policies",
    default="full",
    help="remat policies for our train step, comma-separated (default: full)",
  )
  ap.add_argument(
    "--torch_compile",
    action="store_true",
    help="also time a torch.compile'd diffusers forward (default: off)",
  )
  ap.add_argument(
    "--peak_tflops",
    type=float,
    default=0.0,
    help="device bf16 peak for MFU (default: by GPU name, REFERENCE.md 11)",
  )
  ap.add_argument(
    "--worker_timeout",
    type=int,
    default=240,
    help="seconds before a worker subprocess is stopped (default: 240)",
  )
  ap.add_argument("--json", default=None, help="also write the rows here (default: none)")
  ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  parts = [p for p in args.only.split(",") if p]
  bad = sorted(set(parts) - {"forward", "pipeline", "train"})
  if bad:
    print(
      f"error: --only {args.only}: unknown parts {bad}; allowed: forward, pipeline, train",
      file=sys.stderr,
    )
    return 2
  from sana_jax.models.dit_config import DiTConfig

  for p in args.policies.split(","):
    try:
      DiTConfig(remat_policy=p)
    except ValueError as e:
      print(f"error: --policies {args.policies}: {e}", file=sys.stderr)
      return 2
  if args.worker:
    rows = WORKERS[args.worker](geometry(False), args)
    print("RESULT " + json.dumps(rows), flush=True)
    return 0

  t0 = time.perf_counter()
  device = "cpu (tiny)" if args.tiny else _device_name()
  rows = []
  for part in parts:
    for fw in ("torch", "ours"):
      name = f"{part}:{fw}"
      if args.tiny:
        t = time.perf_counter()
        rows += WORKERS[name](geometry(True), args)
        print(f"[{name}] {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
      else:
        rows += _spawn(name, args)
  import jax
  import torch

  g = geometry(args.tiny)
  print(
    f"sana_jax vs PyTorch on {device}: jax {jax.__version__}, torch {torch.__version__}; "
    f"DiT {g['dit'].depth} x {g['dit'].hidden_size}, {g['size']} px, random weights, "
    f"bf16; {time.strftime('%Y-%m-%d')}; {time.perf_counter() - t0:.0f} s in all"
  )
  print(table(rows, _peak_tflops(device, args.peak_tflops)))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
