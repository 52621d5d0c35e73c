"""The package as a user installs it: a wheel (`pip wheel --no-deps`) in a fresh venv outside
the checkout, its console commands run from another folder.

The venv reuses this machine's packages (--system-site-packages) but the sana_jax it imports
is the wheel's copy, not the editable checkout (checked by sana_jax.__file__). The sampling
runs make the [train] and [torch] packages unimportable (a sitecustomize that sets
sys.modules[name] = None, which is what `import` and importlib.util.find_spec see when a
package is not installed), so they prove that `pip install .` alone samples the embedded
model and imports the optimizer. The second sampling run starts warm: JAX's own
compilation-cache events (jax.monitoring) show every compile it requests answered from the
cache the first one filled (no miss), and nothing new is written to the cache.

Slow part: the module fixture (wheel build + venv + install, a few seconds of CPU) and the
two sampling subprocesses of the embedded model (import, load and compile each).
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# The packages `pip install .` (no extras) does not install: [train], [torch], [demo], tests.
NOT_IN_CORE = (
  "tensorflow_datasets",
  "tensorflow",
  "grain",
  "orbax",
  "array_record",
  "etils",
  "tensorboardX",
  "matplotlib",
  "torch",
  "diffusers",
  "gradio",
)


def _run(cmd, cwd, env, timeout=600):
  t = time.perf_counter()
  p = subprocess.run(
    cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
  )
  p.seconds = time.perf_counter() - t
  return p


def _ok(p):
  assert p.returncode == 0, f"exit {p.returncode}: {p.args}\n{(p.stdout + p.stderr)[-3000:]}"
  return p


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
  """A fresh venv outside the checkout with the wheel of this checkout installed; returns
  (root, env): env has the venv's bin first on PATH, no PYTHONPATH, a private cache dir."""
  root = tmp_path_factory.mktemp("package")
  src = root / "src"
  src.mkdir()
  for f in ("pyproject.toml", "README.md"):
    shutil.copy(REPO / f, src / f)
  # A copy, so the build writes its build/ and egg-info there, not into the checkout.
  shutil.copytree(
    REPO / "sana_jax", src / "sana_jax", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
  )
  try:
    importlib.import_module("setuptools")
    isolation = ["--no-build-isolation"]  # offline: the installed setuptools builds it
  except ImportError:
    isolation = []
  pip = [sys.executable, "-m", "pip"]
  _ok(_run([*pip, "wheel", "-q", "--no-deps", *isolation, str(src), "-w", str(root)], root, None))
  (wheel,) = root.glob("sana_jax-*.whl")
  _ok(_run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
            str(root / "venv")], root, None))  # fmt: skip
  python = root / "venv" / "bin" / "python"
  _ok(
    _run(
      [*pip, "--python", str(python), "install", "-q", "--no-deps", "--ignore-installed",
       "--no-index", str(wheel)],
      root,
      None,
    )
  )  # fmt: skip
  block = root / "block"
  block.mkdir()
  (block / "sitecustomize.py").write_text(
    "import os, sys\n"
    "if os.environ.get('SANA_TEST_CORE_ONLY'):\n"
    f"  for _name in {NOT_IN_CORE!r}:\n"
    "    sys.modules[_name] = None\n"
    # JAX's compilation-cache events of the process, as JSON at exit.
    "if os.environ.get('SANA_TEST_COUNT_COMPILES'):\n"
    "  import atexit, collections, json, jax.monitoring\n"
    "  _counts = collections.Counter()\n"
    "  jax.monitoring.register_event_listener(lambda event, **kw: _counts.update([event]))\n"
    "  atexit.register(lambda: open(os.environ['SANA_TEST_COUNT_COMPILES'], 'w')"
    ".write(json.dumps(_counts)))\n"
  )
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
  env["PYTHONPATH"] = str(block)  # only the sitecustomize, never the checkout
  env["SANA_JAX_CACHE_DIR"] = str(root / "cache")
  env.pop("SANA_JAX_NO_COMPILE_CACHE", None)
  elsewhere = root / "elsewhere"
  elsewhere.mkdir()
  return root, env


