"""Console-script entry points of the commands that live elsewhere in the package.

Each turns on the persistent compilation cache from the environment (compile_cache.py:
SANA_JAX_CACHE_DIR, SANA_JAX_NO_COMPILE_CACHE; these commands have no cache flags), runs the
module's main and returns an exit status (some mains return a report or None).
"""

from __future__ import annotations

import importlib
import sys

from sana_jax.commands import compile_cache


def _run(module: str, cache: bool = True) -> int:
  if cache:
    compile_cache.enable_from_env()
  rc = importlib.import_module(module).main(sys.argv[1:])
  return rc if isinstance(rc, int) else 0


def best_of_n() -> int:
  """sana-best-of-n: python -m sana_jax.scaling.best_of_n."""
  return _run("sana_jax.scaling.best_of_n_cli")


def prune() -> int:
  """sana-prune: python -m sana_jax.scaling.prune_cli."""
  return _run("sana_jax.scaling.prune_cli")


def score() -> int:
  """sana-score: python -m sana_jax.shapes_eval.score (ShapesEval of a model, best-of-N)."""
  return _run("sana_jax.shapes_eval.score")


def shapes_eval() -> int:
  """sana-shapes-eval: python -m sana_jax.shapes_eval.evaluator (a folder of images)."""
  return _run("sana_jax.shapes_eval.evaluator", cache=False)


def preprocess() -> int:
  """sana-preprocess: python -m sana_jax.data.preprocess (images -> latents TFDS)."""
  return _run("sana_jax.data.preprocess")


def lora() -> int:
  """sana-lora: python -m sana_jax.lora (export an adapter to diffusers' file, merge one)."""
  return _run("sana_jax.lora.__main__")
