"""Training options, each against a reference computed independently of the code under test.

EMA (the numpy recurrence over the per-step parameters; exports default to it),
grad_accum (k micro-batches give the one-batch gradient), the non-finite skip and
NonFiniteError, sqrt_lr_scaling and warm-up, grad_clip, every optimizer through
make_optimizer (torch.optim.AdamW / came-pytorch), batches from several aspect buckets,
and the FLOP figures of train/metrics.py (counted from the step's jaxpr).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from benchmarks import bench_gemm
from sana_jax import optim as came_lib
from sana_jax.configs import tiny
from sana_jax.data import latents_tfds
from sana_jax.models import dit
from sana_jax.models.dit_config import DiTConfig
from sana_jax.optim import quant8
from sana_jax.train import checkpoint
from sana_jax.train import loop
from sana_jax.train import metrics
from sana_jax.train import optimizer as optim_lib
from sana_jax.train import state as state_lib
from sana_jax.train import step as step_lib

HW, CAPTION_LEN, CAPTION_CHANNELS, CHANNELS = (4, 6), 12, 20, 4


def _config(**train):
  config = tiny.get_config()
  config.train.update(train)
  return config


def _batch(seed, b=8, hw=HW):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, CAPTION_LEN + 1, b)
  return {
    "latent": jnp.asarray(rng.standard_normal((b, *hw, CHANNELS)), jnp.float32),
    "caption": jnp.asarray(rng.standard_normal((b, CAPTION_LEN, CAPTION_CHANNELS)), jnp.float32),
    "caption_mask": jnp.asarray(np.arange(CAPTION_LEN)[None] < lengths[:, None], jnp.int32),
  }


NULL = jnp.asarray(
  np.random.default_rng(99).standard_normal((CAPTION_LEN, CAPTION_CHANNELS)), jnp.float32
)


def _leaves(tree):
  return [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(tree)]


def _assert_trees_close(got, want, rtol, what):
  for i, (a, b) in enumerate(zip(_leaves(got), _leaves(want), strict=True)):
    scale = max(np.max(np.abs(b)), 1e-6)
    err = np.max(np.abs(a - b))
    assert err <= rtol * scale, f"{what}: leaf {i} differs by {err:.3g} (scale {scale:.3g})"


def _assert_trees_equal(got, want, what):
  for i, (a, b) in enumerate(
    zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True)
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{what}: leaf {i}")


# One configuration for the EMA, skip and accumulation tests (one compile per grad_accum):
# SGD with momentum (a real optimizer state to keep or not), step size a power of two.
EMA_DECAY, SGD_LR = 0.9, 0.0625


@functools.lru_cache(maxsize=None)
def _setup(grad_accum=1, **train):
  config = _config(ema_decay=EMA_DECAY, grad_accum=grad_accum, **train)
  tx = optax.sgd(SGD_LR, momentum=0.9)
  step = jax.jit(functools.partial(step_lib.train_step, config=config, tx=tx))
  state = state_lib.create(dit.init_params(config.model, jax.random.key(0)), tx)
  return step, jax.device_get(state)


def test_ema_is_the_recurrence_over_the_step_parameters():
  """ema_k = d ema_{k-1} + (1 - d) params_k with ema_0 = params_0, in float64 numpy from the
  parameters each step produced."""
  step, state = _setup()
  params = [_leaves(state.params)]
  for k in range(4):
    state, m = step(state, _batch(k), NULL)
    assert bool(m["finite"])
    params.append(_leaves(jax.device_get(state.params)))
  ema = params[0]
  for p in params[1:]:
    ema = [EMA_DECAY * e + (1 - EMA_DECAY) * q for e, q in zip(ema, p)]
  got = _leaves(jax.device_get(state.ema_params))
  for i, (a, b) in enumerate(zip(got, ema)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=f"leaf {i}")
  # Not trivially equal to the parameters (the check above would pass for decay 0).
  moved = max(np.max(np.abs(a - p)) for a, p in zip(got, params[-1]))
  assert moved > 1e-4


@pytest.mark.parametrize("guard", ["cond", "where"])
def test_nonfinite_batch_is_skipped_and_counted(guard):
  """Both train.nonfinite_guard forms keep the whole state on a non-finite step."""
  step, state = _setup(nonfinite_guard=guard)
  state0 = jax.device_get(step(state, _batch(7), NULL)[0])  # a momentum trace to keep
  bad = _batch(0)
  bad["latent"] = bad["latent"].at[3, 1, 2, 0].set(jnp.nan)
  state1, m = step(state0, bad, NULL)
  state1 = jax.device_get(state1)
  assert not bool(m["finite"])
  assert (int(state1.step), int(state1.skipped), int(state1.nonfinite_run)) == (2, 1, 1)
  _assert_trees_equal(state1.params, state0.params, "params")
  _assert_trees_equal(state1.opt_state, state0.opt_state, "opt_state")
  _assert_trees_equal(state1.ema_params, state0.ema_params, "ema_params")
  inf = _batch(1)
  inf["caption"] = inf["caption"].at[0, 0, 0].set(jnp.inf)
  state2 = jax.device_get(step(state1, inf, NULL)[0])
  assert (int(state2.step), int(state2.skipped), int(state2.nonfinite_run)) == (3, 2, 2)
  _assert_trees_equal(state2.params, state0.params, "params")
  state3, m = step(state2, _batch(2), NULL)  # a good batch: a real step, the run resets
  state3 = jax.device_get(state3)
  assert bool(m["finite"])
  assert (int(state3.step), int(state3.skipped), int(state3.nonfinite_run)) == (4, 2, 0)
  assert any(np.any(a != b) for a, b in zip(_leaves(state3.params), _leaves(state0.params)))
  # The reported LR is the schedule at the optimizer's count (applied updates: 1 here).
  np.testing.assert_allclose(
    float(m["lr"]), float(optim_lib.learning_rate(_config().train)(1)), rtol=1e-6
  )


def test_nonfinite_guards_take_the_same_finite_step():
  """train.nonfinite_guard changes how the old state is kept, never the step itself."""
  (cond, state), (where, _) = _setup(), _setup(nonfinite_guard="where")
  a, b = (
    jax.device_get(cond(state, _batch(3), NULL)[0]),
    jax.device_get(where(state, _batch(3), NULL)[0]),
  )
  _assert_trees_equal(a.params, b.params, "params")
  _assert_trees_equal(a.opt_state, b.opt_state, "opt_state")
  _assert_trees_equal(a.ema_params, b.ema_params, "ema_params")


def test_finite_loss_with_nonfinite_gradient_is_skipped(monkeypatch):
  """A model whose loss is finite but whose gradient is not (sqrt at 0): skipped too."""
  import flax.linen as nn

  class SqrtModel(nn.Module):
    config: object

    @nn.compact
    def __call__(self, x, t, caption, mask):
      return x * jnp.sqrt(self.param("w", nn.initializers.zeros, ()))

  monkeypatch.setattr(dit, "SanaDiT", SqrtModel)
  config, tx = _config(), optax.sgd(0.1, momentum=0.9)
  state = state_lib.create({"w": jnp.zeros(())}, tx)
  new, m = jax.jit(functools.partial(step_lib.train_step, config=config, tx=tx))(
    state, _batch(0), NULL
  )
  assert np.isfinite(float(m["loss"])) and not np.isfinite(float(m["grad_norm"]))
  assert not bool(m["finite"]) and int(new.skipped) == 1
  assert float(new.params["w"]) == 0.0 and float(new.ema_params["w"]) == 0.0
  _assert_trees_equal(new.opt_state, state.opt_state, "opt_state")


def test_grad_accum_gives_the_one_batch_gradient():
  """From a fresh state the SGD update is -lr * gradient: 2 micro-batches of 4 must give
  the gradient (and loss, gradient norm) of the whole batch of 8, to float rounding."""
  batch = _batch(5)

  def one(grad_accum):
    step, state = _setup(grad_accum)
    new, m = step(state, batch, NULL)
    delta = [a - b for a, b in zip(_leaves(jax.device_get(new.params)), _leaves(state.params))]
    return delta, jax.device_get(m), _leaves(state.params)

  d1, m1, p0 = one(1)
  d2, m2, _ = one(2)
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)
  # Rounding: the reductions run in another order, and the linear attention's normaliser
  # amplifies it (the qkv kernel's gradient moves by ~7e-4 of itself); a wrong scale or a
  # lost micro-batch moves every leaf by O(1).
  for i, (a, b, p) in enumerate(zip(d2, d1, p0)):
    bound = 3e-3 * np.max(np.abs(b)) + 4 * np.finfo(np.float32).eps * np.max(np.abs(p))
    assert np.max(np.abs(a - b)) <= bound, f"leaf {i}: grad_accum=2 gradient differs"
  assert max(np.max(np.abs(b)) for b in d1) > 1e-3  # the step moved


# ------------------------------------------------------------------ learning rate, clipping


def _tc(**overrides):
  return _config(**{"weight_decay": 0.0, "grad_clip": 0.0, "warmup_steps": 0, **overrides}).train


@pytest.mark.parametrize("scaling,batch", [(True, 64), (True, 1024), (False, 1024)])
def test_learning_rate_warmup_and_sqrt_scaling(scaling, batch):
  """lr(step) = lr * sqrt(global_batch / 256) (when scaled) * min(step / warmup, 1)."""
  tc = _tc(lr=2e-4, warmup_steps=8, sqrt_lr_scaling=scaling, global_batch=batch)
  peak = 2e-4 * (math.sqrt(batch / 256) if scaling else 1.0)
  sched = optim_lib.learning_rate(tc)
  for s in (0, 1, 4, 8, 9, 1000):
    np.testing.assert_allclose(float(sched(s)), peak * min(s / 8, 1.0), rtol=1e-6)
  # The optimizer really uses it: AdamW's first update is lr(0) * g / (|g| + eps); with no
  # warm-up lr(0) is the peak.
  tc = _tc(lr=2e-4, optimizer="adamw", sqrt_lr_scaling=scaling, global_batch=batch)
  tx = optim_lib.make_optimizer(tc)
  p = {"w": jnp.ones((3, 5))}
  g = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((3, 5)), jnp.float32)}
  u, _ = tx.update(g, tx.init(p), p)
  want = -peak * np.asarray(g["w"]) / (np.abs(np.asarray(g["w"])) + 1e-8)
  np.testing.assert_allclose(np.asarray(u["w"]), want, rtol=1e-5)


def _grad_sequence(shapes, norms, seed=0):
  """Gradient trees whose global norms are `norms` (one tree per step)."""
  rng = np.random.default_rng(seed)
  out = []
  for n in norms:
    tree = {k: rng.standard_normal(s) for k, s in shapes.items()}
    total = math.sqrt(sum(float(np.sum(v**2)) for v in tree.values()))
    out.append({k: (v * n / total).astype(np.float32) for k, v in tree.items()})
  return out


def _torch_adamw(params, grads, lrs, weight_decay):
  """torch.optim.AdamW (betas 0.9/0.999, eps 1e-8) on numpy trees; returns the params."""
  import torch

  tp = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
  opt = torch.optim.AdamW(
    list(tp.values()), lr=lrs[0], betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay
  )
  for g, lr in zip(grads, lrs):
    for group in opt.param_groups:
      group["lr"] = lr
    for k, t in tp.items():
      t.grad = torch.tensor(g[k], dtype=torch.float64)
    opt.step()
  return {k: t.detach().numpy() for k, t in tp.items()}


def _run_optax(tx, params, grads):
  state, update = tx.init(params), jax.jit(tx.update)
  for g in grads:
    u, state = update(jax.tree_util.tree_map(jnp.asarray, g), state, params)
    params = optax.apply_updates(params, u)
  return jax.device_get(params), state


SHAPES = {"kernel": (7, 11), "bias": (11,)}


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_grad_clip_clips_the_global_norm(clip):
  """make_optimizer(grad_clip=c) with AdamW equals torch AdamW fed gradients clipped to
  global norm c in numpy (norms 5, 0.3, 2: the clipped steps change Adam's moments)."""
  tc = _tc(optimizer="adamw", lr=1e-2, grad_clip=clip, weight_decay=0.05)
  params = {
    k: np.random.default_rng(1).standard_normal(s).astype(np.float32) for k, s in SHAPES.items()
  }
  grads = _grad_sequence(SHAPES, [5.0, 0.3, 2.0])

  def clipped(g):
    norm = math.sqrt(sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in g.values()))
    scale = min(1.0, clip / norm) if clip > 0 else 1.0
    return {k: v.astype(np.float64) * scale for k, v in g.items()}

  want = _torch_adamw(params, [clipped(g) for g in grads], [1e-2] * 3, 0.05)
  got, _ = _run_optax(
    optim_lib.make_optimizer(tc), jax.tree_util.tree_map(jnp.asarray, params), grads
  )
  for k in SHAPES:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=2e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("norm", [0.3, 5.0])
