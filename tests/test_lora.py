"""LoRA interchange with diffusers/PEFT, merging, bad files (sana_jax.lora).

The oracle is diffusers' SanaTransformer2DModel with PEFT adapters: our export is loaded by
diffusers' own Sana LoRA loader (SanaLoraLoaderMixin.lora_state_dict +
load_lora_into_transformer, what SanaPipeline.load_lora_weights runs), and adapters made by
PEFT's LoraConfig and saved by SanaPipeline.save_lora_weights are imported by ours; both
compare transformer outputs, fp32, on a tiny model whose widths all differ (hidden 48, self
head 8, cross 4 x 10, caption 20, MLP 120, latent 5 x 9, caption length 7).
"""

from __future__ import annotations

import functools
import json
import struct

import jax
import numpy as np
import pytest

from sana_jax import lora
from sana_jax.lora import diffusers as lora_diffusers
from sana_jax.lora import merge
from sana_jax.models import dit
from sana_jax.models.dit_config import LORA_TARGETS, DiTConfig
from sana_jax.weights import dit as dit_weights

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")  # diffusers' LoRA loading needs PEFT
from tests import dit_reference as ref  # noqa: E402

CFG = DiTConfig(
  in_channels=5,
  out_channels=5,
  hidden_size=48,
  depth=2,
  self_head_dim=8,
  cross_heads=4,
  cross_head_dim=10,
  caption_channels=20,
  sample_size=9,
).diffusers_compatible()


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, 5, 9, CFG.in_channels)).astype(np.float32)
  y = rng.standard_normal((2, 7, CFG.caption_channels)).astype(np.float32)
  mask = np.ones((2, 7), np.int32)
  mask[0, 4:] = 0
  return x, np.array([999.0, 37.0], np.float32), y, mask


_APPLY = {}


def _ours(cfg, params, inputs):
  """Our DiT's output (one jitted apply per config, shared by the tests)."""
  if not cfg.lora_rank:  # the lora fields of a model without adapters change nothing
    cfg = cfg.replace(lora_alpha=0.0, lora_targets=CFG.lora_targets)
  if cfg not in _APPLY:
    _APPLY[cfg] = jax.jit(dit.SanaDiT(cfg).apply)
  return np.asarray(_APPLY[cfg]({"params": params}, *inputs))


@functools.lru_cache(maxsize=None)
def _abstract(cfg):
  """dit.abstract_params, traced once per config for the whole file."""
  return dit.abstract_params(cfg)


def _random_adapters(cfg, seed):
  """Random nonzero lora_a/lora_b leaves of cfg's shapes (each group its own A)."""
  rng = np.random.default_rng(seed)
  _, shapes = merge.split(_abstract(cfg))
  return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def _diffusers_load(model, path):
  """What SanaPipeline.load_lora_weights(path) does to its transformer."""
  from diffusers import SanaPipeline

  state_dict, metadata = SanaPipeline.lora_state_dict(str(path), return_lora_metadata=True)
  assert all("lora" in k for k in state_dict)  # load_lora_weights' own format check
  SanaPipeline.load_lora_into_transformer(state_dict, model, metadata=metadata)


def _peft_file(tmp_path, model, seed, **lora_config):
  """Adds a PEFT adapter with random nonzero lora_B to `model`; saves it as diffusers'
  training scripts do; returns the file."""
  from diffusers import SanaPipeline
  from peft import LoraConfig, get_peft_model_state_dict

  model.add_adapter(LoraConfig(init_lora_weights="gaussian", **lora_config))
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_B" in name:
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
  SanaPipeline.save_lora_weights(
    tmp_path,
    transformer_lora_layers=get_peft_model_state_dict(model),
    transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
  )
  return tmp_path / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def base():
  """(torch model without adapters, our converted base params)."""
  model = ref.diffusers_model(CFG, seed=3)
  return model, dit_weights.diffusers_to_params(ref.state_dict_numpy(model), CFG)


# ------------------------------------------------------------------------ export


LCFG = CFG.replace(lora_rank=3, lora_alpha=5.0, lora_targets=LORA_TARGETS)


