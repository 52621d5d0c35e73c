"""Our commands restart with glibc's malloc backing large blocks by huge pages
(sana_jax/commands/huge_pages.py): when they do, that they keep other tunables, that the
restart runs the same command line once more, and that the tunable removes the page
faults of a large block allocated on a worker thread (XLA:CPU's per-run temporaries)."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from sana_jax.commands import huge_pages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ON_GLIBC_WITH_THP = (
  sys.platform.startswith("linux")
  and platform.libc_ver()[0] == "glibc"
  and huge_pages._thp_enabled()
)
needs_thp = pytest.mark.skipif(
  not ON_GLIBC_WITH_THP, reason="needs glibc on Linux with transparent huge pages enabled"
)


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", huge_pages.OPT_OUT)}
  env.update(extra)
  return env


def test_restart_environment_adds_the_tunable_and_keeps_others():
  env = huge_pages.restart_environment({"A": "1"}, "glibc", True)
  assert env == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  env = huge_pages.restart_environment(
    {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "glibc", True
  )
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize(
  "environ, libc, thp",
  [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "glibc", True),  # the user's own choice
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2"}, "glibc", True),
    ({huge_pages.OPT_OUT: ""}, "glibc", True),
    ({}, "", True),  # not glibc (musl, or unknown)
    ({}, "glibc", False),  # the kernel's huge pages are off
  ],
)
def test_no_restart_where_not_wanted(environ, libc, thp):
  assert huge_pages.restart_environment(environ, libc, thp) is None


def test_a_main_called_in_process_never_restarts(monkeypatch):
  monkeypatch.setattr(huge_pages.os, "execve", lambda *a: pytest.fail("restarted"))
  huge_pages.restart(["--help"])


@needs_thp
def test_an_ipython_session_never_restarts(monkeypatch):
  calls = []
  monkeypatch.setattr(huge_pages.os, "execve", lambda *a: calls.append(a))
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.delenv(huge_pages.OPT_OUT, raising=False)
  huge_pages.restart(None)  # this pytest process: not interactive, so it would restart
  assert len(calls) == 1 and calls[0][2]["GLIBC_TUNABLES"] == huge_pages.SETTING
  monkeypatch.setitem(sys.modules, "IPython", sys)
  huge_pages.restart(None)
  assert len(calls) == 1


_SCRIPT = """
import os
from sana_jax.commands import huge_pages
print("start", os.environ.get("GLIBC_TUNABLES", "-"), flush=True)
huge_pages.restart(None)
print("after", os.environ.get("GLIBC_TUNABLES", "-"))
"""


def _run(code, env, *args):
  out = subprocess.run(
    [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, cwd=REPO
  )
  assert out.returncode == 0, out.stderr
  return out.stdout.split("\n")


@needs_thp
def test_restart_runs_the_command_once_more_with_the_tunable():
  lines = _run(_SCRIPT, _env(GLIBC_TUNABLES="glibc.malloc.arena_max=4"))
  assert lines[:3] == [
    "start glibc.malloc.arena_max=4",
    "start glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1",
    "after glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1",
  ]
  lines = _run(_SCRIPT, _env(**{huge_pages.OPT_OUT: "1"}))
  assert lines[:2] == ["start -", "after -"]


@needs_thp
def test_the_train_command_restarts_before_it_reads_its_arguments():
  code = textwrap.dedent("""
    import os, sys
    print("tunables", os.environ.get("GLIBC_TUNABLES", "-"), flush=True)
    from sana_jax.commands import train
    sys.exit(train.main())
  """)
  out = subprocess.run(
    [sys.executable, "-c", code, "--max_steps", "3"],
    env=_env(),
    capture_output=True,
    text=True,
    cwd=REPO,
  )
  assert out.returncode == 2  # --config and --workdir are missing: the usage error
  assert out.stdout.split("\n")[:2] == ["tunables -", "tunables glibc.malloc.hugetlb=1"]


_FAULTS = """
import ctypes, resource, threading
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n = 256 << 20
faults = []
def work():  # a worker thread's large block, allocated, written and freed three times
  for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=work)
t.start()
t.join()
print(min(faults))
"""


@needs_thp
def test_the_tunable_removes_the_page_faults_of_a_worker_threads_large_block():
  pages = (256 << 20) // os.sysconf("SC_PAGE_SIZE")
  default = int(_run(_FAULTS, _env())[0])
  huge = int(_run(_FAULTS, _env(GLIBC_TUNABLES=huge_pages.SETTING))[0])
  assert default >= 0.9 * pages  # a fresh mapping per block: a fault per page
  assert huge <= 0.05 * pages
