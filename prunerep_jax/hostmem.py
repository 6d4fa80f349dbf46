"""Handing freed host memory back to the operating system.

XLA:CPU allocates its buffers (activations, temporaries, compiled code) with the C library's
malloc from many threads. glibc keeps what is freed inside its heaps for reuse, so after a
calibration layer or a model load the resident set stays tens to hundreds of MB above what is
live, and the next layer's allocations add to it rather than reusing it when they land in another
thread's heap. `release_free_memory` asks glibc to return the free pages of every heap
(`malloc_trim(0)`). The long sequential drivers call it between layers and the loaders after
placing the params: measured on the default model, it lowers SparseGPT's pruning peak by ~85 MB
and Wanda's by ~50 MB at no measurable cost (a few ms per call). Elsewhere (macOS, musl) it does
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Optional


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Optional[ctypes._CFuncPtr]:
  name = ctypes.util.find_library("c")
  if name is None:
    return None
  try:
    fn = ctypes.CDLL(name).malloc_trim
  except (OSError, AttributeError):  # not glibc
    return None
  fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
  return fn


def release_free_memory() -> bool:
  """Returns the C heap's free pages to the OS; True if the C library could (glibc)."""
  fn = _malloc_trim()
  if fn is None:
    return False
  fn(0)
  return True
