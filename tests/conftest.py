"""Test setup: 8 simulated CPU devices for sharding tests, fp32 matmuls everywhere.

The suite runs on a 2-core CPU where XLA compilation dominates: tests compile with LLVM
optimisation level 0 (same numerics, about half the compile time) and share a persistent
compilation cache across processes (xdist workers, training subprocesses). Benchmarks do
not import this file and compile normally.
"""

import os

_flags = os.environ.get("XLA_FLAGS", "")
for flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
  if flag.split("=")[0] not in _flags:
    _flags += " " + flag
os.environ["XLA_FLAGS"] = _flags.strip()
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
