"""sample.py end to end on a tiny model folder built here; bad input fails clearly and
writes nothing.

The folder is a random pixel-space model (no autoencoder, so images are 32 x 32 and the
size multiple is the DiT patch, 4): tiny DiT (sana_jax.weights.dit.save_flax), tiny
Gemma-2 (sana_jax.weights.gemma.save_params), a word-level tokenizer and pipeline.json
(sana_jax.bundle.write_settings).
"""

import json
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import sample
from sana_jax import bundle as bundle_lib
from sana_jax.data.tokenizer import build_word_level_tokenizer
from sana_jax.models.dit_config import DiTConfig
from sana_jax.pipeline import SamplingOptions, SanaPipeline

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def write_pixel_model(folder, seed=0):
  """A tiny random pixel-space model folder: DiT patch 4 on 3 channels (hidden 40, cross
  2 x 12), tiny Gemma-2 (hidden 28) over a word-level tokenizer, 10 caption tokens, a
  stored null caption (official settings), image size 32, 3 DPM-Solver steps."""
  from sana_jax.models import dit
  from sana_jax.models import text_encoder as te
  from sana_jax.weights import dit as dit_weights
  from sana_jax.weights import gemma

  words = "a an red green blue yellow circle square triangle star left right of above below".split()
  build_word_level_tokenizer(words, str(folder / "tokenizer"))
  tcfg = te.gemma2_tiny(
    len(words) + 4, hidden_size=28, num_layers=2, head_dim=8, query_pre_attn_scalar=8
  )
  gemma.save_params(jax.device_get(te.init_params(tcfg, seed)), tcfg, str(folder / "text_encoder"))
  cfg = DiTConfig(
    in_channels=3,
    out_channels=3,
    patch_size=4,
    hidden_size=40,
    depth=2,
    self_head_dim=8,
    cross_heads=2,
    cross_head_dim=12,
    caption_channels=28,
    caption_len=10,
    mlp_ratio=2.0,
    sample_size=8,
  )
  params = jax.device_get(dit.init_params(cfg, jax.random.key(seed + 1)))
  # Perturb every tensor (the output layer is zero-initialised) so images depend on inputs.
  rng = np.random.default_rng(seed + 3)
  params = jax.tree_util.tree_map(
    lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype), params
  )
  null = np.random.default_rng(seed + 2).standard_normal((10, 28)).astype(np.float32)
  dit_weights.save_flax(folder / "transformer", params, cfg, {"null_caption_embedding": null})
  bundle_lib.write_settings(
    folder,
    image_size=32,
    flow_shift=3.0,
    sampler={"name": "dpm_solver", "steps": 3, "guidance_scale": 4.5},
    prompt={"max_length": 10, "chi": None, "lowercase": True},
    autoencoder={"kind": "pixels", "channels": 3},
  )
  return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  return write_pixel_model(tmp_path_factory.mktemp("model"))


def test_sample_writes_pngs_grid_and_record(model, tmp_path, capsys):
  out = tmp_path / "out"
  prompts_file = tmp_path / "prompts.txt"
  prompts_file.write_text("a blue square above a star\n\n")
  rc = sample.main(
    [
      "--model",
      str(model),
      "--prompt",
      "a red circle",
      "--prompts_file",
      str(prompts_file),
      "--num_images",
      "2",
      "--seed",
      "5",
      "--steps",
      "2",
      "--out",
      str(out),
      "--no_progress",
    ]
  )
  assert rc == 0
  names = ["p000_00_seed5.png", "p000_01_seed6.png", "p001_00_seed7.png", "p001_01_seed8.png"]
  assert sorted(p.name for p in out.iterdir()) == sorted(names + ["grid.png", "samples.json"])
  records = json.loads((out / "samples.json").read_text())
  assert [r["file"] for r in records] == names
  assert [r["prompt"] for r in records] == ["a red circle"] * 2 + ["a blue square above a star"] * 2
  assert [r["seed"] for r in records] == [5, 6, 7, 8]
  assert all(
    r["steps"] == 2 and r["solver"] == "dpm_solver" and r["guidance_scale"] == 4.5 for r in records
  )
  written = np.stack([np.asarray(Image.open(out / n)) for n in names])
  assert written.shape == (4, 32, 32, 3)
  # The files hold exactly what the library generates for those prompts and seeds.
  pipe = SanaPipeline.from_folder(model)
  ref = pipe.generate([r["prompt"] for r in records], [5, 6, 7, 8], SamplingOptions(steps=2))
  np.testing.assert_array_equal(written, ref)
  assert len({im.tobytes() for im in written}) == 4
  grid = Image.open(out / "grid.png")
  assert grid.width == 2 * 128 and grid.height >= 2 * 128  # 2 columns, 4x upscaled tiles
  assert "wrote 4 images (32x32, 2 dpm_solver steps, CFG 4.5)" in capsys.readouterr().out


def _pngs(out, records):
  return np.stack([np.asarray(Image.open(out / r["file"])) for r in records])


