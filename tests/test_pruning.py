"""Block importance and depth pruning (REFERENCE.md section 8), against a Python loop over
sliced block parameters and against the PyTorch model with forward hooks; prune CLI."""

import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sana_jax.configs import tiny
from sana_jax.models import dit
from sana_jax.models.dit_config import DiTConfig
from sana_jax.scaling import prune_cli, pruning
from sana_jax.weights import dit as W
from tests import dit_reference as ref

CFG5 = DiTConfig.coerce(tiny.get_config().model).replace(depth=5)
LATENT = (6, 7)
CAPTION_LEN = 9


random_params = ref.random_params


@pytest.fixture(scope="module")
def source():
  return random_params(CFG5, 0)


def _inputs(cfg, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, *LATENT, cfg.in_channels)).astype(np.float32)
  y = rng.standard_normal((batch, CAPTION_LEN, cfg.caption_channels)).astype(np.float32)
  mask = np.ones((batch, CAPTION_LEN), np.int32)
  mask[0, 5:] = 0
  t = rng.integers(0, 1000, batch).astype(np.float32)
  return x, t, y, mask


# ------------------------------------------------------------- independent reference loop


def _dense(p, x):
  return jnp.tensordot(x, p["kernel"], axes=1) + (p["bias"] if "bias" in p else 0.0)


@functools.lru_cache(maxsize=None)
def _block_apply(cfg):
  """One block, not scanned: dit.Block(cfg).apply, jitted (compiled once per shape)."""
  return jax.jit(dit.Block(cfg).apply)


def loop_forward(params, cfg, x, t, y, mask, order):
  """The DiT with no scan: embeddings and final layer written out here, then the blocks of
  `order` one at a time (dit.Block applied to params['blocks'] sliced at i).

  Returns (velocity (B, H, W, out), [X_0, X_1, ..., X_len(order)] block inputs/outputs).
  """
  p = params
  b, hh, ww, _ = x.shape
  # Patch embed (p = 1: a linear map per pixel).
  assert cfg.patch_size == 1
  h = _dense(p["patch_embed"], jnp.asarray(x))
  # Timestep: 256 sinusoid features, cos half first; MLP; adaLN-single t0.
  tt = jnp.floor(jnp.asarray(t)) if cfg.floor_timestep else jnp.asarray(t)
  freqs = np.exp(-math.log(10000.0) * np.arange(128) / 128)
  feat = jnp.concatenate([jnp.cos(tt[:, None] * freqs), jnp.sin(tt[:, None] * freqs)], -1)
  temb = _dense(p["t_embedder_fc2"], jax.nn.silu(_dense(p["t_embedder_fc1"], feat)))
  t0 = _dense(p["t_block"], jax.nn.silu(temb)).reshape(b, 6, cfg.hidden_size)
  # Caption projection and RMSNorm.
  cap = _dense(
    p["caption_proj_fc2"],
    jax.nn.gelu(_dense(p["caption_proj_fc1"], jnp.asarray(y)), approximate=True),
  )
  cap = cap / jnp.sqrt(jnp.mean(cap * cap, -1, keepdims=True) + cfg.caption_norm_eps)
  cap = cap * p["caption_norm"]
  xs = [h]
  block = _block_apply(cfg)
  for i in order:
    bp = jax.tree_util.tree_map(lambda a, i=i: a[i], p["blocks"])
    h, _ = block({"params": bp}, h, t0, cap, jnp.asarray(mask), None)
    xs.append(h)
  z = h.reshape(b, hh * ww, cfg.hidden_size)
  mean = z.mean(-1, keepdims=True)
  z = (z - mean) / jnp.sqrt(((z - mean) ** 2).mean(-1, keepdims=True) + cfg.norm_eps)
  table = p["final_scale_shift_table"][None] + temb[:, None]
  z = z * (1 + table[:, 1:2]) + table[:, 0:1]
  out = _dense(p["final_linear"], z).reshape(b, hh, ww, -1)
  return np.asarray(out), [np.asarray(v, np.float64) for v in xs]


