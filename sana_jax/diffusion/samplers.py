"""Flow samplers (DPM-Solver++ 2M, Euler) and classifier-free guidance.

A denoiser is `velocity_fn(x, model_time) -> v` with x (B, ...) float32 latents (NHWC in
this project) and model_time a float32 scalar; it returns the flow velocity, same shape
as x. The samplers are pure, traceable functions built on `lax.scan`, so a caller can jit
the whole sampling loop in one program. `make_sampler` (the pipeline's) instead jits one
solver step for a model apply fn, with parameters and captions as jit arguments (not
baked-in constants), and runs it once per step from Python: progress is reported from the
host between steps, so the program holds no host callback and JAX's persistent
compilation cache can keep it (JAX never writes programs with host callbacks), and every
step count and flow shift shares the one program.

Parity target: diffusers' SanaPipeline loop with `DPMSolverMultistepScheduler(
use_flow_sigmas=True, flow_shift=k, prediction_type="flow_prediction")` or
`FlowMatchEulerDiscreteScheduler(shift=k)`:
  for t in scheduler.timesteps:
    v = guided(transformer(cat[x, x], t.expand(2B), cat[null, cond], cat[null_mask, mask]))
    x = scheduler.step(v, t, x)
"""

import functools
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from sana_jax.diffusion import schedules

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]
Progress = Union[bool, Callable[[int, int], None], None]

SOLVERS = ("dpm_solver", "euler")


def _print_progress(step, total):
  print(f"sampling step {int(step) + 1}/{int(total)}", flush=True)


def _report(progress: Progress, step, total):
  if not progress:
    return
  fn = _print_progress if progress is True else progress
  # Unordered: ordered effects are refused for programs over more than one device. The
  # steps of a scan are sequential anyway, so reports arrive in step order in practice.
  jax.debug.callback(lambda s, n: fn(int(s), int(n)), step, total)


def _grid_columns(schedule: schedules.FlowSchedule, coefficients, xp) -> tuple:
  """Each step's grid values as float32 (N,) columns of array module xp (jnp inside a
  traced loop, np for the per-step sampler), in the order the solver steps unpack them:
  DPM-Solver++ (coefficients given): model time, sigma, ratio, phi, half_phi, inv_r0;
  Euler (coefficients None): model time, dt = sigma_next - sigma (float32, as diffusers')."""
  f32 = lambda a: xp.asarray(a, xp.float32)  # noqa: E731
  if coefficients is None:
    sig = f32(schedule.sigmas)
    return f32(schedule.model_times), sig[1:] - sig[:-1]
  return (f32(schedule.model_times), f32(schedule.sigmas[:-1]), *(f32(c) for c in coefficients))


def _scan_steps(step_fn, carry, xs, num_steps, num_valid, progress):
  """lax.scan of step_fn(carry, inp) -> carry over xs (leading axis = step, first entry the
  step index). With num_valid (a traced int), steps i >= num_valid leave the carry
  unchanged without evaluating the model (lax.cond), so grids padded to one length share
  one compiled program."""
  total = num_steps if num_valid is None else num_valid

  def body(carry, inp):
    def run(c):
      _report(progress, inp[0], total)
      return step_fn(c, inp)

    if num_valid is None:
      return run(carry), None
    return jax.lax.cond(inp[0] < num_valid, run, lambda c: c, carry), None

  carry, _ = jax.lax.scan(body, carry, xs)
  return carry


