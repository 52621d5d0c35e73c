"""Flow matching, training side, against the official Sana recipe (REFERENCE.md section 4).

The reference below is written from the official code paths (train_scripts/train.py,
diffusion/model/respace.py, gaussian_diffusion.py): u = sigmoid(N(0, 1)) in float32 torch,
i = (u * 1000).long(), the `linear_flow` grid s = 1 - linspace(1, 0.001, 1000) (float64),
sigma = shift(s) (float64), model time = int64(1000 sigma) (the float64 timestep map cast
to the index dtype), q_sample with float32(1 - sigma) and float32(sigma), target eps - x0,
loss = mean_flat((target - pred)^2).mean().
"""

import math

import numpy as np
import pytest
from scipy import stats

import jax
import jax.numpy as jnp

from sana_jax.diffusion import flow

torch = pytest.importorskip("torch")


def official_reference(u, shift, x0, noise, pred):
  """u: (B,) float32 torch; x0, noise, pred: (B, ...) float32 torch."""
  betas = np.linspace(1.0, 0.001, 1000, dtype=np.float64)  # 'linear_flow', 1000 steps
  base = 1.0 - betas
  new_sigmas = shift * base / (1 + (shift - 1) * base)
  timestep_map = new_sigmas * 1000
  idx = (u * 1000).long()
  model_t = torch.tensor(timestep_map, dtype=idx.dtype)[idx]
  sig = torch.from_numpy(new_sigmas)[idx].float()
  alp = torch.from_numpy(1.0 - new_sigmas)[idx].float()
  expand = lambda v: v.reshape(v.shape + (1,) * (x0.dim() - 1))
  x_t = expand(alp) * x0 + expand(sig) * noise
  target = noise - x0
  loss = ((target - pred) ** 2).mean(dim=list(range(1, x0.dim()))).mean()
  return dict(
    index=idx.numpy(),
    model_time=model_t.numpy(),
    sigma=sig.numpy(),
    x_t=x_t.numpy(),
    target=target.numpy(),
    loss=float(loss),
  )


def _data(b, seed=0):
  rng = np.random.default_rng(seed)
  shape = (b, 3, 5, 4)
  return [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]


# ------------------------------------------------------------------------ exact values


def test_hand_checked_values():
  """A few values worked out by hand (shift 3: sigma = 3s / (1 + 2s))."""
  u = np.array([0.0, 0.25, 0.5, 0.75, 0.9999], np.float32)
  ts = flow.timesteps_from_draws(u, 3.0, "uniform")
  np.testing.assert_array_equal(np.asarray(ts.index), [0, 250, 500, 750, 999])
  np.testing.assert_allclose(np.asarray(ts.sigma), [0.0, 0.5, 0.75, 0.9, 2.997 / 2.998], rtol=1e-7)
  np.testing.assert_array_equal(np.asarray(ts.model_time), [0, 500, 750, 900, 999])
  # The trap: s_100 = 1 - linspace(...)[100] is a hair below 0.1, so 1000 shift(s) is a
  # hair below 250 and the official floor is 249 (the exact i/1000 grid would give 250).
  ts = flow.timesteps_from_draws(np.float32([0.1005]), 3.0, "uniform")
  assert int(ts.index[0]) == 100 and float(ts.model_time[0]) == 249.0
  ts = flow.timesteps_from_draws(np.float32([0.1005]), 3.0, "uniform", grid="exact")
  assert float(ts.model_time[0]) == 250.0


