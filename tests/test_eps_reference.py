"""Every eps of the DiT against the reference, on inputs where the eps decides the output.

The whole-model parity tests run at activations of order 1, where an eps of 1e-6 or 1e-5
changes the output by ~1e-6 (under their bound). Here each norm and the linear attention
see inputs whose mean square (or attention denominator) is of the order of the eps, so a
wrong eps changes the output by percent, and every test also checks that a planted eps
change (x10) moves our output far outside its bound.

Oracles: the eps each diffusers `SanaTransformer2DModel` submodule holds (and its forward at
that eps), torch.nn.functional's rms_norm / layer_norm, diffusers' own linear-attention
processor (eps 1e-15), and the official values where diffusers differs (REFERENCE.md
section 1; the official code is not installed): block LayerNorm 1e-6, self-attention q/k
RMSNorm 1e-5, cross-attention q/k RMSNorm 1e-6 (diffusers 1e-5), linear attention 1e-8
(diffusers 1e-15), caption RMSNorm 1e-5. The official model's modules are diffusers' with
those eps, and its linear attention is the padded-ones formula written out below.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sana_jax.models import dit
from sana_jax.models.dit_config import DiTConfig
from sana_jax.weights import dit as dit_weights
from tests import dit_reference as ref

OFFICIAL = dict(
  norm_eps=1e-6, qk_norm_eps=1e-5, cross_norm_eps=1e-6, caption_norm_eps=1e-5, linear_attn_eps=1e-8
)

# Width 48 (6 self heads x 8), cross 4 x 10 = 40, caption 20 x 7 tokens, latent 3 x 5.
CFG = DiTConfig(
  in_channels=5,
  out_channels=5,
  hidden_size=48,
  depth=2,
  self_head_dim=8,
  cross_heads=4,
  cross_head_dim=10,
  caption_channels=20,
  sample_size=5,
  qk_norm=True,
  cross_norm=True,
)
DCFG = CFG.diffusers_compatible()
H, W, LY = 3, 5, 7
TOL = 1e-5
PLANT = 10.0  # an eps off by this factor must fail by far


def _rel(a, b):
  return ref.rel_err(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def models():
  torch_model = ref.diffusers_model(DCFG, seed=11)
  params = dit_weights.diffusers_to_params(ref.state_dict_numpy(torch_model), DCFG)
  return torch_model, params


def _layer(params, i=0):
  return jax.tree.map(lambda a: a[i], params["blocks"])


def _t(x):
  return torch.from_numpy(np.ascontiguousarray(x, np.float32))


# ----------------------------------------------------------------------------- the values


def test_config_defaults_are_the_official_values():
  cfg = DiTConfig()
  for name, value in OFFICIAL.items():
    assert getattr(cfg, name) == value, name
  # The released configs keep them (none overrides an eps).
  import importlib

  for mod in (
    "sana_600m",
    "sana_1600m",
    "sana15_1600m",
    "sana15_4800m",
    "sana_1600m_2k",
    "sana_1600m_4k",
  ):
    m = DiTConfig.coerce(importlib.import_module(f"sana_jax.configs.{mod}").get_config().model)
    for name, value in OFFICIAL.items():
      assert getattr(m, name) == value, (mod, name)


def test_eps_equal_those_diffusers_modules_hold(models):
  """diffusers_compatible() uses exactly the eps diffusers' submodules hold; the official
  config differs from it only where the official code does (cross-norm, linear attention)."""
  torch_model, _ = models
  for block in torch_model.transformer_blocks:
    assert block.norm1.eps == DCFG.norm_eps == CFG.norm_eps
    assert block.norm2.eps == DCFG.norm_eps
    assert block.attn1.norm_q.eps == block.attn1.norm_k.eps == DCFG.qk_norm_eps == CFG.qk_norm_eps
    assert block.attn2.norm_q.eps == block.attn2.norm_k.eps == DCFG.cross_norm_eps
  assert torch_model.caption_norm.eps == DCFG.caption_norm_eps == CFG.caption_norm_eps
  assert torch_model.norm_out.norm.eps == DCFG.norm_eps
  assert DCFG.linear_attn_eps == _diffusers_linear_attn_eps()
  # where the official code differs from diffusers
  assert CFG.cross_norm_eps == 1e-6 and DCFG.cross_norm_eps == 1e-5
  assert CFG.linear_attn_eps == 1e-8 and DCFG.linear_attn_eps == 1e-15


def _diffusers_linear_attn_eps():
  """The eps diffusers' SanaLinearAttnProcessor2_0 adds to its denominator, measured: with
  one token, one head, q = k = a (head dim 1), v = 1: out = a^2 / (a^2 + eps)."""
  from diffusers.models.attention_processor import Attention, SanaLinearAttnProcessor2_0

  attn = Attention(
    query_dim=1, heads=1, dim_head=1, bias=False, processor=SanaLinearAttnProcessor2_0()
  )
  with torch.no_grad():
    for lin in (attn.to_q, attn.to_k, attn.to_v):
      lin.weight.fill_(1.0)
    attn.to_out[0].weight.fill_(1.0)
    attn.to_out[0].bias.zero_()
    a = 1e-7  # a^2 = 1e-14: out = 1 / (1 + eps / 1e-14)
    x = torch.full((1, 1, 1), a, dtype=torch.float64).float()
    out = float(attn(x)[0, 0, 0]) / a  # value = a, so divide it out
  eps = (1.0 / out - 1.0) * a * a
  return float(f"{eps:.1g}")  # 1e-15 to one significant digit


# ----------------------------------------------------------------------------- functions


@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_rms_norm_against_torch_where_eps_dominates(eps):
  rng = np.random.default_rng(0)
  x = (math.sqrt(eps) * rng.standard_normal((6, 48))).astype(np.float32)  # mean(x^2) ~ eps
  w = (1 + 0.1 * rng.standard_normal(48)).astype(np.float32)
  theirs = F.rms_norm(_t(x), (48,), _t(w), eps=eps).numpy()
  assert _rel(dit.rms_norm(jnp.asarray(x), jnp.asarray(w), eps), theirs) <= TOL
  assert _rel(dit.rms_norm(jnp.asarray(x), jnp.asarray(w), eps * PLANT), theirs) > 0.2


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_layer_norm_against_torch_where_eps_dominates(eps):
  rng = np.random.default_rng(1)
  x = (0.01 + math.sqrt(eps) * rng.standard_normal((6, 48))).astype(np.float32)  # var ~ eps
  theirs = F.layer_norm(_t(x), (48,), eps=eps).numpy()
  assert _rel(dit.layer_norm(jnp.asarray(x), eps), theirs) <= 1e-4  # fp32 mean subtraction
  assert _rel(dit.layer_norm(jnp.asarray(x), eps * PLANT), theirs) > 0.2


def official_linear_attention(q, k, v, eps):
  """The official LiteLA core in torch: q, k (B, heads, d, N) after ReLU, v (B, heads, e, N);
  v padded with a row of ones, (v @ k^T) @ q, the last row divides the rest."""
  v = F.pad(v, (0, 0, 0, 1), mode="constant", value=1.0)
  vk = torch.matmul(v, k.transpose(-1, -2))
  out = torch.matmul(vk, q)
  return out[:, :, :-1] / (out[:, :, -1:] + eps)


@pytest.mark.parametrize("eps", [1e-8, 1e-15])
def test_linear_attention_against_the_official_formula_where_eps_dominates(eps):
  rng = np.random.default_rng(2)
  b, n, heads, d, e = 2, 9, 3, 4, 5
  # sum_m k_m . q_n ~ n * d * s^2 ~ eps: the denominator is of the order of eps
  s = math.sqrt(eps / (n * d))
  q = np.maximum(s * rng.standard_normal((b, n, heads, d)), 0).astype(np.float32)
  k = np.maximum(s * rng.standard_normal((b, n, heads, d)), 0).astype(np.float32)
  v = rng.standard_normal((b, n, heads, e)).astype(np.float32)
  tq, tk, tv = (_t(a).permute(0, 2, 3, 1) for a in (q, k, v))  # (B, heads, ., N)
  theirs = official_linear_attention(tq, tk, tv, eps).permute(0, 3, 1, 2).numpy()
  assert _rel(dit.linear_attention(q, k, v, eps), theirs) <= TOL
  assert _rel(dit.linear_attention(q, k, v, eps * PLANT), theirs) > 0.2


# ----------------------------------------------------------------------------- modules


def _scaled_input(rng, shape, target_ms, project):
  """A random input scaled so that project(input) has mean square target_ms."""
  x = rng.standard_normal(shape).astype(np.float32)
  ms = float(np.mean(np.square(project(x))))
  return (x * math.sqrt(target_ms / ms)).astype(np.float32)


def test_self_attention_qk_norm_eps_matches_diffusers(models):
  """q and k have mean square ~ qk_norm_eps: diffusers' attn1 (eps 1e-5, official too).

  Only k's eps can show in the output (q's per-token norm cancels in the ratio); q's eps
  is checked by value against attn1.norm_q.eps above."""
  torch_model, params = models
  attn = torch_model.transformer_blocks[0].attn1
  p = _layer(params)["self_attn"]
  rng = np.random.default_rng(3)
  wq = attn.to_q.weight.detach().numpy()
  h = _scaled_input(rng, (2, H * W, CFG.hidden_size), CFG.qk_norm_eps, lambda x: x @ wq.T)
  # Linear attention is invariant to a per-query scale of q and to a common scale of k:
  # the eps shows through the *relative* weight of key tokens of different size, so the
  # tokens' mean squares span 1e-2 .. 1e2 times the eps.
  h = (h * 10.0 ** rng.uniform(-1, 1, (2, H * W, 1))).astype(np.float32)
  with torch.no_grad():
    theirs = attn(_t(h)).numpy()
  for cfg in (DCFG, CFG):
    ours = dit.SelfAttention(cfg).apply({"params": p}, h)
    assert _rel(ours, theirs) <= TOL
  planted = dit.SelfAttention(DCFG.replace(qk_norm_eps=CFG.qk_norm_eps / PLANT)).apply(
    {"params": p}, h
  )
  assert _rel(planted, theirs) > 1e-2


def _self_attn_reference(attn, h, eps):
  """diffusers' attn1 projections with the linear-attention core at `eps` (official formula)."""
  with torch.no_grad():
    x = _t(h)
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    heads = attn.heads
    q, k, v = (a.transpose(1, 2).unflatten(1, (heads, -1)) for a in (q, k, v))  # (B, h, d, N)
    out = official_linear_attention(F.relu(q).float(), F.relu(k).float(), v.float(), eps)
    out = out.flatten(1, 2).transpose(1, 2)
    return attn.to_out[0](out).numpy()


