"""Freed host memory handed back to the kernel (glibc's `malloc_trim`)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform


@functools.lru_cache(maxsize=1)
def _malloc_trim():
  if platform.libc_ver()[0] != "glibc":
    return None
  try:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
  except (OSError, AttributeError):
    return None


def release_freed() -> bool:
  """Return the free pages of glibc's heaps to the kernel (a no-op elsewhere); True where
  it ran. The memory stays allocatable; only its resident pages go. Cheap (milliseconds),
  meant after a compile, whose freed memory would otherwise stay resident where the heap
  keeps freed blocks (sana_jax/commands/malloc_settings.py)."""
  trim = _malloc_trim()
  if trim is None:
    return False
  trim(0)
  return True
