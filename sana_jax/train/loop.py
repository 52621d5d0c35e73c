"""The training loop: validate, build the mesh, resume, step, log, checkpoint.

`train(config, workdir)` resumes automatically from the newest readable checkpoint in
workdir. SIGTERM (preemption) saves a checkpoint at the next step boundary and stops.
"""

from __future__ import annotations

import logging
import pathlib
import signal
import time

import jax
import ml_collections
import numpy as np
import tqdm

from sana_jax import parallel
from sana_jax.data import input_pipeline
from sana_jax.models.dit_config import DiTConfig
from sana_jax.train import checkpoint
from sana_jax.train import metrics as metrics_lib
from sana_jax.train import optimizer as optim_lib
from sana_jax.train import state as state_lib
from sana_jax.train import step as step_lib

log = logging.getLogger(__name__)

NULL_CAPTION_FILE = "null_caption.npz"


class NonFiniteError(RuntimeError):
  pass


def mesh_devices(config: ml_collections.ConfigDict) -> list:
  """The devices of the mesh: all, or the first mesh.num_devices."""
  n = config.mesh.num_devices
  devices = jax.devices()
  if n == -1:
    return devices
  if not 1 <= n <= len(devices):
    raise ValueError(f"mesh.num_devices={n}, but {len(devices)} devices are available")
  return devices[:n]


def validate(config: ml_collections.ConfigDict) -> dict:
  """Every check that needs no compile; clear errors. Returns the dataset's shapes."""
  n_devices = len(mesh_devices(config))
  mesh = config.mesh
  data, fsdp, _ = parallel.mesh_shape(n_devices, mesh.data, mesh.fsdp, mesh.tensor)
  tc = config.train
  if tc.global_batch % (data * fsdp):
    raise ValueError(f"train.global_batch={tc.global_batch} is not divisible by the batch "
                     f"axes data*fsdp = {data}*{fsdp} = {data * fsdp}")
  if tc.grad_accum < 1 or tc.global_batch % (tc.grad_accum * data * fsdp):
    raise ValueError(f"train.global_batch={tc.global_batch} must split into grad_accum="
                     f"{tc.grad_accum} micro-batches divisible by data*fsdp={data * fsdp}")
  optim_lib.make_optimizer(tc)  # validates the optimizer name
  if not config.data.dir:
    raise ValueError("data.dir is not set")
  if not pathlib.Path(config.data.dir).exists():
    raise FileNotFoundError(f"dataset not found: data.dir={config.data.dir}")
  shapes = input_pipeline.dataset_shapes(config.data.dir)
  m = DiTConfig.coerce(config.model)
  bad = []
  if shapes["latent_channels"] != m.in_channels:
    bad.append(f"latents have {shapes['latent_channels']} channels, model.in_channels="
               f"{m.in_channels}")
  if shapes["caption_channels"] != m.caption_channels:
    bad.append(f"captions are {shapes['caption_channels']} wide, model.caption_channels="
               f"{m.caption_channels}")
  for h, w in shapes["buckets"]:
    if h % m.patch_size or w % m.patch_size:
      bad.append(f"latent bucket {h}x{w} is not a multiple of model.patch_size={m.patch_size}")
  if bad:
    raise ValueError(f"dataset {config.data.dir} does not fit the model: " + "; ".join(bad))
  return shapes


def load_null_caption(data_dir: str) -> np.ndarray:
  found = sorted(pathlib.Path(data_dir).glob(f"**/{NULL_CAPTION_FILE}"))
  if not found:
    raise FileNotFoundError(f"{data_dir}: no {NULL_CAPTION_FILE} (the null-caption embedding "
                            "written by the preprocessing command)")
  return np.load(found[0])["caption"].astype(np.float32)


def init_params_from(path: str, model_cfg: DiTConfig, like):
  """Parameters of a Flax DiT folder (`train.init_from`), cast to the dtypes of `like` (the
  fresh state's parameters): shipped folders store fp16, training keeps fp32 masters."""
  from sana_jax.weights import dit as dit_weights
  params, cfg, _ = dit_weights.load_flax(path)
  if cfg.replace(**{k: getattr(model_cfg, k) for k in ("compute_dtype", "remat_policy",
                                                       "depthwise_impl")}) != model_cfg:
    diff = {k: (v, getattr(model_cfg, k)) for k, v in cfg.to_dict().items()
            if getattr(model_cfg, k) != v}
    raise ValueError(f"train.init_from {path} does not fit the model config "
                     f"(checkpoint, config): {diff}")
  return jax.tree.map(lambda p, ref: np.asarray(p).astype(ref.dtype), params, like)