def test_the_venv_imports_the_wheel_and_the_optimizer_without_train_or_torch(venv):
  root, env = venv
  code = (
    "import json, sys, sana_jax, sana_jax.commands.sample as s\n"
    "from sana_jax.optim import came_8bit\n"
    "from sana_jax.embedded import EMBEDDED_MODEL as DEFAULT_MODEL\n"
    "print(json.dumps({'init': sana_jax.__file__, 'sample': s.__file__, "
    "'model': str(DEFAULT_MODEL), 'opt': callable(came_8bit), "
    "'torch': 'torch' in sys.modules and sys.modules['torch'] is not None}))"
  )
  p = _ok(_run(["python", "-c", code], root / "elsewhere", {**env, "SANA_TEST_CORE_ONLY": "1"}))
  got = json.loads(p.stdout.strip().splitlines()[-1])
  site = root / "venv" / "lib"
  for key in ("init", "sample", "model"):
    path = pathlib.Path(got[key]).resolve()
    assert path.is_relative_to(site.resolve()), (key, path)
    assert not path.is_relative_to(REPO), (key, path)
  assert (pathlib.Path(got["model"]) / "pipeline.json").is_file()  # the assets are in the wheel
  assert got["opt"] and not got["torch"]


def test_the_packaged_configs_load_by_name_from_another_folder(venv):
  """`sana-train --config shapes` needs no checkout: the configs ship in sana_jax/configs/,
  and the experiments read the shapes recipe from there."""
  root, env = venv
  code = (
    "import json\n"
    "from sana_jax.config_loader import load_config, packaged_config_names\n"
    "from sana_jax.experiments import common\n"
    "c = load_config('tiny', ['model.depth=3'])\n"
    "print(json.dumps({'names': packaged_config_names(), 'tiny_depth': c.model.depth,\n"
    "  'shapes_width': common.recipe().model.hidden_size,\n"
    "  'shipped': str(common.SHIPPED)}))"
  )
  p = _ok(_run(["python", "-c", code], root / "elsewhere", env))
  got = json.loads(p.stdout.strip().splitlines()[-1])
  assert {"tiny", "shapes", "sana_600m", "sana15_4800m"} <= set(got["names"])
  assert "common" not in got["names"]
  assert got["tiny_depth"] == 3 and got["shapes_width"] == 128
  assert pathlib.Path(got["shipped"]).resolve().is_relative_to((root / "venv").resolve())


def test_console_commands_answer_help_from_another_folder(venv):
  root, env = venv
  for cmd, fragment in (
    (["sana-sample", "--help"], "usage: sana-sample"),
    (["sana-convert", "--help"], "sana-convert dit"),
    (["sana-train", "--help"], "--compile_cache"),
  ):
    exe = root / "venv" / "bin" / cmd[0]
    assert exe.is_file(), exe
    p = _ok(_run([str(exe), *cmd[1:]], root / "elsewhere", env))
    assert fragment in p.stdout, (cmd, p.stdout[:2000])


def test_every_console_command_names_a_function():
  """pyproject.toml's [project.scripts] entries resolve (module imported, function found)."""
  import tomllib

  scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
  assert {"sana-sample", "sana-train", "sana-convert", "sana-demo"} <= set(scripts)
  for name, target in scripts.items():
    module, func = target.split(":")
    assert callable(getattr(importlib.import_module(module), func)), name