@pytest.mark.parametrize("which", ["diffusers", "official"])
def test_self_attention_linear_eps(models, which):
  """No qk-norm, tiny q and k: the attention denominator is ~ linear_attn_eps. diffusers:
  its own processor (1e-15); official: diffusers' projections with the 1e-8 formula."""
  torch_model, params = models
  cfg = DCFG if which == "diffusers" else CFG
  cfg = cfg.replace(qk_norm=False, cross_norm=False)
  attn = torch_model.transformer_blocks[0].attn1
  norm_q, norm_k = attn.norm_q, attn.norm_k
  p = {k: v for k, v in _layer(params)["self_attn"].items() if k not in ("q_norm", "k_norm")}
  rng = np.random.default_rng(4)
  wq = attn.to_q.weight.detach().numpy()
  n, d = H * W, cfg.self_head_dim
  # relu(q) . sum relu(k) ~ (n * d / 4) * ms: make it ~ eps
  h = _scaled_input(
    rng, (2, n, cfg.hidden_size), 4 * cfg.linear_attn_eps / (n * d), lambda x: x @ wq.T
  )
  # v is as small as q and k: drop the output bias (both models) so the output is the core's
  p["out"] = dict(p["out"], bias=jnp.zeros_like(p["out"]["bias"]))
  bias = attn.to_out[0].bias.detach().clone()
  attn.norm_q = attn.norm_k = None
  try:
    with torch.no_grad():
      attn.to_out[0].bias.zero_()
      if which == "diffusers":
        theirs = attn(_t(h)).numpy()
      else:
        theirs = _self_attn_reference(attn, h, OFFICIAL["linear_attn_eps"])
  finally:
    attn.norm_q, attn.norm_k = norm_q, norm_k
    with torch.no_grad():
      attn.to_out[0].bias.copy_(bias)
  ours = dit.SelfAttention(cfg).apply({"params": p}, h)
  assert _rel(ours, theirs) <= 1e-4  # fp32 sums of ~1e-15 terms
  planted = dit.SelfAttention(cfg.replace(linear_attn_eps=cfg.linear_attn_eps * PLANT)).apply(
    {"params": p}, h
  )
  assert _rel(planted, theirs) > 1e-2
  planted = dit.SelfAttention(cfg.replace(linear_attn_eps=cfg.linear_attn_eps + 1e-2)).apply(
    {"params": p}, h
  )
  assert _rel(planted, theirs) > 0.5


