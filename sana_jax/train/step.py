"""The jitted train step: flow-matching loss, CFG dropout, accumulation; then `update`.

LoRA (state.frozen is set): the loss is a function of the adapters (state.params) with the
frozen base closed over, so `jax.grad` never forms a base gradient. train.param_dtype
"bfloat16": the trained parameters are stored (and differentiated) in bf16, each update is
computed in fp32 and stochastically rounded back (no fp32 master copy). train.ema: "fp32"
(update.py's EMA), "bf16" (the EMA stored in bf16, updated in fp32 and stochastically
rounded back, else a 0.9999 EMA would never move: its step is far below bf16's resolution)
or "off" (no EMA; the EMA update is dropped from the program).
"""

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


def _loss_fn(params, frozen, model, batch, noise, draws, drop_u, null_caption, config):
  """params: the trained tree; frozen: the frozen base under LoRA (not differentiated), or
  None."""
  tc = config.train
  if frozen is not None:
    params = state_lib.merge(params, frozen)
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
  model = dit.SanaDiT(state_lib.model_config(config))
  key = jax.random.fold_in(jax.random.key(tc.seed), state.step)
  k_noise, k_t, k_drop = jax.random.split(key, 3)
  b = batch["latent"].shape[0]
  noise = jax.random.normal(k_noise, batch["latent"].shape, jnp.float32)
  draws = flow.timestep_draws(k_t, (b,), tc.timestep_sampler)  # normals or U[0, 1)
  drop_u = jax.random.uniform(k_drop, (b,))
  grad_fn = jax.value_and_grad(_loss_fn)
  k = tc.grad_accum
  if k == 1:
    loss, grads = grad_fn(
      state.params, state.frozen, model, batch, noise, draws, drop_u, null_caption, config
    )
  else:
    split = lambda a: a.reshape(k, a.shape[0] // k, *a.shape[1:])  # noqa: E731
    micro = jax.tree_util.tree_map(split, (batch, noise, draws, drop_u))

    def body(acc, xs):
      mb, n, d, u = xs
      l, g = grad_fn(state.params, state.frozen, model, mb, n, d, u, null_caption, config)
      return jax.tree_util.tree_map(jnp.add, acc, (l, g)), None

    # accumulated in fp32 whatever the parameters' dtype (train.param_dtype)
    zero = (
      jnp.zeros(()),
      jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params),
    )
    (loss, grads), _ = jax.lax.scan(body, zero, micro)
    loss, grads = jax.tree_util.tree_map(lambda a: a / k, (loss, grads))

  return _apply(state, loss, grads, tx=tx, tc=tc)


def _hash32(x: jax.Array) -> jax.Array:
  """murmur3's 32-bit finaliser (uint32 -> uint32, elementwise)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def stochastic_bf16(x: jax.Array, step: jax.Array, salt: int) -> jax.Array:
  """fp32 -> bf16, rounded up with probability equal to the dropped fraction (unbiased).
  The dither is a hash of (element index, step, salt): elementwise, so XLA fuses it (no
  random-bits buffer), identical under any sharding, reproduced exactly on resume."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  idx = jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape)
  mix = step.astype(jnp.uint32) * jnp.uint32(0x9E3779B1) + jnp.uint32((salt * 0x27D4EB2F) % 2**32)
  dither = _hash32(idx * jnp.uint32(0x85EBCA77) + mix) >> 16
  rounded = (bits + dither) & jnp.uint32(0xFFFF0000)
  out = jax.lax.bitcast_convert_type(rounded, jnp.float32)
  return jnp.where(jnp.isfinite(x), out, x).astype(jnp.bfloat16)


def _stochastic_tree(tree, step, salt: int):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  out = [stochastic_bf16(x, step, salt + i) for i, x in enumerate(leaves)]
  return jax.tree_util.tree_unflatten(treedef, out)


def _apply(state, loss, grads, *, tx, tc):
  """update.apply_gradients, with train.ema's storage and train.param_dtype.

  fp32 EMA and parameters: update.py as it is. Otherwise update.py runs with its EMA on a
  stand-in (dead code to XLA) and the EMA is formed here, decay * e + (1 - decay) * p like
  update.py's, one elementwise pass per leaf (no fp32 copy of a bf16 tree): "off" none,
  "bf16" computed in fp32 and stochastically rounded. bf16 parameters: the optimizer sees
  their fp32 values and fp32 gradients; the updated values are stochastically rounded back.
  """
  mode, dtype = state_lib.ema_mode(tc), state_lib.param_dtype(tc)
  if mode == "fp32" and dtype == "float32":
    return update_lib.apply_gradients(state, loss, grads, tx=tx, tc=tc)
  f32 = lambda t: jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), t)  # noqa: E731
  params = f32(state.params) if dtype == "bfloat16" else state.params
  grads = f32(grads) if dtype == "bfloat16" else grads
  stand_in = state.replace(params=params, ema_params=params)
  new, metrics = update_lib.apply_gradients(stand_in, loss, grads, tx=tx, tc=tc)
  finite, decay, salt = metrics["finite"], tc.ema_decay, tc.seed * 1_000_003
  updated = new.params  # fp32; the old values where the step was skipped
  ema = None
  if mode != "off":

    def ema_leaf(e, p):
      e32 = e.astype(jnp.float32)
      return jnp.where(finite, decay * e32 + (1 - decay) * p, e32)

    ema = jax.tree_util.tree_map(ema_leaf, state.ema_params, updated)
    if mode == "bf16":
      ema = _stochastic_tree(ema, state.step, salt)
  if dtype == "bfloat16":
    updated = _stochastic_tree(updated, state.step, salt + 500_009)
  return new.replace(params=updated, ema_params=ema), metrics


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

  model_cfg = state_lib.model_config(config)

  def init(rng):
    params = dit.init_params(model_cfg, rng)
    return state_lib.create(params, tx, config.train, lora=state_lib.is_lora(model_cfg))

  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
    return jax.jit(init, out_shardings=state_shardings)(jax.random.key(config.train.seed))
