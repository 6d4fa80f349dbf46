"""Fixed-shape batches over the rows of an array: one compiled shape per (rows, batch size).

Every batched loop of the library (calibration statistics, drop scoring, perplexity, task
evaluation) walks its rows through `batches`: each batch has exactly B rows, the last one padded
with copies of a real row and a weight of 0 for the copies, so a jitted step compiles once and
padding never reaches a result (callers multiply per-row sums by the weight, or drop the rows past
`real`).
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
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


# At most this many float32 logits ([B, C, V]) live at once inside a jitted reduction: 2**25 is
# 128 MiB, which a 49k vocabulary at B = 8 reaches at C ~ 85 positions.
LOGIT_ELEMENTS = 1 << 25


def chunk_size(batch: int, positions: int, vocab: int) -> int:
  """Positions per chunk so that a [batch, chunk, vocab] float32 array stays within
  LOGIT_ELEMENTS, with the positions split into as few, equally sized chunks as that allows."""
  most = max(1, min(positions, LOGIT_ELEMENTS // max(1, batch * vocab)))
  n = -(-positions // most)
  return -(-positions // n)  # balanced: n chunks of nearly equal size, the least padding


def map_chunks(fn, chunk: int, *xs):
  """fn over position chunks of xs [B, P, ...] (traceable; use inside jit).

  fn takes the chunks [B, C, ...] and returns a pytree of [B, C, ...] arrays; the result has the
  same pytree with [B, P, ...] leaves. P is padded to a multiple of C with zeros (the padded
  positions are computed and cut off), so every chunk has one shape and `jax.lax.map` compiles
  fn once.
  """
  B, P = xs[0].shape[:2]
  n = -(-P // chunk)
  pad = n * chunk - P

  def to_chunks(x):  # [B, P, ...] -> [n, B, C, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((B, n, chunk) + x.shape[2:]), 1, 0)

  def from_chunks(y):  # [n, B, C, ...] -> [B, P, ...]
    y = jnp.moveaxis(y, 0, 1)
    return y.reshape((B, n * chunk) + y.shape[3:])[:, :P]

  out = jax.lax.map(lambda args: fn(*args), tuple(to_chunks(x) for x in xs))
  return jax.tree_util.tree_map(from_chunks, out)


class TokenBatch(NamedTuple):
  """rows: [R] indices (into the caller's list) of the R <= B real rows, in the batch's first R
  rows; tokens, mask: int32 [B, T], left-padded; rows R..B-1 are dummies."""

  rows: np.ndarray
  tokens: np.ndarray
  mask: np.ndarray


def bucket_length(n: int) -> int:
  """The smallest of 16, 24, 32, 48, 64, 96, ... (2^k and 1.5 * 2^k) that is >= n."""
  size = 16
  while True:
    for candidate in (size, size * 3 // 2):
      if candidate >= n:
        return candidate
    size *= 2


def token_batches(rows: Sequence[Sequence[int]], batch_size: int, pad_id: int,
                  max_length: Optional[int] = None, multiple_of: int = 1) -> Iterator[TokenBatch]:
  """Fixed-size, left-padded, length-bucketed batches of variable-length token rows.

  Rows are sorted longest first and each batch is left-padded to a length bucket (16, 24, 32,
  48, 64, 96, ...: at most a third of padding), so a loop compiles one program per bucket; the
  last batch is filled with dummy rows (one real pad token each, so no row attends to nothing).

  Args:
    rows: token id sequences, each non-empty.
    batch_size: B (at most the number of rows is used, so one row never compiles a big batch).
    pad_id: the id written on padding (masked out; any valid id).
    max_length: bucket lengths are capped here (e.g. the room left before the context limit).
    multiple_of: B is rounded up to a multiple of this (the data axis of a device mesh).
  """
  lengths = np.asarray([len(r) for r in rows])
  B = -(-min(batch_size, len(rows)) // multiple_of) * multiple_of
  order = np.argsort(-lengths, kind="stable")
  for start in range(0, len(rows), B):
    idx = order[start:start + B]
    T = bucket_length(int(lengths[idx].max()))
    if max_length is not None:
      T = max(min(T, max_length), int(lengths[idx].max()))
    tokens = np.full((B, T), pad_id, np.int32)
    mask = np.zeros((B, T), np.int32)
    for b, i in enumerate(idx):
      tokens[b, T - lengths[i]:] = rows[i]
      mask[b, T - lengths[i]:] = 1
    mask[len(idx):, -1] = 1  # dummy rows: one real (pad) token, so no row attends to nothing
    yield TokenBatch(np.asarray(idx), tokens, mask)