def cos_formula(xs):
  """Token-mean cos(X_i, X_{i+1}) from block inputs (float64): (L, B)."""
  out = []
  for a, b in zip(xs[:-1], xs[1:]):
    a, b = a.reshape(a.shape[0], -1, a.shape[-1]), b.reshape(b.shape[0], -1, b.shape[-1])
    c = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    out.append(c.mean(-1))
  return np.stack(out)


@functools.lru_cache(maxsize=None)
def _apply(cfg):
  return jax.jit(dit.SanaDiT(cfg).apply)


def _run(cfg, params, inputs):
  return np.asarray(_apply(cfg)({"params": params}, *inputs))


def test_loop_reproduces_scanned_model(source):
  """The reference loop itself is the model (so the tests below compare like with like)."""
  inputs = _inputs(CFG5, seed=1)
  out, _ = loop_forward(source, CFG5, *inputs, order=range(5))
  assert ref.rel_err(out, _run(CFG5, source, inputs)) <= 1e-5


# ---------------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("indices", [[0, 2, 3], [4, 1]])
def test_keep_blocks_equals_loop_over_those_blocks(source, indices):
  inputs = _inputs(CFG5, seed=2)
  pruned, pcfg = pruning.keep_blocks(source, CFG5, indices)
  assert pcfg == CFG5.replace(depth=len(indices))
  for k in source:
    if k != "blocks":
      for a, b in zip(jax.tree_util.tree_leaves(pruned[k]), jax.tree_util.tree_leaves(source[k])):
        np.testing.assert_array_equal(a, b)
  want, _ = loop_forward(source, CFG5, *inputs, order=indices)
  assert ref.rel_err(_run(pcfg, pruned, inputs), want) <= 1e-5


def test_prune_to_depth_drops_least_important(source):
  imp = np.array([0.5, 0.1, 0.3, 0.1, 0.9])
  assert pruning.select_blocks(imp, 3) == [0, 2, 4]
  assert pruning.select_blocks(imp, 4) == [0, 1, 2, 4]  # tie 1 vs 3: the earlier stays
  assert pruning.select_blocks(imp, 5) == [0, 1, 2, 3, 4]
  pruned, pcfg, kept = pruning.prune(source, CFG5, depth=2, importance=imp)
  assert kept == [0, 4] and pcfg.depth == 2
  np.testing.assert_array_equal(
    pruned["blocks"]["scale_shift_table"], source["blocks"]["scale_shift_table"][[0, 4]]
  )


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(depth=0, importance=np.ones(5)), r"int in 1..5 .*got 0"),
    (dict(depth=6, importance=np.ones(5)), r"int in 1..5 .*got 6"),
    (dict(depth=2, importance=np.ones(4)), r"importance has shape \(4,\), expected \(5,\)"),
    (dict(depth=2), "needs the block importance"),
    (dict(indices=[]), "cannot prune to 0 blocks"),
    (dict(indices=[0, 5]), r"\[5\] out of range: the model has blocks 0..4"),
    (dict(indices=[-1, 2]), r"\[-1\] out of range"),
    (dict(indices=[1, 3, 1]), r"repeated: \[1\]"),
    (dict(indices=[1.0, 2]), "must be integers"),
    (dict(indices=[1, 2], depth=2, importance=np.ones(5)), "exactly one of"),
    (dict(), "exactly one of"),
  ],
)
def test_bad_input(source, kwargs, match):
  with pytest.raises(ValueError, match=match):
    pruning.prune(source, CFG5, **kwargs)


def test_bad_calibration_input(source):
  y = np.zeros((2, CAPTION_LEN, CFG5.caption_channels), np.float32)
  m = np.ones((2, CAPTION_LEN), np.int32)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match=r"captions must be \(N, L, 20\)"):
    pruning.block_importance(source, CFG5, y[..., :7], m, key=key)
  with pytest.raises(ValueError, match="masks must be"):
    pruning.block_importance(source, CFG5, y, m[:, :4], key=key)
  with pytest.raises(ValueError, match="model times in"):
    pruning.block_importance(source, CFG5, y, m, key=key, timesteps=[1200])
  with pytest.raises(ValueError, match="paired with the captions"):
    pruning.block_importance(source, CFG5, y, m, key=key, latents=np.zeros((3, 4, 4, 4)))


