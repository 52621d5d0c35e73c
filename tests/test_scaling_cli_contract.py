"""The command-line contract (DESIGN.md decision 14) for score_model, prune_cli, best_of_n
and the ShapesEval folder scorer (python -m sana_jax.eval.shapes).

One parametrized case per bad input, run in-process through `main(argv)` (one subprocess
per command proves the real entry point): exit status 2, an `error: ...` line naming the
option and the value, no traceback, nothing under the test folder created, changed or
deleted, and no model loaded (loading is made to fail in these tests, so a command that
works before checking its arguments fails the case). Plus: every option's help states its
default.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
import traceback

import numpy as np
import pytest

from sana_jax.shapes_eval import score as score_model
from sana_jax.shapes_eval import evaluator as shapes_eval
from sana_jax.scaling import best_of_n_cli, prune_cli
from tests.cli_contract import assert_refused, assert_unchanged, run_command, snapshot

RO = "{readonly}"


def _readonly_place(tmp: pathlib.Path) -> str:
  """A folder this process cannot create anything in: a read-only folder, or (as root,
  who ignores permissions) sysfs, where mkdir is refused to everyone."""
  if hasattr(os, "geteuid") and os.geteuid() == 0:
    return "/sys/sana_jax_contract_test"
  ro = tmp / "ro"
  ro.mkdir(exist_ok=True)
  ro.chmod(0o555)
  return str(ro / "out")


def run_main(main, argv) -> subprocess.CompletedProcess:
  """main(argv) in-process, as the interpreter would run it: SystemExit's code (a string
  code is printed to stderr, status 1), an uncaught exception prints its traceback (status
  1). stdout/stderr are captured here."""
  import contextlib
  import io

  out, err = io.StringIO(), io.StringIO()
  t = time.perf_counter()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      rc = main(argv)
    except SystemExit as e:
      if isinstance(e.code, str):
        print(e.code, file=sys.stderr)
        rc = 1
      else:
        rc = 0 if e.code is None else e.code
    except BaseException:  # pylint: disable=broad-except
      traceback.print_exc()
      rc = 1
  result = subprocess.CompletedProcess(argv, rc, out.getvalue(), err.getvalue())
  result.seconds = time.perf_counter() - t
  return result


class ModelLoaded(AssertionError):
  pass


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
  """Loading a model (pipeline folder or DiT checkpoint) fails: the contract's refusals
  come before any of it."""

  def boom(*a, **k):
    raise ModelLoaded("a model was loaded before the arguments were checked")

  import sana_jax.bundle

  monkeypatch.setattr(sana_jax.bundle, "load", boom)
  monkeypatch.setattr(prune_cli, "load_checkpoint", boom)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Shared, read-only inputs: a tiny DiT checkpoint (depth 3), calibration embeddings
  (good, missing 'mask', wrong width), a prompts file, ShapesEval metadata."""
  from sana_jax.models.dit_config import DiTConfig
  from sana_jax.weights import dit as W

  root = tmp_path_factory.mktemp("contract_inputs")
  cfg = DiTConfig(
    in_channels=3,
    out_channels=3,
    patch_size=4,
    hidden_size=40,
    depth=3,
    self_head_dim=8,
    cross_heads=2,
    cross_head_dim=12,
    caption_channels=28,
    caption_len=10,
    mlp_ratio=2.0,
    sample_size=8,
  )
  rng = np.random.default_rng(0)
  flat = {
    k: rng.standard_normal(shape).astype(np.float32)  # no compile: any values will do
    for k, shape in W._expected_flax_shapes(cfg).items()
  }  # pylint: disable=protected-access
  W.save_flax(root / "ckpt", W.unflatten(flat), cfg)
  np.savez(
    root / "cal.npz",
    caption=rng.standard_normal((2, 10, 28)).astype(np.float32),
    mask=np.ones((2, 10), np.int32),
  )
  np.savez(root / "cal_nomask.npz", caption=np.zeros((2, 10, 28), np.float32))
  np.savez(
    root / "cal_wide.npz", caption=np.zeros((2, 10, 5), np.float32), mask=np.ones((2, 10), np.int32)
  )
  np.savez(root / "lat_bad.npz", latents=np.zeros((3, 8, 8, 3), np.float32))
  (root / "p.txt").write_text("a red circle\n")
  (root / "meta.jsonl").write_text(
    json.dumps(
      {
        "prompt": "a red circle",
        "tag": "single_object",
        "include": [{"class": "circle", "count": 1, "color": "red"}],
      }
    )
    + "\n"
  )
  (root / "meta_bad.jsonl").write_text("{not json\n")
  (root / "not_a_model").mkdir()
  # a GenEval-layout folder of one prompt, and one whose image is not an image
  from sana_jax.shapes_eval import task as shapes

  spec = shapes.eval_prompts()[0]
  shapes_eval.save_geneval_folder(
    str(root / "geneval"), 0, spec, [shapes.render(spec, 32, np.random.default_rng(0))]
  )
  shapes_eval.save_geneval_folder(str(root / "geneval_bad"), 0, spec, [np.zeros((4, 4, 3))])
  (root / "geneval_bad" / "00000" / "samples" / "0000.png").write_bytes(b"not a png")
  (root / "empty").mkdir()
  (root / "spec_bad.jsonl").write_text(
    json.dumps({"tag": "single_object", "include": [{"class": "blob", "count": 1}]}) + "\n"
  )
  return root


