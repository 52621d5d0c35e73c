"""Our commands' processes restarted with glibc's malloc backing large blocks by huge pages.

XLA:CPU allocates the temporaries of each run of a compiled program as one block (367 MB
for the embedded model's train step). It is allocated on a worker thread, whose glibc arena
grows by at most 64 MB, so glibc maps a block that large fresh whatever its mmap settings
(M_MMAP_MAX=0 did not stop it), and unmaps it after the run: every step touches 94,000 new
4 KB pages (touching 385 MB of fresh pages took 172-184 ms in one thread on the project's
2-core machine). PyTorch's tensors are separate blocks under
glibc's 32 MB mmap ceiling, which the heap serves again without faults. The glibc tunable
`glibc.malloc.hugetlb=1` makes malloc advise transparent huge pages for its mappings: 2 MB
pages, ~600 faults per step. The embedded model's train step took 241 ms instead of 278
(docs/train_speed.md, "Session 12"). glibc reads tunables only at process start, so
`restart()` re-executes the command with the tunable added to GLIBC_TUNABLES.

Nothing is restarted when the process is not glibc's on Linux, when the kernel's
transparent huge pages are off (`[never]`), when GLIBC_TUNABLES already sets
glibc.malloc.hugetlb, when SANA_JAX_KEEP_MALLOC is set (to any value), or in an
interactive interpreter or a Jupyter / IPython kernel (whose process is not the command's).
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
SETTING = f"{TUNABLE}=1"
OPT_OUT = "SANA_JAX_KEEP_MALLOC"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_enabled() -> bool:
  """Whether the kernel gives huge pages to madvise'd memory (its mode is not `[never]`)."""
  try:
    with open(_THP) as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def _interactive() -> bool:
  """An interactive interpreter, or an IPython / Jupyter kernel: restarting would restart
  the user's session, not a command."""
  return bool(sys.flags.interactive) or hasattr(sys, "ps1") or "IPython" in sys.modules


def restart_environment(environ, libc: str, thp_enabled: bool) -> dict | None:
  """The environment to restart with, or None where no restart is wanted: `environ` with
  SETTING appended to GLIBC_TUNABLES (its other tunables kept)."""
  if libc != "glibc" or not thp_enabled or OPT_OUT in environ:
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if any(t.split("=")[0] == TUNABLE for t in tunables.split(":")):
    return None
  env = dict(environ)
  env["GLIBC_TUNABLES"] = f"{tunables}:{SETTING}" if tunables else SETTING
  return env


def restart(argv) -> None:
  """Re-execute this process's command line with the tunable, where wanted (see the
  module). Returns only where no restart is wanted. `argv` is a command's `main(argv)`
  argument: a main called in-process (argv given) never restarts."""
  if argv is not None or not sys.platform.startswith("linux") or _interactive():
    return
  env = restart_environment(os.environ, platform.libc_ver()[0], _thp_enabled())
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