@pytest.mark.parametrize("shift", (1.0, 3.0, 6.0))
def test_exact_values_for_given_uniform_draws(shift):
  b = 64
  x0, noise, pred = _data(b)
  # Uniform draws covering every index boundary region, incl. the 0/999 ends.
  u = np.concatenate(
    [
      np.float32([0.0, 0.0999, 0.1, 0.1001, 0.0605, 0.5, 0.999, 0.99999]),
      np.random.default_rng(1).random(b - 8).astype(np.float32),
    ]
  )
  ref = official_reference(torch.from_numpy(u), shift, *map(torch.from_numpy, (x0, noise, pred)))
  ours = flow.training_inputs(jnp.asarray(x0), jnp.asarray(noise), u, shift, "uniform")
  ts = flow.timesteps_from_draws(u, shift, "uniform")
  np.testing.assert_array_equal(np.asarray(ts.index), ref["index"])
  np.testing.assert_array_equal(np.asarray(ours.model_time), ref["model_time"].astype(np.float32))
  np.testing.assert_array_equal(np.asarray(ours.sigma), ref["sigma"])
  np.testing.assert_allclose(np.asarray(ours.x_t), ref["x_t"], rtol=0, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(ours.target), ref["target"])
  loss = flow.flow_loss(jnp.asarray(pred), jnp.asarray(x0), jnp.asarray(noise))
  np.testing.assert_allclose(float(loss), ref["loss"], rtol=1e-6)


def test_logit_normal_indices_match_torch_sigmoid():
  """Same normal draws -> same official index as torch's float32 sigmoid, 200k draws."""
  n = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
  ref_idx = (torch.sigmoid(n) * 1000).long().numpy()
  ts = flow.timesteps_from_draws(n.numpy(), 3.0, "logit_normal")
  np.testing.assert_array_equal(np.asarray(ts.index), ref_idx)
  # logit mean/std follow u = sigmoid(mean + std n)
  ts = flow.timesteps_from_draws(
    n.numpy()[:1000], 3.0, "logit_normal", logit_mean=0.3, logit_std=1.7
  )
  ref_idx = (torch.sigmoid(n[:1000] * 1.7 + 0.3) * 1000).long().numpy()
  np.testing.assert_array_equal(np.asarray(ts.index), ref_idx)


def test_mode_and_uniform_schemes():
  v = np.random.default_rng(0).random(1000).astype(np.float32)
  u_ref = 1 - v - 1.29 * (np.cos(np.pi * v / 2) ** 2 - 1 + v)
  ts = flow.timesteps_from_draws(v, 3.0, "mode", mode_scale=1.29)
  idx_ref = np.clip(np.floor(u_ref.astype(np.float32) * 1000), 0, 999)
  assert np.mean(np.asarray(ts.index) == idx_ref) > 0.995  # float32 cos ulp at boundaries
  for scale in (0.0, 0.8):  # a scale other than the default reaches the formula
    u_ref = 1 - v - scale * (np.cos(np.pi * v / 2) ** 2 - 1 + v)
    ts = flow.timesteps_from_draws(v, 3.0, "mode", mode_scale=scale)
    idx_ref = np.clip(np.floor(u_ref.astype(np.float32) * 1000), 0, 999)
    assert np.mean(np.asarray(ts.index) == idx_ref) > 0.995, scale
  ts = flow.timesteps_from_draws(v, 3.0, "uniform")
  np.testing.assert_array_equal(np.asarray(ts.index), np.floor(v * np.float32(1000)))
  with pytest.raises(ValueError, match="scheme"):
    flow.timesteps_from_draws(v, 3.0, "cosmap")
  with pytest.raises(ValueError, match="scheme"):
    flow.timestep_draws(jax.random.key(0), 4, "cosmap")


def test_loss_and_noising_basics():
  x0 = jnp.zeros((2, 2, 2, 3))
  noise = jnp.ones((2, 2, 2, 3))
  assert float(flow.flow_loss(jnp.zeros_like(x0), x0, noise)) == 1.0
  per = flow.flow_loss(jnp.stack([noise[0], 3 * noise[1]]), x0, noise, per_example=True)
  np.testing.assert_array_equal(np.asarray(per), [0.0, 4.0])
  xt = flow.add_noise(x0 + 2.0, noise, jnp.array([0.0, 1.0]))
  np.testing.assert_array_equal(np.asarray(xt[0]), 2.0)
  np.testing.assert_array_equal(np.asarray(xt[1]), 1.0)
  with pytest.raises(ValueError, match="same shape"):
    flow.add_noise(x0, noise[:1], 0.5)
  with pytest.raises(ValueError, match="batch"):
    flow.add_noise(x0, noise, jnp.ones(3))
  with pytest.raises(ValueError, match="shift"):
    flow.train_table(0.0)


