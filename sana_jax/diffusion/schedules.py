"""Sampling time grids for flow matching, computed exactly as diffusers computes them.

Both grids are built on the host in NumPy (the same float64 / float32 steps diffusers
takes) and returned as a `FlowSchedule` of small float32 arrays, ready to be passed into
a jitted sampler.

* `dpm_solver_schedule`: `DPMSolverMultistepScheduler(use_flow_sigmas=True,
  flow_shift=k, prediction_type="flow_prediction")`. With b = linspace(1, 1/1000, N+1)
  (float64), sigma = shift(1 - b) reversed minus its final 0, then a 0 appended; the model
  time is int64(1000 * sigma) of the *float64* sigma (a floor), handed to the transformer as
  float32 (SanaPipeline: `timestep = t.expand(B) * timestep_scale`).
* `euler_schedule`: `FlowMatchEulerDiscreteScheduler(shift=k)`. Its `__init__` builds the
  training sigmas in float32 and shifts them, so `sigma_min = shift(1/1000)`; `set_timesteps`
  then takes linspace(1000 * sigma_max, 1000 * sigma_min, N) in float64 and shifts *again*
  (diffusers' behaviour: the lower end is shifted twice). Model time = float32(sigma) * 1000
  in float32.

`dpm_solver_coefficients` turns a sigma grid into the per-step scalars of the
2nd-order multistep DPM-Solver++ update (first order on the first and last step), using
diffusers' float32 formulas (alpha = 1 - sigma, lambda = log alpha - log sigma, h, r0).
"""

from typing import NamedTuple

import numpy as np

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(s, shift):
  """Flow shift s -> k s / (1 + (k - 1) s), elementwise, in the dtype of `s`."""
  return shift * s / (1 + (shift - 1) * s)


class FlowSchedule(NamedTuple):
  """A sampling grid of N steps.

  sigmas: (N + 1,) float32, decreasing, sigmas[-1] == 0 (noise level; x = (1-s) x0 + s eps).
  model_times: (N,) float32, the timestep handed to the denoiser at each step.
  """

  sigmas: np.ndarray
  model_times: np.ndarray

  @property
  def num_steps(self) -> int:
    return int(self.model_times.shape[0])


def _check(num_steps, shift):
  if int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
  if not np.isfinite(shift) or shift <= 0:
    raise ValueError(f"flow shift must be a finite number > 0, got {shift!r}")


def dpm_solver_schedule(
  num_steps: int, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> FlowSchedule:
  """Flow DPM-Solver++ grid, as `DPMSolverMultistepScheduler(use_flow_sigmas=True)`."""
  _check(num_steps, shift)
  alphas = np.linspace(1, 1 / num_train_timesteps, num_steps + 1)  # float64
  sigmas = 1.0 - alphas
  sigmas = np.flip(shift * sigmas / (1 + (shift - 1) * sigmas))[:-1].copy()
  # diffusers: torch.from_numpy(sigmas * T).to(int64) -> truncation of the float64 value.
  model_times = (sigmas * num_train_timesteps).astype(np.int64).astype(np.float32)
  sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
  return FlowSchedule(sigmas=sigmas, model_times=model_times)


def euler_schedule(
  num_steps: int, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> FlowSchedule:
  """Flow Euler grid, as `FlowMatchEulerDiscreteScheduler(shift=shift)`."""
  _check(num_steps, shift)
  # __init__: float32 training grid, shifted once in float32.
  t_train = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1]
  s_train = (t_train / np.float32(num_train_timesteps)).astype(np.float32)
  s_train = np.float32(shift) * s_train / (np.float32(1) + np.float32(shift - 1) * s_train)
  s_train = s_train.astype(np.float32)
  sigma_max, sigma_min = float(s_train[0]), float(s_train[-1])
  # set_timesteps: float64 linspace between the (already shifted) ends, shifted again.
  timesteps = np.linspace(
    sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps
  )
  sigmas = timesteps / num_train_timesteps
  sigmas = (shift * sigmas / (1 + (shift - 1) * sigmas)).astype(np.float32)
  model_times = (sigmas * np.float32(num_train_timesteps)).astype(np.float32)
  sigmas = np.concatenate([sigmas, np.zeros(1, np.float32)])
  return FlowSchedule(sigmas=sigmas, model_times=model_times)


class DPMSolverCoefficients(NamedTuple):
  """Per-step scalars (each (N,) float32) of the multistep DPM-Solver++ (midpoint) update.

  With D0 = x0_pred(step i), D1 = inv_r0 * (D0 - x0_pred(step i-1)):
    x_next = ratio * x - phi * D0 - half_phi * D1
  where ratio = sigma_next / sigma, phi = alpha_next * (exp(-h) - 1), half_phi = 0.5 * phi
  on 2nd-order steps. First-order steps (the first one, and the last one, which lands on
  sigma = 0) have inv_r0 = half_phi = 0, which makes the D1 term vanish exactly.
  """

  ratio: np.ndarray
  phi: np.ndarray
  half_phi: np.ndarray
  inv_r0: np.ndarray


def dpm_solver_coefficients(
  sigmas: np.ndarray, solver_order: int = 2, lower_order_final: bool = True
) -> DPMSolverCoefficients:
  """Coefficients of diffusers' DPM-Solver++ for a flow sigma grid ((N+1,), last 0).

  Mirrors `DPMSolverMultistepScheduler.step` with algorithm_type="dpmsolver++",
  solver_type="midpoint", final_sigmas_type="zero": step 0 is first order (no history),
  the last step is first order (final sigma is 0), the rest are 2nd order. All arithmetic
  is float32 scalar arithmetic in diffusers' order.
  """
  if solver_order not in (1, 2):
    raise ValueError(f"solver_order must be 1 or 2, got {solver_order}")
  sig = np.asarray(sigmas, np.float32)
  if sig.ndim != 1 or sig.shape[0] < 2:
    raise ValueError(f"sigmas must be 1-D with >= 2 entries, got shape {sig.shape}")
  n = sig.shape[0] - 1
  f32 = np.float32
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    alpha = (f32(1) - sig).astype(f32)
    lam = (np.log(alpha) - np.log(sig)).astype(f32)  # lambda[-1] = +inf (sigma = 0)
    ratio = np.zeros(n, f32)
    phi = np.zeros(n, f32)
    half_phi = np.zeros(n, f32)
    inv_r0 = np.zeros(n, f32)
    for i in range(n):
      h = f32(lam[i + 1] - lam[i])
      ratio[i] = f32(sig[i + 1] / sig[i])
      phi[i] = f32(alpha[i + 1] * f32(np.exp(f32(-h)) - f32(1)))
      # diffusers: last step is 1st order when the final sigma is 0 ("zero"), or with
      # lower_order_final and fewer than 15 steps.
      final = (i == n - 1) and (sig[-1] == 0 or (lower_order_final and n < 15))
      if solver_order == 2 and i >= 1 and not final:
        h0 = f32(lam[i] - lam[i - 1])
        r0 = f32(h0 / h)
        inv_r0[i] = f32(f32(1) / r0)
        half_phi[i] = f32(f32(0.5) * phi[i])
  return DPMSolverCoefficients(ratio=ratio, phi=phi, half_phi=half_phi, inv_r0=inv_r0)
