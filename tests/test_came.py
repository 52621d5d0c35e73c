"""CAME (sana_jax.optim.came) against came-pytorch, step by step, and its invariances.

The Flax tree uses Flax layouts: Dense kernels (in, out), stacked block kernels
(L, in, out), a 1x1 conv (1, 1, in, out) and depthwise convs (3, 3, 1, C) / stacked
(L, 3, 3, C). Each is compared with came-pytorch on the view the official CAMEWrapper
uses: torch (out, in) weights (so our factoring runs on the transposed matrix), one
independent torch parameter per layer of a stacked tensor, and flattened 1-D tensors for
the unfactored depthwise convs.
"""

import numpy as np
import optax
import pytest
import jax
import jax.numpy as jnp

import importlib

came_lib = importlib.import_module("sana_jax.optim.came")  # the package attr `came` is the alias

torch = pytest.importorskip("torch")
came_pytorch = pytest.importorskip("came_pytorch")

TOL = 1e-5
STACKED = lambda path: path.startswith("blocks/")
SPEC = came_lib.reference_spec(stacked=STACKED)

# name -> (Flax shape, kind); dimensions all differ so a wrong transpose cannot pass.
LEAVES = {
    "dense/kernel": ((37, 53), "matrix_t"),  # torch weight (53, 37)
    "dense/bias": ((53,), "flat"),
    "table": ((6, 41), "matrix"),  # a (6, C) modulation table, same view in torch
    "conv1x1/kernel": ((1, 1, 13, 17), "conv1x1"),  # torch (17, 13, 1, 1) -> (17, 13)
    "dwconv/kernel": ((3, 3, 1, 11), "flat"),  # unfactored, flattened
    "blocks/kernel": ((3, 19, 23), "stacked_t"),  # 3 x torch (23, 19)
    "blocks/bias": ((3, 23), "stacked_flat"),  # 3 x torch (23,)
    "blocks/dw": ((3, 3, 3, 29), "stacked_flat"),  # 3 x torch (261,)
}


def _tree(flat):
  out = {}
  for k, v in flat.items():
    d = out
    parts = k.split("/")
    for p in parts[:-1]:
      d = d.setdefault(p, {})
    d[parts[-1]] = v
  return out