@pytest.mark.parametrize("given", [False, True])
def test_clip_equals_optax_clip_by_global_norm(norm, given):
  """optimizer.clip_by_global_norm (one scalar factor; the caller's norm as the extra
  argument grad_norm, or its own) gives optax.clip_by_global_norm's gradient up to
  rounding, below and above the threshold, and the same (empty) state: checkpoints written
  with optax's clip restore."""
  g = _grad_sequence(SHAPES, [norm])[0]
  ours, theirs = optim_lib.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
  assert jax.tree_util.tree_structure(ours.init(g)) == jax.tree_util.tree_structure(theirs.init(g))

  def clip(g):
    extra = {"grad_norm": optax.tree.norm(g), "grad_norm_of": g} if given else {}
    return ours.update(g, ours.init(g), None, **extra)

  got, _ = jax.jit(clip)(g)
  want, _ = theirs.update(g, theirs.init(g), None)
  for k in SHAPES:
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-6, atol=0)
  got_norm = float(optax.tree.norm(got))
  assert got_norm == pytest.approx(min(norm, 1.0), rel=1e-5)


def test_clip_takes_the_norm_only_of_the_tree_it_receives():
  """A norm passed for the gradient is not used for another tree: after a scale in the
  chain, the clip computes the norm of what it receives, as optax's does."""
  g = _grad_sequence(SHAPES, [5.0])[0]
  ours = optax.chain(optax.scale(0.5), optim_lib.clip_by_global_norm(1.0))
  theirs = optax.chain(optax.scale(0.5), optax.clip_by_global_norm(1.0))
  norm = optax.tree.norm(g)
  got, _ = ours.update(g, ours.init(g), None, grad_norm=norm, grad_norm_of=g)
  want, _ = theirs.update(g, theirs.init(g), None)
  assert float(optax.tree.norm(got)) == pytest.approx(1.0, rel=1e-5)
  for k in SHAPES:
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-6, atol=0)
  # given with its own tree, the norm is the one used (here a wrong one, to show it)
  got, _ = optim_lib.clip_by_global_norm(1.0).update(
    g, optax.EmptyState(), None, grad_norm=2 * norm, grad_norm_of=g
  )
  assert float(optax.tree.norm(got)) == pytest.approx(0.5, rel=1e-5)
  # a norm without the tree it belongs to is not used either
  wrong = {"grad_norm": jnp.float32(1e9)}
  got, _ = optim_lib.clip_by_global_norm(1.0).update(g, optax.EmptyState(), None, **wrong)
  assert float(optax.tree.norm(got)) == pytest.approx(1.0, rel=1e-5)


