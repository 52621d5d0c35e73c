"""sample.py holds the command-line contract (DESIGN.md decision 14; tests/cli_contract.py).

Every bad input is refused before the model is loaded, with `error: <what, which value,
what is allowed>` on stderr, exit status 2, no traceback, nothing written or changed (a
previous run's output folder included). A reused --out is refused unless --overwrite, and
with --overwrite the old output is replaced only once the new one is complete. Prompts the
tokenizer cuts or words it does not know are named in one warning each per run.

Most cases call `sample.main(argv)` in-process on the tiny pixel-space model of
tests/test_sample_cli.py; one runs `python sample.py` as a subprocess.
"""

import json
import pathlib
import subprocess

import pytest

import sample
from tests import cli_contract
from tests.cli_contract import assert_refused, assert_unchanged, run_command, snapshot
from tests.test_sample_cli import write_pixel_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  return write_pixel_model(tmp_path_factory.mktemp("model"))


def call_main(argv, capsys) -> subprocess.CompletedProcess:
  """sample.main(argv) in-process (tests.cli_contract.call_main)."""
  return cli_contract.call_main(sample.main, argv, capsys)


def _old_run(tmp_path) -> pathlib.Path:
  """An --out folder holding a previous run's files."""
  out = tmp_path / "out"
  out.mkdir()
  (out / "p000_00_seed0.png").write_bytes(b"old image")
  (out / "samples.json").write_text("[]")
  return out


# (id, extra arguments, fragments the error line must name). OUT is --out (absent unless
# the case makes it), FILE an existing file, OLD a folder with a previous run's images,
# DIR a folder, RO a place no one can write (even root).
BAD = [
  ("height_0", ["--height", "0"], ["--height", "0", ">= 1"]),
  ("width_negative", ["--width", "-32"], ["--width", "-32"]),
  ("height_not_multiple", ["--height", "30"], ["--height", "30", "multiple of 4"]),
  ("batch_size_0", ["--batch_size", "0"], ["--batch_size", "0"]),
  ("steps_0", ["--steps", "0"], ["--steps", "0"]),
  ("guidance_negative", ["--guidance", "-1"], ["--guidance", "-1"]),
  ("num_images_negative", ["--num_images", "-2"], ["--num_images", "-2"]),
  ("seed_negative", ["--seed", "-1"], ["--seed", "-1"]),
  ("upscale_4096", ["--height", "4096", "--width", "4096"], ["4096x4096", "32x32"]),
  ("height_not_int", ["--height", "abc"], ["--height", "abc"]),
  ("sampler_unknown", ["--sampler", "ddim"], ["--sampler", "ddim"]),
  ("out_is_file", ["--out", "FILE"], ["--out", "FILE"]),
  ("out_under_file", ["--out", "FILE/run"], ["--out", "FILE"]),
  ("out_reused", ["--out", "OLD"], ["--out", "OLD", "--overwrite"]),
  ("out_read_only", ["--out", "RO"], ["--out", "RO"]),
  ("prompts_file_is_dir", ["--prompts_file", "DIR"], ["--prompts_file", "DIR"]),
  ("model_is_file", ["--model", "FILE"], ["--model", "FILE"]),
]


