"""The train state and its shardings.

Full training: `params` is the whole DiT tree. LoRA training (the model config has
lora_rank > 0, from `train.lora.*`): `params` holds only the adapter leaves (lora_a /
lora_b, the same nested paths as in the model tree), so the optimizer state and the EMA
cover only them; the rest of the tree, the frozen base, is `frozen` (fp32 or bf16), never
differentiated, sharded by the same logical rules and checkpointed with the state.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sana_jax import parallel
from sana_jax.models import dit
from sana_jax.models.dit_config import DEFAULT_LORA_TARGETS, LORA_TARGETS, DiTConfig
from sana_jax import optim as came_lib

ADAPTER_LEAVES = ("lora_a", "lora_b")
EMA_MODES = ("fp32", "bf16", "off")
BASE_DTYPES = ("float32", "bfloat16")
PARAM_DTYPES = ("float32", "bfloat16")


class TrainState(flax.struct.PyTreeNode):
  """step: int32 scalar; params: the trained tree (the whole DiT, or its adapters under
  LoRA; fp32, or bf16 under train.param_dtype="bfloat16"); opt_state: optax state of `params`; ema_params: like `params` (fp32, bf16
  under train.ema="bf16", None under "off"); skipped: steps skipped for non-finite loss or
  gradients; nonfinite_run: the current run of consecutive skipped steps; frozen: the
  frozen base under LoRA (the DiT tree without its adapter leaves), else None."""

  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  skipped: jax.Array
  nonfinite_run: jax.Array
  frozen: Any = None


# ----------------------------------------------------------------------------- config


def lora_settings(tc) -> dict:
  """train.lora with its defaults (configs written before LoRA have no such section):
  {"rank", "alpha", "targets", "base", "base_dtype"}."""
  lora = dict(rank=0, alpha=0.0, targets=DEFAULT_LORA_TARGETS, base="", base_dtype="float32")
  section = tc.get("lora", None) if hasattr(tc, "get") else None
  if section is not None:
    lora.update(section.to_dict() if hasattr(section, "to_dict") else dict(section))
  lora["targets"] = tuple(lora["targets"])
  return lora


def ema_mode(tc) -> str:
  """train.ema ("fp32" when the config has none)."""
  return tc.get("ema", "fp32") if tc is not None and hasattr(tc, "get") else "fp32"


def param_dtype(tc) -> str:
  """train.param_dtype ("float32" when the config has none)."""
  return tc.get("param_dtype", "float32") if tc is not None and hasattr(tc, "get") else "float32"


def check_train_settings(tc) -> list[str]:
  """Named problems of train.lora.* and train.ema (empty when they are fine)."""
  bad = []
  lora = lora_settings(tc)
  rank, alpha = lora["rank"], lora["alpha"]
  if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
    bad.append(f"train.lora.rank={rank!r} must be an integer >= 0 (0 = no LoRA)")
  if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha < 0:
    bad.append(f"train.lora.alpha={alpha!r} must be a number >= 0 (0 = the rank: scale 1)")
  unknown = [t for t in lora["targets"] if t not in LORA_TARGETS]
  if unknown or not lora["targets"]:
    bad.append(
      f"train.lora.targets={list(lora['targets'])!r}: "
      + (f"unknown {unknown}" if unknown else "empty")
      + f"; allowed: {', '.join(LORA_TARGETS)}"
    )
  if lora["base_dtype"] not in BASE_DTYPES:
    bad.append(
      f"train.lora.base_dtype={lora['base_dtype']!r} must be one of {', '.join(BASE_DTYPES)}"
    )
  if lora["base"] and not (isinstance(rank, int) and rank > 0):
    bad.append(f"train.lora.base={lora['base']!r} is set but train.lora.rank is 0 (no LoRA)")
  if isinstance(rank, int) and rank > 0 and tc.get("init_from", ""):
    bad.append(
      f"train.init_from={tc.init_from!r} and train.lora.rank={rank}: a LoRA run starts "
      "from train.lora.base (the frozen base), not train.init_from"
    )
  if param_dtype(tc) not in PARAM_DTYPES:
    bad.append(f"train.param_dtype={param_dtype(tc)!r} must be one of {', '.join(PARAM_DTYPES)}")
  if ema_mode(tc) not in EMA_MODES:
    bad.append(f"train.ema={ema_mode(tc)!r} must be one of {', '.join(EMA_MODES)}")
  guard = tc.get("nonfinite_guard", "cond")
  if guard not in ("cond", "where"):
    bad.append(f"train.nonfinite_guard={guard!r} must be one of cond, where")
  return bad


def model_config(config) -> DiTConfig:
  """The DiT config a training config builds: config.model, with lora_rank / lora_alpha /
  lora_targets from train.lora when train.lora.rank > 0."""
  cfg = DiTConfig.coerce(config.model)
  tc = config.get("train", None) if hasattr(config, "get") else None
  if tc is None:
    return cfg
  lora = lora_settings(tc)
  if lora["rank"]:
    cfg = cfg.replace(
      lora_rank=lora["rank"], lora_alpha=float(lora["alpha"]), lora_targets=lora["targets"]
    )
  return cfg


def is_lora(model_cfg) -> bool:
  return DiTConfig.coerce(model_cfg).lora_rank > 0


# ----------------------------------------------------------------------------- trees


def split_adapters(tree: Mapping) -> tuple[dict, dict]:
  """A DiT-shaped nested dict -> (adapters: only the lora_a / lora_b leaves, base: the
  rest), both nested dicts with the original paths (empty branches dropped)."""
  adapters, base = {}, {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      a, b = split_adapters(v)
      if a:
        adapters[k] = a
      if b:
        base[k] = b
    elif k in ADAPTER_LEAVES:
      adapters[k] = v
    else:
      base[k] = v
  return adapters, base


def merge(adapters: Mapping, base: Mapping) -> dict:
  """The inverse of split_adapters: one nested dict holding both trees' leaves."""
  out = dict(base)
  for k, v in adapters.items():
    out[k] = merge(v, out.get(k, {})) if isinstance(v, Mapping) else v
  return out