def _full_size_outputs(tx, tc, shape):
  """Fusions with a leaf's shape in the compiled update (state donated, as the step does)."""
  import re

  from sana_jax.train import update as update_lib
  from tests import train_fixtures

  params = {"kernel": jax.ShapeDtypeStruct(shape, jnp.float32)}
  text = train_fixtures.compiled_update_text(update_lib.apply_gradients, tx, tc, params)
  dims = ",".join(map(str, shape))
  return len(re.findall(rf"^\s*(?:ROOT )?%\S+ = f32\[{dims}\]\S* fusion\(", text, re.M))


def test_clip_is_not_a_pass_of_its_own():
  """The update clips inside the optimizer's moment passes with the norm it computed for
  the guard: compiled, it writes two full-size arrays fewer per leaf than the same update
  with optax's clip (its clipped copy of the gradient, and the g^2 of a second norm)."""
  tc = _tc(optimizer="adamw", grad_clip=1.0, weight_decay=0.01)
  plain = optim_lib.make_optimizer(_tc(optimizer="adamw", weight_decay=0.01))
  with_optax_clip = optax.chain(optax.clip_by_global_norm(1.0), plain)
  ours = _full_size_outputs(optim_lib.make_optimizer(tc), tc, (37, 53))
  theirs = _full_size_outputs(with_optax_clip, tc, (37, 53))
  assert ours <= theirs - 2, (ours, theirs)


