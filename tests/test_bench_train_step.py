"""benchmarks/bench_train_step.py in its seconds-long mode, so the benchmark cannot rot: our
step and diffusers' + torch's step on the same tiny geometry and weights, compiled, run and
tabulated (one timed run, no breakdown)."""

import math

import pytest

from benchmarks import bench_train_step as bench


def test_tiny_geometry_runs_both_sides(capsys):
  rows = bench.main(
    [
      "--geometries",
      "tiny",
      "--optimizers",
      "adamw",
      "--runs",
      "1",
      "--no-breakdown",
    ]
  )
  out = capsys.readouterr().out
  assert [(r["optimizer"], r["variant"]) for r in rows] == [("adamw", "project")]
  for r in rows:
    assert r["params"] > 0 and r["ours_ms"] > 0 and r["theirs_ms"] > 0
    assert math.isfinite(r["compile_s"])
  # Both sides train the same function: same parameter count, same prediction.
  assert rows[0]["pred_rel_err"] < 1e-5
  assert "| tiny | adamw vs AdamW | project |" in out


@pytest.mark.parametrize(
  "argv",
  [
    ["--geometries", "nope"],
    ["--optimizers", "sgd"],
    ["--variants", "x"],
    ["--runs", "0"],
    ["--lead", "-1"],
  ],
)
def test_bad_arguments_are_refused(argv):
  with pytest.raises(SystemExit) as e:
    bench.parse_args(argv)
  assert e.value.code == 2


def _state_copies(update_fn) -> int:
  """Full-size copies of parameter / optimizer-state leaves in the compiled update (the
  state donated, as the train step does)."""
  import re

  import jax

  from sana_jax.configs import tiny
  from sana_jax.models import dit
  from sana_jax.train import optimizer as optim_lib
  from tests import train_fixtures

  config = tiny.get_config()
  config.train.optimizer = "adamw"
  tx = optim_lib.make_optimizer(config.train)
  params = dit.abstract_params(config.model)
  text = train_fixtures.compiled_update_text(update_fn, tx, config.train, params)
  shapes = {
    "f32[" + ",".join(map(str, x.shape)) + "]"
    for x in jax.tree_util.tree_leaves(params)
    if x.ndim >= 2
  }
  copied = re.findall(r"= (f32\[[\d,]*\])\S* copy\(", text)
  return sum(s in shapes for s in copied)


def test_update_does_not_copy_the_state():
  """The non-finite guard as a `where` over every donated leaf made XLA copy each parameter
  and moment at the start of the step (issue 21); the project's update copies none."""
  from sana_jax.train import update

  assert _state_copies(bench.where_guard_update) > 0  # the form this guards against
  assert _state_copies(update.apply_gradients) == 0
