"""Plant plausible bugs in the training modules one at a time; check that a test catches each.

Not part of CI (it runs the training tests once per planted bug: about 30-60 minutes on a
2-core CPU). It never touches the checkout: the committed tree (`git archive HEAD`) is
unpacked into a temporary folder, each bug is planted there, the relevant tests run with
`python -m pytest -x` in that folder (which imports its own `sana_jax`), and the file is
restored. A bug counts as caught when a test fails (pytest exit status 1); a plant whose
text is not found exactly once, or whose tests cannot run, is reported as an error.

    python benchmarks/planted_bugs_training.py            # every plant
    python benchmarks/planted_bugs_training.py --list
    python benchmarks/planted_bugs_training.py --only ema_decay_swapped grad_clip_ignored

Prints one line per plant (caught by which test, or MISSED) and "N planted, N caught".
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

FLOW = "tests/test_flow.py"
STEP_TIMES = "tests/test_flow.py::test_train_step_timesteps_follow_the_scheme"
OPT = "tests/test_train_options.py"
EMA = f"{OPT}::test_ema_is_the_recurrence_over_the_step_parameters"
SKIP = f"{OPT}::test_nonfinite_batch_is_skipped_and_counted"
SKIP_GRAD = f"{OPT}::test_finite_loss_with_nonfinite_gradient_is_skipped"
ACCUM = f"{OPT}::test_grad_accum_gives_the_one_batch_gradient"
STOP = f"{OPT}::test_consecutive_nonfinite_steps_stop_the_run"
LR = f"{OPT}::test_learning_rate_warmup_and_sqrt_scaling"
CLIP = f"{OPT}::test_grad_clip_clips_the_global_norm"
OPTIMIZERS = f"{OPT}::test_each_optimizer_matches_its_reference"
CAME_CLIP = f"{OPT}::test_came_takes_the_clip_as_a_factor"
FWD_FLOPS = f"{OPT}::test_forward_flops_equal_the_counted_matmuls"
STEP_FLOPS = f"{OPT}::test_train_step_flops_equal_the_counted_matmuls"
MFU = f"{OPT}::test_mfu"
SCHEDULES = [
  "tests/test_samplers.py::test_schedules_bitwise_equal_diffusers",
  "tests/test_samplers.py::test_dpm_model_times_are_floored",
  "tests/test_samplers.py::test_sampler_parity_with_sana_pipeline",
]
# What a developer runs after touching the step: the fast step tests first.
STEP_TESTS = [STEP_TIMES, SKIP_GRAD, EMA, SKIP, ACCUM, STOP]
OPTIMIZER_TESTS = [LR, CLIP, OPTIMIZERS]
FLOP_TESTS = [FWD_FLOPS, STEP_FLOPS, MFU]

STEP = "sana_jax/train/step.py"
UPDATE = "sana_jax/train/update.py"
FLOWPY = "sana_jax/diffusion/flow.py"
SCHED = "sana_jax/diffusion/schedules.py"
OPTPY = "sana_jax/train/optimizer.py"
CAMEPY = "sana_jax/optim/came.py"
METRICS = "sana_jax/train/metrics.py"


@dataclasses.dataclass(frozen=True)
class Plant:
  name: str
  path: str
  old: str
  new: str
  tests: tuple
  what: str


def _p(name, path, old, new, tests, what):
  return Plant(name, path, old, new, tuple([tests] if isinstance(tests, str) else tests), what)


PLANTS = [
  # ---------------------------------------------------------------- train/step.py
  _p(
    "timestep_draws_always_normal",
    STEP,
    "draws = flow.timestep_draws(k_t, (b,), tc.timestep_sampler)",
    "draws = jax.random.normal(k_t, (b,), jnp.float32)",
    STEP_TESTS,
    "the issue's bug: normals for every scheme",
  ),
  _p(
    "timestep_scheme_ignored",
    STEP,
    "draws = flow.timestep_draws(k_t, (b,), tc.timestep_sampler)",
    "draws = flow.timestep_draws(k_t, (b,), 'logit_normal')",
    STEP_TESTS,
    "train.timestep_sampler ignored for the draws",
  ),
  _p(
    "rng_not_folded_with_step",
    STEP,
    "key = jax.random.fold_in(jax.random.key(tc.seed), state.step)",
    "key = jax.random.key(tc.seed)",
    STEP_TESTS,
    "the same noise and timesteps at every step",
  ),
  _p(
    "cfg_dropout_ignored",
    STEP,
    'batch["caption"], null_caption, tc.cfg_dropout)',
    'batch["caption"], null_caption, 0.0)',
    STEP_TESTS,
    "no CFG dropout",
  ),
  _p(
    "ema_decay_swapped",
    UPDATE,
    'lambda e, p: decay * e + (1 - decay) * p',
    'lambda e, p: (1 - decay) * e + decay * p',
    STEP_TESTS,
    "EMA weights swapped",
  ),
  _p(
    "ema_of_old_params",
    UPDATE,
    'decay * e + (1 - decay) * p, ema_params, params)',
    'decay * e + (1 - decay) * p, ema_params, state.params)',
    STEP_TESTS,
    "EMA updated with the parameters before the step",
  ),
  _p(
    "ema_not_updated",
    UPDATE,
    '    return params, opt_state, ema\n',
    '    return params, opt_state, ema_params\n',
    STEP_TESTS,
    "EMA frozen at the initial parameters",
  ),
  _p(
    "grad_accum_summed",
    STEP,
    "loss, grads = jax.tree_util.tree_map(lambda a: a / k, (loss, grads))",
    "loss = loss / k",
    STEP_TESTS,
    "micro-batch gradients summed, not averaged",
  ),
  _p(
    "grad_accum_last_microbatch",
    STEP,
    "return jax.tree_util.tree_map(jnp.add, acc, (l, g)), None",
    "return jax.tree_util.tree_map(lambda a, b: k * b, acc, (l, g)), None",
    STEP_TESTS,
    "only the last micro-batch's gradient kept",
  ),
  _p(
    "skip_keeps_new_opt_state",
    UPDATE,
    '  def keep(params, opt_state, ema_params):\n    return params, opt_state, ema_params',
    '  def keep(params, opt_state, ema_params):\n    return params, update(params, opt_state, ema_params)[1], ema_params',
    STEP_TESTS,
    "a non-finite step still writes the optimizer state",
  ),
  _p(
    "skip_keeps_new_params",
    UPDATE,
    '  def keep(params, opt_state, ema_params):\n    return params, opt_state, ema_params',
    '  def keep(params, opt_state, ema_params):\n    return update(params, opt_state, ema_params)[0], opt_state, ema_params',
    STEP_TESTS,
    "a non-finite step still writes the parameters",
  ),
  _p(
    "skip_checks_loss_only",
    UPDATE,
    'finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)',
    'finite = jnp.isfinite(loss)',
    STEP_TESTS,
    "a finite loss with a non-finite gradient is applied",
  ),
  _p(
    "nonfinite_run_never_resets",
    UPDATE,
    'nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),',
    'nonfinite_run=state.nonfinite_run + (~finite).astype(jnp.int32),',
    STEP_TESTS,
    "consecutive count never reset by a good step",
  ),
  _p(
    "nonfinite_run_not_counted",
    UPDATE,
    'nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),',
    'nonfinite_run=jnp.where(finite, 0, state.nonfinite_run),',
    STEP_TESTS,
    "NonFiniteError can never fire",
  ),
  # ---------------------------------------------------------------- diffusion/flow.py
  _p(
    "target_sign",
    FLOWPY,
    "  return noise - x0\n",
    "  return x0 - noise\n",
    FLOW,
    "velocity target x0 - eps",
  ),
  _p(
    "noise_sign",
    FLOWPY,
    "  return a * x0 + s * noise\n",
    "  return a * x0 - s * noise\n",
    FLOW,
    "x_t = alpha x0 - sigma eps",
  ),
  _p(
    "model_time_not_floored",
    FLOWPY,
    "  model_time = np.floor(s * num_train_timesteps)",
    "  model_time = s * num_train_timesteps",
    FLOW,
    "model time not floored",
  ),
  _p(
    "exact_grid",
    FLOWPY,
    'return 1.0 - np.linspace(1.0, 1.0 / num_train_timesteps, num_train_timesteps, dtype=np.float64)',
    'return np.arange(num_train_timesteps, dtype=np.float64) / num_train_timesteps',
    FLOW,
    "i/1000 grid instead of the official linspace",
  ),
  _p(
    "logit_mean_std_swapped",
    FLOWPY,
    "jax.nn.sigmoid(n * jnp.float32(std) + jnp.float32(mean))",
    "jax.nn.sigmoid(n * jnp.float32(mean) + jnp.float32(std))",
    FLOW,
    "logit-normal mean and std swapped",
  ),
  _p(
    "mode_sign",
    FLOWPY,
    "return 1 - v - mode_scale * (",
    "return 1 - v + mode_scale * (",
    FLOW,
    "mode density with the wrong sign",
  ),
  _p(
    "mode_scale_ignored",
    FLOWPY,
    "u = u_mode(draws, mode_scale)",
    "u = u_mode(draws)",
    FLOW,
    "mode_scale ignored",
  ),
  _p(
    "uniform_draws_for_logit_normal",
    FLOWPY,
    '  if scheme == "logit_normal":\n    return jax.random.normal(rng, shape, jnp.float32)',
    '  if scheme == "logit_normal":\n    return jax.random.uniform(rng, shape, jnp.float32)',
    FLOW,
    "the draw helper itself wrong for logit_normal",
  ),
  _p(
    "cfg_drop_inverted",
    FLOWPY,
    "jnp.where((u < prob)[:, None, None], null, caption)",
    "jnp.where((u > prob)[:, None, None], null, caption)",
    FLOW,
    "90% of captions dropped",
  ),
  _p(
    "loss_batch_sum",
    FLOWPY,
    "  return per if per_example else jnp.mean(per)",
    "  return per if per_example else jnp.sum(per)",
    FLOW,
    "loss summed over the batch",
  ),
  _p(
    "index_rounded",
    FLOWPY,
    "i = jnp.floor(u * jnp.float32(num_train_timesteps)).astype(jnp.int32)",
    "i = jnp.round(u * jnp.float32(num_train_timesteps)).astype(jnp.int32)",
    FLOW,
    "index rounded instead of floored",
  ),
  # ---------------------------------------------------------------- diffusion/schedules.py
  _p(
    "shift_formula",
    SCHED,
    "  return shift * s / (1 + (shift - 1) * s)",
    "  return shift * s / (1 + shift * s)",
    [FLOW] + SCHEDULES,
    "flow shift denominator",
  ),
  _p(
    "dpm_model_time_rounded",
    SCHED,
    "model_times = (sigmas * num_train_timesteps).astype(np.int64).astype(np.float32)",
    "model_times = np.round(sigmas * num_train_timesteps).astype(np.float32)",
    SCHEDULES,
    "DPM model time rounded, not truncated",
  ),
  _p(
    "euler_single_shift",
    SCHED,
    "  sigmas = (shift * sigmas / (1 + (shift - 1) * sigmas)).astype(np.float32)",
    "  sigmas = sigmas.astype(np.float32)",
    SCHEDULES,
    "Euler grid shifted once",
  ),
  _p(
    "dpm_half_phi",
    SCHED,
    "half_phi[i] = f32(f32(0.5) * phi[i])",
    "half_phi[i] = f32(phi[i])",
    SCHEDULES,
    "2nd-order term doubled",
  ),
  # ---------------------------------------------------------------- train/optimizer.py
  _p(
    "sqrt_scaling_inverted",
    OPTPY,
    "math.sqrt(tc.global_batch / 256)",
    "math.sqrt(256 / tc.global_batch)",
    OPTIMIZER_TESTS,
    "LR scaled by sqrt(256 / batch)",
  ),
  _p(
    "sqrt_scaling_linear",
    OPTPY,
    "math.sqrt(tc.global_batch / 256)",
    "(tc.global_batch / 256)",
    OPTIMIZER_TESTS,
    "linear instead of sqrt LR scaling",
  ),
  _p(
    "warmup_ignored",
    OPTPY,
    "  if tc.warmup_steps <= 0:\n",
    "  if True:\n",
    OPTIMIZER_TESTS,
    "no warm-up",
  ),
  _p(
    "grad_clip_ignored",
    OPTPY,
    "  return optax.chain(clip_by_global_norm(tc.grad_clip), opt)",
    "  return optax.chain(opt)",
    OPTIMIZER_TESTS,
    "train.grad_clip ignored",
  ),
  _p(
    "grad_clip_elementwise",
    OPTPY,
    "optax.chain(clip_by_global_norm(tc.grad_clip), opt)",
    "optax.chain(optax.clip(tc.grad_clip), opt)",
    OPTIMIZER_TESTS,
    "per-element clip instead of the global norm",
  ),
  _p(
    "grad_clip_after_optimizer",
    OPTPY,
    "optax.chain(clip_by_global_norm(tc.grad_clip), opt)",
    "optax.chain(opt, optax.clip_by_global_norm(tc.grad_clip))",
    OPTIMIZER_TESTS,
    "the update clipped instead of the gradient",
  ),
  _p(
    "came_clip_factor_dropped",
    OPTPY,
    "inner.update(updates, state[1], params, grad_scale=factor, **extra)",
    "inner.update(updates, state[1], params, **extra)",
    [CAME_CLIP],
    "CAME and CAME-8bit never clip (the factor not handed over)",
  ),
  _p(
    "came_clip_factor_in_statistics_only",
    CAMEPY,
    "    c = c * grad_scale\n",
    "    pass\n",
    [CAME_CLIP],
    "the clip factor scales the statistics but not the gradient",
  ),
  _p(
    "came_weight_decay_dropped",
    OPTPY,
    "opt = came_lib.came(schedule, weight_decay=tc.weight_decay, spec=came_lib.sana_spec())",
    "opt = came_lib.came(schedule, spec=came_lib.sana_spec())",
    OPTIMIZER_TESTS,
    "CAME without weight decay",
  ),
  _p(
    "came_8bit_is_came",
    OPTPY,
    "opt = came_lib.came_8bit(\n      schedule, weight_decay=tc.weight_decay, spec=came_lib.sana_spec(), "
    "**CAME_8BIT_STATES[state]\n    )",
    "opt = came_lib.came(schedule, weight_decay=tc.weight_decay, spec=came_lib.sana_spec())",
    OPTIMIZER_TESTS,
    "came_8bit silently runs fp32 CAME",
  ),
  _p(
    "came_8bit_state_ignored",
    OPTPY,
    "spec=came_lib.sana_spec(), **CAME_8BIT_STATES[state]\n",
    "spec=came_lib.sana_spec()\n",
    OPTIMIZER_TESTS,
    'train.came_8bit_state="compact" silently keeps the official (larger) state',
  ),
  _p(
    "adamw_weight_decay_default",
    OPTPY,
    "opt = optax.adamw(schedule, weight_decay=tc.weight_decay)",
    "opt = optax.adamw(schedule)",
    OPTIMIZER_TESTS,
    "AdamW with optax's default decay 1e-4",
  ),
  _p(
    "adamw_constant_lr",
    OPTPY,
    "opt = optax.adamw(schedule, weight_decay=tc.weight_decay)",
    "opt = optax.adamw(tc.lr, weight_decay=tc.weight_decay)",
    OPTIMIZER_TESTS,
    "AdamW ignores the schedule",
  ),
  # ---------------------------------------------------------------- train/metrics.py
  _p(
    "flops_linear_attention_once",
    METRICS,
    '"linear_attention": 2 * 2 * n * c * d + 2 * n * c,',
    '"linear_attention": 2 * n * c * d,',
    FLOP_TESTS,
    "linear attention counted once",
  ),
  _p(
    "flops_depthwise_dropped",
    METRICS,
    '"depthwise": 2 * 9 * n * 2 * hid,',
    '"depthwise": 0,',
    FLOP_TESTS,
    "depthwise conv not counted",
  ),
  _p(
    "flops_timestep_mlp_dropped",
    METRICS,
    '"t_fc2_block": 2 * (c * c + c * 6 * c),',
    '"t_fc2_block": 0,',
    FLOP_TESTS,
    "timestep MLP not counted",
  ),
  _p(
    "flops_cross_kv_per_token",
    METRICS,
    '"cross_kv": 2 * caption_len * c * 2 * ci,',
    '"cross_kv": 2 * n * c * 2 * ci,',
    FLOP_TESTS,
    "cross k/v counted per image token",
  ),
  _p(
    "flops_backward_once",
    METRICS,
    "  bwd = 2 * fwd - sum(",
    "  bwd = fwd - sum(",
    FLOP_TESTS,
    "backward counted as one forward",
  ),
  _p(
    "flops_remat_ignored",
    METRICS,
    '"full": sum(block.values()),',
    '"full": 0.0,',
    FLOP_TESTS,
    "remat recomputation not counted",
  ),
  _p(
    "mfu_devices_ignored",
    METRICS,
    "(peak_tflops * 1e12 * devices)",
    "(peak_tflops * 1e12)",
    FLOP_TESTS,
    "MFU against one device's peak",
  ),
]


def _snapshot(dest: pathlib.Path) -> None:
  archive = subprocess.run(
    ["git", "archive", "HEAD"], cwd=REPO, check=True, capture_output=True
  ).stdout
  subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def _pytest(root: pathlib.Path, tests, timeout: float) -> tuple[int, str]:
  cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
  env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
  try:
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout, env=env)
  except subprocess.TimeoutExpired:
    return -1, "timeout"
  return r.returncode, r.stdout + r.stderr


def _first_failure(output: str) -> str:
  m = re.search(r"^FAILED (\S+)", output, re.M)
  return m.group(1) if m else "?"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--only", nargs="*", default=None, help="plant names to run (default: all)")
  ap.add_argument("--list", action="store_true", help="list the plants and exit (default: off)")
  ap.add_argument(
    "--timeout", type=float, default=1800.0, help="seconds per pytest run (default: 1800)"
  )
  args = ap.parse_args(argv)
  plants = PLANTS
  if args.only:
    unknown = sorted(set(args.only) - {p.name for p in PLANTS})
    if unknown:
      print(f"error: unknown plant(s) {unknown}; --list shows them", file=sys.stderr)
      return 2
    plants = [p for p in PLANTS if p.name in args.only]
  if args.list:
    for p in plants:
      print(f"{p.name:32s} {p.path:34s} {p.what}")
    return 0
  with tempfile.TemporaryDirectory(prefix="planted_bugs_") as tmp:
    root = pathlib.Path(tmp)
    _snapshot(root)
    where = subprocess.run(
      [sys.executable, "-c", "import sana_jax; print(sana_jax.__file__)"],
      cwd=root,
      capture_output=True,
      text=True,
      check=True,
    ).stdout.strip()
    if not where.startswith(str(root)):
      print(f"error: the copy imports sana_jax from {where}, not from {root}", file=sys.stderr)
      return 2
    tests = sorted({t for p in plants for t in p.tests})
    t0 = time.perf_counter()
    rc, out = _pytest(root, tests, args.timeout)
    print(
      f"baseline: {len(tests)} test selections, exit {rc} ({time.perf_counter() - t0:.0f} s)",
      flush=True,
    )
    if rc != 0:
      print(out[-3000:])
      print("error: the unmodified tests do not pass; nothing planted", file=sys.stderr)
      return 1
    caught, missed, errors = [], [], []
    for p in plants:
      f = root / p.path
      original = f.read_text()
      if original.count(p.old) != 1:
        errors.append(p)
        print(
          f"ERROR  {p.name:32s} text found {original.count(p.old)} times in {p.path}", flush=True
        )
        continue
      t0 = time.perf_counter()
      try:
        f.write_text(original.replace(p.old, p.new))
        rc, out = _pytest(root, p.tests, args.timeout)
      finally:
        f.write_text(original)
      dt = time.perf_counter() - t0
      if rc == 1:
        caught.append(p)
        print(f"caught {p.name:32s} by {_first_failure(out)}  ({dt:.0f} s)", flush=True)
      elif rc == 0:
        missed.append(p)
        print(f"MISSED {p.name:32s} ({p.what}; ran {', '.join(p.tests)})  ({dt:.0f} s)", flush=True)
      else:
        errors.append(p)
        print(f"ERROR  {p.name:32s} pytest exit {rc}: {out[-500:]}", flush=True)
  print(
    f"\n{len(plants)} planted, {len(caught)} caught"
    + (f"; missed: {', '.join(p.name for p in missed)}" if missed else "")
    + (f"; errors: {', '.join(p.name for p in errors)}" if errors else "")
  )
  return 0 if not (missed or errors) else 1


if __name__ == "__main__":
  sys.exit(main())
