"""Fixed-shape batches over the rows of an array: one compiled shape per (rows, batch size).

Every batched loop of the library (calibration statistics, drop scoring, perplexity, task
evaluation) walks its rows through `batches`: each batch has exactly B rows, the last one padded
with copies of a real row and a weight of 0 for the copies, so a jitted step compiles once and
padding never reaches a result (callers multiply per-row sums by the weight, or drop the rows past
`real`).
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np


class Batch(NamedTuple):
  """rows [B] int32 indices into the data (the padding repeats the last real row); weight [B]
  float32, 1 for real rows and 0 for padding; real: number of real rows (they come first)."""

  rows: np.ndarray
  weight: np.ndarray
  real: int


def batch_size_for(n: int, batch_size: int) -> int:
  """The batch size actually used: never more rows than the data has."""
  return max(1, min(int(batch_size), int(n)))


def batches(n: int, batch_size: int) -> Iterator[Batch]:
  """Batches of exactly `batch_size_for(n, batch_size)` rows covering rows 0..n-1 in order."""
  B = batch_size_for(n, batch_size)
  for start in range(0, n, B):
    real = min(B, n - start)
    rows = np.arange(start, start + B, dtype=np.int32)
    rows[real:] = start + real - 1
    weight = np.zeros(B, np.float32)
    weight[:real] = 1.0
    yield Batch(rows, weight, real)