def _argv(template, files, tmp):
  """Fills {in} (shared inputs), {tmp} (this case's folder), {file} (an existing file),
  {full} (an existing non-empty folder), {readonly} (a place nothing can be written)."""
  return [
    a.replace("{in}", str(files))
    .replace("{tmp}", str(tmp))
    .replace("{file}", str(tmp / "existing.txt"))
    .replace("{full}", str(tmp / "full"))
    .replace(RO, _readonly_place(tmp))
    for a in template
  ]


def _case(main, template, fragments, files, tmp_path, monkeypatch):
  work = tmp_path / "work"
  work.mkdir()
  (work / "existing.txt").write_text("keep me\n")
  (work / "full").mkdir()
  (work / "full" / "old.txt").write_text("an earlier output\n")
  monkeypatch.chdir(work)  # a default output would land here, and be seen
  argv = _argv(template, files, work)
  before = snapshot(work)
  result = run_main(main, argv)
  assert_refused(result, *[f.replace("{readonly}", _readonly_place(work)) for f in fragments])
  assert_unchanged(before)
  if RO in template:
    assert not pathlib.Path(_readonly_place(work)).exists()


# ------------------------------------------------------------------------------ score_model

SCORE_OUT = ["--out", "{tmp}/score"]
SCORE_CASES = [
  (["--per_category", "0"], ["--per_category", "'0'", ">= 1"]),
  (["--per_category", "-2"], ["--per_category", "'-2'"]),
  (["--per_category", "51"], ["--per_category 51", "50 prompts per category"]),
  (["--validation", "--per_category", "91"], ["--per_category 91", "at most 90"]),
  (["--num_prompts", "0"], ["--num_prompts", "'0'"]),
  (["--num_prompts", "301"], ["--num_prompts 301", "300 prompts"]),
  (["--ns", "0"], ["--ns", "'0'", ">= 1"]),
  (["--ns", "1,x"], ["--ns", "'x' is not an integer"]),
  (["--ns", ""], ["--ns", "''"]),
  (["--ns=-4,2"], ["--ns", "'-4,2'"]),
  (["--batch", "0"], ["--batch", "'0'"]),
  (["--steps", "0"], ["--steps", "'0'"]),
  (["--guidance", "nan"], ["--guidance", "'nan'", "finite"]),
  (["--guidance", "-1"], ["--guidance", "'-1'"]),
  (["--model", "{tmp}/nope"], ["--model", "nope", "does not exist"]),
  (["--model", "{in}/not_a_model"], ["--model", "not_a_model", "pipeline.json"]),
  (["--out", "{full}"], ["--out", "full", "--overwrite"]),
  (["--out", "{file}"], ["--out", "existing.txt", "not a folder"]),
  (["--out", "{file}/sub"], ["--out", "existing.txt", "is a file"]),
  (["--out", RO], ["--out", "cannot write"]),
  (["--out", ".", "--overwrite"], ["--out", "the current folder"]),
]


