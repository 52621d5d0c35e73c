"""The jitted train step: flow-matching loss, CFG dropout, accumulation; then `update`."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from sana_jax import parallel
from sana_jax.diffusion import flow
from sana_jax.models import dit
from sana_jax.train import state as state_lib
from sana_jax.train import update as update_lib


def _loss_fn(params, model, batch, noise, draws, drop_u, null_caption, config):
  tc = config.train
  ti = flow.training_inputs(batch["latent"], noise, draws, config.flow_shift, tc.timestep_sampler)
  caption = flow.drop_captions(drop_u, batch["caption"], null_caption, tc.cfg_dropout)
  pred = model.apply({"params": params}, ti.x_t, ti.model_time, caption, batch["caption_mask"])
  return flow.flow_loss(pred, batch["latent"], noise)


def train_step(
  state: state_lib.TrainState,
  batch: dict,
  null_caption: jax.Array,
  *,
  config: ml_collections.ConfigDict,
  tx: optax.GradientTransformation,
) -> tuple[state_lib.TrainState, dict]:
  """One optimizer step on a global batch.

  batch: {"latent" (B, h, w, C), "caption" (B, L, Cy), "caption_mask" (B, L)}.
  null_caption: (L, Cy), the CFG-dropout replacement (its mask is the caption's).
  The randomness (noise, timesteps, dropout) is a function of (train.seed, step), so a
  resumed run draws exactly what the uninterrupted one did. With train.grad_accum = k the
  batch is split into k equal micro-batches whose gradients are averaged.
  """
  tc = config.train
  model = dit.SanaDiT(config.model)
  key = jax.random.fold_in(jax.random.key(tc.seed), state.step)
  k_noise, k_t, k_drop = jax.random.split(key, 3)
  b = batch["latent"].shape[0]
  noise = jax.random.normal(k_noise, batch["latent"].shape, jnp.float32)
  draws = flow.timestep_draws(k_t, (b,), tc.timestep_sampler)  # normals or U[0, 1)
  drop_u = jax.random.uniform(k_drop, (b,))
  grad_fn = jax.value_and_grad(_loss_fn)
  k = tc.grad_accum
  if k == 1:
    loss, grads = grad_fn(state.params, model, batch, noise, draws, drop_u, null_caption, config)
  else:
    split = lambda a: a.reshape(k, a.shape[0] // k, *a.shape[1:])  # noqa: E731
    micro = jax.tree_util.tree_map(split, (batch, noise, draws, drop_u))

    def body(acc, xs):
      mb, n, d, u = xs
      l, g = grad_fn(state.params, model, mb, n, d, u, null_caption, config)
      return jax.tree_util.tree_map(jnp.add, acc, (l, g)), None

    zero = (jnp.zeros(()), jax.tree_util.tree_map(jnp.zeros_like, state.params))
    (loss, grads), _ = jax.lax.scan(body, zero, micro)
    loss, grads = jax.tree_util.tree_map(lambda a: a / k, (loss, grads))

  return update_lib.apply_gradients(state, loss, grads, tx=tx, tc=tc)


def jit_train_step(config, tx, mesh, state_shardings):
  """train_step jitted with in/out shardings and the state donated."""
  batch_sh = {
    "latent": parallel.batch_sharding(mesh, 4),
    "caption": parallel.batch_sharding(mesh, 3),
    "caption_mask": parallel.batch_sharding(mesh, 2),
  }
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  fn = functools.partial(train_step, config=config, tx=tx)
  jitted = jax.jit(
    fn,
    in_shardings=(state_shardings, batch_sh, replicated),
    out_shardings=(state_shardings, replicated),
    donate_argnums=(0,),
  )

  def run(state, batch, null_caption):
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
      return jitted(state, batch, null_caption)

  run.jitted = jitted
  run.batch_shardings = batch_sh
  return run


def init_state(config, tx, mesh, state_shardings):
  """A fresh, sharded train state (parameters initialised on their devices)."""

  def init(rng):
    return state_lib.create(dit.init_params(config.model, rng), tx)

  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
    return jax.jit(init, out_shardings=state_shardings)(jax.random.key(config.train.seed))