@pytest.mark.slow
def test_sample_from_another_folder_then_a_warm_start_compiles_nothing(venv):
  """The wheel's sana-sample, core packages only, from a folder outside the checkout: two
  images of the embedded model, with its progress bar (the default); the second start
  reads the compilation cache the first wrote for every program it compiles (a program
  with a host callback would be compiled again and never written), writes nothing new and
  gives the same images."""
  root, env = venv
  env = {**env, "SANA_TEST_CORE_ONLY": "1"}
  cache = root / "cache"
  exe = str(root / "venv" / "bin" / "sana-sample")
  args = ["--prompt", "two red circles", "--num_images", "2", "--steps", "4"]
  events = {}
  for name in ("cold", "warm"):
    counts = root / f"{name}.events.json"
    runs = _ok(_run([exe, *args, "--out", name], root / "elsewhere",
                    {**env, "SANA_TEST_COUNT_COMPILES": str(counts)}))  # fmt: skip
    events[name] = (runs, json.loads(counts.read_text()))
    if name == "cold":
      entries = {p.name: p.stat().st_mtime_ns for p in cache.rglob("*-cache")}
      assert entries, f"nothing cached in {cache}: {sorted(cache.rglob('*'))[:10]}"
  requests, hits, misses = (
    {k: e.get(f"/jax/compilation_cache/{what}", 0) for k, (_, e) in events.items()}
    for what in ("compile_requests_use_cache", "cache_hits", "cache_misses")
  )
  assert misses["cold"] > 0, events["cold"]  # the cold start compiles
  # the warm start: no miss; what the cold start compiled came from the cache
  assert misses["warm"] == 0 and hits["warm"] >= misses["cold"], (events["cold"], events["warm"])
  assert requests["warm"] == hits["warm"], events["warm"]  # nothing compiled outside the cache
  after = {p.name: p.stat().st_mtime_ns for p in cache.rglob("*-cache")}
  assert after == entries, f"the warm start wrote {sorted(set(after) - set(entries))}"
  cold, warm = events["cold"][0], events["warm"][0]
  pngs = sorted(p.name for p in (root / "elsewhere" / "cold").glob("p*.png"))
  assert len(pngs) == 2
  for name in pngs:
    a = (root / "elsewhere" / "cold" / name).read_bytes()
    assert a == (root / "elsewhere" / "warm" / name).read_bytes(), name
  print(
    f"cold {cold.seconds:.1f} s ({misses['cold']} compiles), warm {warm.seconds:.1f} s "
    f"({hits['warm']} cache hits, {misses['warm']} misses), {len(entries)} cache entries"
  )


# The compilation cache's settings (sana_jax/commands/compile_cache.py), in this process.


@pytest.fixture
def cache_env(monkeypatch, tmp_path):
  for name in ("SANA_JAX_CACHE_DIR", "SANA_JAX_NO_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  return monkeypatch


def test_cache_folder_precedence(cache_env, tmp_path):
  import argparse

  from sana_jax.commands import compile_cache as cc

  ns = argparse.Namespace
  default = tmp_path / "xdg" / "sana_jax" / "jax_cache"
  assert cc.resolve(None) == default and default.is_dir()  # the user cache, created
  cache_env.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jaxs"))
  assert cc.resolve(None) == tmp_path / "jaxs"
  cache_env.setenv("SANA_JAX_CACHE_DIR", str(tmp_path / "ours"))
  assert cc.resolve(None) == tmp_path / "ours"
  flag = ns(compile_cache=tmp_path / "flag", no_compile_cache=False)
  assert cc.resolve(flag) == tmp_path / "flag"
  assert cc.resolve(ns(compile_cache=tmp_path / "flag", no_compile_cache=True)) is None
  cache_env.setenv("SANA_JAX_NO_COMPILE_CACHE", "1")
  assert cc.resolve(None) is None
  assert cc.resolve(ns(compile_cache=None, no_compile_cache=False)) is None
  assert cc.resolve(flag) == tmp_path / "flag"  # an explicit folder wins over the variable
  cache_env.setenv("SANA_JAX_NO_COMPILE_CACHE", "0")
  assert cc.resolve(None) == tmp_path / "ours"


def test_an_unusable_default_cache_is_a_warning_not_a_failure(cache_env, tmp_path, capsys):
  from sana_jax.commands import compile_cache as cc

  (tmp_path / "xdg").write_text("a file where the cache's parent should be")
  assert cc.resolve(None) is None
  assert "warning: compilation cache" in capsys.readouterr().err


@pytest.mark.contract
@pytest.mark.parametrize("command", ["sample", "train"])
def test_a_compile_cache_that_is_a_file_is_refused(command, cache_env, tmp_path, capsys):
  from sana_jax.commands import sample as sample_cmd
  from sana_jax.commands import train as train_cmd
  from tests.cli_contract import assert_refused, assert_unchanged, call_main, snapshot

  bad = tmp_path / "cache_file"
  bad.write_text("not a folder")
  before = snapshot(tmp_path)
  if command == "sample":
    main, argv = sample_cmd.main, ["--prompt", "a red circle", "--out", tmp_path / "out"]
  else:
    main, argv = train_cmd.main, ["--config", REPO / "configs/tiny.py", "--workdir", tmp_path / "w"]
  assert_refused(
    call_main(main, [*argv, "--compile_cache", bad], capsys),
    "--compile_cache",
    "cache_file",
    "is a file",
  )
  assert_unchanged(before)