def _flat(tree):
  return {came_lib._path_str(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def to_torch_views(x, kind):
  """Flax-layout array -> list of came-pytorch views (numpy)."""
  if kind == "matrix":
    return [x]
  if kind == "matrix_t":
    return [x.T]
  if kind == "conv1x1":
    return [x[0, 0].T]
  if kind == "flat":
    return [x.reshape(-1)]
  if kind == "stacked_t":
    return [layer.T for layer in x]
  if kind == "stacked_flat":
    return [layer.reshape(-1) for layer in x]
  raise ValueError(kind)


def from_torch_views(views, kind, shape):
  if kind == "matrix":
    return views[0]
  if kind == "matrix_t":
    return views[0].T
  if kind == "conv1x1":
    return views[0].T.reshape(shape)
  if kind == "flat":
    return views[0].reshape(shape)
  if kind == "stacked_t":
    return np.stack([v.T for v in views])
  if kind == "stacked_flat":
    return np.stack([v.reshape(shape[1:]) for v in views])
  raise ValueError(kind)


def make_problem(seed=0, steps=50):
  """Initial params, targets, and per-step noise with row/col-dependent scales (so the
  factored statistics are far from uniform)."""
  rng = np.random.default_rng(seed)
  init, target, noise = {}, {}, {}
  for name, (shape, _) in LEAVES.items():
    init[name] = rng.normal(size=shape).astype(np.float32)
    target[name] = rng.normal(size=shape).astype(np.float32)
    scale = np.exp(rng.normal(size=shape[-1:]))
    if len(shape) >= 2:
      scale = scale * np.exp(rng.normal(size=shape[-2:-1] + (1,)))
    noise[name] = (rng.normal(size=(steps,) + shape) * scale).astype(np.float32)
  return init, target, noise


def grad_of(params, target, noise, t):
  """A gradient that depends on the current params (so trajectories feed back)."""
  return {k: (0.5 * (params[k] - target[k]) + noise[k][t]).astype(np.float32) for k in params}


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def run_parity(weight_decay, lr, steps=50, seed=0):
  init, target, noise = make_problem(seed, steps)
  lr_fn = lr if callable(lr) else (lambda t: lr)

  # --- JAX
  opt = came_lib.came(lr, weight_decay=weight_decay, spec=SPEC)
  params = jax.tree.map(jnp.asarray, _tree(init))
  state = opt.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  # --- torch: one parameter per view
  tparams = {k: [torch.nn.Parameter(torch.tensor(np.ascontiguousarray(v)))
                 for v in to_torch_views(init[k], LEAVES[k][1])] for k in init}
  topt = came_pytorch.CAME([p for ps in tparams.values() for p in ps], lr=1.0,
                           weight_decay=weight_decay)

  worst = {"params": 0.0, "mu": 0.0, "stats": 0.0}
  for t in range(steps):
    g = grad_of(_flat(params), target, noise, t)
    params, state = step(params, state, _tree({k: jnp.asarray(v) for k, v in g.items()}))

    tp = {k: from_torch_views([p.detach().numpy() for p in ps], LEAVES[k][1], LEAVES[k][0])
          for k, ps in tparams.items()}
    tg = grad_of(tp, target, noise, t)
    for k, ps in tparams.items():
      for p, gv in zip(ps, to_torch_views(tg[k], LEAVES[k][1])):
        p.grad = torch.tensor(np.ascontiguousarray(gv))
    for group in topt.param_groups:
      group["lr"] = float(lr_fn(t))
    topt.step()

    # compare params and first moments every step
    ours_p = _flat(params)
    came_state = state[0]
    ours_mu = _flat(came_state.mu)
    for k, ps in tparams.items():
      kind, shape = LEAVES[k][1], LEAVES[k][0]
      theirs_p = from_torch_views([p.detach().numpy() for p in ps], kind, shape)
      theirs_mu = from_torch_views([topt.state[p]["exp_avg"].numpy() for p in ps], kind, shape)
      worst["params"] = max(worst["params"], rel_err(ours_p[k], theirs_p))
      worst["mu"] = max(worst["mu"], rel_err(ours_mu[k], theirs_mu))
    # factored statistics: Flax (in, out) row stats are torch's (out, in) column stats
    nu = came_state.nu
    d = nu["dense"]["kernel"]
    st = topt.state[tparams["dense/kernel"][0]]
    for ours, key in ((d.v_row, "exp_avg_sq_col"), (d.v_col, "exp_avg_sq_row"),
                      (d.res_row, "exp_avg_res_col"), (d.res_col, "exp_avg_res_row")):
      worst["stats"] = max(worst["stats"], rel_err(ours, st[key].numpy()))
    b = nu["blocks"]["kernel"]
    for i, p in enumerate(tparams["blocks/kernel"]):
      st = topt.state[p]
      worst["stats"] = max(worst["stats"], rel_err(b.v_row[i], st["exp_avg_sq_col"].numpy()),
                           rel_err(b.res_col[i], st["exp_avg_res_row"].numpy()))
  return worst


@pytest.mark.parametrize(
    "weight_decay,lr",
    [
        (0.0, 1e-2),
        (0.1, 1e-2),
        (0.05, optax.warmup_cosine_decay_schedule(0.0, 3e-2, 10, 50, 1e-3)),
    ],
    ids=["plain", "weight_decay", "schedule+wd"],
)
def test_matches_came_pytorch_50_steps(weight_decay, lr):
  worst = run_parity(weight_decay, lr)
  print(worst)
  for what, err in worst.items():
    assert err <= TOL, f"{what}: max rel err {err:.3g} > {TOL}"


def test_classification_reference_rule():
  shapes = {k: jnp.zeros(s) for k, (s, _) in LEAVES.items()}
  tree = _tree(shapes)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  specs = came_lib.leaf_specs(tree, SPEC)
  got = {came_lib._path_str(p): s for (p, _), s in zip(leaves, specs)}
  assert got["dense/kernel"] == came_lib.LeafSpec(True, 0)
  assert got["table"] == came_lib.LeafSpec(True, 0)
  assert got["conv1x1/kernel"] == came_lib.LeafSpec(True, 2)
  assert got["dwconv/kernel"] == came_lib.LeafSpec(False, 0)
  assert got["blocks/kernel"] == came_lib.LeafSpec(True, 1)
  assert got["blocks/bias"] == came_lib.LeafSpec(False, 1)
  assert got["blocks/dw"] == came_lib.LeafSpec(False, 1)
  # Without the stacked rule a stacked kernel is a rank-3 non-1x1 tensor: unfactored.
  assert came_lib.leaf_specs({"k": jnp.zeros((3, 4, 5))})[0] == came_lib.LeafSpec(False, 0)


def test_transposed_view_gives_transposed_update():
  """Factoring (a, b) or its transpose (b, a) gives the same update: r_i c_j / mean(r)
  is symmetric because mean(r) == mean(c). Strongly non-uniform rows and columns."""
  rng = np.random.default_rng(3)
  a, b = 31, 47
  rs = np.exp(2 * rng.normal(size=(a, 1)))
  cs = np.exp(2 * rng.normal(size=(1, b)))
  grads = (rng.normal(size=(60, a, b)) * rs * cs).astype(np.float32)
  opt = came_lib.scale_by_came()
  s1 = opt.init(jnp.zeros((a, b)))
  s2 = opt.init(jnp.zeros((b, a)))
  upd = jax.jit(opt.update)
  worst = 0.0
  for g in grads:
    u1, s1 = upd(jnp.asarray(g), s1)
    u2, s2 = upd(jnp.asarray(g.T), s2)
    worst = max(worst, rel_err(np.asarray(u2).T, np.asarray(u1)))
  assert worst <= 1e-6, worst
  # and the stored stats are the swapped ones
  np.testing.assert_allclose(s1.nu.v_row, s2.nu.v_col, rtol=1e-6)


def test_stacked_equals_independent_layers():
  """A (L, a, b) leaf evolves exactly like L separate (a, b) leaves (own clip and stats)."""
  rng = np.random.default_rng(4)
  L, a, b = 3, 9, 14
  layer_scale = np.array([1e-3, 1.0, 1e3]).reshape(L, 1, 1)  # different clip per layer
  grads = (rng.normal(size=(20, L, a, b)) * layer_scale).astype(np.float32)
  opt = came_lib.came(1e-2, spec=came_lib.reference_spec(stacked=lambda p: True))
  opt_single = came_lib.came(1e-2)
  p = jnp.asarray(rng.normal(size=(L, a, b)), jnp.float32)
  ps = [p[i] for i in range(L)]
  s = opt.init(p)
  ss = opt_single.init(ps)
  for g in grads:
    u, s = opt.update(jnp.asarray(g), s, p)
    p = optax.apply_updates(p, u)
    us, ss = opt_single.update([jnp.asarray(x) for x in g], ss, ps)
    ps = optax.apply_updates(ps, us)
  for i in range(L):
    np.testing.assert_allclose(p[i], ps[i], rtol=1e-6, atol=1e-6)


def test_bad_spec_raises():
  with pytest.raises(ValueError, match="factored needs rank >= 2"):
    came_lib.scale_by_came(spec=lambda path, x: came_lib.LeafSpec(True)).init(
        {"b": jnp.zeros(3)})
  with pytest.raises(ValueError, match="stacked axes"):
    came_lib.scale_by_came(spec=came_lib.reference_spec(lambda p: 2)).init({"b": jnp.zeros(3)})
  with pytest.raises(TypeError, match="static_args"):
    came_lib.scale_by_came(block_size=jnp.asarray(4))
