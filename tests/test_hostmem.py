"""hostmem.release_free_memory gives the C heap's free pages back to the OS (glibc)."""

import os

import numpy as np
import pytest

from benchmarks.memory import rss_mb
from prunerep_jax import hostmem


@pytest.mark.skipif(not os.path.exists("/proc/self/status") or hostmem._malloc_trim() is None,
                    reason="needs Linux with glibc")
def test_release_returns_the_holes_of_a_fragmented_heap():
  # 2000 blocks of 64 KB (below glibc's mmap threshold: they come from the heap); keeping every
  # 8th leaves ~110 MB of free holes that glibc keeps resident until asked.
  blocks = [np.ones(8_000) for _ in range(2000)]
  kept = blocks[::8]
  del blocks
  before = rss_mb()
  assert hostmem.release_free_memory() is True
  after = rss_mb()
  assert before - after > 60, (before, after)
  assert all(float(k[0]) == 1.0 and k.size == 8_000 for k in kept)  # live blocks untouched