# Shapes for the CAME cases: a Dense kernel over 16384 elements (CAME-8bit stores its m in
# 8 bits), a modulation table (factored) and a bias (unfactored), all dimensions distinct.
CAME_SHAPES = {
  "t_block/kernel": (131, 127),
  "final_scale_shift_table": (2, 41),
  "t_block/bias": (127,),
  "proj/kernel": (40, 53),  # 2120 values: 8-bit under "compact" only
  "proj/bias": (1500,),  # unfactored, 1500 values: 8-bit under "compact" only
}
# The leaves whose first moment train.came_8bit_state stores in 8 bits, with the metadata's
# dtype (docs/came.md: "official" > 16384 values and factored, fp32; "compact" > 1024, bf16).
EIGHT_BIT = {
  "official": ({"t_block/kernel"}, jnp.float32),
  "compact": ({"t_block/kernel", "proj/kernel", "proj/bias"}, jnp.bfloat16),
}


def _tree(flat):
  out = {}
  for k, v in flat.items():
    d = out
    *head, last = k.split("/")
    for h in head:
      d = d.setdefault(h, {})
    d[last] = v
  return out


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, prefix + k + "/"))
    else:
      out[prefix + k] = v
  return out


def _torch_came(params, grads, lrs, weight_decay):
  """came-pytorch's CAME (its default betas and eps) on torch views: a Flax (in, out) kernel
  is the torch (out, in) weight; returns Flax-layout params."""
  import torch

  came_pytorch = pytest.importorskip("came_pytorch")
  view = lambda k, v: v.T if k.endswith("kernel") else v  # noqa: E731
  tp = {
    k: torch.tensor(np.ascontiguousarray(view(k, v)), dtype=torch.float32, requires_grad=True)
    for k, v in params.items()
  }
  opt = came_pytorch.CAME(list(tp.values()), lr=1.0, weight_decay=weight_decay)  # lr set below
  for g, lr in zip(grads, lrs):
    for group in opt.param_groups:
      group["lr"] = lr
    for k, t in tp.items():
      t.grad = torch.tensor(np.ascontiguousarray(view(k, g[k])), dtype=torch.float32)
    opt.step()
  return {k: view(k, t.detach().numpy()) for k, t in tp.items()}


