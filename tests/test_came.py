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

# name -> (Flax shape, view kind); dimensions all differ so a wrong transpose cannot pass.
# The sana_jax DiT naming, classified by came.sana_spec().
SANA_LEAVES = {
  "t_block/kernel": ((37, 53), "matrix_t"),  # torch Linear weight (53, 37)
  "t_block/bias": ((53,), "flat"),
  "patch_embed/kernel": ((13, 17), "matrix_t"),  # torch 1x1 conv (17, 13, 1, 1) -> (17, 13)
  "final_scale_shift_table": ((2, 41), "matrix"),  # torch parameter (2, C), same view
  "blocks/scale_shift_table": ((3, 6, 41), "stacked"),  # 3 x torch (6, 41)
  "blocks/self_attn/qkv/kernel": ((3, 19, 3, 23), "stacked_dg"),  # 3 x torch (69, 19)
  "blocks/self_attn/out/kernel": ((3, 29, 19), "stacked_t"),  # 3 x torch (19, 29)
  "blocks/self_attn/q_norm": ((3, 19), "stacked_flat"),  # 3 x torch (19,)
  "blocks/mlp/inverted/bias": ((3, 2, 23), "stacked_flat"),  # 3 x torch (46,)
  "blocks/mlp/depthwise_kernel": ((3, 3, 3, 2, 23), "stacked_flat"),  # 3 x (46,1,3,3) flat
}
# Generic Flax layouts, classified by came.reference_spec() (no stacked axes).
GENERIC_LEAVES = {
  "dense/kernel": ((37, 53), "matrix_t"),
  "dense/bias": ((53,), "flat"),
  "table": ((6, 41), "matrix"),
  "conv1x1/kernel": ((1, 1, 13, 17), "conv1x1"),  # torch (17, 13, 1, 1) -> (17, 13)
  "dwconv/kernel": ((3, 3, 1, 11), "flat"),  # unfactored, flattened
}
CASES = {
  "sana": (SANA_LEAVES, came_lib.sana_spec()),
  "generic": (GENERIC_LEAVES, came_lib.reference_spec()),
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
  return {
    came_lib._path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


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
  if kind == "stacked":
    return list(x)
  if kind == "stacked_t":
    return [layer.T for layer in x]
  if kind == "stacked_dg":
    return [layer.reshape(layer.shape[0], -1).T for layer in x]
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
  if kind == "stacked":
    return np.stack(views)
  if kind == "stacked_t":
    return np.stack([v.T for v in views])
  if kind == "stacked_dg":
    return np.stack([v.T.reshape(shape[1:]) for v in views])
  if kind == "stacked_flat":
    return np.stack([v.reshape(shape[1:]) for v in views])
  raise ValueError(kind)


def make_problem(leaves, seed=0, steps=50):
  """Initial params, targets, and per-step noise with row/col-dependent scales (so the
  factored statistics are far from uniform)."""
  rng = np.random.default_rng(seed)
  init, target, noise = {}, {}, {}
  for name, (shape, _) in leaves.items():
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


def run_parity(case, weight_decay, lr, steps=50, seed=0, make_opt=None):
  """Worst relative errors against came-pytorch. make_opt(lr, weight_decay, spec) builds the
  optax optimizer (default came.came); its state[0] must be the CameState."""
  LEAVES, spec = CASES[case]
  init, target, noise = make_problem(LEAVES, seed, steps)
  lr_fn = lr if callable(lr) else (lambda t: lr)

  # --- JAX
  make_opt = make_opt or (
    lambda lr, weight_decay, spec: came_lib.came(lr, weight_decay=weight_decay, spec=spec)
  )
  opt = make_opt(lr, weight_decay=weight_decay, spec=spec)
  params = jax.tree.map(jnp.asarray, _tree(init))
  state = opt.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  # --- torch: one parameter per view
  tparams = {
    k: [
      torch.nn.Parameter(torch.tensor(np.ascontiguousarray(v)))
      for v in to_torch_views(init[k], LEAVES[k][1])
    ]
    for k in init
  }
  topt = came_pytorch.CAME(
    [p for ps in tparams.values() for p in ps], lr=1.0, weight_decay=weight_decay
  )

  worst = {"params": 0.0, "mu": 0.0, "stats": 0.0}
  for t in range(steps):
    g = grad_of(_flat(params), target, noise, t)
    params, state = step(params, state, _tree({k: jnp.asarray(v) for k, v in g.items()}))

    tp = {
      k: from_torch_views([p.detach().numpy() for p in ps], LEAVES[k][1], LEAVES[k][0])
      for k, ps in tparams.items()
    }
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
    nu = _flat_nu(came_state.nu)
    for k, ps in tparams.items():
      kind = LEAVES[k][1]
      if kind not in ("matrix_t", "stacked_t", "stacked_dg", "conv1x1"):
        continue
      d = nu[k]
      for i, p in enumerate(ps):
        st = topt.state[p]
        sl = (lambda x: x[i]) if kind.startswith("stacked") else (lambda x: x)
        for ours, key in (
          (d.v_row, "exp_avg_sq_col"),
          (d.v_col, "exp_avg_sq_row"),
          (d.res_row, "exp_avg_res_col"),
          (d.res_col, "exp_avg_res_row"),
        ):
          worst["stats"] = max(
            worst["stats"], rel_err(np.asarray(sl(ours)).reshape(-1), st[key].numpy())
          )
  return worst


def _flat_nu(nu):
  is_entry = lambda x: isinstance(x, (came_lib.FactoredMoments, came_lib.FullMoment))
  return {
    came_lib._path_str(p): x
    for p, x in jax.tree_util.tree_flatten_with_path(nu, is_leaf=is_entry)[0]
  }


SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 3e-2, 10, 50, 1e-3)


@pytest.mark.parametrize(
  "case,weight_decay,lr",
  [
    ("sana", 0.0, 1e-2),
    ("sana", 0.1, 1e-2),
    ("sana", 0.05, SCHEDULE),
    ("generic", 0.05, SCHEDULE),
  ],
  ids=["sana-plain", "sana-weight_decay", "sana-schedule+wd", "generic-schedule+wd"],
)
def test_matches_came_pytorch_50_steps(case, weight_decay, lr):
  worst = run_parity(case, weight_decay, lr)
  print(worst)
  for what, err in worst.items():
    assert err <= TOL, f"{what}: max rel err {err:.3g} > {TOL}"


def test_scale_by_came_defaults_match_came_pytorch():
  """scale_by_came's own defaults (betas, eps, clip), chained by hand as users of the bare
  transformation do, against came-pytorch (came() passes its own defaults down)."""

  def make(lr, weight_decay, spec):
    return optax.chain(
      came_lib.scale_by_came(spec=spec),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(lr),
    )

  worst = run_parity("generic", 0.05, SCHEDULE, steps=30, make_opt=make)
  for what, err in worst.items():
    assert err <= TOL, f"{what}: max rel err {err:.3g} > {TOL}"


def test_zero_and_tiny_gradients_match_came_pytorch():
  """Where the eps decide: a matrix whose gradient has all-zero rows and columns (an unused
  embedding row: its instability is exactly 0, so eps2 keeps rsqrt finite), gradients of
  size 1e-10 (g^2 = 1e-20, so eps1 = 1e-30 vs 1e-16 matters) and a vector with zero
  entries. came-pytorch on the same (torch-layout) tensors, 8 steps."""
  rng = np.random.default_rng(11)
  shapes = {"w": (7, 9), "tiny": (5, 6), "v": (8,)}
  init = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  grads = []
  for _ in range(8):
    g = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    g["w"][2] = 0.0
    g["w"][:, 4] = 0.0
    g["tiny"] *= np.float32(1e-10)
    g["v"][::3] = 0.0
    grads.append(g)
  opt = came_lib.came(1e-2)
  params = {k: jnp.asarray(v) for k, v in init.items()}
  state = opt.init(params)
  tparams = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in init.items()}
  topt = came_pytorch.CAME(list(tparams.values()), lr=1e-2)
  for g in grads:
    u, state = opt.update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
    params = optax.apply_updates(params, u)
    for k, p in tparams.items():
      p.grad = torch.tensor(g[k])
    topt.step()
  for k, p in tparams.items():
    ours = np.asarray(params[k])
    assert np.all(np.isfinite(ours)), k
    theirs = p.detach().numpy()
    delta = theirs - init[k]  # compare the accumulated update, not the (large) params
    assert rel_err(ours - init[k], delta) <= 1e-4, (k, rel_err(ours - init[k], delta))


