"""Test setup: 8 simulated CPU devices for sharding tests, fp32 matmuls everywhere.

The suite runs on a 2-core CPU where XLA compilation dominates: tests compile with most
optimisations off (`JAX_DISABLE_MOST_OPTIMIZATIONS`: LLVM level 0, no expensive passes;
same numerics, ~0.8x a test's cold time) and share a persistent compilation cache across
processes (xdist workers, training subprocesses). Tests whose time is in running many steps
rather than compiling take the `optimized_compiles` fixture (the programs they compile are
optimised as users get them: the tiny overfit's 300 steps run in half the time). Benchmarks
do not import this file and compile normally.
"""

import os

_flags = os.environ.get("XLA_FLAGS", "")
for flag in ("--xla_force_host_platform_device_count=8",):
  if flag.split("=")[0] not in _flags:
    _flags += " " + flag
os.environ["XLA_FLAGS"] = _flags.strip()
# An environment variable (not a flag in XLA_FLAGS) so that training subprocesses inherit
# it and a test can turn it off for its own compiles (`optimized_compiles`).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/sana_jax_test_jit_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "2")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

try:  # Tiny torch reference models run ~100x slower with 2 threads on a busy 2-core box.
  import torch

  torch.set_num_threads(1)
except ImportError:
  pass


import pytest  # noqa: E402


@pytest.fixture
def optimized_compiles():
  """For the test's duration, programs compile fully optimised (jax_disable_most_optimizations
  off): for tests that run hundreds of steps of a few programs. Restored afterwards."""
  before = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)