@pytest.mark.contract
@pytest.mark.parametrize(
  "template,fragments", SCORE_CASES, ids=[" ".join(c[0]) for c in SCORE_CASES]
)
def test_score_model_refuses(template, fragments, files, tmp_path, monkeypatch):
  if "--out" not in template:
    template = template + SCORE_OUT
  _case(score_model.main, template, fragments, files, tmp_path, monkeypatch)


# -------------------------------------------------------------------------------- prune_cli

PRUNE_BASE = ["--checkpoint", "{in}/ckpt", "--out", "{tmp}/pruned"]
CAL = ["--captions", "{in}/cal.npz"]
PRUNE_CASES = [
  (["--keep", "0,0,1"], ["--keep", "'0,0,1'", "0 repeated"]),
  (["--keep", "0,9"], ["--keep 0,9", "[9] out of range", "0..2"]),
  (["--keep", "0,x"], ["--keep", "'x' is not an integer"]),
  (["--keep", ""], ["--keep", "''"]),
  (["--keep=-1,2"], ["--keep", "'-1,2'", ">= 0"]),
  (["--depth", "0"], ["--depth", "'0'"]),
  (["--depth", "4", *CAL], ["--depth 4", "1..3"]),
  (["--depth", "2"], ["--captions is needed"]),
  (["--keep", "0", "--chart", "{tmp}/c.png"], ["--captions is needed", "--chart"]),
  (["--depth", "2", "--captions", "{in}/p.txt"], ["--captions", "p.txt", "--text-encoder"]),
  (
    ["--depth", "2", "--captions", "{in}/p.txt", "--text-encoder", "{tmp}/nope"],
    ["--text-encoder", "nope", "no such folder"],
  ),
  (
    ["--depth", "2", "--captions", "{in}/p.txt", "--text-encoder", "{in}/not_a_model"],
    ["--text-encoder", "not_a_model", "config.json"],
  ),
  (["--depth", "2", "--captions", "{tmp}/nope.npz"], ["--captions", "nope.npz", "no such file"]),
  (
    ["--depth", "2", "--captions", "{in}/cal_nomask.npz"],
    ["--captions", "cal_nomask.npz", "missing ['mask']"],
  ),
  (
    ["--depth", "2", "--captions", "{in}/cal_wide.npz"],
    ["--captions", "cal_wide.npz", "(N, L, 28)"],
  ),
  (["--depth", "2", *CAL, "--latents", "{tmp}/nope.npz"], ["--latents", "nope.npz"]),
  (["--depth", "2", *CAL, "--latents", "{in}/lat_bad.npz"], ["--latents", "lat_bad.npz", "N=2"]),
  (["--depth", "2", *CAL, "--timesteps", "2000"], ["--timesteps", "'2000'", "[0, 1000]"]),
  (["--depth", "2", *CAL, "--timesteps", "nan"], ["--timesteps", "'nan'"]),
  (["--depth", "2", *CAL, "--draws", "0"], ["--draws", "'0'"]),
  (["--depth", "2", *CAL, "--batch-size", "0"], ["--batch-size", "'0'"]),
  (["--depth", "2", *CAL, "--latent-size", "0x4"], ["--latent-size", "'0x4'"]),
  (["--depth", "2", *CAL, "--max-length", "0"], ["--max-length", "'0'"]),
  (["--depth", "2", *CAL, "--chart", "{file}"], ["--chart", "existing.txt", "--overwrite"]),
  (["--depth", "2", *CAL, "--chart", "{tmp}/c.jpg"], ["--chart", "c.jpg", ".png"]),
  (["--keep", "1", "--checkpoint", "{tmp}/nope"], ["--checkpoint", "nope", "no such"]),
  (
    ["--keep", "1", "--checkpoint", "{in}/not_a_model"],
    ["--checkpoint", "not_a_model", "config.json"],
  ),
  (["--keep", "1", "--out", "{full}"], ["--out", "full", "--overwrite"]),
  (["--keep", "1", "--out", "{file}"], ["--out", "existing.txt", "not a folder"]),
  (["--keep", "1", "--out", RO], ["--out", "cannot write"]),
]