@pytest.mark.parametrize(
  "name,state", [("adamw", None), ("came", None), ("came_8bit", "official"), ("came_8bit", None)]
)
def test_each_optimizer_matches_its_reference(name, state):
  """make_optimizer(name) with warm-up and weight decay, three steps, against torch's AdamW
  or came-pytorch's CAME (CAME-8bit: the m of the leaves train.came_8bit_state names, and
  only those, really is stored in 8 bits, with its metadata dtype, and their updates stay
  within 2% of CAME's; the leaves kept in fp32 match CAME's exactly). state None: the
  config's default, which must be "compact"."""
  lr, warmup, wd = 3e-3, 2, 0.02
  shapes = CAME_SHAPES if name.startswith("came") else SHAPES
  tc = _tc(optimizer=name, lr=lr, warmup_steps=warmup, weight_decay=wd)
  if state is not None:
    tc.came_8bit_state = state
  eight_bit, meta_dtype = EIGHT_BIT[tc.came_8bit_state] if name == "came_8bit" else (set(), None)
  rng = np.random.default_rng(2)
  params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  grads = _grad_sequence(shapes, [1.0, 0.5, 2.0], seed=3)
  tx = optim_lib.make_optimizer(tc)
  opt_state = tx.init(_tree(jax.tree_util.tree_map(jnp.asarray, params)))
  reference = _torch_adamw if name == "adamw" else _torch_came
  # Step 0 runs at lr(0) = 0 (it only fills the moments), then lr / 2, lr, lr.
  lrs = [lr * min(s / warmup, 1.0) for s in range(4)]
  seq = [{k: np.full(s, 1e-3, np.float32) for k, s in shapes.items()}] + grads
  tol = dict(rtol=2e-5, atol=1e-7)
  p = _tree(jax.tree_util.tree_map(jnp.asarray, params))
  update = jax.jit(tx.update)
  for i, g in enumerate(seq):
    u, opt_state = update(_tree(jax.tree_util.tree_map(jnp.asarray, g)), opt_state, p)
    p = optax.apply_updates(p, u)
    got = _flat(jax.device_get(p))
    want = reference(params, seq[: i + 1], lrs[: i + 1], wd)
    for k in shapes:
      if i >= 1 and k in eight_bit:  # m stored in 8 bits
        err = np.max(np.abs(got[k] - want[k])) / np.max(np.abs(want[k] - params[k]))
        print(f"came_8bit step {i}: 8-bit m moves {k}'s update by {err:.2%} of it")
        assert err < 0.02, (k, i, err)
      else:
        np.testing.assert_allclose(got[k], want[k], err_msg=f"{k} step {i}", **tol)
  quantized = [
    x
    for x in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, quant8.QuantizedArray)
    )
    if isinstance(x, quant8.QuantizedArray)
  ]
  assert sorted(x.shape for x in quantized) == sorted(shapes[k] for k in eight_bit)
  assert all(x.minimum.dtype == x.scale.dtype == meta_dtype for x in quantized)