def dpm_solver_loop(
  velocity_fn: VelocityFn,
  x,
  schedule: schedules.FlowSchedule,
  coefficients: Optional[schedules.DPMSolverCoefficients] = None,
  progress: Progress = False,
  num_valid=None,
):
  """Flow DPM-Solver++ (2nd-order multistep, midpoint; 1st order on first and last step).

  x: (B, ...) float32 initial noise at sigmas[0]. Returns x at sigma = 0. Mirrors
  diffusers: x0_pred = x - sigma * v, then x <- ratio x - phi D0 - half_phi D1.
  `schedule` and `coefficients` may be traced arrays (jit arguments); `coefficients` can
  only be derived here when the sigmas are concrete. num_valid: see `_scan_steps`.
  progress: True prints each step; a callable gets (step, total); via jax.debug.callback.
  """
  if coefficients is None:
    coefficients = schedules.dpm_solver_coefficients(np.asarray(schedule.sigmas))
  n = int(np.shape(schedule.model_times)[0])
  xs = (jnp.arange(n), *_grid_columns(schedule, coefficients, jnp))
  x = jnp.asarray(x, jnp.float32)
  step = functools.partial(dpm_solver_step, velocity_fn)
  x, _ = _scan_steps(step, (x, jnp.zeros_like(x)), xs, n, num_valid, progress)
  return x


def dpm_solver_step(velocity_fn: VelocityFn, carry, inp):
  """One DPM-Solver++ step: carry (x, previous x0 prediction), inp (step index, model time,
  sigma, ratio, phi, half_phi, inv_r0) -> the next carry."""
  x, prev_x0 = carry
  _, t, sigma, ratio, phi, half_phi, inv_r0 = inp
  v = velocity_fn(x, t).astype(jnp.float32)
  x0 = x - sigma * v
  d1 = inv_r0 * (x0 - prev_x0)
  return ratio * x - phi * x0 - half_phi * d1, x0


def euler_step(velocity_fn: VelocityFn, x, inp):
  """One flow Euler step: inp (step index, model time, dt) -> x + dt v."""
  _, t, dt = inp
  return x + dt * velocity_fn(x, t).astype(jnp.float32)


def euler_loop(
  velocity_fn: VelocityFn,
  x,
  schedule: schedules.FlowSchedule,
  progress: Progress = False,
  num_valid=None,
):
  """Flow Euler: x <- x + (sigma_next - sigma) v. x: (B, ...) float32 noise."""
  n = int(np.shape(schedule.model_times)[0])
  xs = (jnp.arange(n), *_grid_columns(schedule, None, jnp))
  x = jnp.asarray(x, jnp.float32)
  return _scan_steps(functools.partial(euler_step, velocity_fn), x, xs, n, num_valid, progress)


def pad_schedule(schedule: schedules.FlowSchedule, coefficients, length: int):
  """Pad a grid (and DPM coefficients, or None) to `length` steps with inert entries
  (sigma 0, zero coefficients) for use with num_valid = schedule.num_steps."""
  n = schedule.num_steps
  if length < n:
    raise ValueError(f"cannot pad {n} steps to {length}")
  pad = lambda a, k: np.concatenate([np.asarray(a, np.float32), np.zeros(k, np.float32)])
  schedule = schedules.FlowSchedule(
    pad(schedule.sigmas, length - n), pad(schedule.model_times, length - n)
  )
  if coefficients is not None:
    coefficients = schedules.DPMSolverCoefficients(*(pad(a, length - n) for a in coefficients))
  return schedule, coefficients


def make_schedule(solver: str, num_steps: int, shift: float) -> schedules.FlowSchedule:
  if solver == "dpm_solver":
    return schedules.dpm_solver_schedule(num_steps, shift)
  if solver == "euler":
    return schedules.euler_schedule(num_steps, shift)
  raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")


def sample(
  velocity_fn: VelocityFn,
  noise,
  *,
  num_steps: int,
  shift: float,
  solver: str = "dpm_solver",
  progress: Progress = False,
):
  """Run a flow sampler from `noise` (B, ...) to the clean latents (traceable; jit it at
  the call site, or use `make_sampler`)."""
  schedule = make_schedule(solver, num_steps, shift)
  if solver == "dpm_solver":
    return dpm_solver_loop(velocity_fn, noise, schedule, progress=progress)
  return euler_loop(velocity_fn, noise, schedule, progress=progress)