def test_export_loads_in_diffusers_with_the_same_output(base, tmp_path):
  """Every target, alpha/r = 5/3, each MLP group its own A (exported as the exact rank-6
  conv_inverted adapter): diffusers' loader takes the file unchanged and its transformer
  then computes ours."""
  _, params = base
  adapted = merge.attach(params, _random_adapters(LCFG, 0))
  path = lora_diffusers.save(tmp_path / "lora.safetensors", adapted, LCFG)
  inputs = _inputs()
  ours = _ours(LCFG, adapted, inputs)
  model = ref.diffusers_model(CFG, seed=3)
  before = ref.run_diffusers(model, *inputs)
  _diffusers_load(model, path)
  theirs = ref.run_diffusers(model, *inputs)
  assert ref.rel_err(before, theirs) > 0.1  # the adapter matters
  assert ref.rel_err(ours, theirs) <= 1e-5
  with open(path, "rb") as f:  # the key layout the issue names
    header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
  k = "transformer.transformer_blocks.1.attn1.to_q.lora_"
  assert header[k + "A.weight"]["shape"] == [3, 48] and header[k + "B.weight"]["shape"] == [48, 3]
  k = "transformer.transformer_blocks.0.ff.conv_point.lora_"
  assert header[k + "A.weight"]["shape"] == [3, 120, 1, 1]
  assert header[k + "B.weight"]["shape"] == [48, 3, 1, 1]


# ------------------------------------------------------------------------ import


PEFT_CASES = {
  # diffusers' DreamBooth LoRA script for Sana: to_k, to_q, to_v (self and cross).
  "qkv": dict(r=4, lora_alpha=6, target_modules=["to_k", "to_q", "to_v"]),
  # Out projections and the MLP's 1x1 convs; per-module ranks and alphas; rsLoRA scale.
  "all_patterns_rslora": dict(
    r=4,
    lora_alpha=6,
    target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv_inverted", "conv_point"],
    rank_pattern={"conv_point": 2, "attn2.to_k": 3},
    alpha_pattern={"to_out.0": 3},
    use_rslora=True,
  ),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_import_peft_adapter_matches_torch(base, tmp_path, case):
  _, params = base
  model = ref.diffusers_model(CFG, seed=3)
  path = _peft_file(tmp_path, model, seed=len(case), **PEFT_CASES[case])
  inputs = _inputs(1)
  theirs = ref.run_diffusers(model, *inputs)
  tree, cfg = lora_diffusers.load(path, CFG)
  ours = _ours(cfg, merge.attach(params, tree), inputs)
  assert ref.rel_err(ours, theirs) <= 1e-5
  assert cfg.lora_rank == 4 and cfg.lora_scale == 1.0
  if case == "qkv":
    assert cfg.lora_targets == ("self_attn.qkv", "cross_attn.q", "cross_attn.kv")
  else:
    assert cfg.lora_targets == LORA_TARGETS
    point = tree["blocks"]["mlp"]["point"]
    assert not np.any(point["lora_a"][..., 2:]) and not np.any(point["lora_b"][:, 2:])


def test_import_missing_slices_are_zero(base, tmp_path):
  """Only to_q adapted: the qkv adapter's k and v slices import as zeros; the cross
  attention gets a q adapter and no kv adapter."""
  _, params = base
  model = ref.diffusers_model(CFG, seed=3)
  path = _peft_file(tmp_path, model, seed=7, r=2, lora_alpha=2, target_modules=["to_q"])
  tree, cfg = lora_diffusers.load(path, CFG)
  assert cfg.lora_targets == ("self_attn.qkv", "cross_attn.q")
  qkv = tree["blocks"]["self_attn"]["qkv"]
  assert np.any(qkv["lora_b"][:, 0]) and not np.any(qkv["lora_b"][:, 1:])
  assert not np.any(qkv["lora_a"][:, :, 1:])
  inputs = _inputs(2)
  assert (
    ref.rel_err(_ours(cfg, merge.attach(params, tree), inputs), ref.run_diffusers(model, *inputs))
    <= 1e-5
  )


def test_round_trip_diffusers_file_is_unchanged(base, tmp_path):
  """import -> export gives back the PEFT file's tensors (conv_inverted at its own rank: the
  groups share the imported A)."""
  model = ref.diffusers_model(CFG, seed=3)
  kw = dict(r=3, lora_alpha=3, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv_inverted"])
  path = _peft_file(tmp_path, model, seed=4, **kw)
  original, _ = lora_diffusers.read_file(path)
  tree, cfg = lora_diffusers.load(path, CFG)
  again = lora_diffusers.to_diffusers(merge.attach(base[1], tree), cfg)
  assert sorted(again) == sorted(original)
  for k, v in original.items():
    np.testing.assert_allclose(again[k], v, rtol=0, atol=1e-7, err_msg=k)


# ------------------------------------------------------------------------- merge


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_merge_equals_applying(base, scale):
  """W + scale * (alpha/r) A B with lora_rank 0 computes what the adapter computes with its
  B scaled by `scale`."""
  _, params = base
  adapters = _random_adapters(LCFG, 1)
  merged, plain_cfg = merge.merge(merge.attach(params, adapters), LCFG, lora_scale=scale)
  assert plain_cfg.lora_rank == 0
  assert not merge.split(merged)[1]
  inputs = _inputs(3)
  scaled = jax.tree_util.tree_map_with_path(
    lambda p, v: v * scale if p[-1].key == "lora_b" else v, adapters
  )
  want = _ours(LCFG, merge.attach(params, scaled), inputs)
  assert ref.rel_err(_ours(plain_cfg, merged, inputs), want) <= 1e-5
  assert ref.rel_err(_ours(plain_cfg, params, inputs), want) > 0.1


def test_merge_into_a_bf16_base_is_not_rounded_back(base):
  """A bf16 base (the shipped model's storage) merges into float32 kernels: an update far
  below bf16's resolution survives."""
  import ml_dtypes

  _, params = base
  bf = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16), params)
  tiny = jax.tree.map(lambda a: a * 1e-3, _random_adapters(LCFG, 2))
  merged, _ = merge.merge(merge.attach(bf, tiny), LCFG)
  kernel = merged["blocks"]["self_attn"]["qkv"]["kernel"]
  assert kernel.dtype == np.float32
  a, b = tiny["blocks"]["self_attn"]["qkv"]["lora_a"], tiny["blocks"]["self_attn"]["qkv"]["lora_b"]
  want = bf["blocks"]["self_attn"]["qkv"]["kernel"].astype(
    np.float32
  ) + LCFG.lora_scale * np.einsum("ligr,lgro->ligo", a, b)
  np.testing.assert_allclose(kernel, want, rtol=1e-6, atol=1e-9)


