"""The planted-bug benchmarks (benchmarks/planted_bugs_*.py) cannot rot silently: every
plant's text occurs exactly once in today's source, so each still plants its bug.

The benchmarks themselves (one pytest run per bug) are not part of the suite.
"""

import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _plants(module: str, attr: str):
  path = ROOT / "benchmarks" / f"{module}.py"
  spec = importlib.util.spec_from_file_location(module, path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[module] = mod  # dataclasses look their module up while the class is built
  spec.loader.exec_module(mod)
  return getattr(mod, attr)


@pytest.mark.parametrize(
  "module,attr", [("planted_bugs_numerics", "BUGS"), ("planted_bugs_training", "PLANTS")]
)
def test_every_plant_applies_once(module, attr):
  plants = _plants(module, attr)
  assert len(plants) >= 40
  stale = []
  for bug in plants:
    source = (ROOT / bug.path).read_text()
    if source.count(bug.old) != 1 or bug.old == bug.new:
      stale.append(f"{bug.name}: {source.count(bug.old)} occurrences in {bug.path}")
  assert not stale, "plants whose text moved on (update the benchmark):\n" + "\n".join(stale)