def train(config: ml_collections.ConfigDict, workdir: str, *, max_steps: int | None = None,
          progress: bool = True) -> state_lib.TrainState:
  """Runs (or resumes) training to config.train.steps (or max_steps). Returns the state."""
  parallel.maybe_initialize_distributed()
  shapes = validate(config)
  tc = config.train
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  model_cfg = DiTConfig.coerce(config.model)
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor,
                            devices=mesh_devices(config))
  tx = optim_lib.make_optimizer(tc)
  shardings = state_lib.state_shardings(model_cfg, tx, mesh)
  abstract = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      state_lib.abstract_state(model_cfg, tx), shardings)

  loader, plan = input_pipeline.make_loader(config.data.dir, tc.global_batch, tc.seed,
                                            num_epochs=config.data.num_epochs,
                                            worker_count=config.data.get("worker_count", 0))
  iterator = iter(loader)
  mgr = checkpoint.manager(workdir, tc.keep_checkpoints, tc.async_checkpoints)
  start, state = checkpoint.restore_latest(mgr, abstract, iterator)
  if state is None:
    start = 0
    state = step_lib.init_state(config, tx, mesh, shardings)
    if tc.init_from:
      params = init_params_from(tc.init_from, model_cfg, state.params)
      state = state.replace(params=jax.device_put(params, shardings.params),
                            ema_params=jax.device_put(params, shardings.ema_params),
                            opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(
                                jax.device_put(params, shardings.params)))
  null_caption = load_null_caption(config.data.dir)
  step_fn = step_lib.jit_train_step(config, tx, mesh, shardings)
  total = tc.steps if max_steps is None else min(tc.steps, max_steps)
  config_dict = config.to_dict()

  preempted = {"flag": False}
  previous = signal.getsignal(signal.SIGTERM)

  def on_sigterm(signum, frame):
    del signum, frame
    preempted["flag"] = True

  try:
    signal.signal(signal.SIGTERM, on_sigterm)
  except ValueError:  # not the main thread
    previous = None

  writer = metrics_lib.Writer(workdir, enabled=jax.process_index() == 0)
  h, w = shapes["buckets"][0]
  flops = metrics_lib.train_step_flops(model_cfg, h, w, shapes["caption_len"], tc.global_batch,
                                       model_cfg.remat_policy != "none")
  bar = tqdm.tqdm(total=total, initial=start, desc="train", disable=not progress,
                  dynamic_ncols=True)
  t_last, step_last = time.perf_counter(), start
  step = start
  try:
    while step < total:
      local = next(iterator)
      batch = {k: jax.make_array_from_process_local_data(step_fn.batch_shardings[k], v)
               for k, v in local.items()}
      state, m = step_fn(state, batch, null_caption)
      step += 1
      bar.update(1)
      if step % tc.log_every == 0 or step == total:
        m = jax.device_get(m)
        run = int(state.nonfinite_run)
        now = time.perf_counter()
        dt = (now - t_last) / max(step - step_last, 1)
        t_last, step_last = now, step
        scalars = {"loss": m["loss"], "grad_norm": m["grad_norm"], "lr": m["lr"],
                   "skipped": int(state.skipped), "steps_per_s": 1 / dt,
                   "images_per_s": tc.global_batch / dt, "tflops": flops / dt / 1e12}
        if tc.peak_tflops:
          scalars["mfu"] = flops / dt / 1e12 / (tc.peak_tflops * jax.device_count())
        writer.write(step, scalars)
        bar.set_postfix(loss=f"{float(m['loss']):.4f}", skipped=int(state.skipped))
        if run >= tc.max_consecutive_nonfinite:
          raise NonFiniteError(
              f"{run} consecutive steps had a non-finite loss or gradient (up to step {step}); "
              "stopping. Lower train.lr, raise train.warmup_steps or check the data; the last "
              "good checkpoint is kept.")
      if step % tc.checkpoint_every == 0 or step == total or preempted["flag"]:
        checkpoint.save(mgr, step, state, iterator, config_dict, force=True)
      if preempted["flag"]:
        log.warning("SIGTERM: saved a checkpoint at step %d and stopped", step)
        break
  finally:
    bar.close()
    mgr.wait_until_finished()
    mgr.close()
    writer.close()
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
  return state