# -------------------------------------------------------------------- bad files


def _good_file(tmp_path):
  return dict(_good_state_dict())


@functools.lru_cache(maxsize=None)
def _good_state_dict():
  adapted = merge.attach(_zero_base(), _random_adapters(LCFG, 5))
  return lora_diffusers.to_diffusers(adapted, LCFG)


def _zero_base():
  return jax.tree.map(lambda s: np.zeros(s.shape, np.float32), _abstract(CFG))


def _edit(kind):
  """A bad state dict (from a good one) and the error class and fragments it must raise."""

  def edit(sd):
    sd = dict(sd)
    q = "transformer.transformer_blocks.0.attn1.to_q"
    if kind == "unknown key":
      sd["transformer.transformer_blocks.0.attn1.to_zz.lora_A.weight"] = sd[q + ".lora_A.weight"]
      return sd, lora.LoraKeyError, ["attn1.to_zz", "name no adapter"]
    if kind == "not a lora key":
      sd["transformer.proj_out.weight"] = np.zeros((5, 48), np.float32)
      return sd, lora.LoraKeyError, ["proj_out.weight"]
    if kind == "text encoder key":
      sd["text_encoder.layers.0.q_proj.lora_A.weight"] = np.zeros((3, 8), np.float32)
      return sd, lora.LoraKeyError, ["outside the transformer", "text_encoder"]
    if kind == "A without B":
      del sd[q + ".lora_B.weight"]
      return sd, lora.LoraKeyError, ["transformer_blocks.0.attn1.to_q", "not both"]
    if kind == "rank mismatch":
      sd[q + ".lora_B.weight"] = np.zeros((48, 2), np.float32)
      return sd, lora.LoraRankError, ["attn1.to_q", "rank 3", "rank 2"]
    if kind == "conv without 1x1":
      k = "transformer.transformer_blocks.1.ff.conv_point.lora_A.weight"
      sd[k] = sd[k][:, :, 0, 0]
      return sd, lora.LoraShapeError, ["conv_point.lora_A", "(r, in, 1, 1)"]
    if kind == "3-d linear":
      sd[q + ".lora_A.weight"] = sd[q + ".lora_A.weight"][None]
      return sd, lora.LoraShapeError, ["to_q.lora_A", "(1, 3, 48)"]
    if kind == "other hidden size":
      sd[q + ".lora_A.weight"] = np.zeros((3, 64), np.float32)
      return sd, lora.LoraGeometryError, ["another geometry", "attn1.to_q", "in 64", "in 48"]
    if kind == "deeper model":
      for k in list(sd):
        if "transformer_blocks.1." in k:
          sd[k.replace("transformer_blocks.1.", "transformer_blocks.2.")] = sd[k]
      return sd, lora.LoraGeometryError, ["another geometry", "depth 3", "depth 2"]
    if kind == "shallower model":
      sd = {k: v for k, v in sd.items() if "transformer_blocks.1." not in k}
      return sd, lora.LoraGeometryError, ["depth 1", "depth 2"]
    raise AssertionError(kind)

  return edit


