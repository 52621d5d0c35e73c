"""benchmarks/tpu_plan.py on a small case: the tiny config AOT-compiled for TPU v5e:2x2.

Needs libtpu (`pip install "jax[tpu]==<our jax>"`); skipped without it. Nothing runs on a
TPU: libtpu compiles for the topology on this CPU.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason="libtpu is not installed (pip install 'jax[tpu]==" + jax.__version__ + "')",
)

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other test processes may hold it
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))


@pytest.fixture(scope="module")
def plan():
  import tpu_plan  # pylint: disable=import-error

  return tpu_plan


def test_loop_corrected_cost_equals_the_unrolled_program(plan):
  """XLA counts a scanned loop's body once: the depth-1/2 probe correction gives the FLOPs
  and bytes of the same program with every block unrolled."""
  chip, devices = plan.topology("v5e:2x2")
  assert len(devices) == 4 and chip.hbm_gb == 16
  mesh = plan.parallel.make_mesh(data=1, fsdp=4, devices=devices)
  config = plan._config("tiny", "none", "shift")  # pylint: disable=protected-access
  flops, nbytes = plan.corrected_cost(plan.forward_program, config, mesh, 2)
  with plan.unrolled_scans():
    unrolled = plan._analyse(plan.forward_program(plan._copy(config), mesh, 2))  # pylint: disable=protected-access
  np.testing.assert_allclose(flops, unrolled.flops, rtol=0.01)
  np.testing.assert_allclose(nbytes, unrolled.bytes, rtol=0.05)
  # Our analytic matmul count is per example and whole-mesh; XLA's per chip.
  from sana_jax.models.dit_config import DiTConfig
  from sana_jax.train import metrics

  cfg = DiTConfig.coerce(config.model)
  analytic = 2 * metrics.dit_forward_flops(cfg, 8, 8, cfg.caption_len)  # batch 2 per chip
  assert 0.5 * analytic < flops < 3 * analytic


def test_train_step_plan_on_v5e(plan):
  """The real train step compiles for TPU with the state donated; its arguments are the
  state split over 4 chips plus the batch; the table row says it is a compiler plan."""
  row = plan.plan_train(
    "tiny", "v5e:2x2", "data=1,fsdp=-1", "full", "shift", [2], 64, False, False, lambda s: None
  )
  r = row["r"]
  assert not r.oom and row["fits"] and row["max_batch"] == 2
  config = plan._config("tiny", "full", "shift")  # pylint: disable=protected-access
  tx = plan.optim_lib.make_optimizer(config.train)
  state = plan.state_lib.abstract_state(config.model, tx)
  state_bytes = sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))
  m = config.model
  batch_bytes = 2 * 4 * (8 * 8 * m.in_channels + m.caption_len * (m.caption_channels + 1))
  assert state_bytes / 4 < r.arg < state_bytes + batch_bytes  # sharded, not replicated
  assert r.alias > 0.5 * state_bytes / 4  # donated: the new state reuses the old buffers
  assert r.total < chip_hbm(plan) and r.flops > 0
  text = plan.format_row(row)
  assert "| train | tiny" in text and "v5e:2x2 (4)" in text and "fsdp4" in text
  assert "NOT MEASURED" in plan.BANNER


def chip_hbm(plan):
  return plan.CHIPS["v5e"].hbm_gb * plan.GB