@pytest.mark.contract
@pytest.mark.parametrize(
  "template,fragments", PRUNE_CASES, ids=[" ".join(c[0]) for c in PRUNE_CASES]
)
def test_prune_cli_refuses(template, fragments, files, tmp_path, monkeypatch):
  base = list(PRUNE_BASE)
  for flag in ("--checkpoint", "--out"):
    if flag in template:
      i = base.index(flag)
      del base[i : i + 2]
  _case(prune_cli.main, base + template, fragments, files, tmp_path, monkeypatch)


# -------------------------------------------------------------------------------- best_of_n

BON_BASE = [
  "--prompt",
  "a red circle",
  "--judge",
  "shapes",
  "--shapes_metadata",
  "{in}/meta.jsonl",
  "--out_dir",
  "{tmp}/bon",
]
BON_CASES = [
  (["--n", "0"], ["--n", "'0'", ">= 1"]),
  (["--n", "x"], ["--n", "'x'"]),
  (["--n", "2", "--k", "3"], ["--k 3", "1 <= k <= n = 2"]),
  (["--n", "2", "--k", "0"], ["--k", "'0'"]),
  (["--n", "4", "--batch_size", "0"], ["--batch_size", "'0'"]),
  (["--n", "4", "--judge_batch", "0"], ["--judge_batch", "'0'"]),
  (["--n", "4", "--judge_timeout", "0"], ["--judge_timeout", "'0'"]),
  (["--n", "4", "--steps", "0"], ["--steps", "'0'"]),
  (["--n", "4", "--guidance", "nan"], ["--guidance", "'nan'"]),
  (["--n", "4", "--seed", "-1"], ["--seed", "'-1'"]),
  (["--n", "4", "--judge", "clip"], ["--judge", "'clip'", "nvila"]),
  (["--n", "4", "--prompt", " "], ["--prompt", "empty"]),
  (
    ["--n", "4", "--shapes_metadata", "{in}/meta_bad.jsonl"],
    ["--shapes_metadata", "meta_bad.jsonl:1"],
  ),
  (["--n", "4", "--model", "{tmp}/nope"], ["--model", "nope", "does not exist"]),
  (["--n", "4", "--model", "{in}/not_a_model"], ["--model", "not_a_model", "pipeline.json"]),
  (
    ["--n", "4", "--generate_fn", "no_such_module_xyz:gen"],
    ["--generate_fn", "no_such_module_xyz"],
  ),
  (
    ["--n", "4", "--generate_fn", "json:gen", "--model", "{in}/not_a_model"],
    ["--model", "--generate_fn"],
  ),
  (["--n", "4", "--generate_fn", "json:dumps", "--steps", "3"], ["--steps", "--generate_fn"]),
  (["--n", "4", "--out_dir", "{full}"], ["--out_dir", "full", "--overwrite"]),
  (["--n", "4", "--out_dir", "{file}"], ["--out_dir", "existing.txt", "not a folder"]),
  (["--n", "4", "--out_dir", RO], ["--out_dir", "cannot write"]),
  (
    ["--n", "4", "--out_dir", "..", "--overwrite"],
    ["--out_dir", "the current folder or one above"],
  ),
]