@pytest.mark.parametrize("name", ["came", "came_8bit"])
def test_came_takes_the_clip_as_a_factor(name):
  """With CAME and CAME-8bit, make_optimizer hands the clip factor to the optimizer
  (clip_folded_into, scale_by_came's grad_scale) instead of clipping the gradient: the same
  state structure as chain(clip, optimizer), so older checkpoints restore; the same
  updates up to rounding over steps below and above the threshold (CAME-8bit: codes may
  flip on rounding, within 1% of the update); scale_by_came(grad_scale=s) on g gives its
  direction for s * g (its own rms clip lifted, which would hide a wrong scale); and,
  compiled, one full-size fusion fewer per leaf (the clipped copy of the gradient is not
  formed)."""
  tc = _tc(optimizer=name, lr=1e-2, grad_clip=1.0, weight_decay=0.02)
  folded = optim_lib.make_optimizer(tc)
  lr, kw = optim_lib.learning_rate(tc), dict(weight_decay=0.02, spec=came_lib.sana_spec())
  if name == "came":
    opt = came_lib.came(lr, **kw)
  else:
    opt = came_lib.came_8bit(lr, **kw, **optim_lib.CAME_8BIT_STATES[tc.came_8bit_state])
  chained = optax.chain(optim_lib.clip_by_global_norm(1.0), opt)
  rng = np.random.default_rng(4)
  params = _tree(
    {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in CAME_SHAPES.items()}
  )
  a_state, b_state = folded.init(params), chained.init(params)
  assert jax.tree_util.tree_structure(a_state) == jax.tree_util.tree_structure(b_state)
  a_p = b_p = params
  for g in _grad_sequence(CAME_SHAPES, [5.0, 0.3, 2.0], seed=5):
    g = _tree(jax.tree_util.tree_map(jnp.asarray, g))
    extra = {"grad_norm": optax.tree.norm(g), "grad_norm_of": g}
    ua, a_state = folded.update(g, a_state, a_p, **extra)
    ub, b_state = chained.update(g, b_state, b_p, **extra)
    for x, y in zip(jax.tree_util.tree_leaves(ua), jax.tree_util.tree_leaves(ub)):
      if name == "came":
        atol = 1e-5 * float(np.max(np.abs(y)))  # rounding, relative to the leaf's step
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=atol)
      else:
        assert np.max(np.abs(x - y)) <= 1e-2 * np.max(np.abs(y))
    a_p, b_p = optax.apply_updates(a_p, ua), optax.apply_updates(b_p, ub)
  # grad_scale itself, with CAME's own update clip out of the way (it would rescale a
  # wrongly scaled U back to rms 1): the direction for s * g, over steps
  eight_bit = dict(quantize_mu=True, **came_lib.COMPACT) if name == "came_8bit" else {}
  direction = came_lib.scale_by_came(clip_threshold=1e6, spec=came_lib.sana_spec(), **eight_bit)
  a_state = b_state = direction.init(params)
  for s, g in zip([0.2, 1.0, 0.5], _grad_sequence(CAME_SHAPES, [5.0, 0.3, 2.0], seed=6)):
    g = _tree(jax.tree_util.tree_map(jnp.asarray, g))
    ua, a_state = direction.update(g, a_state, grad_scale=jnp.float32(s))
    ub, b_state = direction.update(jax.tree_util.tree_map(lambda x: s * x, g), b_state)
    for x, y in zip(jax.tree_util.tree_leaves(ua), jax.tree_util.tree_leaves(ub)):
      assert np.max(np.abs(x - y)) <= (1e-5 if name == "came" else 1e-2) * np.max(np.abs(y))
  shape = (131, 127)
  ours = _full_size_outputs(folded, tc, shape)
  theirs = _full_size_outputs(chained, tc, shape)
  assert ours <= theirs - 1, (ours, theirs)


# ------------------------------------------------------------------------- aspect buckets