def _mask_bias(mask):
  return (1 - _t(mask))[:, None, :] * -10000.0


@pytest.mark.parametrize("which", ["diffusers", "official"])
def test_cross_attention_norm_eps(models, which):
  """q and k of the cross attention have mean square ~ cross_norm_eps (to_q and to_k scaled
  down in both models; v stays of order 1 so the attention weights show). The reference is
  diffusers' attn2 holding the eps of that reference (diffusers 1e-5, official 1e-6)."""
  torch_model, params = models
  cfg = DCFG if which == "diffusers" else CFG
  attn = torch_model.transformer_blocks[0].attn2
  p = _layer(params)["cross_attn"]
  rng = np.random.default_rng(5)
  eps = cfg.cross_norm_eps
  spread = lambda n: 10.0 ** rng.uniform(-0.5, 0.5, (2, n, 1))  # token sizes differ
  x = (rng.standard_normal((2, H * W, cfg.hidden_size)) * spread(H * W)).astype(np.float32)
  y = (rng.standard_normal((2, LY, cfg.hidden_size)) * spread(LY)).astype(np.float32)
  mask = np.ones((2, LY), np.int32)
  mask[0, -2:] = 0
  with torch.no_grad():
    sq = math.sqrt(eps / 2 / float(torch.mean(attn.to_q(_t(x)) ** 2)))
    sk = math.sqrt(eps / 2 / float(torch.mean(attn.to_k(_t(y)) ** 2)))
  saved = {
    n: [t.detach().clone() for t in (getattr(attn, n).weight, getattr(attn, n).bias)]
    for n in ("to_q", "to_k")
  }
  saved_eps = (attn.norm_q.eps, attn.norm_k.eps)
  try:
    with torch.no_grad():
      for n, f in (("to_q", sq), ("to_k", sk)):
        getattr(attn, n).weight.mul_(f)
        getattr(attn, n).bias.mul_(f)
      attn.norm_q.eps = attn.norm_k.eps = eps
      theirs = attn(_t(x), encoder_hidden_states=_t(y), attention_mask=_mask_bias(mask)).numpy()
  finally:
    with torch.no_grad():
      for n, (w, b) in saved.items():
        getattr(attn, n).weight.copy_(w)
        getattr(attn, n).bias.copy_(b)
    attn.norm_q.eps, attn.norm_k.eps = saved_eps
  p = dict(p)
  p["q"] = jax.tree.map(lambda a: a * sq, p["q"])
  p["kv"] = {
    "kernel": jnp.asarray(p["kv"]["kernel"]).at[:, 0].multiply(sk),
    "bias": jnp.asarray(p["kv"]["bias"]).at[0].multiply(sk),
  }
  run = lambda c: dit.CrossAttention(c).apply({"params": p}, x, y, mask)
  assert _rel(run(cfg), theirs) <= TOL
  other = CFG if which == "diffusers" else DCFG  # 1e-6 <-> 1e-5: the planted change
  assert _rel(run(other), theirs) > 1e-2
  assert _rel(run(cfg.replace(cross_norm_eps=eps * PLANT)), theirs) > 1e-2


