"""Flow matching, training side (REFERENCE.md section 4), as the official Sana code does it.

Official recipe (train_scripts/train.py + diffusion/model/respace.py, gaussian_diffusion.py):

  u = sigmoid(N(mean, std))                      (float32; "logit_normal")
  i = floor(1000 u)                              (`(u * 1000).long()`, an index in 0..999)
  sigma_i = shift(s_i), s_i = 1 - linspace(1, 0.001, 1000)[i]   (float64, ~ i / 1000)
  x_t = (1 - sigma) x0 + sigma eps,  target v = eps - x0
  model time = floor(1000 sigma_i)               (float64 map cast to the int64 index dtype)
  loss = mean((v_pred - v)^2), unweighted (per-example mean over all non-batch axes, then
         the batch mean)

All sigma / model-time values come from a 1000-entry table built on the host in float64
exactly as the official code builds it, then cast to float32, so indexing is exact. The
`s_i` grid matters: with the exact i / 1000 instead of the official linspace, the floor of
1000 shift(s_i) differs at some i (e.g. i = 100 for shift 3); `grid="exact"` gives that
variant.

Every function is pure: random functions take either explicit draws (uniform or normal
arrays) or a `jax.random` key.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sana_jax.diffusion.schedules import NUM_TRAIN_TIMESTEPS, shift_sigma

TIMESTEP_SAMPLERS = ("logit_normal", "uniform", "mode")


def base_sigma_grid(
  num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, grid: str = "official"
) -> np.ndarray:
  """Unshifted training sigmas s_i, i = 0..T-1, float64.

  grid="official": 1 - linspace(1, 1/T, T) (the official `linear_flow` betas, 1 - beta).
  grid="exact": i / T.
  """
  if grid == "official":
    return 1.0 - np.linspace(1.0, 1.0 / num_train_timesteps, num_train_timesteps, dtype=np.float64)
  if grid == "exact":
    return np.arange(num_train_timesteps, dtype=np.float64) / num_train_timesteps
  raise ValueError(f"grid must be 'official' or 'exact', got {grid!r}")


class TrainTable(NamedTuple):
  """Per-index training values, each (T,): sigma, alpha = 1 - sigma (float32, rounded from
  float64), model_time (float32 holding the integer floor(T * sigma))."""

  sigma: np.ndarray
  alpha: np.ndarray
  model_time: np.ndarray


def train_table(
  shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, grid: str = "official"
) -> TrainTable:
  """The official index -> (sigma, alpha, model time) table for a flow shift."""
  if not np.isfinite(shift) or shift <= 0:
    raise ValueError(f"flow shift must be a finite number > 0, got {shift!r}")
  s = shift_sigma(base_sigma_grid(num_train_timesteps, grid), float(shift))
  model_time = np.floor(s * num_train_timesteps)
  return TrainTable(
    sigma=s.astype(np.float32),
    alpha=(1.0 - s).astype(np.float32),
    model_time=model_time.astype(np.float32),
  )


# ----------------------------------------------------------------------------- timesteps


def u_from_normal(normal, mean: float = 0.0, std: float = 1.0):
  """Logit-normal u = sigmoid(mean + std * n) from standard normal draws n (float32)."""
  n = jnp.asarray(normal, jnp.float32)
  return jax.nn.sigmoid(n * jnp.float32(std) + jnp.float32(mean))


def u_mode(uniform, mode_scale: float = 1.29):
  """SD3 "mode" density: u = 1 - v - s (cos^2(pi v / 2) - 1 + v), v ~ U[0, 1)."""
  v = jnp.asarray(uniform, jnp.float32)
  return 1 - v - mode_scale * (jnp.cos(jnp.pi * v / 2) ** 2 - 1 + v)


def index_from_u(u, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
  """i = floor(T u) as int32, clipped to [0, T-1] (u in [0, 1]; the official code would
  index out of range at u == 1, which float32 sigmoid reaches for n > ~17)."""
  u = jnp.asarray(u, jnp.float32)
  i = jnp.floor(u * jnp.float32(num_train_timesteps)).astype(jnp.int32)
  return jnp.clip(i, 0, num_train_timesteps - 1)


class TimestepSample(NamedTuple):
  """index: (B,) int32; sigma, alpha, model_time: (B,) float32."""

  index: jax.Array
  sigma: jax.Array
  alpha: jax.Array
  model_time: jax.Array


def lookup(
  index, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, grid: str = "official"
) -> TimestepSample:
  """(sigma, alpha, model time) for integer indices i (any shape)."""
  table = train_table(shift, num_train_timesteps, grid)
  index = jnp.asarray(index, jnp.int32)
  return TimestepSample(
    index=index,
    sigma=jnp.asarray(table.sigma)[index],
    alpha=jnp.asarray(table.alpha)[index],
    model_time=jnp.asarray(table.model_time)[index],
  )


def timesteps_from_draws(
  draws,
  shift: float,
  scheme: str = "logit_normal",
  *,
  logit_mean: float = 0.0,
  logit_std: float = 1.0,
  mode_scale: float = 1.29,
  num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
  grid: str = "official",
) -> TimestepSample:
  """Training timesteps from explicit draws.

  draws: standard normals for scheme="logit_normal"; U[0, 1) uniforms for "uniform" and
  "mode". Returns the official index, sigma, alpha and (floored) model time.
  """
  if scheme == "logit_normal":
    u = u_from_normal(draws, logit_mean, logit_std)
  elif scheme == "uniform":
    u = jnp.asarray(draws, jnp.float32)
  elif scheme == "mode":
    u = u_mode(draws, mode_scale)
  else:
    raise ValueError(f"scheme must be one of {TIMESTEP_SAMPLERS}, got {scheme!r}")
  return lookup(index_from_u(u, num_train_timesteps), shift, num_train_timesteps, grid)


def timestep_draws(rng, shape, scheme: str = "logit_normal") -> jax.Array:
  """The raw float32 draws a scheme's timesteps are made from (the one place that knows):
  standard normals for "logit_normal", U[0, 1) for "uniform" and "mode"."""
  if scheme not in TIMESTEP_SAMPLERS:
    raise ValueError(f"scheme must be one of {TIMESTEP_SAMPLERS}, got {scheme!r}")
  shape = (shape,) if isinstance(shape, int) else tuple(shape)
  if scheme == "logit_normal":
    return jax.random.normal(rng, shape, jnp.float32)
  return jax.random.uniform(rng, shape, jnp.float32)


def sample_timesteps(
  rng, batch_size: int, shift: float, scheme: str = "logit_normal", **kwargs
) -> TimestepSample:
  """Draw (B,) training timesteps with a `jax.random` key (see `timesteps_from_draws`)."""
  return timesteps_from_draws(timestep_draws(rng, batch_size, scheme), shift, scheme, **kwargs)


# ------------------------------------------------------------------------ noising / loss


def _bcast(v, x):
  v = jnp.asarray(v, x.dtype)
  if v.ndim == 0:
    return v
  if v.shape[0] != x.shape[0]:
    raise ValueError(f"per-example values have batch {v.shape[0]}, x has {x.shape[0]}")
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def add_noise(x0, noise, sigma, alpha=None):
  """x_t = alpha x0 + sigma eps with alpha = 1 - sigma (pass the table's alpha for the
  official float64-rounded value). x0, noise: (B, ...); sigma, alpha: (B,) or scalar."""
  if x0.shape != noise.shape:
    raise ValueError(f"x0 {x0.shape} and noise {noise.shape} must have the same shape")
  s = _bcast(sigma, x0)
  a = 1 - s if alpha is None else _bcast(alpha, x0)
  return a * x0 + s * noise


def velocity_target(x0, noise):
  """Flow-matching target v = eps - x0."""
  return noise - x0


def flow_loss(pred, x0, noise, per_example: bool = False):
  """Unweighted MSE between predicted and target velocity.

  pred, x0, noise: (B, ...). Returns the scalar batch mean of per-example means, or (B,)
  per-example means with per_example=True.
  """
  if not (pred.shape == x0.shape == noise.shape):
    raise ValueError(f"shapes differ: pred {pred.shape}, x0 {x0.shape}, noise {noise.shape}")
  err = (pred.astype(jnp.float32) - velocity_target(x0, noise).astype(jnp.float32)) ** 2
  per = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
  return per if per_example else jnp.mean(per)


class TrainingInputs(NamedTuple):
  """x_t: noisy latents; target: eps - x0; model_time: (B,) float32; sigma: (B,) float32."""

  x_t: jax.Array
  target: jax.Array
  model_time: jax.Array
  sigma: jax.Array


def training_inputs(
  x0, noise, timestep_draws, shift: float, scheme: str = "logit_normal", **kwargs
) -> TrainingInputs:
  """Everything the train step feeds the DiT, from explicit draws (see
  `timesteps_from_draws`; `timestep_draws` makes the right kind for a scheme): noisy latents,
  velocity target and floored model time."""
  ts = timesteps_from_draws(timestep_draws, shift, scheme, **kwargs)
  return TrainingInputs(
    x_t=add_noise(x0, noise, ts.sigma, ts.alpha),
    target=velocity_target(x0, noise),
    model_time=ts.model_time,
    sigma=ts.sigma,
  )


def drop_captions(uniform, caption, null_caption, prob: float = 0.1):
  """Classifier-free-guidance dropout: caption b -> null caption where uniform[b] < prob.

  caption: (B, L, C); null_caption: (L, C) or (1, L, C) or (B, L, C); uniform: (B,).
  The caption mask is *not* changed (the official recipe keeps it).
  """
  u = jnp.asarray(uniform)
  if u.shape != caption.shape[:1]:
    raise ValueError(f"uniform draws {u.shape} must be (B,) = {caption.shape[:1]}")
  null = jnp.broadcast_to(jnp.asarray(null_caption, caption.dtype), caption.shape)
  return jnp.where((u < prob)[:, None, None], null, caption)