def _write_dataset(root, latents, seed=0):
  """A dataset of the given latents (a list of (h, w, C) arrays, several sizes allowed)."""
  rng = np.random.default_rng(seed)
  n = len(latents)
  captions = rng.standard_normal((n, CAPTION_LEN, CAPTION_CHANNELS)).astype(np.float32)
  masks = np.ones((n, CAPTION_LEN), np.int8)

  def examples():
    for i in range(n):
      yield {
        "latent": latents[i],
        "caption": captions[i],
        "caption_mask": masks[i],
        "text": f"example {i}",
      }

  buckets = sorted({tuple(x.shape[:2]) for x in latents})
  return latents_tfds.write_dataset(
    examples,
    str(root),
    "options",
    buckets=buckets,
    channels=CHANNELS,
    caption_len=CAPTION_LEN,
    caption_channels=CAPTION_CHANNELS,
    null_caption=rng.standard_normal((CAPTION_LEN, CAPTION_CHANNELS)).astype(np.float32),
    null_mask=np.ones(CAPTION_LEN, np.int32),
  )


def _single_device(config):
  config.mesh.update(data=1, fsdp=1, num_devices=1)
  return config


def test_two_buckets_every_batch_one_bucket_all_seen_and_export_is_ema(tmp_path, monkeypatch):
  """loop.train on a dataset with buckets 4x6 (8 examples) and 6x4 (4): with global batch 4,
  each of the 3 steps of an epoch gets 4 examples of one bucket and the epoch sees all 12.
  The checkpoint's exported parameters default to the EMA."""
  rng = np.random.default_rng(0)
  latents = [
    rng.standard_normal((*hw, CHANNELS)).astype(np.float32) for hw in [(4, 6)] * 8 + [(6, 4)] * 4
  ]
  data_dir = _write_dataset(tmp_path / "data", latents)
  seen = []
  original = step_lib.train_step

  def spy(state, batch, null_caption, **kwargs):  # inside the jitted (or AOT-compiled) step
    jax.debug.callback(lambda x: seen.append(np.asarray(x)), batch["latent"])
    return original(state, batch, null_caption, **kwargs)

  monkeypatch.setattr(step_lib, "train_step", spy)
  config = _single_device(
    _config(
      steps=3,
      global_batch=4,
      ema_decay=0.5,
      warmup_steps=0,
      checkpoint_every=100,
      async_checkpoints=False,
    )
  )
  config.data.dir = data_dir
  state = jax.device_get(loop.train(config, str(tmp_path / "run"), progress=False))
  jax.effects_barrier()
  assert len(seen) == 3
  ids = []
  for batch in seen:
    assert batch.shape[0] == 4 and batch.shape[1:3] in ((4, 6), (6, 4))
    for x in batch:
      match = [
        i for i, ref in enumerate(latents) if ref.shape == x.shape and np.array_equal(ref, x)
      ]
      assert len(match) == 1
      ids.append(match[0])
  assert sorted(ids) == list(range(12))
  assert {b.shape[1:3] for b in seen} == {(4, 6), (6, 4)}
  # Export: restore_params defaults to the EMA weights, ema=False gives the raw ones.
  ema, step = checkpoint.restore_params(tmp_path / "run")
  raw, _ = checkpoint.restore_params(tmp_path / "run", ema=False)
  assert step == 3
  _assert_trees_equal(ema, state.ema_params, "exported EMA")
  _assert_trees_equal(raw, state.params, "raw params")
  assert any(np.any(a != b) for a, b in zip(_leaves(ema), _leaves(raw)))


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path):
  latents = [np.full((*HW, CHANNELS), np.nan, np.float32) for _ in range(8)]
  data_dir = _write_dataset(tmp_path / "data", latents)
  config = _single_device(
    _config(
      steps=20,
      global_batch=4,
      ema_decay=0.5,
      warmup_steps=0,
      max_consecutive_nonfinite=3,
      log_every=1,
      checkpoint_every=100,
      async_checkpoints=False,
    )
  )
  config.data.dir = data_dir
  with pytest.raises(loop.NonFiniteError, match=r"3 consecutive steps .*up to step 3\)"):
    loop.train(config, str(tmp_path / "run"), progress=False)


# ------------------------------------------------------------------------------- FLOPs


def _prod(xs):
  return int(np.prod([int(x) for x in xs])) if len(xs) else 1