@pytest.mark.parametrize("where", ["norm1", "norm2"])
def test_block_layer_norm_eps_matches_diffusers(models, where):
  """A block's residual stream with per-token variance ~ norm_eps. For norm2 the two
  attention outputs are zeroed (both models), so the stream stays small up to it."""
  torch_model, params = models
  block = torch_model.transformer_blocks[1]
  p = _layer(params, 1)
  rng = np.random.default_rng(6)
  eps = CFG.norm_eps
  x = (math.sqrt(eps) * rng.standard_normal((2, H, W, CFG.hidden_size))).astype(np.float32)
  t0 = (0.3 * rng.standard_normal((2, 6, CFG.hidden_size))).astype(np.float32)
  y = rng.standard_normal((2, LY, CFG.hidden_size)).astype(np.float32)
  mask = np.ones((2, LY), np.int32)
  saved = None
  if where == "norm2":
    saved = [
      (m, m.weight.detach().clone(), m.bias.detach().clone())
      for m in (block.attn1.to_out[0], block.attn2.to_out[0])
    ]
    with torch.no_grad():
      for m, _, _ in saved:
        m.weight.zero_()
        m.bias.zero_()
    p = jax.tree.map(lambda a: a, p)
    for name in ("self_attn", "cross_attn"):
      p[name] = dict(p[name], out=jax.tree.map(jnp.zeros_like, p[name]["out"]))
  try:
    with torch.no_grad():
      theirs = (
        block(
          _t(x.reshape(2, H * W, -1)),
          encoder_hidden_states=_t(y),
          encoder_attention_mask=_mask_bias(mask),
          timestep=_t(t0.reshape(2, -1)),
          height=H,
          width=W,
        )
        .numpy()
        .reshape(x.shape)
      )
  finally:
    if saved:
      with torch.no_grad():
        for m, w, b in saved:
          m.weight.copy_(w)
          m.bias.copy_(b)
  run = lambda c: dit.Block(c).apply({"params": p}, x, t0, y, mask, None)[0]
  # The output is x (~1e-3) plus terms of order 1: compare the update, relative to itself.
  assert _rel(np.asarray(run(DCFG)) - x, theirs - x) <= TOL
  assert _rel(np.asarray(run(DCFG.replace(norm_eps=eps * PLANT))) - x, theirs - x) > 1e-2


