"""Flow matching for SANA: training-side formulation (`flow`), sampling grids
(`schedules`) and samplers with classifier-free guidance (`samplers`)."""

from sana_jax.diffusion import flow, samplers, schedules
from sana_jax.diffusion.flow import (
  add_noise,
  flow_loss,
  sample_timesteps,
  timesteps_from_draws,
  training_inputs,
  velocity_target,
)
from sana_jax.diffusion.samplers import (
  dpm_solver_loop,
  euler_loop,
  guided_velocity_fn,
  make_sampler,
  sample,
)
from sana_jax.diffusion.schedules import dpm_solver_schedule, euler_schedule, shift_sigma

__all__ = [
  "flow",
  "samplers",
  "schedules",
  "add_noise",
  "flow_loss",
  "sample_timesteps",
  "timesteps_from_draws",
  "training_inputs",
  "velocity_target",
  "dpm_solver_loop",
  "euler_loop",
  "guided_velocity_fn",
  "make_sampler",
  "sample",
  "dpm_solver_schedule",
  "euler_schedule",
  "shift_sigma",
]