def test_training_inputs_jit_and_rng():
  x0, noise, _ = _data(8)
  f = jax.jit(lambda x, n, d: flow.training_inputs(x, n, d, 3.0))
  d = np.random.default_rng(0).standard_normal(8).astype(np.float32)
  a, b = f(x0, noise, d), flow.training_inputs(jnp.asarray(x0), jnp.asarray(noise), d, 3.0)
  np.testing.assert_array_equal(np.asarray(a.model_time), np.asarray(b.model_time))
  for p, q in zip(a, b):  # jit may fuse a*x0 + s*eps into an FMA: 1 ulp
    np.testing.assert_allclose(np.asarray(p), np.asarray(q), rtol=0, atol=1e-6)
  ts = flow.sample_timesteps(jax.random.key(0), 8, 3.0)
  assert ts.model_time.shape == (8,) and ts.model_time.dtype == jnp.float32


def test_drop_captions_keeps_mask_semantics():
  cap = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
  null = -jnp.ones((3, 4))
  out = flow.drop_captions(jnp.array([0.05, 0.5]), cap, null, 0.1)
  np.testing.assert_array_equal(np.asarray(out[0]), -1.0)
  np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(cap[1]))


# ------------------------------------------------------------- the sampled distribution


def model_time_pmf(
  shift, *, mean=0.0, std=1.0, grid="official", rounding="floor", index_floor=True
):
  """Exact pmf over model times 0..999 implied by i = floor(1000 sigmoid(n)),
  n ~ N(mean, std), sigma = shift(s_i), t = floor(1000 sigma). The keyword arguments build
  the *wrong* models the statistical test must reject."""
  if not index_floor:
    # no index flooring: sigma = shift(u) continuous, t = floor(1000 sigma); P(t = k) =
    # P(shift^-1(k/1000) <= u < shift^-1((k+1)/1000)), shift^-1(y) = y / (k - (k-1) y).
    edges = np.arange(1001) / 1000.0
    u_edges = edges / (shift - (shift - 1) * edges)
  else:
    u_edges = None
  if u_edges is not None:
    with np.errstate(divide="ignore"):
      z = (np.log(u_edges) - np.log1p(-u_edges) - mean) / std
    return np.diff(stats.norm.cdf(z))
  edges = np.arange(1001) / 1000.0
  with np.errstate(divide="ignore"):
    z = (np.log(edges) - np.log1p(-edges) - mean) / std
  p_index = np.diff(stats.norm.cdf(z))
  s = flow.shift_sigma(flow.base_sigma_grid(1000, grid), shift)
  t = np.floor(1000 * s) if rounding == "floor" else np.round(1000 * s)
  t = np.minimum(t, 999).astype(int)
  return np.bincount(t, weights=p_index, minlength=1000)


def gof_pvalue(samples, pmf, min_expected=5.0):
  """Chi-square goodness of fit of integer samples to a pmf on 0..999; bins merged left to
  right until each expects >= min_expected. A sample outside the support gives 0."""
  samples = np.asarray(samples).astype(int)
  n = samples.size
  counts = np.bincount(samples, minlength=pmf.size)
  if np.any(counts[pmf <= 0] > 0):
    return 0.0
  obs, exp, o_acc, e_acc = [], [], 0.0, 0.0
  for o, e in zip(counts, pmf * n):
    o_acc += o
    e_acc += e
    if e_acc >= min_expected:
      obs.append(o_acc)
      exp.append(e_acc)
      o_acc = e_acc = 0.0
  obs[-1] += o_acc
  exp[-1] += e_acc
  obs, exp = np.array(obs), np.array(exp)
  chi2 = np.sum((obs - exp) ** 2 / exp)
  return float(stats.chi2.sf(chi2, obs.size - 1))