BAD = [
  "unknown key",
  "not a lora key",
  "text encoder key",
  "A without B",
  "rank mismatch",
  "conv without 1x1",
  "3-d linear",
  "other hidden size",
  "deeper model",
  "shallower model",
]


@pytest.mark.parametrize("kind", BAD)
def test_bad_state_dict_named_error(tmp_path, kind):
  sd, error, fragments = _edit(kind)(_good_file(tmp_path))
  with pytest.raises(error) as info:
    lora_diffusers.from_diffusers(sd, CFG)
  for f in fragments:
    assert f in str(info.value), (f, str(info.value))


def test_bad_files_named_error(tmp_path):
  text = tmp_path / "notes.safetensors"
  text.write_text("a LoRA, honestly\n" * 10)
  with pytest.raises(lora.LoraFormatError, match="not a safetensors file"):
    lora_diffusers.load(text, CFG)
  with pytest.raises(FileNotFoundError, match="no such LoRA file"):
    lora_diffusers.load(tmp_path / "absent.safetensors", CFG)
  # A readable file, rank metadata contradicting the tensors, names both.
  from safetensors.numpy import save_file

  sd = _good_file(tmp_path)
  meta = {"transformer.r": 8, "transformer.lora_alpha": 8}
  save_file(
    sd, str(tmp_path / "m.safetensors"), metadata={"lora_adapter_metadata": json.dumps(meta)}
  )
  with pytest.raises(lora.LoraRankError, match="metadata gives rank 8"):
    lora_diffusers.load(tmp_path / "m.safetensors", CFG)
  meta = {"transformer.r": 3, "transformer.use_dora": True}
  save_file(
    sd, str(tmp_path / "d.safetensors"), metadata={"lora_adapter_metadata": json.dumps(meta)}
  )
  with pytest.raises(lora.LoraFormatError, match="use_dora"):
    lora_diffusers.load(tmp_path / "d.safetensors", CFG)


def test_export_refuses_adapters_that_do_not_fit_the_config():
  adapted = merge.attach(_zero_base(), _random_adapters(LCFG, 6))
  with pytest.raises(lora.LoraGeometryError, match="lora_a: shape"):
    lora_diffusers.to_diffusers(adapted, LCFG.replace(lora_rank=4))
  with pytest.raises(lora.LoraGeometryError, match="lora_rank 0"):
    lora_diffusers.to_diffusers(adapted, CFG)


# ------------------------------------------- your own images: captions in a .jsonl


@pytest.fixture(scope="module")
def pixel_model():
  """The embedded ShapesEval model (pixel space, 32 px): nothing to build."""
  from sana_jax.shapes_eval import model as shapes_model

  return shapes_model.DEFAULT_MODEL


def _image_folder(folder):
  from PIL import Image

  rng = np.random.default_rng(0)
  for i, (h, w) in enumerate([(40, 40), (30, 70), (33, 33), (50, 50)]):
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
  (folder / "im3.txt").write_text("a sidecar caption the jsonl overrides")
  return folder