def jaxpr_matmul_flops(jaxpr) -> int:
  """2 x multiply-adds of every dot_general and conv in a jaxpr (sub-jaxprs included, scan
  bodies times their length)."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
      ls, rs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
      lfree = [d for i, d in enumerate(ls) if i not in lc and i not in lb]
      rfree = [d for i, d in enumerate(rs) if i not in rc and i not in rb]
      total += 2 * _prod([ls[i] for i in lb + lc]) * _prod(lfree) * _prod(rfree)
    elif name == "conv_general_dilated":
      rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feat, in feat, spatial...)
      rs = eqn.invars[1].aval.shape
      total += (
        2
        * _prod(eqn.outvars[0].aval.shape)
        * rs[rhs_spec[1]]
        * _prod([rs[i] for i in rhs_spec[2:]])
      )
    times = eqn.params["length"] if name == "scan" else 1
    total += times * sum(jaxpr_matmul_flops(s) for s in bench_gemm.sub_jaxprs(eqn.params))
  return total


FLOP_MODELS = {
  "tiny": tiny.get_config().model.to_dict(),
  "patch2": dict(
    in_channels=3,
    out_channels=3,
    patch_size=2,
    hidden_size=40,
    depth=2,
    self_head_dim=10,
    cross_heads=3,
    cross_head_dim=7,
    caption_channels=9,
    caption_len=11,
    mlp_ratio=2.2,
    sample_size=8,
  ),
}


def _flop_inputs(cfg, b=4, hw=(4, 6), caption_len=11):
  x, y = jnp.ones((b, *hw, cfg.in_channels)), jnp.ones((b, caption_len, cfg.caption_channels))
  return x, y, jnp.ones((b, caption_len), jnp.int32)


@pytest.mark.parametrize("model", sorted(FLOP_MODELS))
def test_forward_flops_equal_the_counted_matmuls(model):
  """dit_forward_flops equals the matmul FLOPs of the model's forward jaxpr (linear
  attention, the depthwise 3x3 as a grouped conv, the timestep and caption MLPs)."""
  cfg = DiTConfig.coerce(FLOP_MODELS[model]).replace(depthwise_impl="conv")
  x, y, mask = _flop_inputs(cfg)
  (b, h, w, _), L = x.shape, y.shape[1]
  params = dit.abstract_params(cfg)  # shapes only: tracing compiles nothing

  def count(dw):
    fwd = lambda p: dit.SanaDiT(cfg.replace(depthwise_impl=dw)).apply(  # noqa: E731
      {"params": p}, x, jnp.ones((b,)), y, mask
    )
    return jaxpr_matmul_flops(jax.make_jaxpr(fwd)(params).jaxpr)

  counted = count("conv")
  assert counted == b * metrics.dit_forward_flops(cfg, h, w, L)
  # The counter sees the depthwise conv: the "shift" form (no conv) has exactly its FLOPs less.
  n = h * w // cfg.patch_size**2
  assert counted - count("shift") == b * cfg.depth * 2 * 9 * n * 2 * cfg.mlp_hidden


@pytest.mark.parametrize(
  "model,remat",
  [
    ("tiny", "none"),
    ("tiny", "full"),
    ("tiny", "dots"),
    ("tiny", "dots_no_batch"),
    ("patch2", "none"),
  ],
)
def test_train_step_flops_equal_the_counted_matmuls(model, remat):
  """train_step_flops equals the matmul FLOPs of the real train step's jaxpr (forward,
  backward, what each remat policy recomputes; grad_accum 2, the config's optimizer)."""
  cfg = DiTConfig.coerce(FLOP_MODELS[model]).replace(depthwise_impl="conv", remat_policy=remat)
  x, y, mask = _flop_inputs(cfg)
  (b, h, w, _), L = x.shape, y.shape[1]
  config = _config(grad_accum=2)
  config.model = cfg.to_dict()
  tx = optim_lib.make_optimizer(config.train)
  state = jax.eval_shape(lambda p: state_lib.create(p, tx), dit.abstract_params(cfg))
  batch = {"latent": x, "caption": y, "caption_mask": mask}
  step = functools.partial(step_lib.train_step, config=config, tx=tx)
  jaxpr = jax.make_jaxpr(step)(state, batch, jnp.ones((L, cfg.caption_channels))).jaxpr
  counted = jaxpr_matmul_flops(jaxpr)
  assert counted == metrics.train_step_flops(cfg, h, w, L, b, remat)
  if remat in ("none", "full"):
    assert counted == metrics.train_step_flops(cfg, h, w, L, b, remat == "full")


def test_mfu():
  # 2e14 FLOPs a step at 0.5 s a step on 4 devices of 200 TFLOP/s: 400 of 800 TFLOP/s.
  assert metrics.mfu(2e14, 0.5, 200.0, 4) == pytest.approx(0.5)
  with pytest.raises(ValueError, match="peak"):
    metrics.mfu(1.0, 1.0, 0.0, 1)