N_SAMPLES = 200_000


@pytest.mark.parametrize("shift", (3.0, 6.0))
def test_sampled_timestep_distribution_matches_official(shift):
  ts = flow.sample_timesteps(jax.random.key(int(shift)), N_SAMPLES, shift, "logit_normal")
  t = np.asarray(ts.model_time)
  assert np.all(t == np.floor(t))
  p = gof_pvalue(t, model_time_pmf(shift))
  print(f"shift {shift}: p-value vs official pmf {p:.3f}")
  assert p > 1e-4
  # The same samples reject wrong models: another shift, rounding instead of flooring,
  # no flooring of the index.
  wrong = {
    "shift x1.15": model_time_pmf(shift * 1.15),
    "shift 1": model_time_pmf(1.0),
    "round": model_time_pmf(shift, rounding="round"),
    "no index floor": model_time_pmf(shift, index_floor=False),
    "logit std 1.1": model_time_pmf(shift, std=1.1),
    "grid i/1000": model_time_pmf(shift, grid="exact"),
  }
  for name, pmf in wrong.items():
    assert gof_pvalue(t, pmf) < 1e-8, name


def test_statistical_test_rejects_wrong_samplers():
  """Samples from deliberately wrong implementations fail against the official pmf."""
  shift = 3.0
  pmf = model_time_pmf(shift)
  n = np.random.default_rng(0).standard_normal(N_SAMPLES).astype(np.float32)
  u = 1 / (1 + np.exp(-n.astype(np.float64)))
  good = np.floor(
    1000 * flow.shift_sigma(flow.base_sigma_grid()[np.floor(1000 * u).astype(int)], shift)
  )
  assert gof_pvalue(good, pmf) > 1e-4  # sanity: the numpy re-implementation passes
  wrong_shift = np.asarray(flow.timesteps_from_draws(n, 3.5).model_time)
  assert gof_pvalue(wrong_shift, pmf) < 1e-8
  no_index_floor = np.floor(1000 * flow.shift_sigma(u, shift))
  assert gof_pvalue(no_index_floor, pmf) < 1e-8
  rounded = np.round(1000 * flow.shift_sigma(np.floor(1000 * u) / 1000, shift))
  assert gof_pvalue(np.minimum(rounded, 999), pmf) < 1e-8
  exact_grid = np.asarray(flow.timesteps_from_draws(n, shift, grid="exact").model_time)
  assert gof_pvalue(exact_grid, pmf) < 1e-8  # i/1000 instead of the official linspace
  unshifted_time = np.floor(1000 * u)  # model time = index (shift forgotten in the time)
  assert gof_pvalue(unshifted_time, pmf) < 1e-8


# ------------------------------------------------ the train step's timesteps, per scheme


def _mode_inverse(u, scale=1.29, iters=80):
  """v with u_mode(v) = u (u_mode decreases from 1 at v = 0 to 0 at v = 1), by bisection."""
  f = lambda v: 1 - v - scale * (np.cos(np.pi * v / 2) ** 2 - 1 + v)  # noqa: E731
  lo, hi = np.zeros_like(u), np.ones_like(u)
  for _ in range(iters):
    mid = (lo + hi) / 2
    above = f(mid) > u  # f decreasing: the root lies right of mid
    lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
  return (lo + hi) / 2