@pytest.mark.filterwarnings("ignore::sana_jax.models.prompts.PromptWarning")
def test_preprocess_folder_with_jsonl_captions(pixel_model, tmp_path, capsys):
  """--captions FILE.jsonl replaces the sidecar .txt files: the images it lists (and only
  those) are encoded with its captions, one record per image, in their aspect buckets."""
  from sana_jax.data import latents_tfds, preprocess

  (tmp_path / "imgs").mkdir()
  images = _image_folder(tmp_path / "imgs")
  rows = {"im0.png": "a red star", "im1.png": "a blue circle left of a star", "im3.png": "a star"}
  jsonl = tmp_path / "metadata.jsonl"
  jsonl.write_text(
    "\n".join(json.dumps({"file_name": k, "text": v}) for k, v in rows.items()) + "\n\n"
  )
  out = tmp_path / "data"
  argv = ["--model", pixel_model, "--out", out, "--source", "folder", "--images", images]
  argv += ["--captions", jsonl, "--buckets", "32x32,32x64", "--name", "j", "--no_progress"]
  argv += ["--batch_size", "2"]
  assert preprocess.main([str(a) for a in argv]) == 0, capsys.readouterr().err
  assert "wrote dataset of 3 examples" in capsys.readouterr().out
  recs = {
    split: sorted(src[i]["text"].decode() for i in range(len(src)))
    for split, src in latents_tfds.open_dataset(latents_tfds.version_dir(out, "j")).items()
  }
  assert recs == {"train_32x32": ["a red star", "a star"], "train_32x64": [rows["im1.png"]]}


@pytest.mark.contract
@pytest.mark.parametrize(
  "case", ["not json", "no text", "absent file", "outside", "twice", "empty", "with shapes"]
)
def test_preprocess_bad_jsonl_refused(pixel_model, tmp_path, capsys, case):
  from sana_jax.data import preprocess
  from tests import cli_contract

  images = tmp_path / "imgs"
  images.mkdir()
  _image_folder(images)
  good = json.dumps({"file_name": "im0.png", "text": "a star"})
  lines, fragments = {
    "not json": ([good, "{oops"], ["line 2", "not JSON"]),
    "no text": ([json.dumps({"file_name": "im0.png"})], ["line 1", '"text"']),
    "absent file": ([json.dumps({"file_name": "im9.png", "text": "x"})], ["line 1", "im9.png"]),
    "outside": ([json.dumps({"file_name": "../x.png", "text": "x"})], ["outside --images"]),
    "twice": ([good, good], ["line 2", "listed twice"]),
    "empty": ([], ["no captions"]),
    "with shapes": ([good], ["--captions", "--source folder"]),
  }[case]
  jsonl = tmp_path / "c.jsonl"
  jsonl.write_text("\n".join(lines))
  out = tmp_path / "out"
  source = ["--source", "folder", "--images", str(images)] if case != "with shapes" else []
  argv = ["--model", pixel_model, "--out", out, *source, "--captions", jsonl]
  before = cli_contract.snapshot(tmp_path)
  result = cli_contract.call_main(preprocess.main, argv, capsys)
  cli_contract.assert_refused(result, "--captions", *fragments)
  cli_contract.assert_unchanged(before)


# ------------------------------------------------------------ sample --lora FILE


@pytest.fixture(scope="module")
def shapes_lora(tmp_path_factory):
  """A random LoRA (default targets, rank 2) exported for the embedded model's geometry."""
  from sana_jax.shapes_eval import model as shapes_model

  tmp_path, name = tmp_path_factory.mktemp("shapes_lora"), "shapes_lora.safetensors"

  meta = json.loads((shapes_model.DEFAULT_MODEL / "transformer" / "config.json").read_text())
  cfg = DiTConfig.coerce(meta["model"]).replace(lora_rank=2, lora_alpha=4.0)
  base = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), _abstract(cfg))
  adapted = merge.attach(merge.split(base)[0], _random_adapters(cfg, 8))
  return lora_diffusers.save(tmp_path / name, adapted, cfg)


