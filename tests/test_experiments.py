"""The four SANA-1.5 claim experiments (sana_jax/experiments): their --quick runs end to end,
the command-line contract, and the pure pieces (crossing point, block sets)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.cli_contract import assert_refused, assert_unchanged, call_main, snapshot
from sana_jax.experiments import came8, growth, inference_scaling, pruning

# Every test here on one xdist worker (the suite runs with --dist loadgroup): quick_outputs
# runs the four commands (~100 s) once per worker that gets one of these tests.
pytestmark = pytest.mark.xdist_group("experiments")

COMMANDS = {
  "growth": growth,
  "pruning": pruning,
  "inference_scaling": inference_scaling,
  "came8": came8,
}
PLOTS = {
  "growth": "claim_growth.png",
  "pruning": "claim_pruning.png",
  "inference_scaling": "claim_inference.png",
  "came8": "claim_came8.png",
}


@pytest.fixture(scope="module")
def quick_outputs(tmp_path_factory):
  """Each command's --quick run, in this process (compiled programs shared), once."""
  import contextlib
  import io

  outs = {}
  for name, mod in COMMANDS.items():
    out = tmp_path_factory.mktemp(name)
    argv = ["--quick", "--out", str(out)]
    if name == "came8":  # the two optimizer paths the trainer does not build itself
      argv += ["--optimizers", "came_8bit,adamw_bf16mu"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
      rc = mod.main(argv)
    outs[name] = (out, rc, buf.getvalue())
  return outs


@pytest.mark.parametrize("name", list(COMMANDS))
def test_quick_run_writes_table_and_plot(name, quick_outputs):
  out, rc, printed = quick_outputs[name]
  assert rc == 0
  assert "|---|" in printed  # the table is printed
  for f in ("results.json", "table.md", PLOTS[name]):
    assert (out / f).is_file(), f
  assert (out / PLOTS[name]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  result = json.loads((out / "results.json").read_text())
  assert result["args"]["quick"] is True
  assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left
  assert list((out / "cache").glob("shapes_*.npz"))  # the training data is cached there


def test_quick_results_are_consistent(quick_outputs):
  """Numbers that follow from the definitions, whatever the (meaningless) quick scores."""
  r = json.loads((quick_outputs["came8"][0] / "results.json").read_text())
  by = {row["optimizer"]: row for row in r["rows"]}
  # 8-bit CAME holds ~2 bytes/param (uint8 first moment + factored second), far below AdamW
  # with a bf16 first moment (2 + 4 = 6 bytes/param, plus counts).
  assert by["came_8bit"]["bytes_per_param"] < 3.0 < 5.5 < by["adamw_bf16mu"]["bytes_per_param"]
  assert by["adamw_bf16mu"]["bytes_per_param"] < 6.5
  r = json.loads((quick_outputs["inference_scaling"][0] / "results.json").read_text())
  assert r["flops"]["small"] < r["flops"]["big"]
  assert len(r["kept"]) == 4
  r = json.loads((quick_outputs["growth"][0] / "results.json").read_text())
  assert r["step_flops"]["small"] < r["step_flops"]["big"]
  for name, curve in r["curves"].items():
    flops = [p["flops"] for p in curve]
    assert flops == sorted(flops), name
  grown = r["curves"]["grown: partial preservation"]
  # The small model's steps are counted at its own FLOPs, then the big model's.
  assert grown[1]["flops"] == pytest.approx(r["step_flops"]["small"])
  assert grown[-1]["flops"] == pytest.approx(r["step_flops"]["small"] + r["step_flops"]["big"])


@pytest.mark.parametrize("name", list(COMMANDS))
def test_existing_results_are_not_overwritten(name, quick_outputs, capsys):
  out = quick_outputs[name][0]
  before = snapshot(out)
  result = call_main(COMMANDS[name].main, ["--quick", "--out", out], capsys)
  assert_refused(result, "--out", "--overwrite")
  assert_unchanged(before)


BAD = [
  ("growth", ["--steps", "0"], "--steps"),
  ("growth", ["--steps", "100", "--small_steps", "100"], "--small_steps"),
  ("growth", ["--eval_every", "7"], "--eval_every"),
  ("growth", ["--per_category", "51"], "--per_category"),
  ("growth", ["--grown_warmup", "-1"], "--grown_warmup"),
  ("pruning", ["--depths", "6"], "--depths"),
  ("pruning", ["--depths", "4,x"], "--depths"),
  ("pruning", ["--finetune", "0"], "--finetune"),
  ("pruning", ["--warmup", "-1"], "--warmup"),
  ("pruning", ["--lr", "0"], "--lr"),
  ("pruning", ["--lr", "nan"], "--lr"),
  ("inference_scaling", ["--ns", "0,2"], "--ns"),
  ("inference_scaling", ["--depth", "6"], "--depth"),
  ("came8", ["--optimizers", "sgd"], "--optimizers"),
  ("came8", ["--batch", "zero"], "--batch"),
]


@pytest.mark.contract
@pytest.mark.parametrize("name,argv,flag", BAD, ids=[f"{n}:{' '.join(a)}" for n, a, _ in BAD])
def test_bad_values_are_refused(name, argv, flag, tmp_path, capsys):
  out = tmp_path / "out"
  before = snapshot(tmp_path)
  result = call_main(COMMANDS[name].main, [*argv, "--out", out], capsys)
  assert_refused(result, flag)
  assert_unchanged(before)


@pytest.mark.contract
def test_out_that_is_a_file_is_refused(tmp_path, capsys):
  f = tmp_path / "file"
  f.write_text("x")
  before = snapshot(tmp_path)
  assert_refused(call_main(came8.main, ["--out", f], capsys), "--out", str(f))
  assert_unchanged(before)


def test_help_states_the_default_size_estimate(capsys):
  for mod in COMMANDS.values():
    with pytest.raises(SystemExit):
      mod.build_parser().parse_args(["--help"])
    assert "minutes on this 2-core CPU" in " ".join(capsys.readouterr().out.split())


def test_first_reach_interpolates_the_first_crossing():
  curve = [(0.0, 0.0), (10.0, 0.2), (20.0, 0.6), (30.0, 0.4), (40.0, 0.9)]
  assert growth.first_reach(curve, 0.4, lower_is_better=False) == pytest.approx(15.0)
  assert growth.first_reach(curve, 0.95, lower_is_better=False) is None
  loss = [(0.0, 1.0), (10.0, 0.5), (20.0, 0.25)]
  assert growth.first_reach(loss, 0.375, lower_is_better=True) == pytest.approx(15.0)
  assert growth.first_reach(loss, 1.0, lower_is_better=True) == 0.0


def test_grown_runs_get_the_scratch_runs_compute_and_never_more():
  assert growth.grown_steps_at_equal_compute(400, 200, 2.0, 1.0) == 300
  assert growth.grown_steps_at_equal_compute(400, 200, 9.5, 4.8) == 298  # rounded down
  for steps, small, fb, fs in [(400, 200, 9.5, 4.8), (7, 3, 3.0, 1.7), (2, 1, 5.0, 2.6)]:
    n = growth.grown_steps_at_equal_compute(steps, small, fb, fs)
    assert small * fs + n * fb <= steps * fb < small * fs + (n + 1) * fb


def test_block_sets():
  bi = np.array([0.3, 0.05, 0.2, 0.01, 0.1, 0.4])
  sets = pruning.block_sets(bi, 3)
  assert sets["importance"] == [0, 2, 5]
  assert sets["first"] == [0, 1, 2]
  assert sets["random"] == pruning.block_sets(bi, 3)["random"]  # seeded
  assert len(set(sets["random"])) == 3 and sets["random"] == sorted(sets["random"])