def scheme_model_time_pmf(scheme, shift):
  """Exact pmf over model times 0..999 of a scheme: P(index i) = P(i/1000 <= u < (i+1)/1000)
  for the scheme's u, pushed through the official table t_i = floor(1000 shift(s_i))."""
  edges = np.arange(1001) / 1000.0
  if scheme == "logit_normal":
    return model_time_pmf(shift)
  if scheme == "uniform":
    p_index = np.full(1000, 1e-3)
  elif scheme == "mode":  # u = u_mode(v), v ~ U[0, 1), u_mode decreasing
    v_edges = _mode_inverse(edges)
    p_index = v_edges[:-1] - v_edges[1:]
  else:
    raise ValueError(scheme)
  t = np.floor(1000 * flow.shift_sigma(flow.base_sigma_grid(1000), shift)).astype(int)
  return np.bincount(np.minimum(t, 999), weights=p_index, minlength=1000)


class _TimeSpy:
  """A stand-in for SanaDiT that records the model time and (the first entry of) the
  caption the train step hands it."""

  def __init__(self):
    import flax.linen as nn

    seen = self.seen = []

    class Spy(nn.Module):
      config: object

      @nn.compact
      def __call__(self, x, t, caption, mask):
        jax.debug.callback(
          lambda v, c: seen.append((np.asarray(v), np.asarray(c))), t, caption[:, 0, 0]
        )
        return x * self.param("w", nn.initializers.zeros, ())

    self.module = Spy


@pytest.mark.parametrize("scheme", flow.TIMESTEP_SAMPLERS)
def test_train_step_timesteps_follow_the_scheme(scheme, monkeypatch):
  """The model time the real train step feeds the model has the scheme's exact
  distribution, and so do the scheme's own samples (flow.sample_timesteps); the step drops
  captions at the cfg_dropout rate."""
  import ml_collections
  import optax
  from sana_jax.configs import common
  from sana_jax.models import dit
  from sana_jax.train import state as state_lib
  from sana_jax.train import step as step_lib

  shift, b, steps = 3.0, 50_000, 4
  spy = _TimeSpy()
  monkeypatch.setattr(dit, "SanaDiT", spy.module)
  config = ml_collections.ConfigDict(dict(flow_shift=shift, model={}))
  config.train = common.train_config(timestep_sampler=scheme, global_batch=b)
  tx = optax.sgd(0.1)
  state = state_lib.create({"w": jnp.zeros(())}, tx)
  assert config.train.cfg_dropout == 0.1
  batch = {
    "latent": jnp.ones((b, 1, 1, 1)),
    "caption": jnp.ones((b, 1, 1)),
    "caption_mask": jnp.ones((b, 1), jnp.int32),
  }
  step = jax.jit(lambda s: step_lib.train_step(s, batch, jnp.zeros((1, 1)), config=config, tx=tx))
  for _ in range(steps):
    state, _ = step(state)
  jax.effects_barrier()
  t = np.concatenate([v for v, _ in spy.seen])
  assert t.shape == (b * steps,)
  # CFG dropout: captions (ones) replaced by the null caption (zeros) at rate cfg_dropout.
  dropped = np.mean(np.concatenate([c for _, c in spy.seen]) == 0)
  sd = math.sqrt(0.1 * 0.9 / t.size)
  assert abs(dropped - config.train.cfg_dropout) < 5 * sd, dropped
  pmf = scheme_model_time_pmf(scheme, shift)
  p = gof_pvalue(t, pmf)
  own = np.asarray(flow.sample_timesteps(jax.random.key(1), b * steps, shift, scheme).model_time)
  p_own = gof_pvalue(own, pmf)
  print(
    f"{scheme}: p-value of the step's model times {p:.3g}, of sample_timesteps {p_own:.3g}; "
    f"share at model time 0: step {np.mean(t == 0):.3f}, sampler {np.mean(own == 0):.3f}"
  )
  assert p_own > 1e-4, "the scheme's own sampler does not follow its pmf"
  assert p > 1e-4, "the train step's model times do not follow the scheme"
  # The same samples reject the other schemes' distributions.
  for other in flow.TIMESTEP_SAMPLERS:
    if other != scheme:
      assert gof_pvalue(t, scheme_model_time_pmf(other, shift)) < 1e-8, other