def test_sample_merges_the_lora_at_its_scale(tmp_path, monkeypatch, shapes_lora):
  """sample --lora F --lora_scale 0.5 samples the model whose kernels are W + 0.5 B_d A_d
  (the file's own tensors, diffusers' convention): checked on the bundle the pipeline gets."""
  from sana_jax import pipeline, shapes_model
  from sana_jax.commands import sample
  from sana_jax.weights import dit as dw

  path = shapes_lora
  seen = {}

  class Stop(Exception):
    pass

  def capture(self, bundle, **kw):
    seen["bundle"] = bundle
    raise Stop

  monkeypatch.setattr(pipeline.SanaPipeline, "__init__", capture)
  argv = ["--prompt", "a red circle", "--out", tmp_path / "o", "--no_progress", "--lora", path]
  with pytest.raises(Stop):
    sample.main([str(a) for a in argv + ["--lora_scale", "0.5"]])
  got = seen["bundle"]
  assert got.dit_config.lora_rank == 0 and not merge.split(got.dit_params)[1]
  base, _, _ = dw.load_flax(shapes_model.DEFAULT_MODEL / "transformer")
  sd, _ = lora_diffusers.read_file(path)
  for i in range(got.dit_config.depth):
    for j, m in enumerate(["to_q", "to_k", "to_v"]):
      k = f"transformer.transformer_blocks.{i}.attn1.{m}.lora_"
      want = (
        base["blocks"]["self_attn"]["qkv"]["kernel"][i, :, j]
        + 0.5 * (sd[k + "B.weight"] @ sd[k + "A.weight"]).T
      )
      np.testing.assert_allclose(
        got.dit_params["blocks"]["self_attn"]["qkv"]["kernel"][i, :, j], want, atol=1e-6
      )
  np.testing.assert_array_equal(  # untargeted kernels untouched
    got.dit_params["blocks"]["mlp"]["point"]["kernel"], base["blocks"]["mlp"]["point"]["kernel"]
  )


SAMPLE_BAD = {
  "missing file": (["--lora", "ABSENT"], ["--lora", "no such file"]),
  "a folder": (["--lora", "DIR"], ["--lora", "a folder"]),
  "not safetensors": (["--lora", "TEXT"], ["--lora", "not a safetensors file"]),
  "another geometry": (["--lora", "TINY"], ["--lora", "another geometry"]),
  "scale nan": (["--lora", "GOOD", "--lora_scale", "nan"], ["--lora_scale", "nan", "finite"]),
  "scale inf": (["--lora", "GOOD", "--lora_scale", "inf"], ["--lora_scale", "inf"]),
  "scale not a number": (["--lora", "GOOD", "--lora_scale", "x"], ["--lora_scale", "'x'"]),
  "scale without lora": (["--lora_scale", "0.5"], ["--lora_scale", "needs --lora"]),
}


@pytest.mark.contract
@pytest.mark.parametrize("case", list(SAMPLE_BAD))
def test_sample_bad_lora_refused(tmp_path, capsys, case, shapes_lora):
  from sana_jax.commands import sample
  from tests import cli_contract

  files = {"ABSENT": tmp_path / "absent.safetensors", "DIR": tmp_path / "adir"}
  files["DIR"].mkdir()
  files["TEXT"] = tmp_path / "notes.safetensors"
  files["TEXT"].write_text("not a tensor file at all\n" * 4)
  if case == "another geometry":
    adapted = merge.attach(_zero_base(), _random_adapters(LCFG, 0))
    files["TINY"] = lora_diffusers.save(tmp_path / "tiny.safetensors", adapted, LCFG)
  files["GOOD"] = shapes_lora
  extra, fragments = SAMPLE_BAD[case]
  extra = [str(files.get(a, a)) for a in extra]
  out = tmp_path / "out"
  before = cli_contract.snapshot(tmp_path)
  argv = ["--prompt", "a red circle", "--out", out, "--no_progress", *extra]
  result = cli_contract.call_main(sample.main, argv, capsys)
  cli_contract.assert_refused(result, *fragments)
  cli_contract.assert_unchanged(before)


# ------------------------------------------------ python -m sana_jax.lora export / merge


