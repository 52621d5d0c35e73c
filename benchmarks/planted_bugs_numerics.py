"""Plant plausible bugs in the numerics and optimizer modules, one at a time, and see which
tests catch them (issue 22). Not part of CI: it runs pytest once per bug.

Each bug is a one-line source patch (a wrong eps, beta, sign, a dropped term, an option
that is ignored) applied to a temporary copy of the working tree; the relevant test files
run there (`pytest -x`), and the bug counts as caught when a test fails. The copy keeps
the real tree untouched, so the script can run while others work in it.

    python benchmarks/planted_bugs_numerics.py            # all bugs
    python benchmarks/planted_bugs_numerics.py --list     # names only
    python benchmarks/planted_bugs_numerics.py --only came_b3_8bit,dit_norm_eps

Prints one row per bug (caught / MISSED, the first failing test, seconds) and
"N planted, N caught", then the missed ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EPS = "tests/test_eps_reference.py"
PARITY = "tests/test_dit_parity.py"
SWITCH = "tests/test_dit_switches.py"
CAME = "tests/test_came.py"
CAME8 = "tests/test_came_8bit.py"
GEMMA = "tests/test_text_encoder.py"
DIT = "sana_jax/models/dit.py"
DCFG = "sana_jax/models/dit_config.py"
OPT = "sana_jax/optim/came.py"
Q8 = "sana_jax/optim/quant8.py"
TE = "sana_jax/models/text_encoder.py"


@dataclasses.dataclass
class Bug:
  name: str
  what: str
  path: str
  old: str
  new: str
  tests: tuple  # pytest arguments (files, -k filters)


BUGS = [
  # --- DiT eps and numerics
  Bug(
    "dit_norm_eps",
    "block/final LayerNorm eps 1e-6 -> 1e-5",
    DCFG,
    "  norm_eps: float = 1e-6  ",
    "  norm_eps: float = 1e-5  ",
    (EPS,),
  ),
  Bug(
    "dit_qk_norm_eps",
    "self-attention q/k RMSNorm eps 1e-5 -> 1e-6",
    DCFG,
    "qk_norm_eps: float = 1e-5",
    "qk_norm_eps: float = 1e-6",
    (EPS,),
  ),
  Bug(
    "dit_cross_norm_eps_diffusers",
    "diffusers cross-norm eps 1e-5 -> 1e-6",
    DCFG,
    "cross_norm_eps=1e-5, cross_mask",
    "cross_norm_eps=1e-6, cross_mask",
    (EPS,),
  ),
  Bug(
    "dit_cross_norm_eps_official",
    "official cross-norm eps 1e-6 -> 1e-5",
    DCFG,
    "cross_norm_eps: float = 1e-6",
    "cross_norm_eps: float = 1e-5",
    (EPS,),
  ),
  Bug(
    "dit_linear_eps_plus",
    "linear-attention eps + 1e-2",
    DCFG,
    "linear_attn_eps: float = 1e-8",
    "linear_attn_eps: float = 1e-8 + 1e-2",
    (EPS,),
  ),
  Bug(
    "dit_linear_eps_diffusers",
    "diffusers linear-attention eps 1e-15 -> 1e-12",
    DCFG,
    "linear_attn_eps=1e-15",
    "linear_attn_eps=1e-12",
    (EPS,),
  ),
  Bug(
    "dit_caption_norm_eps",
    "caption RMSNorm eps 1e-5 -> 1e-6",
    DCFG,
    "caption_norm_eps: float = 1e-5",
    "caption_norm_eps: float = 1e-6",
    (EPS,),
  ),
  Bug(
    "dit_final_ln_hardcoded",
    "final LayerNorm ignores cfg.norm_eps (1e-5)",
    DIT,
    "x = modulate(layer_norm(x, cfg.norm_eps), shift, scale)",
    "x = modulate(layer_norm(x, 1e-5), shift, scale)",
    (EPS,),
  ),
  Bug(
    "dit_linear_eps_precedence",
    "eps added after the division",
    DIT,
    "return num / (den[..., None] + eps)",
    "return num / den[..., None] + eps",
    (EPS,),
  ),
  Bug(
    "dit_rms_no_weight",
    "RMSNorm drops its weight",
    DIT,
    "return (y * scale.astype(jnp.float32)).astype(x.dtype)",
    "return y.astype(x.dtype)",
    (PARITY, "-k", "matches_diffusers"),
  ),
  Bug(
    "dit_cross_scale",
    "cross-attention scale 1/head_dim instead of 1/sqrt",
    DIT,
    "preferred_element_type=jnp.float32) / math.sqrt(hd)",
    "preferred_element_type=jnp.float32) / hd",
    (PARITY, "-k", "matches_diffusers"),
  ),
  Bug(
    "dit_modulate_no_one",
    "modulate x * scale + shift (dropped 1 +)",
    DIT,
    "return x * (1 + scale) + shift",
    "return x * scale + shift",
    (PARITY, "-k", "matches_diffusers"),
  ),
  Bug(
    "dit_timestep_sin_first",
    "timestep features sin half first",
    DIT,
    "jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)",
    "jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)",
    (PARITY, "-k", "matches_diffusers"),
  ),
  Bug(
    "dit_floor_ignored",
    "floor_timestep ignored",
    DIT,
    "if cfg.floor_timestep:",
    "if False:",
    (PARITY,),
  ),
  Bug(
    "dit_fp16_clip_ignored",
    "fp16_attn_clip ignored",
    DIT,
    "if cfg.fp16_attn_clip:",
    "if False:",
    (SWITCH, "-k", "clip"),
  ),
  Bug(
    "dit_clip_bound",
    "fp16 clip at +-65500",
    DIT,
    "out = jnp.clip(out, -65504.0, 65504.0)",
    "out = jnp.clip(out, -65500.0, 65500.0)",
    (SWITCH, "-k", "clip"),
  ),
  Bug(
    "dit_depthwise_flipped",
    "shift depthwise conv flips the kernel (convolution)",
    DIT,
    'term = xp[:, i : i + h, j : j + w] * kernel[i, j].astype(x.dtype)',
    'term = xp[:, i : i + h, j : j + w] * kernel[2 - i, 2 - j].astype(x.dtype)',
    (SWITCH, "-k", "depthwise"),
  ),
  Bug(
    "dit_depthwise_conv_impl_ignored",
    "depthwise_impl='conv' ignored (shift runs)",
    DIT,
    'if impl == "conv":',
    'if False:',
    (SWITCH, "-k", "depthwise"),
  ),
  Bug(
    "dit_remat_ignored",
    "remat_policy ignored",
    DIT,
    'if cfg.remat_policy != "none":',
    "if False:",
    (SWITCH, "-k", "remat"),
  ),
  Bug(
    "dit_remat_wrong_policy",
    "'dots' maps to dots_with_no_batch_dims_saveable",
    DIT,
    '"dots": jax.checkpoint_policies.dots_saveable,',
    '"dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,',
    (SWITCH, "-k", "remat"),
  ),
  Bug(
    "dit_bf16_ignored",
    "compute_dtype ignored in the whole model (fp32 everywhere)",
    DCFG,
    '''  def __post_init__(self):
''',
    '''  def __post_init__(self):
    object.__setattr__(self, "compute_dtype", "float32")
''',
    (SWITCH, "-k", "bfloat16"),
  ),
  Bug(
    "dit_bf16_linear_attn",
    "linear attention accumulates in bf16",
    DIT,
    "q, k, v = (a.astype(jnp.float32) for a in (q, k, v))",
    "q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))",
    (SWITCH, "-k", "bfloat16"),
  ),
  Bug(
    "dit_zero_mask_none",
    "all-zero caption mask attends to nothing (old behaviour)",
    DIT,
    "keep = keep | ~jnp.any(keep, axis=-1, keepdims=True)",
    "pass",
    (SWITCH, "-k", "zero"),
  ),
  # --- CAME / CAME-8bit
  Bug(
    "came_b3_8bit",
    "came_8bit default b3 0.9999 -> 0.999",
    OPT,
    'def came_8bit(\n  learning_rate: optax.ScalarOrSchedule,\n  b1: float = 0.9,\n  b2: float = 0.999,\n  b3: float = 0.9999,',
    'def came_8bit(\n  learning_rate: optax.ScalarOrSchedule,\n  b1: float = 0.9,\n  b2: float = 0.999,\n  b3: float = 0.999,',
    (CAME8, "-k", "pytorch or numpy"),
  ),
  Bug(
    "came_b1",
    "scale_by_came default b1 0.9 -> 0.95",
    OPT,
    'def scale_by_came(\n  b1: float = 0.9,',
    'def scale_by_came(\n  b1: float = 0.95,',
    (CAME, "-k", "pytorch"),
  ),
  Bug(
    "came_b2",
    "came default b2 0.999 -> 0.99",
    OPT,
    'def came(\n  learning_rate: optax.ScalarOrSchedule,\n  b1: float = 0.9,\n  b2: float = 0.999,',
    'def came(\n  learning_rate: optax.ScalarOrSchedule,\n  b1: float = 0.9,\n  b2: float = 0.99,',
    (CAME, "-k", "pytorch"),
  ),
  Bug(
    "came_res_sign",
    "instability (U + m)^2 instead of (U - m)^2",
    OPT,
    'res = (g_d * r_d * c_d - m) ** 2',
    'res = (g_d * r_d * c_d + m) ** 2',
    (CAME, "-k", "pytorch"),
  ),
  Bug(
    "came_no_clip",
    "RMS clip of U dropped",
    OPT,
    "upd = upd / jnp.maximum(rms / clip_threshold, 1.0)",
    "pass",
    (CAME, "-k", "pytorch"),
  ),
  Bug(
    "came_no_row_norm",
    "rsqrt(r) instead of rsqrt(r / mean(r))",
    OPT,
    "r = jax.lax.rsqrt(row / jnp.mean(row, axis=rows, keepdims=True))",
    "r = jax.lax.rsqrt(row)",
    (CAME, "-k", "pytorch"),
  ),
  Bug(
    "came_eps2_dropped",
    "eps2 dropped from the instability",
    OPT,
    '(jnp.mean(res_a, axis=cols) + eps[1])\n  res_col = b3 * nu.res_col + (1.0 - b3) * (jnp.mean(res_b, axis=rows) + eps[1])',
    'jnp.mean(res_a, axis=cols)\n  res_col = b3 * nu.res_col + (1.0 - b3) * jnp.mean(res_b, axis=rows)',
    (CAME, "-k", "pytorch or zero"),
  ),
  Bug(
    "came_eps1_swapped",
    "eps1 -> eps2 (1e-16) added to g^2",
    OPT,
    "u = g * g + eps[0]",
    "u = g * g + eps[1]",
    (CAME, "-k", "pytorch or zero"),
  ),
  Bug(
    "came_wd_ignored",
    "came() ignores weight_decay",
    OPT,
    '    scale_by_came(b1, b2, b3, eps, clip_threshold, spec=spec),\n    optax.add_decayed_weights(weight_decay, weight_decay_mask),',
    '    scale_by_came(b1, b2, b3, eps, clip_threshold, spec=spec),\n    optax.add_decayed_weights(0.0, weight_decay_mask),',
    (CAME, "-k", "pytorch"),
  ),
  Bug(
    "came8_wd_ignored",
    "came_8bit() ignores weight_decay",
    OPT,
    '      meta_dtype=meta_dtype,\n    ),\n    optax.add_decayed_weights(weight_decay, weight_decay_mask),',
    '      meta_dtype=meta_dtype,\n    ),\n    optax.add_decayed_weights(0.0, weight_decay_mask),',
    (CAME8,),
  ),
  Bug(
    "came8_quant_unfactored_ignored",
    "quantize_unfactored ignored",
    OPT,
    "and (spec.factored or unfactored)",
    "and spec.factored",
    (CAME8, "-k", "quantized"),
  ),
  Bug(
    "came8_step_uses_quantized_m",
    "step uses the requantised m, not the fp32 m",
    OPT,
    '  res = (g_d * r_d * c_d - m) ** 2',
    '  m = quant8.dequantize(quant8.quantize(m, mu.tile, mu.minimum.dtype)) if quantized else m\n  res = (g_d * r_d * c_d - m) ** 2',
    (CAME8,),
  ),
  Bug(
    "came8_min_size_ge",
    "8-bit threshold > 16384 -> > 1024",
    OPT,
    'and math.prod(shape[spec.batch_ndim :]) > min_8bit_size',
    'and math.prod(shape[spec.batch_ndim :]) > min_8bit_size // 16',
    (CAME8, "-k", "quantized or numpy"),
  ),
  Bug(
    "came_stacked_warning_dropped",
    "spec=None on stacked trees is silent again",
    OPT,
    '''    if spec is None:
      _warn_if_stacked(''',
    '''    if False:
      _warn_if_stacked(''',
    (CAME8, "-k", "stacked or 1600m"),
  ),
  Bug(
    "quant8_levels_256",
    "codec scale (max - min) / 256",
    Q8,
    "_LEVELS = 255.0",
    "_LEVELS = 256.0",
    (CAME8,),
  ),
  Bug(
    "quant8_floor",
    "codec floor instead of round",
    Q8,
    "q = jnp.clip(jnp.round(code), 0, _LEVELS)",
    "q = jnp.clip(jnp.floor(code), 0, _LEVELS)",
    (CAME8,),
  ),
  # --- Gemma-2 text encoder
  Bug(
    "gemma_embed_scale",
    "embedding scale sqrt(hidden) x 1.02",
    TE,
    "jnp.asarray(math.sqrt(c.hidden_size), dtype=dt)",
    "jnp.asarray(1.02 * math.sqrt(c.hidden_size), dtype=dt)",
    (GEMMA, "-k", "parity"),
  ),
  Bug(
    "gemma_rms_eps_hardcoded",
    "Gemma RMSNorm eps hard-coded 1e-6 (config says 1e-5)",
    TE,
    "y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)",
    "y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + 1e-6)",
    (GEMMA, "-k", "parity or eps"),
  ),
  Bug(
    "gemma_rms_no_one",
    "Gemma RMSNorm x * w instead of x * (1 + w)",
    TE,
    "return (y * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)",
    "return (y * weight.astype(jnp.float32)).astype(x.dtype)",
    (GEMMA, "-k", "parity"),
  ),
  Bug(
    "gemma_softcap_ignored",
    "attention logit softcap ignored",
    TE,
    "if c.attn_logit_softcapping:",
    "if False:",
    (GEMMA, "-k", "parity"),
  ),
  Bug(
    "gemma_attn_scale_head_dim",
    "attention scale head_dim^-0.5",
    TE,
    "logits = logits * (float(c.query_pre_attn_scalar) ** -0.5)",
    "logits = logits * (float(c.head_dim) ** -0.5)",
    (GEMMA, "-k", "parity"),
  ),
  Bug(
    "gemma_rope_theta_ignored",
    "rope_theta ignored (10000)",
    TE,
    "cos, sin = rope_tables(input_ids.shape[1], c.head_dim, c.rope_theta)",
    "cos, sin = rope_tables(input_ids.shape[1], c.head_dim, 10000.0)",
    (GEMMA, "-k", "parity"),
  ),
  Bug(
    "gemma_bf16_ignored",
    "Gemma dtype='bfloat16' ignored for the MLP",
    TE,
    '    dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)\n    gate = _dense',
    '    dt, pdt = jnp.float32, jnp.dtype(c.param_dtype)\n    gate = _dense',
    (GEMMA, "-k", "bfloat16"),
  ),
]


def _copy_tree(dst):
  files = subprocess.run(
    ["git", "ls-files", "-co", "--exclude-standard"],
    cwd=ROOT,
    check=True,
    capture_output=True,
    text=True,
  ).stdout.split("\n")
  for f in files:
    if not f or not os.path.isfile(os.path.join(ROOT, f)):
      continue
    os.makedirs(os.path.dirname(os.path.join(dst, f)) or dst, exist_ok=True)
    shutil.copy2(os.path.join(ROOT, f), os.path.join(dst, f))


def _patch(tree, bug):
  path = os.path.join(tree, bug.path)
  src = open(path).read()
  if src.count(bug.old) != 1:
    raise RuntimeError(
      f"{bug.name}: the text to patch occurs {src.count(bug.old)} times "
      f"in {bug.path} (the source moved on; update the bug)"
    )
  out = src.replace(bug.old, bug.new)
  open(path, "w").write(out)
  return path, src


def _run(tree, bug, timeout):
  env = dict(os.environ, PYTHONPATH=tree, PYTHONDONTWRITEBYTECODE="1")
  cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *bug.tests]
  t0 = time.time()
  try:
    p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return "timeout", "", time.time() - t0
  out = p.stdout + p.stderr
  failed = re.findall(r"^FAILED (\S+)", out, re.M)
  if p.returncode == 0:
    return "MISSED", "", time.time() - t0
  if p.returncode == 1:
    return "caught", failed[0] if failed else "?", time.time() - t0
  return (
    "error",
    out.strip().splitlines()[-1] if out.strip() else f"rc {p.returncode}",
    time.time() - t0,
  )


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--only", default="", help="comma-separated bug names (default: all)")
  ap.add_argument("--list", action="store_true", help="list the bugs and exit (default: off)")
  ap.add_argument(
    "--timeout", type=int, default=900, help="seconds per bug's test run (default: 900)"
  )
  args = ap.parse_args(argv)
  bugs = BUGS
  if args.only:
    names = set(args.only.split(","))
    unknown = names - {b.name for b in BUGS}
    if unknown:
      print(f"error: --only: unknown bugs {sorted(unknown)}; --list shows them", file=sys.stderr)
      return 2
    bugs = [b for b in BUGS if b.name in names]
  if args.list:
    for b in bugs:
      print(f"{b.name:34s} {b.path:32s} {b.what}")
    return 0
  results = []
  with tempfile.TemporaryDirectory(prefix="planted_") as tree:
    _copy_tree(tree)
    for b in bugs:
      path, original = _patch(tree, b)
      try:
        status, test, secs = _run(tree, b, args.timeout)
      finally:
        open(path, "w").write(original)
      results.append((b, status, test, secs))
      print(
        f"{status:7s} {b.name:34s} {secs:6.0f} s  {b.what}" + (f"  <- {test}" if test else ""),
        flush=True,
      )
  caught = sum(s == "caught" for _, s, _, _ in results)
  print(f"\n{len(results)} planted, {caught} caught")
  for b, s, t, _ in results:
    if s != "caught":
      print(f"  {s}: {b.name} ({b.what}) [{' '.join(b.tests)}] {t}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