def test_caption_norm_eps_matches_diffusers(models):
  """Caption embedding after the projection with mean square ~ caption_norm_eps (the
  projection's biases are scaled down in both models so a small caption gives a small y)."""
  torch_model, params = models
  proj = torch_model.caption_projection
  rng = np.random.default_rng(7)
  eps = CFG.caption_norm_eps
  cap = rng.standard_normal((2, LY, CFG.caption_channels)).astype(np.float32)
  shrink = 1e-3
  saved = [(m, m.bias.detach().clone()) for m in (proj.linear_1, proj.linear_2)]
  try:
    with torch.no_grad():
      for m, _ in saved:
        m.bias.mul_(shrink)
      # scale the caption so that the projection's output has mean square ~ eps
      ms = float(torch.mean(proj(_t(cap)) ** 2))
      cap = (cap * math.sqrt(eps / ms)).astype(np.float32)  # GELU ~ linear near 0
      theirs = torch_model.caption_norm(proj(_t(cap))).numpy()
  finally:
    with torch.no_grad():
      for m, b in saved:
        m.bias.copy_(b)
  p = dict(params)
  for k in ("caption_proj_fc1", "caption_proj_fc2"):
    p[k] = dict(p[k], bias=p[k]["bias"] * shrink)
  run = lambda c: dit.SanaDiT(c).apply({"params": p}, cap, method=dit.SanaDiT.encode_caption)
  assert _rel(run(DCFG), theirs) <= 1e-4
  assert _rel(run(DCFG.replace(caption_norm_eps=eps * PLANT)), theirs) > 1e-2


def test_final_layer_norm_eps_matches_diffusers(models):
  """Whole model with every residual write zeroed (attention outputs, FFN point conv) and
  no patch bias: the blocks pass tiny latents through and the final LayerNorm sees a
  per-token variance ~ norm_eps."""
  torch_model, params = models
  sd = ref.state_dict_numpy(torch_model)
  for k in list(sd):
    if (
      any(s in k for s in ("attn1.to_out.0.", "attn2.to_out.0.", "ff.conv_point."))
      or k == "patch_embed.proj.bias"
    ):
      sd[k] = np.zeros_like(sd[k])
  from diffusers import SanaTransformer2DModel

  config = dit_weights.to_diffusers_config(DCFG)
  config.pop("_class_name")
  zeroed = SanaTransformer2DModel(**config).eval()
  zeroed.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
  p = dit_weights.diffusers_to_params(sd, DCFG)
  rng = np.random.default_rng(8)
  wp = sd["patch_embed.proj.weight"][:, :, 0, 0]
  lat = _scaled_input(rng, (2, H, W, CFG.in_channels), CFG.norm_eps, lambda a: a @ wp.T)
  t = np.array([999.0, 37.0], np.float32)
  cap = rng.standard_normal((2, LY, CFG.caption_channels)).astype(np.float32)
  mask = np.ones((2, LY), np.int32)
  theirs = ref.run_diffusers(zeroed, lat, t, cap, mask)
  run = lambda c: dit.SanaDiT(c).apply({"params": p}, lat, t, cap, mask)
  assert _rel(run(DCFG), theirs) <= 1e-4
  assert _rel(run(DCFG.replace(norm_eps=CFG.norm_eps * PLANT)), theirs) > 1e-2