def _ema_init(params, mode: str):
  if mode == "off":
    return None
  dtype = jnp.bfloat16 if mode == "bf16" else None
  return jax.tree_util.tree_map(lambda p: jnp.array(p, dtype=dtype or p.dtype), params)


def create(params, tx, tc=None, *, lora: bool = False) -> TrainState:
  """The step-0 state of a DiT tree `params` (fp32). lora: train only its adapter leaves,
  the rest becomes the frozen base (in train.lora.base_dtype). tc: the train config
  (train.ema, train.lora.base_dtype); None = fp32 EMA, fp32 base."""
  zero = jnp.zeros((), jnp.int32)
  frozen = None
  if lora:
    params, frozen = split_adapters(params)
    if tc is not None and lora_settings(tc)["base_dtype"] == "bfloat16":
      frozen = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), frozen)
  opt_state = tx.init(params)  # of the fp32 values: the update runs in fp32
  ema = _ema_init(params, ema_mode(tc))
  if param_dtype(tc) == "bfloat16":
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
  return TrainState(
    step=zero,
    params=params,
    opt_state=opt_state,
    ema_params=ema,
    skipped=zero,
    nonfinite_run=zero,
    frozen=frozen,
  )


def abstract_state(model_cfg, tx, tc=None) -> TrainState:
  """The state's shapes and dtypes (nothing allocated). LoRA iff model_cfg.lora_rank > 0."""
  params = dit.abstract_params(model_cfg)
  return jax.eval_shape(lambda p: create(p, tx, tc, lora=is_lora(model_cfg)), params)


def state_shardings(model_cfg, tx, mesh: Mesh, tc=None) -> TrainState:
  """NamedShardings for every leaf: params / EMA / frozen base by the logical rules, the
  optimizer state like its parameter (CAME statistics on the parameter's remaining axes),
  scalars replicated."""
  p_sh = parallel.param_shardings(model_cfg, mesh)
  frozen = None
  if is_lora(model_cfg):
    p_sh, frozen = split_adapters(p_sh)
  abstract = abstract_state(model_cfg, tx, tc)
  replicated = NamedSharding(mesh, P())
  return TrainState(
    step=replicated,
    params=p_sh,
    opt_state=came_lib.state_sharding(abstract.opt_state, p_sh),
    ema_params=None if abstract.ema_params is None else p_sh,
    skipped=replicated,
    nonfinite_run=replicated,
    frozen=frozen,
  )
