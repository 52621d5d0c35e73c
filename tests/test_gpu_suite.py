"""benchmarks/gpu_suite.py cannot rot where there is no GPU: its --tiny mode runs every
worker (DiT forward, text to image, train step; ours and PyTorch's) on tiny geometries, in
this process (the driver's per-framework subprocesses are for the GPU's peak memory)."""

import re

import pytest

from benchmarks import gpu_suite
from tests import cli_contract


def test_tiny_mode_runs_every_part_for_both_frameworks(capsys):
  assert gpu_suite.main(["--tiny"]) == 0
  out = capsys.readouterr().out
  rows = [l for l in out.splitlines() if re.match(r"(forward|pipeline|train)\s", l)]
  frameworks = {
    ("forward", "diffusers"),
    ("forward", "sana_jax"),
    ("pipeline", "diffusers"),
    ("pipeline", "sana_jax"),
    ("train", "torch+came-pytorch"),
    ("train", "sana_jax"),
  }
  seen = {(l.split()[0], f) for l in rows for _, f in frameworks if f" {f} " in f" {l} "}
  assert seen == frameworks, out
  for line in rows:
    assert "Error" not in line and "timed out" not in line, line
    if " sana_jax " in line:
      assert re.search(r"\d+\.\d\dx$", line), f"no ours/torch ratio: {line}"
  train = [l for l in rows if l.startswith("train")]
  assert all(re.search(r"\d+\.\d+\s+\d+\.\d+\s+\d+\.\d+\s+\d+\.\d+", l) for l in train), train


@pytest.mark.contract
@pytest.mark.parametrize(
  "args,named", [(["--only", "forward,bogus"], "bogus"), (["--policies", "fastest"], "fastest")]
)
def test_bad_arguments_are_refused(args, named):
  result = cli_contract.run_command(["benchmarks/gpu_suite.py", *args])
  cli_contract.assert_refused(result, named)