# ------------------------------------------------------------------- classifier-free guidance


def _check_interval(interval):
  if interval is None:
    return None
  lo, hi = (float(v) for v in interval)
  if not lo < hi:
    raise ValueError(f"guidance_interval must be (lo, hi) with lo < hi, got {interval}")
  return lo, hi


def guided_velocity_fn(
  apply_fn,
  caption,
  caption_mask,
  null_caption,
  *,
  guidance_scale: float,
  null_mask=None,
  guidance_interval: Optional[Sequence[float]] = None,
) -> VelocityFn:
  """Classifier-free guidance on one batched [null, cond] pass.

  apply_fn(x (2B, ...), t (2B,) float32, caption (2B, L, C), mask (2B, L)) -> v (2B, ...).
  caption: (B, L, C); caption_mask: (B, L); null_caption: (L, C), (1, L, C) or (B, L, C).
  null_mask: None -> the conditional mask is used for the null half too (the official
    Sana sampler repeats `emb_masks` over both halves); pass the null caption's own mask
    ((L,), (1, L) or (B, L)) to get diffusers' SanaPipeline behaviour.
  guidance_scale: v = v_null + s (v_cond - v_null) (diffusers' expression). A Python 1.0
    means no guidance: a single conditional pass.
  guidance_interval: (lo, hi) in model-time units (0..1000): guide only where
    lo < t < hi (strict, as the official `interval_guidance`, which is in [0, 1] units:
    multiply by 1000), else a single conditional pass.
  Returns velocity_fn(x (B, ...), t scalar) -> v (B, ...).
  """
  if isinstance(guidance_scale, (int, float)) and not guidance_scale >= 0:
    raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale!r}")
  caption = jnp.asarray(caption)
  caption_mask = jnp.asarray(caption_mask)
  if caption.ndim != 3 or caption_mask.shape != caption.shape[:2]:
    raise ValueError(
      f"caption must be (B, L, C) and mask (B, L); got {caption.shape} and {caption_mask.shape}"
    )
  null = jnp.asarray(null_caption, caption.dtype)
  if null.shape[-2:] != caption.shape[-2:]:
    raise ValueError(f"null_caption {null.shape} must end in (L, C) = {caption.shape[1:]}")
  null = jnp.broadcast_to(null, caption.shape)
  null_m = (
    caption_mask
    if null_mask is None
    else jnp.broadcast_to(jnp.asarray(null_mask, caption_mask.dtype), caption_mask.shape)
  )
  both_caption = jnp.concatenate([null, caption], axis=0)
  both_mask = jnp.concatenate([null_m, caption_mask], axis=0)
  interval = _check_interval(guidance_interval)
  no_cfg = isinstance(guidance_scale, (int, float)) and float(guidance_scale) == 1.0
  batch = caption.shape[0]

  def cond_only(x, t):
    tb = jnp.full((x.shape[0],), t, jnp.float32)
    return apply_fn(x, tb, caption, caption_mask).astype(jnp.float32)

  def guided(x, t):
    if x.shape[0] != batch:
      raise ValueError(f"latents batch {x.shape[0]} != caption batch {batch}")
    x2 = jnp.concatenate([x, x], axis=0)
    tb = jnp.full((x2.shape[0],), t, jnp.float32)
    out = apply_fn(x2, tb, both_caption, both_mask).astype(jnp.float32)
    v_null, v_cond = out[:batch], out[batch:]
    return v_null + guidance_scale * (v_cond - v_null)

  if no_cfg:
    return cond_only
  if interval is None:
    return guided

  def velocity_fn(x, t):
    t = jnp.asarray(t, jnp.float32)
    inside = (t > interval[0]) & (t < interval[1])
    return jax.lax.cond(inside, guided, cond_only, x, t)

  return velocity_fn