@pytest.mark.contract
@pytest.mark.parametrize("template,fragments", BON_CASES, ids=[" ".join(c[0]) for c in BON_CASES])
def test_best_of_n_refuses(template, fragments, files, tmp_path, monkeypatch):
  base = list(BON_BASE)
  for flag in ("--out_dir", "--judge"):
    if flag in template:
      i = base.index(flag)
      del base[i : i + 2]
  if "--judge" in template:  # no shapes metadata for another judge
    i = base.index("--shapes_metadata")
    del base[i : i + 2]
  if "--prompt" in template:
    del base[:2]
  _case(best_of_n_cli.main, base + template, fragments, files, tmp_path, monkeypatch)


# ---------------------------------------------------------------------- eval.shapes (folder)

EVAL_BASE = ["--images", "{in}/geneval"]
EVAL_CASES = [
  (["--images", "{tmp}/nope"], ["--images", "nope", "no such folder"]),
  (["--images", "{in}/empty"], ["--images", "empty", "no prompt folders"]),
  (["--metadata", "{tmp}/nope.jsonl"], ["--metadata", "nope.jsonl", "no such file"]),
  (["--metadata", "{in}/meta_bad.jsonl"], ["--metadata", "meta_bad.jsonl:1"]),
  (["--metadata", "{in}/spec_bad.jsonl"], ["--metadata", "spec_bad.jsonl:1", "'blob'"]),
  (["--images", "{in}/geneval_bad"], ["0000.png", "not a readable image"]),
  (["--out", "{file}"], ["--out", "existing.txt", "--overwrite"]),
  (["--json", "{file}"], ["--json", "existing.txt", "--overwrite"]),
  (["--out", "{full}"], ["--out", "full", "is a folder"]),
  (["--out", RO], ["--out", "cannot write"]),
  (["--out", "{tmp}/r.json", "--json", "{tmp}/r.json"], ["--out", "--json", "same file"]),
]


@pytest.mark.contract
@pytest.mark.parametrize("template,fragments", EVAL_CASES, ids=[" ".join(c[0]) for c in EVAL_CASES])
def test_shapes_eval_refuses(template, fragments, files, tmp_path, monkeypatch):
  base = [] if "--images" in template else list(EVAL_BASE)
  _case(shapes_eval.main, base + template, fragments, files, tmp_path, monkeypatch)


# ------------------------------------------------------- the real entry points (subprocess)

SUBPROCESS_CASES = [
  (
    ["-m", "sana_jax.eval.score_model", "--ns", "1,x", "--out", "{tmp}/score"],
    ["--ns", "'x' is not an integer"],
  ),
  (["-m", "sana_jax.scaling.prune_cli", *PRUNE_BASE, "--keep", "0,0,1"], ["--keep", "0 repeated"]),
  (
    ["-m", "sana_jax.scaling.best_of_n", *BON_BASE, "--n", "2", "--k", "3"],
    ["--k 3", "1 <= k <= n = 2"],
  ),
  (["-m", "sana_jax.eval.shapes", "--images", "{tmp}/nope"], ["--images", "no such folder"]),
]


@pytest.mark.contract
@pytest.mark.parametrize(
  "template,fragments", SUBPROCESS_CASES, ids=[c[0][1] for c in SUBPROCESS_CASES]
)
def test_entry_point_refuses(template, fragments, files, tmp_path):
  (tmp_path / "full").mkdir()
  argv = _argv(template, files, tmp_path)
  before = snapshot(tmp_path)
  result = run_command(argv, cwd=tmp_path)
  assert_refused(result, *fragments)
  assert_unchanged(before)


# ------------------------------------------------------------------------ help and defaults


@pytest.mark.parametrize(
  "module",
  [score_model, prune_cli, best_of_n_cli, shapes_eval],
  ids=["score_model", "prune_cli", "best_of_n", "eval.shapes"],
)
def test_every_option_has_help_with_its_default(module):
  parser = module.build_parser()
  missing = [
    a.option_strings
    for a in parser._actions  # pylint: disable=protected-access
    if a.dest != "help" and "default" not in (a.help or "")
  ]
  assert not missing, f"options without a help text stating the default: {missing}"