def _specs(leaves, spec):
  tree = _tree({k: jnp.zeros(sh) for k, (sh, _) in leaves.items()})
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {came_lib._path_str(p): s for (p, _), s in zip(flat, came_lib.leaf_specs(tree, spec))}


def test_classification_reference_rule():
  LS = came_lib.LeafSpec
  got = _specs(SANA_LEAVES, came_lib.sana_spec())
  assert got == {
    "t_block/kernel": LS(True, 0, 1),
    "t_block/bias": LS(False, 0),
    "patch_embed/kernel": LS(True, 0, 1),
    "final_scale_shift_table": LS(True, 0, 1),
    "blocks/scale_shift_table": LS(True, 1, 1),
    "blocks/self_attn/qkv/kernel": LS(True, 1, 1),
    "blocks/self_attn/out/kernel": LS(True, 1, 1),
    "blocks/self_attn/q_norm": LS(False, 1),
    "blocks/mlp/inverted/bias": LS(False, 1),
    "blocks/mlp/depthwise_kernel": LS(False, 1),
  }
  got = _specs(GENERIC_LEAVES, came_lib.reference_spec())
  assert got == {
    "dense/kernel": LS(True, 0, 1),
    "dense/bias": LS(False, 0),
    "table": LS(True, 0, 1),
    "conv1x1/kernel": LS(True, 2, 1),
    "dwconv/kernel": LS(False, 0),
  }
  # Without a stacked rule a stacked kernel is a rank-3 non-1x1 tensor: unfactored.
  assert came_lib.leaf_specs({"k": jnp.zeros((3, 4, 5))})[0] == LS(False, 0)


