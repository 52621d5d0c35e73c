"""The command-line contract (DESIGN.md decision 14) as helpers for every command's tests.

A bad input must end, before any model is loaded or anything is computed, with a line
`error: <what, which value, what is allowed>` on stderr and exit status 2, no traceback, and
nothing written, changed or deleted. Tests of that contract are marked `contract`
(`pytest -m contract` runs them all; `--collect-only -q -m contract` counts them), and each
uses these helpers:

  before = snapshot(tmp_path, existing_output)
  result = run_command(["sample.py", "--height", "0", "--out", str(out)])
  assert_refused(result, "--height", "0")
  assert_unchanged(before)
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

# A bad argument is refused before any compile: far below any model's load + compile time.
REFUSAL_SECONDS = 60


def run_command(
  args: list[str], *, cwd: pathlib.Path | str = REPO, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
  """Runs `python ARGS...` (a script path relative to the repo, or `-m module ...`) in a
  subprocess with the test environment; returns the completed process (text output) with
  `.seconds` set to its wall time."""
  full_env = dict(os.environ)
  full_env.setdefault("PYTHONPATH", str(REPO))
  if env:
    full_env.update(env)
  argv = list(args)
  if argv and argv[0].endswith(".py") and not pathlib.Path(argv[0]).is_absolute():
    argv[0] = str(REPO / argv[0])
  t = time.perf_counter()
  result = subprocess.run(
    [sys.executable, *argv],
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=timeout,
    env=full_env,
    stdin=subprocess.DEVNULL,
  )
  result.seconds = time.perf_counter() - t
  return result


def call_main(main, argv, capsys) -> subprocess.CompletedProcess:
  """A command's `main(argv)` in-process, as the CompletedProcess `run_command` returns
  (argparse's SystemExit is the exit status; stdout/stderr from pytest's capsys; `.seconds`
  set). An exception escaping main fails the test."""
  argv = [str(a) for a in argv]
  t = time.perf_counter()
  try:
    rc = main(argv)
  except SystemExit as e:
    rc = e.code
  captured = capsys.readouterr()
  result = subprocess.CompletedProcess(argv, rc, captured.out, captured.err)
  result.seconds = time.perf_counter() - t
  return result


def assert_refused(
  result: subprocess.CompletedProcess, *fragments: str, max_seconds: float = REFUSAL_SECONDS
) -> str:
  """Exit status 2, an `error: ...` line naming every fragment, no traceback, quickly.
  Returns the error line."""
  out = result.stdout + result.stderr
  assert result.returncode == 2, f"exit status {result.returncode}, want 2:\n{out[-3000:]}"
  assert "Traceback" not in out, f"a traceback instead of a named error:\n{out[-3000:]}"
  lines = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert lines, f"no 'error: ...' line on stderr:\n{result.stderr[-3000:]}"
  message = "\n".join(lines)
  for f in fragments:
    assert f in message, f"the error does not name {f!r}: {message}"
  seconds = getattr(result, "seconds", None)
  if seconds is not None:
    assert seconds < max_seconds, f"refused after {seconds:.0f} s: validate before working"
  return message


def snapshot(*roots: pathlib.Path | str) -> dict:
  """Every file and folder under (and including) the roots: path -> digest of its bytes
  (None for a folder); absent roots are recorded as absent."""
  state = {}
  for root in map(pathlib.Path, roots):
    if not root.exists():
      state[str(root)] = "absent"
      continue
    for p in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
      state[str(p)] = None if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest()
  state["__roots__"] = tuple(str(r) for r in roots)
  return state


def assert_unchanged(before: dict) -> None:
  """Nothing under the snapshot's roots was created, changed or deleted."""
  after = snapshot(*before["__roots__"])
  created = sorted(set(after) - set(before))
  deleted = sorted(set(before) - set(after))
  changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
  assert not (created or deleted or changed), (
    f"created {created[:5]}, deleted {deleted[:5]}, changed {changed[:5]}"
  )
