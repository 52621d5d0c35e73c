"""Flow samplers (DPM-Solver++ 2M, Euler) and classifier-free guidance.

A denoiser is `velocity_fn(x, model_time) -> v` with x (B, ...) float32 latents (NHWC in
this project) and model_time a float32 scalar; it returns the flow velocity, same shape
as x. The samplers are pure, traceable functions built on `lax.scan`, so a caller jits
the whole sampling loop in one program (`make_sampler` does that for a model apply fn,
with parameters and captions as jit arguments, not baked-in constants).

Parity target: diffusers' SanaPipeline loop with `DPMSolverMultistepScheduler(
use_flow_sigmas=True, flow_shift=k, prediction_type="flow_prediction")` or
`FlowMatchEulerDiscreteScheduler(shift=k)`:
  for t in scheduler.timesteps:
    v = guided(transformer(cat[x, x], t.expand(2B), cat[null, cond], cat[null_mask, mask]))
    x = scheduler.step(v, t, x)
"""

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


def _report(progress: Progress, step, total: int):
  if not progress:
    return
  fn = _print_progress if progress is True else progress
  jax.debug.callback(lambda s: fn(int(s), total), step, ordered=True)


def _as_f32(a):
  return jnp.asarray(np.asarray(a, np.float32))


def dpm_solver_loop(velocity_fn: VelocityFn, x, schedule: schedules.FlowSchedule,
                    coefficients: Optional[schedules.DPMSolverCoefficients] = None,
                    progress: Progress = False):
  """Flow DPM-Solver++ (2nd-order multistep, midpoint; 1st order on first and last step).

  x: (B, ...) float32 initial noise at sigmas[0]. Returns x at sigma = 0. Mirrors
  diffusers: x0_pred = x - sigma * v, then x <- ratio x - phi D0 - half_phi D1.
  """
  if coefficients is None:
    coefficients = schedules.dpm_solver_coefficients(np.asarray(schedule.sigmas))
  n = int(np.shape(schedule.model_times)[0])
  xs = (jnp.arange(n), _as_f32(schedule.model_times), _as_f32(schedule.sigmas[:-1]),
        _as_f32(coefficients.ratio), _as_f32(coefficients.phi),
        _as_f32(coefficients.half_phi), _as_f32(coefficients.inv_r0))
  x = jnp.asarray(x, jnp.float32)

  def body(carry, inp):
    x, prev_x0 = carry
    i, t, sigma, ratio, phi, half_phi, inv_r0 = inp
    v = velocity_fn(x, t).astype(jnp.float32)
    x0 = x - sigma * v
    d1 = inv_r0 * (x0 - prev_x0)
    x_next = ratio * x - phi * x0 - half_phi * d1
    _report(progress, i, n)
    return (x_next, x0), None

  (x, _), _ = jax.lax.scan(body, (x, jnp.zeros_like(x)), xs)
  return x


def euler_loop(velocity_fn: VelocityFn, x, schedule: schedules.FlowSchedule,
               progress: Progress = False):
  """Flow Euler: x <- x + (sigma_next - sigma) v. x: (B, ...) float32 noise."""
  sig = np.asarray(schedule.sigmas, np.float32)
  dt = (sig[1:] - sig[:-1]).astype(np.float32)
  n = int(dt.shape[0])
  xs = (jnp.arange(n), _as_f32(schedule.model_times), _as_f32(dt))
  x = jnp.asarray(x, jnp.float32)

  def body(x, inp):
    i, t, dt = inp
    v = velocity_fn(x, t).astype(jnp.float32)
    _report(progress, i, n)
    return x + dt * v, None

  x, _ = jax.lax.scan(body, x, xs)
  return x


def make_schedule(solver: str, num_steps: int, shift: float) -> schedules.FlowSchedule:
  if solver == "dpm_solver":
    return schedules.dpm_solver_schedule(num_steps, shift)
  if solver == "euler":
    return schedules.euler_schedule(num_steps, shift)
  raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")


def sample(velocity_fn: VelocityFn, noise, *, num_steps: int, shift: float,
           solver: str = "dpm_solver", progress: Progress = False):
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


def guided_velocity_fn(apply_fn, caption, caption_mask, null_caption, *,
                       guidance_scale: float, null_mask=None,
                       guidance_interval: Optional[Sequence[float]] = None) -> VelocityFn:
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
  caption = jnp.asarray(caption)
  caption_mask = jnp.asarray(caption_mask)
  if caption.ndim != 3 or caption_mask.shape != caption.shape[:2]:
    raise ValueError(f"caption must be (B, L, C) and mask (B, L); got {caption.shape} and "
                     f"{caption_mask.shape}")
  null = jnp.asarray(null_caption, caption.dtype)
  if null.shape[-2:] != caption.shape[-2:]:
    raise ValueError(f"null_caption {null.shape} must end in (L, C) = {caption.shape[1:]}")
  null = jnp.broadcast_to(null, caption.shape)
  null_m = caption_mask if null_mask is None else jnp.broadcast_to(
      jnp.asarray(null_mask, caption_mask.dtype), caption_mask.shape)
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


def make_sampler(apply_fn, *, num_steps: int, shift: float, solver: str = "dpm_solver",
                 guidance_scale: float = 4.5, guidance_interval=None,
                 use_null_mask: bool = False, progress: Progress = False):
  """A jitted end-to-end sampler around a model apply fn.

  apply_fn(params, x, t, caption, mask) -> v. Returns
  `run(params, noise, caption, caption_mask, null_caption, null_mask=None) -> latents`,
  a `jax.jit` function (parameters and captions are arguments). With use_null_mask=False
  (official) `null_mask` is ignored and the conditional mask is used for the null half.
  """
  schedule = make_schedule(solver, num_steps, shift)
  coeffs = schedules.dpm_solver_coefficients(schedule.sigmas) if solver == "dpm_solver" else None

  def run(params, noise, caption, caption_mask, null_caption, null_mask=None):
    vf = guided_velocity_fn(
        lambda x, t, c, m: apply_fn(params, x, t, c, m), caption, caption_mask,
        null_caption, guidance_scale=guidance_scale,
        null_mask=null_mask if use_null_mask else None,
        guidance_interval=guidance_interval)
    if solver == "dpm_solver":
      return dpm_solver_loop(vf, noise, schedule, coeffs, progress=progress)
    return euler_loop(vf, noise, schedule, progress=progress)

  return jax.jit(run)