def test_pruned_checkpoint_converts(source, tmp_path):
  pruned, pcfg = pruning.keep_blocks(source, CFG5, [0, 3, 4])
  pruned = jax.device_get(pruned)
  back, _ = W.official_to_params(W.params_to_official(pruned, pcfg), pcfg)
  back2 = W.diffusers_to_params(W.params_to_diffusers(pruned, pcfg), pcfg)
  for tree in (back, back2):
    for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(pruned)):
      np.testing.assert_array_equal(a, b)
  W.save_diffusers(tmp_path / "d", pruned, pcfg)
  loaded, lcfg = W.load_diffusers(tmp_path / "d")
  assert lcfg.depth == 3
  for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(pruned)):
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------ block importance


def test_block_cosine_equals_formula_on_loop(source):
  inputs = _inputs(CFG5, batch=3, seed=4)
  cos = np.asarray(pruning.block_cosine(source, CFG5, *inputs))
  _, xs = loop_forward(source, CFG5, *inputs, order=range(5))
  want = cos_formula(xs)
  assert cos.shape == (5, 3)
  np.testing.assert_allclose(cos, want, atol=2e-6, rtol=0)
  assert np.ptp(want) > 1e-3  # the blocks differ: a wrong block order would show


def test_block_importance_equals_formula(source):
  """Captions x timesteps x noise draws, in one batch through the loop, vs the scanned
  one-pass computation in batches of 2 (the noise scheme is rebuilt here from its spec)."""
  n, ts, draws = 3, [150.0, 800.0], 2
  _, _, y, mask = _inputs(CFG5, batch=n, seed=6)
  key = jax.random.key(11)
  bi = pruning.block_importance(
    source, CFG5, y, mask, key=key, timesteps=ts, num_draws=draws, latent_size=LATENT, batch_size=2
  )
  xt, tt, yy, mm = [], [], [], []
  for d in range(draws):
    for i in range(n):
      k_eps, k_x0 = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, d), i))
      eps = np.asarray(jax.random.normal(k_eps, (*LATENT, 4)))
      x0 = np.asarray(jax.random.normal(k_x0, (*LATENT, 4)))
      for t in ts:
        xt.append((1 - t / 1000) * x0 + t / 1000 * eps)
        tt.append(t)
        yy.append(y[i])
        mm.append(mask[i])
  _, xs = loop_forward(
    source,
    CFG5,
    np.stack(xt).astype(np.float32),
    np.array(tt, np.float32),
    np.stack(yy),
    np.stack(mm),
    order=range(5),
  )
  want = 1.0 - cos_formula(xs).mean(axis=1)
  assert bi.shape == (5,)
  np.testing.assert_allclose(bi, want, atol=2e-6, rtol=0)
  # Batching does not change the draws.
  bi3 = pruning.block_importance(
    source, CFG5, y, mask, key=key, timesteps=ts, num_draws=draws, latent_size=LATENT, batch_size=3
  )
  np.testing.assert_allclose(bi3, bi, atol=1e-6, rtol=0)


def test_block_importance_with_latents(source):
  """At t = 0 the model sees x0 itself: BI from given latents is the formula on them."""
  x, _, y, mask = _inputs(CFG5, batch=2, seed=8)
  bi = pruning.block_importance(
    source, CFG5, y, mask, key=jax.random.key(0), timesteps=[0], latents=x
  )
  _, xs = loop_forward(source, CFG5, x, np.zeros(2, np.float32), y, mask, order=range(5))
  np.testing.assert_allclose(bi, 1.0 - cos_formula(xs).mean(axis=1), atol=2e-6, rtol=0)