@pytest.mark.contract
@pytest.mark.parametrize("extra,fragments", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_refused_before_loading_nothing_touched(
  model, tmp_path, capsys, monkeypatch, extra, fragments
):
  ro = pathlib.Path("/sys/sana_jax_sample_out")
  if "RO" in extra:
    try:
      ro.mkdir()
    except OSError:
      pass
    else:
      ro.rmdir()
      pytest.skip("/sys is writable here")
  (tmp_path / "file.txt").write_text("not a folder")
  (tmp_path / "dir").mkdir()
  old = _old_run(tmp_path) if "OLD" in extra else None
  subst = {
    "FILE": str(tmp_path / "file.txt"),
    "FILE/run": str(tmp_path / "file.txt" / "run"),
    "OLD": str(old),
    "RO": str(ro),
    "DIR": str(tmp_path / "dir"),
  }
  extra = [subst.get(a, a) for a in extra]
  fragments = [subst.get(f, f) for f in fragments]
  argv = ["--prompt", "a red circle", "--no_progress"]
  if "--model" not in extra:
    argv += ["--model", str(model)]
  if "--out" not in extra:
    argv += ["--out", str(tmp_path / "out")]
  before = snapshot(tmp_path)
  # Refused before any model is loaded: loading raises here.
  from sana_jax.pipeline import SanaPipeline

  monkeypatch.setattr(
    SanaPipeline,
    "from_folder",
    classmethod(lambda *a, **k: pytest.fail("model loaded before refusing")),
  )
  assert_refused(call_main(argv + extra, capsys), *fragments)
  assert_unchanged(before)


@pytest.mark.contract
def test_cli_refuses_a_reused_out_as_a_command(model, tmp_path):
  """The real entry point: a previous run's folder is refused (exit 2, named error), fast,
  and left as it was."""
  out = _old_run(tmp_path)
  before = snapshot(tmp_path)
  result = run_command(
    ["sample.py", "--model", str(model), "--prompt", "a red circle", "--out", str(out)]
  )
  assert_refused(result, "--out", str(out), "--overwrite", max_seconds=30)
  assert_unchanged(before)


def test_overwrite_replaces_the_old_run_whole(model, tmp_path, capsys):
  out = _old_run(tmp_path)
  rc = sample.main(
    [
      "--model",
      str(model),
      "--prompt",
      "a red circle",
      "--num_images",
      "2",
      "--steps",
      "1",
      "--out",
      str(out),
      "--overwrite",
      "--no_progress",
    ]
  )
  assert rc == 0
  records = json.loads((out / "samples.json").read_text())
  assert sorted(p.name for p in out.iterdir()) == sorted(
    [r["file"] for r in records] + ["grid.png", "samples.json"]
  )
  assert (out / "p000_00_seed0.png").read_bytes() != b"old image"
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_overwrite_keeps_the_old_run_when_sampling_fails(model, tmp_path, monkeypatch):
  from sana_jax.pipeline import SanaPipeline

  out = _old_run(tmp_path)
  before = snapshot(tmp_path)

  def broken(self, *a, **k):
    raise RuntimeError("sampling failed")

  monkeypatch.setattr(SanaPipeline, "generate", broken)
  with pytest.raises(RuntimeError, match="sampling failed"):
    sample.main(
      [
        "--model",
        str(model),
        "--prompt",
        "a red circle",
        "--steps",
        "1",
        "--out",
        str(out),
        "--overwrite",
        "--no_progress",
      ]
    )
  assert_unchanged(before)


def test_cut_prompt_and_unknown_word_warned_once_each(model, tmp_path, capsys):
  long = "a red circle above a blue square left of a green star"  # 12 words + <bos> > 10
  rc = sample.main(
    [
      "--model",
      str(model),
      "--prompt",
      long,
      "--prompt",
      "a red hexagon",
      "--num_images",
      "2",
      "--steps",
      "1",
      "--out",
      str(tmp_path / "out"),
      "--no_progress",
    ]
  )
  assert rc == 0
  warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning: ")]
  cut = [w for w in warnings if long in w]
  unknown = [w for w in warnings if "'hexagon'" in w]
  assert len(cut) == 1 and "10" in cut[0], warnings  # names the prompt and the limit
  assert "green star" in cut[0], cut  # and the words dropped
  assert len(unknown) == 1 and "a red hexagon" in unknown[0], warnings
  assert len(warnings) == 2, warnings


def test_resized_output_is_announced(model, tmp_path, capsys):
  """A size other than the model's bin is sampled at the bin and resized: said so."""
  rc = sample.main(
    [
      "--model",
      str(model),
      "--prompt",
      "a red circle",
      "--height",
      "64",
      "--width",
      "64",
      "--steps",
      "1",
      "--out",
      str(tmp_path / "out"),
      "--no_progress",
    ]
  )
  assert rc == 0
  note = [l for l in capsys.readouterr().out.splitlines() if l.startswith("note: ")]
  assert len(note) == 1 and "32x32" in note[0] and "64x64" in note[0], note


def test_every_option_has_a_help_text_with_its_default():
  parser = sample.build_parser()
  for action in parser._actions:
    if action.dest == "help":
      continue
    assert action.help and "default" in action.help, (action.option_strings, action.help)


def test_default_out_is_a_new_run_folder_each_time(tmp_path):
  """Without --out, runs go to outputs/run-001, run-002, ...: rerunning the README's first
  command never meets a refusal nor touches an earlier run."""
  from sample import next_run_folder

  root = tmp_path / "outputs"
  assert next_run_folder(root) == root / "run-001"
  (root / "run-001").mkdir(parents=True)
  (root / "run-007").mkdir()
  (root / "run-x").mkdir()
  assert next_run_folder(root) == root / "run-008"
