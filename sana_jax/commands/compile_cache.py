"""The persistent XLA compilation cache of the commands (jax_compilation_cache_dir).

A command that compiles turns it on before its first compile, so a second start with the
same model, sizes and JAX version loads the compiled programs instead of compiling them
again (docs/install.md has the cold and warm figures). Where it lives, first match wins:

  --compile_cache DIR                 (sample and train)
  $SANA_JAX_CACHE_DIR
  $JAX_COMPILATION_CACHE_DIR          (JAX's own variable)
  $XDG_CACHE_HOME/sana_jax/jax_cache, else ~/.cache/sana_jax/jax_cache

It is off with --no_compile_cache or SANA_JAX_NO_COMPILE_CACHE=1. An explicit folder that
cannot be made is a usage error; the default one falls back to no cache with a warning.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

from sana_jax.cli import UsageError

ENV_DIR = "SANA_JAX_CACHE_DIR"
ENV_OFF = "SANA_JAX_NO_COMPILE_CACHE"
# Compiles shorter than this are not written (JAX's default is 1 s, which leaves out the
# many small programs of a sampler; each costs a file of a few kB).
MIN_COMPILE_SECONDS = 0.0


def default_dir() -> pathlib.Path:
  """The cache folder without --compile_cache (the environment, then the user cache)."""
  for name in (ENV_DIR, "JAX_COMPILATION_CACHE_DIR"):
    if os.environ.get(name):
      return pathlib.Path(os.environ[name]).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base).expanduser() / "sana_jax" / "jax_cache"


def disabled_by_env() -> bool:
  return os.environ.get(ENV_OFF, "").strip().lower() not in ("", "0", "false", "no", "off")


def add_arguments(ap: argparse.ArgumentParser) -> None:
  """--compile_cache and --no_compile_cache."""
  ap.add_argument(
    "--compile_cache",
    type=pathlib.Path,
    default=None,
    metavar="DIR",
    help="folder of the persistent compilation cache, created if missing, so a second "
    f"start does not recompile (default: ${ENV_DIR}, else $XDG_CACHE_HOME/sana_jax/"
    "jax_cache, i.e. ~/.cache/sana_jax/jax_cache)",
  )
  ap.add_argument(
    "--no_compile_cache",
    action="store_true",
    help=f"compile everything afresh, reading and writing no cache (default: off, the "
    f"cache is used; {ENV_OFF}=1 does the same)",
  )


def _make(path: pathlib.Path) -> str | None:
  """Creates the folder; None, or why it cannot be used."""
  if path.exists() and not path.is_dir():
    return "it is a file"
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    return f"cannot create it ({e.strerror or e})"
  if not os.access(path, os.W_OK | os.X_OK):
    return "it is not writable"
  return None


def resolve(args: argparse.Namespace | None = None) -> pathlib.Path | None:
  """The folder to use (created), or None for no cache. Raises UsageError for an explicit
  --compile_cache that cannot be used; a default one that cannot is a `warning:` and None."""
  if args is not None and getattr(args, "no_compile_cache", False):
    return None
  explicit = None if args is None else getattr(args, "compile_cache", None)
  if explicit is not None:
    why = _make(explicit)
    if why:
      raise UsageError(f"--compile_cache {explicit}: {why}; give a writable folder")
    return explicit
  if disabled_by_env():
    return None
  path = default_dir()
  why = _make(path)
  if why:
    print(f"warning: compilation cache {path} not used: {why}", file=sys.stderr)
    return None
  return path


def enable(path: pathlib.Path | None) -> None:
  """Points JAX's persistent compilation cache at `path` (None: leaves it off). Call before
  the first compile of the process."""
  if path is None:
    return
  import jax

  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)


def enable_from_env() -> pathlib.Path | None:
  """For commands without the flags: the environment's or the default folder."""
  path = resolve(None)
  enable(path)
  return path
