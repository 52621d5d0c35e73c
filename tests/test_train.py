"""Training: it learns, sharding is invisible, nothing is lost on a kill, bad configs fail early."""

import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from sana_jax.diffusion import flow
from sana_jax.models import dit
from sana_jax.train import loop
from tests import train_fixtures

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return train_fixtures.write_tiny_dataset(tmp_path_factory.mktemp("data"))


def _config(data_dir, **train):
  config = tiny.get_config()
  config.data.dir = data_dir
  config.train.update(train)
  return config


def _fixed_loss(config, params, data_dir):
  """Mean loss over the whole set at 16 fixed (noise, timestep) draws."""
  from sana_jax.data import latents_tfds
  src = latents_tfds.open_dataset(data_dir)["train_4x6"]
  batch = {k: np.stack([np.asarray(src[i][k]) for i in range(len(src))])
           for k in ("latent", "caption", "caption_mask")}
  model = dit.SanaDiT(config.model)

  @jax.jit
  def loss(params, key):
    k1, k2 = jax.random.split(key)
    x0 = jnp.asarray(batch["latent"])
    noise = jax.random.normal(k1, x0.shape)
    ti = flow.training_inputs(x0, noise, jax.random.normal(k2, (x0.shape[0],)),
                              config.flow_shift)
    pred = model.apply({"params": params}, ti.x_t, ti.model_time, batch["caption"],
                       batch["caption_mask"])
    return flow.flow_loss(pred, x0, noise)

  return float(np.mean([loss(params, jax.random.key(100 + i)) for i in range(16)]))


def test_tiny_config_overfits(data_dir, tmp_path):
  config = _config(data_dir, steps=300, cfg_dropout=0.0, ema_decay=0.0, checkpoint_every=1000,
                   lr=3e-3, warmup_steps=20)
  init = dit.init_params(config.model, jax.random.key(config.train.seed))
  start = _fixed_loss(config, init, data_dir)
  state = loop.train(config, str(tmp_path), progress=False)
  end = _fixed_loss(config, jax.device_get(state.params), data_dir)
  print(f"overfit: fixed-draw loss {start:.4f} -> {end:.4f} ({end / start:.3f}x)")
  assert int(state.skipped) == 0
  assert end < 0.2 * start