def _native_file(path, adapters, cfg):
  """An adapter file in train.py's format (train/checkpoint.save_adapters' docstring)."""
  from sana_jax.weights import io

  meta = {
    "format": "sana_jax.lora_adapter",
    "step": "7",
    "weights": "params",
    "rank": str(cfg.lora_rank),
    "alpha": repr(float(cfg.lora_alpha)),
    "scale": repr(float(cfg.lora_scale)),
    "targets": json.dumps(list(cfg.lora_targets)),
    "model": json.dumps(cfg.to_dict()),
  }
  io.write_safetensors(dit_weights.flatten(adapters), path, metadata=meta)
  return path


def test_cli_exports_and_merges_a_trained_adapter(base, tmp_path, capsys):
  """train.py's adapter file -> the diffusers file of the same adapters; merge -> a DiT
  folder whose kernels are the merged ones (and sample/load_flax read it)."""
  from sana_jax.lora import __main__ as cli

  _, params = base
  dit_weights.save_flax(tmp_path / "dit", params, CFG)
  adapters = _random_adapters(LCFG, 9)
  native = _native_file(tmp_path / "adapter.safetensors", adapters, LCFG)
  tree, cfg = lora_diffusers.load(native, CFG)
  assert cfg.lora_rank == 3 and cfg.lora_alpha == 5.0 and cfg.lora_targets == LORA_TARGETS
  argv = ["export", "--model", tmp_path / "dit", "--lora", native, "--out", tmp_path / "d.st"]
  assert cli.main([str(a) for a in argv]) == 0, capsys.readouterr().err
  got, _ = lora_diffusers.read_file(tmp_path / "d.st")
  want = lora_diffusers.to_diffusers(merge.attach(params, adapters), LCFG)
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
  argv = ["merge", "--model", tmp_path / "dit", "--lora", native, "--out", tmp_path / "m"]
  assert cli.main([str(a) for a in argv + ["--lora_scale", "0.5"]]) == 0
  merged, mcfg, _ = dit_weights.load_flax(tmp_path / "m")
  want, _ = merge.merge(merge.attach(params, adapters), LCFG, 0.5)
  assert mcfg == CFG
  for k, v in dit_weights.flatten(want).items():
    np.testing.assert_allclose(dit_weights.flatten(merged)[k], v, rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def cli_inputs(base, tmp_path_factory):
  """(a DiT folder of the tiny model, a train.py adapter file for it)."""
  tmp = tmp_path_factory.mktemp("cli")
  dit_weights.save_flax(tmp / "dit", base[1], CFG)
  return tmp / "dit", _native_file(tmp / "adapter.safetensors", _random_adapters(LCFG, 9), LCFG)


CLI_BAD = {
  "lora missing": (["--lora", "ABSENT"], ["--lora", "no such file"]),
  "out exists": (["--out", "EXISTS"], ["--out", "--overwrite"]),
  "scale nan": (["--lora_scale", "nan"], ["--lora_scale", "finite"]),
  "scale on export": (["--lora_scale", "2"], ["--lora_scale", "merge only"]),
  "model not a model": (["--model", "EXISTS"], ["--model", "not a model folder"]),
  "other geometry": (["--lora", "SHAPES"], ["--lora", "another geometry"]),
  "unknown command": (["--command_is_positional"], ["unrecognized"]),
}


@pytest.mark.contract
@pytest.mark.parametrize("case", list(CLI_BAD))
def test_cli_bad_input_refused(cli_inputs, tmp_path, capsys, case, shapes_lora):
  from sana_jax.lora import __main__ as cli
  from tests import cli_contract

  dit, native = cli_inputs
  (tmp_path / "exists").mkdir()
  names = {"ABSENT": tmp_path / "nope.st", "EXISTS": tmp_path / "exists", "SHAPES": shapes_lora}
  opts = {"--model": dit, "--lora": native, "--out": tmp_path / "o.st"}
  extra, fragments = CLI_BAD[case]
  for flag, value in zip(extra[::2], extra[1::2]):
    opts[flag] = names.get(value, value)
  argv = ["export", *[str(x) for kv in opts.items() for x in kv]]
  if case == "unknown command":
    argv.append(extra[0])
  before = cli_contract.snapshot(tmp_path)
  result = cli_contract.call_main(cli.main, argv, capsys)
  cli_contract.assert_refused(result, *fragments)
  cli_contract.assert_unchanged(before)
