"""Fault injection: SIGKILL train.py at random points, restart it each time, and check that
the run ends bit-identical to an uninterrupted one.

  python benchmarks/fault_injection.py [--faults 6] [--steps 60] [--seed 0]

Faults alternate between two kinds:
  write   killed while an asynchronous checkpoint is being written (a
          `<step>.orbax-checkpoint-tmp*` folder exists in workdir/checkpoints), at the
          second save of that run (so that every run makes progress);
  random  killed a random time (0-4 s) after the run has logged its first step.
After each kill the same command is started again (it resumes from the newest complete
checkpoint); when all faults are spent it runs to the end. The final parameters and EMA
parameters are compared bit for bit with the uninterrupted run's. Prints one line per fault
and "N of N faults survived". The tiny config on one CPU device; steps are cheap, so most
of the time is process start-up and (cached) compilation.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def train_cmd(workdir, data_dir, steps, every):
  return [
    sys.executable,
    str(REPO / "train.py"),
    "--config",
    str(REPO / "configs/tiny.py"),
    "--workdir",
    str(workdir),
    f"--config.data.dir={data_dir}",
    f"--config.train.steps={steps}",
    f"--config.train.checkpoint_every={every}",
    "--config.train.log_every=1",
    "--config.train.keep_checkpoints=3",
    "--config.mesh.num_devices=1",
    "--config.mesh.data=1",
    "--no_progress",
  ]


def env():
  e = dict(os.environ)
  e.setdefault("JAX_PLATFORMS", "cpu")
  e.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/sana_jax_fault_injection_cache")
  e.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  e["PYTHONPATH"] = str(REPO)
  return e


def checkpoints(workdir) -> tuple[list[int], bool]:
  """(finished checkpoint steps, whether a save is in progress)."""
  root = pathlib.Path(workdir) / "checkpoints"
  if not root.is_dir():
    return [], False
  names = [p.name for p in root.iterdir()]
  return sorted(int(n) for n in names if n.isdigit()), any("tmp" in n for n in names)


def logged_steps(workdir) -> int:
  """Lines in metrics.jsonl (log_every=1: one per step run, re-run steps again)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return len(path.read_text().splitlines()) if path.exists() else 0


def last_logged_step(workdir) -> int:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  lines = path.read_text().splitlines() if path.exists() else []
  return json.loads(lines[-1])["step"] if lines else 0


def run_with_fault(cmd, workdir, kind, rng, timeout=900):
  """Starts cmd and kills it per `kind`; returns (killed, note)."""
  proc = subprocess.Popen(
    cmd,
    cwd=REPO,
    env=env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    stdin=subprocess.DEVNULL,
  )
  start_logged = logged_steps(workdir)
  start_done = set(checkpoints(workdir)[0])
  deadline = time.time() + timeout
  kill_at = None
  try:
    while proc.poll() is None and time.time() < deadline:
      if kind == "write":  # the second save of this run: each run makes some progress
        done, writing = checkpoints(workdir)
        if writing and set(done) - start_done:
          break
        time.sleep(0.002)
      else:
        if kill_at is None and logged_steps(workdir) > start_logged:
          kill_at = time.time() + rng.uniform(0, 4)
        if kill_at is not None and time.time() >= kill_at:
          break
        time.sleep(0.01)
    if proc.poll() is not None:
      return False, f"finished before the fault (exit {proc.returncode})"
    in_write = checkpoints(workdir)[1]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done, _ = checkpoints(workdir)
    return True, (
      f"killed {'during a checkpoint write' if in_write else 'between saves'} "
      f"after step {last_logged_step(workdir)}, complete checkpoints {done}"
    )
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--faults", type=int, default=6, help="faults to inject (default: 6)")
  ap.add_argument("--steps", type=int, default=60, help="training steps (default: 60)")
  ap.add_argument(
    "--checkpoint_every", type=int, default=3, help="checkpoint interval in steps (default: 3)"
  )
  ap.add_argument("--seed", type=int, default=0, help="seed of the fault times (default: 0)")
  ap.add_argument(
    "--workdir", default=None, help="folder for the runs (default: a new temporary folder)"
  )
  args = ap.parse_args(argv)
  import jax
  import numpy as np
  from sana_jax.train import checkpoint
  from tests import train_fixtures

  root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="sana_fault_"))
  root.mkdir(parents=True, exist_ok=True)
  data_dir = train_fixtures.write_tiny_dataset(root / "data")
  rng = random.Random(args.seed)
  t0 = time.perf_counter()
  ref = subprocess.run(
    train_cmd(root / "uninterrupted", data_dir, args.steps, args.checkpoint_every),
    cwd=REPO,
    env=env(),
    capture_output=True,
    text=True,
  )
  if ref.returncode:
    print(ref.stderr[-3000:])
    return 1
  print(f"uninterrupted run: {time.perf_counter() - t0:.0f} s")

  workdir = root / "faulty"
  cmd = train_cmd(workdir, data_dir, args.steps, args.checkpoint_every)
  injected = 0
  restarts_ok = 0
  kinds = ["write", "random"]
  while injected < args.faults:
    kind = kinds[injected % 2]
    killed, note = run_with_fault(cmd, workdir, kind, rng)
    if not killed:
      print(f"  (no fault: {note})")
      break
    injected += 1
    print(f"fault {injected} ({kind}): {note}")
  final = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True)
  resumed = [l for l in final.stdout.splitlines() if l.startswith(("resumed", "starting"))]
  print(f"final run: exit {final.returncode}; {resumed[0] if resumed else final.stderr[-500:]}")
  if final.returncode == 0:
    restarts_ok = injected
  same = True
  for ema in (False, True):
    a, sa = checkpoint.restore_params(root / "uninterrupted", ema=ema)
    b, sb = checkpoint.restore_params(workdir, ema=ema)
    same &= sa == sb == args.steps and all(
      np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )
  survived = restarts_ok if same else 0
  print(
    f"final parameters and EMA {'bit-identical to' if same else 'DIFFER from'} the "
    f"uninterrupted run"
  )
  print(f"{survived} of {injected} faults survived ({time.perf_counter() - t0:.0f} s)")
  return 0 if same and survived == injected else 1


if __name__ == "__main__":
  sys.exit(main())