def test_block_cosine_matches_diffusers_hooks():
  """On a converted tiny diffusers model: our one-pass cosines equal the formula applied to
  the hidden states that forward hooks collect around transformer_blocks."""
  cfg = DiTConfig.coerce(tiny.get_config().model).replace(depth=4).diffusers_compatible()
  model = ref.diffusers_model(cfg, seed=3)
  params = W.diffusers_to_params(ref.state_dict_numpy(model), cfg)
  x, _, y, mask = _inputs(cfg, batch=3, seed=10)
  t = np.array([999.0, 421.0, 3.0], np.float32)  # integer timesteps
  ins, outs = {}, {}
  handles = []
  for i, blk in enumerate(model.transformer_blocks):
    handles.append(
      blk.register_forward_pre_hook(
        lambda m, args, i=i: ins.__setitem__(i, args[0].detach().double().numpy())
      )
    )
    handles.append(
      blk.register_forward_hook(
        lambda m, args, out, i=i: outs.__setitem__(i, out.detach().double().numpy())
      )
    )
  ref.run_diffusers(model, x, t, y, mask)
  for h in handles:
    h.remove()
  assert sorted(ins) == sorted(outs) == list(range(4))
  for i in range(3):  # the blocks are chained
    np.testing.assert_array_equal(outs[i], ins[i + 1])
  want = cos_formula([ins[0]] + [outs[i] for i in range(4)])
  ours = np.asarray(pruning.block_cosine(params, cfg, x, t, y, mask))
  np.testing.assert_allclose(ours, want, atol=1e-5, rtol=0)
  np.testing.assert_allclose(1 - ours.mean(1), 1 - want.mean(1), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------- CLI


def test_cli_with_cached_embeddings(source, tmp_path):
  ckpt = tmp_path / "ckpt"
  W.save_flax(ckpt, source, CFG5, {"null_caption_embedding": np.ones((3, 20), np.float32)})
  _, _, y, mask = _inputs(CFG5, batch=3, seed=12)
  np.savez(tmp_path / "calib.npz", caption=y, mask=mask)
  out, chart = tmp_path / "pruned", tmp_path / "bi.png"
  assert (
    prune_cli.main(
      [
        "--checkpoint",
        str(ckpt),
        "--captions",
        str(tmp_path / "calib.npz"),
        "--depth",
        "3",
        "--timesteps",
        "200,700",
        "--latent-size",
        "6x7",
        "--batch-size",
        "2",
        "--seed",
        "5",
        "--out",
        str(out),
        "--chart",
        str(chart),
      ]
    )
    == 0
  )
  bi = pruning.block_importance(
    source, CFG5, y, mask, key=jax.random.key(5), timesteps=[200, 700], latent_size=LATENT
  )
  report = json.loads((out / "block_importance.json").read_text())
  np.testing.assert_allclose(report["importance"], bi, atol=1e-6, rtol=0)
  assert report["kept"] == pruning.select_blocks(bi, 3)
  params, pcfg, extras = W.load_flax(out)
  assert pcfg.depth == 3
  np.testing.assert_array_equal(extras["null_caption_embedding"], 1.0)
  np.testing.assert_array_equal(
    params["blocks"]["mlp"]["point"]["kernel"],
    source["blocks"]["mlp"]["point"]["kernel"][report["kept"]],
  )
  from PIL import Image

  with Image.open(chart) as im:
    assert im.format == "PNG" and im.size[0] > 100


def test_cli_errors_and_whole_outputs(source, tmp_path, capsys, monkeypatch):
  """Bad input: exit 2 with a named error (one contract case each in
  tests/test_scaling_cli_contract.py); here, that --keep without captions is the plain cut,
  and that --out is never overwritten without --overwrite, and then only whole."""
  ckpt = tmp_path / "ckpt"
  W.save_flax(ckpt, source, CFG5)
  (tmp_path / "p.txt").write_text("a red circle\n")
  base = ["--checkpoint", str(ckpt), "--out", str(tmp_path / "o")]
  with pytest.raises(SystemExit) as e:  # neither --depth nor --keep
    prune_cli.main(base)
  assert e.value.code == 2
  with pytest.raises(SystemExit) as e:  # both
    prune_cli.main(base + ["--depth", "2", "--keep", "0,1"])
  assert e.value.code == 2
  assert prune_cli.main(base + ["--depth", "9", "--captions", str(tmp_path / "p.txt")]) == 2
  assert "error: --depth 9: expected 1..5" in capsys.readouterr().err
  # --keep without captions: no importance, just the cut.
  assert prune_cli.main(base + ["--keep", "4,1"]) == 0
  params, pcfg, _ = W.load_flax(tmp_path / "o")
  np.testing.assert_array_equal(
    params["blocks"]["scale_shift_table"], source["blocks"]["scale_shift_table"][[4, 1]]
  )
  first = {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()}
  # an existing --out: refused without --overwrite
  assert prune_cli.main(base + ["--keep", "2"]) == 2
  assert "--overwrite" in capsys.readouterr().err
  assert {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()} == first

  # a failure while writing leaves the old output as it was, and nothing beside it
  def broken_save(folder, *a, **k):
    (pathlib.Path(folder) / "params.safetensors").write_bytes(b"half")
    raise OSError("disk full")

  with monkeypatch.context() as m:
    m.setattr(W, "save_flax", broken_save)
    with pytest.raises(OSError, match="disk full"):
      prune_cli.main(base + ["--keep", "2", "--overwrite"])
  assert {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()} == first
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "o", "p.txt"]
  # with --overwrite: replaced by the new checkpoint only
  assert prune_cli.main(base + ["--keep", "2", "--overwrite"]) == 0
  assert W.load_flax(tmp_path / "o")[1].depth == 1
  assert sorted(p.name for p in (tmp_path / "o").iterdir()) == sorted(first)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "o", "p.txt"]