def test_sana_spec_on_the_dit_tree():
  """On the real DiT tree (tiny config): every kernel is factored as (in, prod(out)) per
  layer, biases / norms / depthwise conv are not; the factored element count equals the
  torch 2-D / 1x1-conv weights' count."""
  dit = pytest.importorskip("sana_jax.models.dit")
  from sana_jax.configs import tiny

  cfg = tiny.get_config()
  tree = dit.abstract_params(cfg.model)
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  specs = came_lib.leaf_specs(tree, came_lib.sana_spec())
  for (p, x), s in zip(flat, specs):
    path = came_lib._path_str(p)
    stacked = path.startswith("blocks/")
    assert s.batch_ndim == int(stacked), path
    name = path.rsplit("/", 1)[-1]
    is_matrix = name == "kernel" or name.endswith("scale_shift_table")
    assert s.factored == is_matrix, path
    if s.factored:
      assert s.row_ndim == 1, path


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
  with pytest.raises(ValueError, match="factored needs"):
    came_lib.scale_by_came(spec=lambda path, x: came_lib.LeafSpec(True)).init({"b": jnp.zeros(3)})
  with pytest.raises(ValueError, match="stacked axes"):
    came_lib.scale_by_came(spec=came_lib.reference_spec(lambda p: 2)).init({"b": jnp.zeros(3)})
  with pytest.raises(TypeError, match="static_args"):
    came_lib.scale_by_came(block_size=jnp.asarray(4))
