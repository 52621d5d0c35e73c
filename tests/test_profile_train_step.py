"""benchmarks/profile_train_step.py: each op of a compiled program gets its phase and kind
from its HLO metadata, control flow and the runtime's spans are not counted, and the
seconds-long geometry profiles end to end."""

import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks import profile_train_step as prof
from sana_jax.models import dit


def _compiled_text():
  """A program with a product and the depthwise conv, differentiated, inside a scan."""

  def loss(w, k, x):
    def body(c, _):
      y = dit.depthwise_conv3x3(jnp.einsum("bhwc,cd->bhwd", c, w), k)
      return jnp.tanh(y), None

    out, _ = jax.lax.scan(body, x, None, length=2)
    return jnp.sum(out)

  w, k, x = jnp.ones((5, 5)), jnp.ones((3, 3, 5)), jnp.ones((2, 4, 3, 5))
  return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(w, k, x).compile().as_text()


def test_instructions_get_phase_and_kind_from_their_metadata():
  info = prof.instructions(_compiled_text())
  tags = {(prof.phase_of(op), prof.kind_of(n, opc, op)) for n, (_, opc, op) in info.items()}
  assert ("forward", "products") in tags
  assert ("backward", "products") in tags  # dx and dw of the einsum
  assert ("backward", "depthwise conv") in tags  # the custom VJP's ops keep the scope
  assert any(opc == "while" for _, opc, _ in info.values())
  # no product is filed under another kind, and no depthwise op under another
  for n, (_, opc, op) in info.items():
    if "dot_general" in op:
      assert prof.kind_of(n, opc, op) == "products"


def test_op_times_count_program_ops_only(tmp_path):
  text = _compiled_text()
  info = prof.instructions(text)
  loop = next(n for n, (_, opc, _) in info.items() if opc == "while")
  dot = next(n for n, (_, _, op) in info.items() if "dot_general" in op)
  events = [
    {"ph": "X", "name": dot, "dur": 3000},
    {"ph": "X", "name": dot, "dur": 1000},
    {"ph": "X", "name": loop, "dur": 9000},  # spans its body: not counted
    {"ph": "X", "name": "MutexLock", "dur": 500},  # the runtime's: not counted
  ]
  (tmp_path / "x").mkdir()
  with gzip.open(tmp_path / "x" / "host.trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  rows = prof.op_times(str(tmp_path), text, steps=2)
  assert [(r["name"], r["ms"], r["count"], r["kind"]) for r in rows] == [
    (dot, 2.0, 1.0, "products")
  ]
  cells = prof.table(rows)
  assert sum(cells.values()) == pytest.approx(2.0)
  with pytest.raises(FileNotFoundError, match="trace.json.gz"):
    prof.op_times(str(tmp_path / "none"), text, steps=1)


def test_tiny_step_profiles_end_to_end():
  result = prof.profile("tiny", "adamw", "project", steps=1)
  cells = prof.table(result["rows"])
  assert cells[("forward", "products")] > 0 and cells[("backward", "products")] > 0
  assert cells[("backward", "depthwise conv")] > 0
  assert cells[("update", "other")] > 0  # optimizer and EMA
  assert sum(cells.values()) == pytest.approx(sum(r["ms"] for r in result["rows"]))
  assert result["wall_ms"] > 0
  grouped = prof.grouped(result["rows"])
  assert sum(g["ms"] for g in grouped) == pytest.approx(sum(cells.values()))
  assert len(grouped) < len(result["rows"])  # the two blocks' ops merged


def test_bad_arguments_are_refused_before_any_work(capsys):
  for argv in (["--geometry", "huge"], ["--optimizer", "sgd"], ["--steps", "0"]):
    with pytest.raises(SystemExit) as e:
      prof.main(argv)
    assert e.value.code == 2
  assert "error:" in capsys.readouterr().err
