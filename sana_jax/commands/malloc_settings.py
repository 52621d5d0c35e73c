"""Our commands' processes restarted with glibc's malloc keeping large blocks, and XLA:CPU
running single-device programs inline.

XLA:CPU allocates the temporaries of each run of a compiled program as one block (367 MB
for the embedded model's train step at batch 32). With async dispatch (JAX's default) the
run and its block are on a worker thread, whose glibc arena grows by at most 64 MB, so
glibc maps the block fresh and unmaps it after the run: every step touched ~94,000 new 4 KB
pages (fresh pages cost ~0.45 ms per MB in one thread on the project's 2-core machine).
The settings here make the block come from the main heap and stay there:

- tunables (glibc reads them only at process start, hence the restart):
  `glibc.malloc.mmap_max=0` (large blocks from the heap, not fresh mappings),
  `glibc.malloc.trim_threshold=2**40` (freed memory at the heap's top is kept for the next
  run), and, where the kernel's transparent huge pages are not `[never]`,
  `glibc.malloc.hugetlb=1` (2 MB pages for the heap);
- `jax_cpu_enable_async_dispatch=False` once the process runs with mmap_max=0: a
  single-device program then runs on the calling (main) thread, whose arena is the heap.
  Its inputs must be ready for that (a batch still being copied sends the run to a worker
  thread): the train loop waits for each batch (`sana_jax/train/loop.py`).

The heap keeps memory freed during compilation too (a hole the step's block may not fit
into), so the train loop hands freed memory back to the kernel after each compile
(`sana_jax/host_memory.py`). Measured in docs/train_speed.md, "Session 13".

The heap tunables (and so inline runs) are added only where JAX will compute on the CPU
(`cpu_only`: JAX_PLATFORMS=cpu, or no accelerator plugin installed); with an accelerator
only huge pages are, as before.

Nothing is restarted or set when the process is not glibc's on Linux, when
SANA_JAX_KEEP_MALLOC is set (to any value), in an interactive interpreter or a Jupyter /
IPython kernel (whose process is not the command's), or for a `main(argv)` called
in-process. A tunable the user already set in GLIBC_TUNABLES keeps the user's value.
"""

from __future__ import annotations

import os
import platform
import sys

HUGE_PAGES = ("glibc.malloc.hugetlb", "1")
HEAP = (("glibc.malloc.mmap_max", "0"), ("glibc.malloc.trim_threshold", str(1 << 40)))
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


def _tunables(environ) -> dict:
  """GLIBC_TUNABLES as {name: value}, in order."""
  items = [t.partition("=") for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
  return {name: value for name, _, value in items}


def cpu_only(environ) -> bool:
  """Whether JAX will compute on the CPU, known without starting it: JAX_PLATFORMS names
  only `cpu`, or it is unset and no accelerator plugin (a `jax_plugins` entry point, such
  as CUDA's) nor libtpu is installed."""
  platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return all(p == "cpu" for p in platforms)
  import importlib.metadata
  import importlib.util

  if importlib.metadata.entry_points(group="jax_plugins"):
    return False
  return importlib.util.find_spec("libtpu") is None


def restart_environment(environ, libc: str, thp_enabled: bool, on_cpu: bool) -> dict | None:
  """The environment to restart with, or None where no restart is wanted: `environ` with
  the tunables it lacks appended to GLIBC_TUNABLES (its own tunables kept, values too). The
  heap tunables only where JAX computes on the CPU (`on_cpu`): on an accelerator's host
  they would only keep freed host memory (restored checkpoints, say) resident."""
  if libc != "glibc" or OPT_OUT in environ:
    return None
  wanted = (HEAP if on_cpu else ()) + ((HUGE_PAGES,) if thp_enabled else ())
  have = _tunables(environ)
  missing = [f"{name}={value}" for name, value in wanted if name not in have]
  if not missing:
    return None
  env = dict(environ)
  own = environ.get("GLIBC_TUNABLES", "")
  env["GLIBC_TUNABLES"] = ":".join(([own] if own else []) + missing)
  return env


def heap_kept(environ) -> bool:
  """Whether this process's malloc serves large blocks from the heap (mmap_max=0)."""
  return _tunables(environ).get("glibc.malloc.mmap_max") == "0"


def restart(argv) -> None:
  """Re-execute this process's command line with the tunables where wanted, then run
  single-device programs inline where the heap keeps large blocks (see the module).
  Returns only where no restart is wanted; a `main(argv)` called in-process (argv given)
  changes nothing. Call it before JAX creates its CPU client (before any computation)."""
  if argv is not None or not sys.platform.startswith("linux") or _interactive():
    return
  if OPT_OUT in os.environ:
    return
  env = restart_environment(
    os.environ, platform.libc_ver()[0], _thp_enabled(), cpu_only(os.environ)
  )
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  if heap_kept(os.environ):
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)