@functools.lru_cache(maxsize=64)
def _jitted_step(apply_fn, solver, guidance_scale, guidance_interval, use_null_mask):
  """One jitted solver step per (model fn, solver, guidance settings):
  step(params, carry, caption, caption_mask, null_caption, null_mask, inp) -> carry, with
  the step's grid values `inp` as arguments, so every step, step count and flow shift
  shares the program."""

  def step(params, carry, caption, caption_mask, null_caption, null_mask, inp):
    vf = guided_velocity_fn(
      lambda x, t, c, m: apply_fn(params, x, t, c, m),
      caption,
      caption_mask,
      null_caption,
      guidance_scale=guidance_scale,
      null_mask=null_mask if use_null_mask else None,
      guidance_interval=guidance_interval,
    )
    if solver == "dpm_solver":
      return dpm_solver_step(vf, carry, inp)
    return euler_step(vf, carry, inp)

  return jax.jit(step)


def _step_inputs(schedule: schedules.FlowSchedule, coeffs) -> list[tuple]:
  """Per-step grid values (what the scan's xs hold at step i), as float32 / int32 numpy
  scalars so that every step traces to the same program."""
  cols = _grid_columns(schedule, coeffs, np)
  n = schedule.num_steps
  return [(np.int32(i), *(c[i] for c in cols)) for i in range(n)]


def make_sampler(
  apply_fn,
  *,
  num_steps: int,
  shift: float,
  solver: str = "dpm_solver",
  guidance_scale: float = 4.5,
  guidance_interval=None,
  use_null_mask: bool = False,
  progress: Progress = False,
  pad_to: Optional[int] = None,
):
  """A sampler around a model apply fn: one jitted solver step, run once per step.

  apply_fn(params, x, t, caption, mask) -> v (x (2B, H, W, C), t (2B,)). Returns
  `run(params, noise, caption, caption_mask, null_caption, null_mask=None) -> latents`
  (float32, like noise); parameters and captions are jit arguments (not baked-in
  constants), and one compiled step serves every step count and shift of the same (apply_fn,
  solver, guidance settings). `run.step` is that jitted step and `run.step_inputs` its
  per-step grid values (for lowering it alone). With use_null_mask=False (official)
  `null_mask` is ignored and the conditional mask is used for the null half; with True it
  is required (diffusers' SanaPipeline behaviour).
  progress: True prints each step; a callable gets (step, total) on the host after each
  step has run (no callback inside the program).
  pad_to: kept for callers of the scanned grid; only checked (>= num_steps), since every
  step count already shares the one compiled step.
  """
  schedule = make_schedule(solver, num_steps, shift)
  coeffs = schedules.dpm_solver_coefficients(schedule.sigmas) if solver == "dpm_solver" else None
  interval = _check_interval(guidance_interval)
  if not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
    raise ValueError(f"guidance_scale must be a number >= 0, got {guidance_scale!r}")
  if pad_to is not None and pad_to < num_steps:
    raise ValueError(f"cannot pad {num_steps} steps to {pad_to}")
  step = _jitted_step(apply_fn, solver, float(guidance_scale), interval, bool(use_null_mask))
  inputs = _step_inputs(schedule, coeffs)
  report = None if not progress else (_print_progress if progress is True else progress)

  def run(params, noise, caption, caption_mask, null_caption, null_mask=None):
    if use_null_mask and null_mask is None:
      raise ValueError("use_null_mask=True needs the null caption's mask")
    null_mask = null_mask if use_null_mask else None
    x = jnp.asarray(noise, jnp.float32)
    carry = (x, jnp.zeros_like(x)) if coeffs is not None else x
    for i, inp in enumerate(inputs):
      carry = step(params, carry, caption, caption_mask, null_caption, null_mask, inp)
      if report is not None:
        jax.block_until_ready(carry)
        report(i, num_steps)
    return carry[0] if coeffs is not None else carry

  run.step = step
  run.step_inputs = inputs
  return run
