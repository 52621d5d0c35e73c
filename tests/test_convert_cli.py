"""The converters' command-line contract (DESIGN.md decision 14): convert.dit, convert.gemma,
convert.dcae and sana_jax.bundle_from_diffusers.

Every bad input is one `contract` case: exit status 2, an `error: ...` line naming the
value, no traceback, nothing created, changed or deleted, and (unless the case is found by
reading the source) no model loaded: the loaders are replaced by ones that fail the test.
One case per command runs the real entry point in a subprocess; the rest call main(argv).
Then: --overwrite replaces an output only once the new one is complete, and every option
has a help text stating its default.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest

from convert import dcae as dcae_cli
from convert import dit as dit_cli
from convert import gemma as gemma_cli
from sana_jax import bundle_from_diffusers as bfd
from sana_jax.models.dit_config import DiTConfig
from sana_jax.weights import dcae as dcae_w
from sana_jax.weights import dit as W
from sana_jax.weights import gemma as gemma_w
from sana_jax.weights import io
from tests.test_autoencoder import CFG_B
from tests.cli_contract import assert_refused, assert_unchanged, run_command, snapshot

CFG = DiTConfig(
  in_channels=5,
  out_channels=5,
  hidden_size=48,
  depth=2,
  self_head_dim=8,
  cross_heads=4,
  cross_head_dim=10,
  caption_channels=20,
  caption_len=7,
  sample_size=9,
)
GEMMA = {
  "model_type": "gemma2",
  "vocab_size": 31,
  "hidden_size": 16,
  "intermediate_size": 24,
  "num_hidden_layers": 2,
  "num_attention_heads": 2,
  "num_key_value_heads": 1,
  "head_dim": 8,
  "sliding_window": 4,
  "query_pre_attn_scalar": 8,
}
VAE = CFG_B  # the DC-AE branch configuration the autoencoder tests use


def _write(path: pathlib.Path, text: str | bytes) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
  return path


def _dummy_weights(path: pathlib.Path) -> None:
  io.write_safetensors({"w": np.zeros((2, 3), np.float32)}, path)


def _copy_truncated(src: pathlib.Path, dst: pathlib.Path, name: str) -> None:
  shutil.copytree(src, dst)
  data = (dst / name).read_bytes()
  (dst / name).write_bytes(data[: len(data) - 100])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
  """Sources (good and broken) and existing outputs for every command."""
  import diffusers
  import torch
  from tests import dit_reference as ref

  w = tmp_path_factory.mktemp("convert_cli")
  # convert.dit
  params = ref.random_params(CFG, 0)
  null = np.ones((CFG.caption_len, CFG.caption_channels), np.float32)
  W.save_flax(w / "dit_flax", params, CFG, {"null_caption_embedding": null})
  W.save_diffusers(w / "dit_diff", params, CFG)
  W.save_official(w / "dit.pth", params, CFG, {"null_caption_embedding": null})
  sd = W.params_to_official(params, CFG)
  sd["pos_embed"] = np.full((1, 81, CFG.hidden_size), 0.5, np.float32)  # non-zero: PE on
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, w / "pe.pth")
  _write(
    w / "dit_cfg.py",
    "import ml_collections\ndef get_config():\n  return "
    f"ml_collections.ConfigDict({{'model': {CFG.to_dict()!r}}})\n",
  )
  _write(w / "x.json", json.dumps({"model": CFG.to_dict()}))
  _write(w / "broken.py", "def get_config(:\n")
  _write(
    w / "nomodel.py",
    "import ml_collections\ndef get_config():\n  return ml_collections.ConfigDict({'lr': 1.0})\n",
  )
  _write(w / "r.pth", np.random.default_rng(0).bytes(4096))
  _write(w / "model.txt", "not a checkpoint")
  _write(w / "bad_json" / "config.json", '{"_class_name": "SanaTransformer2DModel",')
  _copy_truncated(w / "dit_diff", w / "dit_trunc", "diffusion_pytorch_model.safetensors")
  np.save(w / "null_1d.npy", np.ones(20, np.float32))
  _write(w / "existing_dir" / "keep.txt", "someone's files")
  _write(w / "existing_file", "someone's file")
  # convert.gemma: a transformers-layout folder of the right shapes (no transformers needed)
  cfg = gemma_w.config_from_hf(GEMMA)
  rng = np.random.default_rng(1)
  tensors = {
    f"model.{k}": rng.standard_normal(s).astype(np.float32)
    for k, s in gemma_w.expected_hf_shapes(cfg).items()
  }
  g = w / "gemma"
  _write(g / "config.json", json.dumps(GEMMA))
  io.write_safetensors(tensors, g / "model.safetensors")
  _write(g / "tokenizer.json", "{}")
  shutil.copytree(g, w / "gemma_notok", ignore=shutil.ignore_patterns("tokenizer*"))
  _write(w / "gemma_llama" / "config.json", json.dumps({**GEMMA, "model_type": "llama"}))
  _write(w / "gemma_badjson" / "config.json", "{oops")
  _write(w / "gemma_noweights" / "config.json", json.dumps(GEMMA))
  _copy_truncated(g, w / "gemma_trunc", "model.safetensors")
  # convert.dcae
  torch.manual_seed(0)
  diffusers.AutoencoderDC(**VAE).eval().save_pretrained(w / "vae")
  _write(w / "vae_wrongclass" / "config.json", json.dumps({"_class_name": "UNet2DModel"}))
  _write(w / "vae_badjson" / "config.json", "[1, 2")
  _write(w / "vae_noweights" / "config.json", (w / "vae" / "config.json").read_text())
  # bundle_from_diffusers: a SanaPipeline-shaped folder (dummy weights: refused before use)
  p = w / "pipe"
  _write(p / "transformer" / "config.json", json.dumps(W.to_diffusers_config(CFG)))
  _write(p / "text_encoder" / "config.json", json.dumps(GEMMA))
  _write(p / "vae" / "config.json", (w / "vae" / "config.json").read_text())
  for part, stem in (
    ("transformer", "diffusion_pytorch_model"),
    ("text_encoder", "model"),
    ("vae", "diffusion_pytorch_model"),
  ):
    _dummy_weights(p / part / f"{stem}.safetensors")
  (p / "tokenizer").mkdir()
  _write(
    p / "scheduler" / "scheduler_config.json",
    json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}),
  )
  shutil.copytree(p, w / "pipe_ddim")
  _write(
    w / "pipe_ddim" / "scheduler" / "scheduler_config.json",
    json.dumps({"_class_name": "DDIMScheduler"}),
  )
  shutil.copytree(p, w / "pipe_badsched")
  _write(w / "pipe_badsched" / "scheduler" / "scheduler_config.json", "{")
  shutil.copytree(p, w / "pipe_novae", ignore=shutil.ignore_patterns("vae"))
  _write(w / "bundle_out" / "pipeline.json", '{"format": "sana_jax.pipeline"}')
  return w


@pytest.fixture()
def no_loading(monkeypatch):
  """Any model load fails the test: refusals must come before the work."""

  def fail(*a, **k):
    raise AssertionError("a model was loaded before the bad input was refused")

  for mod, name in (
    (W, "load_official"),
    (W, "load_diffusers"),
    (W, "load_flax"),
    (gemma_w, "load_hf_folder"),
    (dcae_w, "load_autoencoder"),
  ):
    monkeypatch.setattr(mod, name, fail)


MAINS = {"dit": dit_cli.main, "gemma": gemma_cli.main, "dcae": dcae_cli.main, "bundle": bfd.main}
MODULES = {
  "dit": "convert.dit",
  "gemma": "convert.gemma",
  "dcae": "convert.dcae",
  "bundle": "sana_jax.bundle_from_diffusers",
}

# (command, arguments ({w}: the work folder), fragments the error must name, reads source)
CASES = [
  # convert.dit: existing outputs (the data-loss cases)
  (
    "dit",
    "--src {w}/dit_flax --to diffusers --dst {w}/existing_dir",
    ["existing_dir", "exists", "--overwrite"],
    False,
  ),
  ("dit", "--src {w}/dit_flax --to flax --dst {w}/existing_file", ["existing_file"], False),
  (
    "dit",
    "--src {w}/dit_flax --to flax --dst {w}/existing_file --overwrite",
    ["existing_file", "is a file"],
    False,
  ),
  ("dit", "--src {w}/dit_flax --to official --dst {w}/dit.pth", ["dit.pth", "exists"], False),
  ("dit", "--src {w}/dit_flax --to flax --dst {w} --overwrite", ["holds the source"], False),
  (
    "dit",
    "--src {w}/dit_flax --to flax --dst /sys/sana_out",
    ["/sys/sana_out", "cannot write"],
    False,
  ),
  # convert.dit: --config
  (
    "dit",
    "--src {w}/dit.pth --to flax --dst {w}/o --config {w}/x.json",
    ["--config", "x.json", ".py"],
    False,
  ),
  (
    "dit",
    "--src {w}/dit.pth --to flax --dst {w}/o --config {w}/nope.py",
    ["--config", "nope.py", "no such file"],
    False,
  ),
  (
    "dit",
    "--src {w}/dit.pth --to flax --dst {w}/o --config {w}/broken.py",
    ["--config", "broken.py", "SyntaxError"],
    False,
  ),
  (
    "dit",
    "--src {w}/dit.pth --to flax --dst {w}/o --config {w}/nomodel.py",
    ["nomodel.py", "`model`"],
    False,
  ),
  (
    "dit",
    "--src {w}/dit.pth --to flax --dst {w}/o --config {w}/dit_cfg.py --config.depth=x",
    ["--config", "depth"],
    False,
  ),
  ("dit", "--src {w}/dit.pth --to flax --dst {w}/o --config.depth=3", ["--config"], False),
  # convert.dit: sources
  ("dit", "--src {w}/nope.pth --to flax --dst {w}/o", ["--src", "nope.pth"], False),
  ("dit", "--src {w}/model.txt --to flax --dst {w}/o", ["model.txt", ".pth"], False),
  ("dit", "--src {w}/bad_json --to flax --dst {w}/o", ["bad_json/config.json", "malformed"], False),
  ("dit", "--src {w}/dit_trunc --to flax --dst {w}/o", ["dit_trunc", "truncated"], False),
  ("dit", "--src {w}/r.pth --to flax --dst {w}/o", ["r.pth", "refused to unpickle"], True),
  ("dit", "--src {w}/pe.pth --to flax --dst {w}/o --config {w}/dit_cfg.py", ["use_pe"], True),
  (
    "dit",
    "--src {w}/dit_flax --from diffusers --to flax --dst {w}/o",
    ["--from", "diffusers"],
    False,
  ),
  # convert.dit: options
  ("dit", "--src {w}/dit_flax --dst {w}/o", ["--to"], False),
  ("dit", "--src {w}/dit_flax --to onnx --dst {w}/o", ["--to", "onnx"], False),
  ("dit", "--src {w}/dit_flax --to official --dst {w}/out_folder", ["--dst", ".pth"], False),
  ("dit", "--src {w}/dit_flax --to flax --dst {w}/o.pth", ["--dst", "folder"], False),
  ("dit", "--src {w}/dit_flax --to flax --dst {w}/o --ema", ["--ema"], False),
  ("dit", "--src {w}/dit_diff --to official --dst {w}/o.pth", ["--null-embedding"], False),
  (
    "dit",
    "--src {w}/dit_flax --to flax --dst {w}/o --null-embedding {w}/null_1d.npy",
    ["--null-embedding", "--to official"],
    False,
  ),
  (
    "dit",
    "--src {w}/dit_diff --to official --dst {w}/o.pth --null-embedding {w}/no.npy",
    ["--null-embedding", "no.npy"],
    False,
  ),
  (
    "dit",
    "--src {w}/dit_diff --to official --dst {w}/o.pth --null-embedding {w}/null_1d.npy",
    ["null_1d.npy", "shape"],
    False,
  ),
  (
    "dit",
    "--src {w}/dit_diff --to official --dst {w}/o.pth --null-embedding {w}/model.txt",
    ["model.txt", ".npy"],
    False,
  ),
  (
    "dit",
    "--src {w}/dit_flax --to diffusers --dst {w}/o --max-shard-mb 0",
    ["--max-shard-mb", "0"],
    False,
  ),
  # convert.gemma
  ("gemma", "--src {w}/nothing --dst {w}/o", ["--src", "nothing"], False),
  ("gemma", "--src {w}/model.txt --dst {w}/o", ["--src", "not a file"], False),
  (
    "gemma",
    "--src {w}/gemma_badjson --dst {w}/o",
    ["gemma_badjson/config.json", "malformed"],
    False,
  ),
  ("gemma", "--src {w}/gemma_llama --dst {w}/o", ["config.json", "llama"], False),
  ("gemma", "--src {w}/gemma_noweights --dst {w}/o", ["model.safetensors"], False),
  ("gemma", "--src {w}/gemma_trunc --dst {w}/o", ["model.safetensors", "truncated"], False),
  ("gemma", "--src {w}/gemma_notok --dst {w}/o --tokenizer", ["--tokenizer"], False),
  ("gemma", "--src {w}/gemma --dst {w}/existing_dir", ["existing_dir", "exists"], False),
  ("gemma", "--src {w}/gemma --dst {w}/o --dtype float16", ["--dtype", "float16"], False),
  ("gemma", "--src {w}/gemma --dst {w}/gemma --overwrite", ["source"], False),
  # convert.dcae
  (
    "dcae",
    "--src {w}/vae --to-diffusers --parts decoder --dst {w}/o",
    ["--to-diffusers", "--parts"],
    False,
  ),
  ("dcae", "--src {w}/vae", ["--dst"], False),
  ("dcae", "--src {w}/vae --check --dst {w}/o", ["--check"], False),
  ("dcae", "--src {w}/nothing --dst {w}/o", ["--src", "nothing"], False),
  ("dcae", "--src {w}/vae_wrongclass --dst {w}/o", ["_class_name", "UNet2DModel"], False),
  ("dcae", "--src {w}/vae_badjson --dst {w}/o", ["vae_badjson/config.json", "malformed"], False),
  ("dcae", "--src {w}/vae_noweights --dst {w}/o", ["diffusion_pytorch_model"], False),
  ("dcae", "--src {w}/vae --dst {w}/existing_dir", ["existing_dir", "exists"], False),
  ("dcae", "--src {w}/vae --dst {w}/o --parts middle", ["--parts", "middle"], False),
  # sana_jax.bundle_from_diffusers
  (
    "bundle",
    "--src {w}/pipe --out {w}/bundle_out --settings_only",
    ["pipeline.json", "exists"],
    False,
  ),
  ("bundle", "--src {w}/pipe --out {w}/existing_dir", ["existing_dir", "exists"], False),
  ("bundle", "--src {w}/nothing --out {w}/o", ["--src", "nothing"], False),
  ("bundle", "--src {w}/pipe_novae --out {w}/o", ["missing", "vae"], False),
  ("bundle", "--src {w}/pipe_ddim --out {w}/o", ["DDIMScheduler", "not supported"], False),
  ("bundle", "--src {w}/pipe_badsched --out {w}/o", ["scheduler_config.json", "malformed"], False),
  ("bundle", "--src {w}/pipe --out {w}/o --max_length 0", ["--max_length", "0"], False),
  ("bundle", "--src {w}/pipe --out {w}/pipe --overwrite", ["source"], False),
  (
    "bundle",
    "--src {w}/pipe --out {w}/o --text_encoder_dtype int8",
    ["--text_encoder_dtype", "int8"],
    False,
  ),
]

# One case per command through the real entry point.
SUBPROCESS = {cmd: next(i for i, c in enumerate(CASES) if c[0] == cmd) for cmd in MAINS}


def _argv(template: str, w: pathlib.Path) -> list[str]:
  return template.format(w=w).split()


@pytest.mark.contract
@pytest.mark.parametrize(
  "cmd,template,fragments,reads", [pytest.param(*c, id=f"{c[0]}-{i}") for i, c in enumerate(CASES)]
)
def test_bad_input_refused(work, request, capsys, cmd, template, fragments, reads):
  before = snapshot(work)
  if not reads:
    request.getfixturevalue("no_loading")
  status = MAINS[cmd](_argv(template, work))
  err = capsys.readouterr().err
  assert status == 2, f"exit status {status}, want 2:\n{err[-2000:]}"
  assert "Traceback" not in err and "weights_only=False" not in err, err
  lines = [line for line in err.splitlines() if line.startswith("error: ")]
  assert lines, f"no 'error: ...' line: {err[-2000:]}"
  for f in fragments:
    assert f.format(w=work) in lines[0], f"the error does not name {f!r}: {lines[0]}"
  assert_unchanged(before)


@pytest.mark.contract
@pytest.mark.parametrize("cmd", list(SUBPROCESS))
def test_bad_input_refused_by_the_command(work, cmd):
  _, template, fragments, _ = CASES[SUBPROCESS[cmd]]
  assert CASES[SUBPROCESS[cmd]][0] == cmd
  before = snapshot(work)
  result = run_command(["-m", MODULES[cmd], *_argv(template, work)])
  assert_refused(result, *fragments)
  assert_unchanged(before)


# ------------------------------------------------------------------------ --overwrite


def test_overwrite_replaces_only_a_complete_output(work, tmp_path, monkeypatch, capsys):
  dst = tmp_path / "out"
  _write(dst / "old.txt", "old")
  assert (
    dit_cli.main(
      ["--src", str(work / "dit_flax"), "--to", "diffusers", "--dst", str(dst), "--overwrite"]
    )
    == 0
  )
  assert sorted(p.name for p in dst.iterdir()) == [
    "config.json",
    "diffusion_pytorch_model.safetensors",
  ]
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries
  # A failure while writing leaves the existing output as it was.
  before = snapshot(tmp_path)

  def disk_full(*a, **k):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(io, "write_safetensors", disk_full)
  assert (
    dit_cli.main(
      ["--src", str(work / "dit_flax"), "--to", "flax", "--dst", str(dst), "--overwrite"]
    )
    == 2
  )
  assert "No space left" in capsys.readouterr().err
  assert_unchanged(before)


def test_overwrite_other_commands(work, tmp_path):
  for cmd, argv in (
    ("gemma", ["--src", str(work / "gemma"), "--tokenizer"]),
    ("dcae", ["--src", str(work / "vae")]),
  ):
    dst = tmp_path / cmd
    _write(dst / "old.txt", "old")
    assert MAINS[cmd](argv + ["--dst", str(dst)]) == 2  # refused without --overwrite
    assert (dst / "old.txt").exists()
    assert MAINS[cmd](argv + ["--dst", str(dst), "--overwrite"]) == 0
    assert not (dst / "old.txt").exists() and (dst / "config.json").exists()
  assert (tmp_path / "gemma" / "tokenizer" / "tokenizer.json").exists()
  gemma_w.load_params(str(tmp_path / "gemma"))
  dcae_w.load_autoencoder(tmp_path / "dcae")
  out = tmp_path / "bundle"
  _write(out / "pipeline.json", "{}")
  assert (
    bfd.main(["--src", str(work / "pipe"), "--out", str(out), "--settings_only", "--overwrite"])
    == 0
  )
  assert json.loads((out / "pipeline.json").read_text())["flow_shift"] == 3.0
  assert not [p for p in tmp_path.rglob(".*")]


def test_atomic_output_keeps_the_old_output_on_failure(tmp_path):
  target = _write(tmp_path / "f.bin", "old")
  with pytest.raises(RuntimeError):
    with io.atomic_output(target, is_dir=False) as tmp:
      tmp.write_text("half")
      raise RuntimeError("interrupted")
  assert target.read_text() == "old"
  with pytest.raises(FileExistsError):
    with io.atomic_output(target, is_dir=False, overwrite=False):
      pass
  with pytest.raises(RuntimeError):  # parent folders it made are removed again
    with io.atomic_output(tmp_path / "a" / "b" / "c", is_dir=True):
      raise RuntimeError
  assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


# ------------------------------------------------------------------------------ help


@pytest.mark.parametrize(
  "module", [dit_cli, gemma_cli, dcae_cli, bfd], ids=["dit", "gemma", "dcae", "bundle"]
)
def test_every_option_has_help_and_default(module):
  ap = module.build_parser()
  formatter = ap._get_formatter()
  for action in ap._actions:
    if action.dest == "help":
      continue
    text = formatter._get_help_string(action) if action.help else ""
    assert text, f"{action.option_strings} has no help"
    assert "required" in text or "default" in text, f"{action.option_strings}: {text}"