def test_batch_size_does_not_change_the_images(model, tmp_path, monkeypatch):
  """--batch_size 2 and 3 (uneven last batch) denoise in batches of that size and give
  each seed the image it gets in one batch of all 4."""
  prompts = ["--prompt", "a red circle", "--prompt", "a blue square above a star"]
  runs, batches = {}, []
  make = SanaPipeline._sampler

  def counting_sampler(self, r):
    run = make(self, r)

    def counted(params, x, *rest):
      batches[-1].append(x.shape[0])
      return run(params, x, *rest)

    return counted

  monkeypatch.setattr(SanaPipeline, "_sampler", counting_sampler)
  for bs in (None, 2, 3):
    batches.append([])
    out = tmp_path / f"bs{bs}"
    argv = prompts + [
      "--model",
      str(model),
      "--num_images",
      "2",
      "--seed",
      "3",
      "--steps",
      "2",
      "--out",
      str(out),
      "--no_progress",
    ]
    assert sample.main(argv + ([] if bs is None else ["--batch_size", str(bs)])) == 0
    records = json.loads((out / "samples.json").read_text())
    runs[bs] = (records, _pngs(out, records))
  assert batches == [[4], [2, 2], [3, 1]]
  one_records, one = runs[None]
  assert [r["seed"] for r in one_records] == [3, 4, 5, 6]
  for bs in (2, 3):
    records, images = runs[bs]
    assert records == one_records
    # Same seed, same image; a batch-dependent reduction order may move a pixel by 1.
    diff = np.abs(images.astype(int) - one.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01, (bs, diff.max(), diff.mean())
  assert len({im.tobytes() for im in one}) == 4


def test_sampler_euler_is_used(model, tmp_path, capsys):
  """--sampler euler: recorded, and the files are the library's Euler images."""
  out = tmp_path / "out"
  assert (
    sample.main(
      [
        "--model",
        str(model),
        "--prompt",
        "a red circle",
        "--num_images",
        "2",
        "--steps",
        "3",
        "--sampler",
        "euler",
        "--out",
        str(out),
        "--no_progress",
      ]
    )
    == 0
  )
  assert "3 euler steps" in capsys.readouterr().out
  records = json.loads((out / "samples.json").read_text())
  assert all(r["solver"] == "euler" for r in records)
  written = _pngs(out, records)
  pipe = SanaPipeline.from_folder(model)
  euler = pipe.generate(["a red circle"] * 2, [0, 1], SamplingOptions(steps=3, sampler="euler"))
  # (Euler != DPM-Solver on the same model: tests/test_pipeline.py, against diffusers.)
  np.testing.assert_array_equal(written, euler)


def _incomplete(model, tmp_path):
  bad = tmp_path / "incomplete"
  shutil.copytree(model, bad)
  (bad / "text_encoder" / "params.safetensors").unlink()
  return bad


def _no_settings(model, tmp_path):
  bad = tmp_path / "no_settings"
  shutil.copytree(model, bad)
  (bad / bundle_lib.PIPELINE_FILE).unlink()
  return bad


BAD = [
  (["--height", "30"], "--height 30: must be a multiple of 4"),
  (["--width", "34", "--height", "32"], "--width 34: must be a multiple of 4"),
  (["--steps", "0"], "--steps 0: must be >= 1"),
  (["--guidance", "-1"], "--guidance -1: must be >= 0"),
  (["--num_images", "0"], "--num_images 0: must be >= 1"),
  (["--prompts_file", "EMPTY"], "has no prompts"),
  (["--prompt", "   "], "empty prompt"),
  (["--model", "MISSING"], "does not exist"),
  (["--model", "INCOMPLETE"], r"incomplete; missing: \['text_encoder/params.safetensors'\]"),
  (["--model", "NO_SETTINGS"], "not a sana_jax model folder"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[m[:24] for _, m in BAD])
def test_bad_input_clear_error_nothing_written(model, tmp_path, capsys, extra, message):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n  \n")
  subst = {
    "EMPTY": str(empty),
    "MISSING": str(tmp_path / "nope"),
    "INCOMPLETE": str(_incomplete(model, tmp_path)) if "INCOMPLETE" in extra else "",
    "NO_SETTINGS": str(_no_settings(model, tmp_path)) if "NO_SETTINGS" in extra else "",
  }
  extra = [subst.get(a, a) for a in extra]
  args = [
    "--model",
    str(model),
    "--prompt",
    "a red circle",
    "--out",
    str(tmp_path / "out"),
    "--no_progress",
  ]
  if "--prompt" in extra or "--prompts_file" in extra:
    args = args[:2] + args[4:]
  assert sample.main(args + extra) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and re.search(message, err), err
  assert not (tmp_path / "out").exists()


def test_cli_exit_code_2_and_message(tmp_path):
  """As a command: exit status 2, 'error: ...' on stderr, no output folder."""
  out = tmp_path / "out"
  for extra, message in (
    (["--model", str(tmp_path / "nope")], "does not exist"),
    (["--prompts_file", str(tmp_path / "none.txt")], "no such file"),
  ):
    proc = subprocess.run(
      [sys.executable, str(REPO / "sample.py"), "--prompt", "a circle", "--out", str(out), *extra],
      capture_output=True,
      text=True,
      cwd=REPO,
      timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr
    assert not out.exists()