def test_cli_with_prompts_and_text_encoder(tmp_path):
  """Prompts encoded by a tiny Gemma-2 (our folder) + a word-level tokenizer, on a converted
  diffusers checkpoint folder; the importance equals the API on the same embeddings."""
  from sana_jax.data.tokenizer import build_word_level_tokenizer, words_of
  from sana_jax.models import text_encoder as te
  from sana_jax.models.prompts import PromptEncoder, PromptConfig
  from sana_jax.weights import gemma

  prompts = ["a red circle left of a blue square", "two green triangles", "a small cat"]
  (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
  tok_dir, enc_dir = str(tmp_path / "tok"), str(tmp_path / "enc")
  build_word_level_tokenizer(words_of(prompts), tok_dir)
  gcfg = te.Gemma2Config(
    vocab_size=40,
    hidden_size=20,
    intermediate_size=24,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=6,
    sliding_window=4,
    query_pre_attn_scalar=6,
  )
  gemma.save_params(te.init_params(gcfg, 0), gcfg, enc_dir)
  cfg = DiTConfig.coerce(tiny.get_config().model).diffusers_compatible()  # depth 3
  params = random_params(cfg, 4)
  W.save_diffusers(tmp_path / "diffusers", params, cfg)
  out = tmp_path / "pruned"
  assert (
    prune_cli.main(
      [
        "--checkpoint",
        str(tmp_path / "diffusers"),
        "--captions",
        str(tmp_path / "prompts.txt"),
        "--text-encoder",
        enc_dir,
        "--tokenizer",
        tok_dir,
        "--no-chi",
        "--max-length",
        "8",
        "--timesteps",
        "500",
        "--latent-size",
        "5",
        "--depth",
        "2",
        "--out",
        str(out),
      ]
    )
    == 0
  )
  enc = PromptEncoder.from_folders(tok_dir, enc_dir, PromptConfig(max_length=8, chi=None))
  y, mask = enc.encode(prompts)
  assert y.shape == (3, 8, 20)
  loaded, lcfg = W.load_diffusers(tmp_path / "diffusers")
  bi = pruning.block_importance(
    loaded, lcfg, y, mask, key=jax.random.key(0), timesteps=[500], latent_size=5
  )
  report = json.loads((out / "block_importance.json").read_text())
  np.testing.assert_allclose(report["importance"], bi, atol=1e-6, rtol=0)
  assert W.load_flax(out)[1].depth == 2
