"""Sparsity patterns and the masks that realise them on a score matrix.

A pattern is a tiny immutable value (`Unstructured(0.5)`, `NM(2, 4)`); a mask function turns a
score matrix into a boolean keep-mask (True = keep). Every pruning method shares these: magnitude,
Wanda and SparseGPT differ only in the score they feed in.

Orientation. Scores and weights are in Flax layout, [..., I, O] (inputs, outputs). The papers write
weights as torch [out, in]: one of their "output rows" is a column here, and "M consecutive inputs
of a row" are M consecutive entries along the I axis of one column.

Ties are broken by position (the entry earlier along the flattened axis is pruned first), so a mask
prunes exactly the requested count; magnitude pruning's "ties pruned" rule lives in magnitude.py.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Unstructured:
  """Prune a fraction `sparsity` of the weights, wherever they are.

  Attributes:
    sparsity: fraction pruned, 0 <= sparsity < 1; the count is floor(sparsity * size) of
      whatever group a method compares within (a matrix, an output column, a block).
  """

  sparsity: float

  def __post_init__(self):
    check_sparsity(self.sparsity)


@dataclasses.dataclass(frozen=True)
class NM:
  """Prune the n lowest of every m consecutive inputs of each output ("2:4" prunes half).

  Attributes:
    n: how many of each group of m are pruned, 0 < n < m.
    m: group length along the input axis; the input dim must be divisible by it.
  """

  n: int
  m: int

  def __post_init__(self):
    for name, value in (("n", self.n), ("m", self.m)):
      if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"NM: {name} must be an int, got {value!r}")
    if not 0 < self.n < self.m:
      raise ValueError(f"NM: expected 0 < n < m, got n={self.n}, m={self.m}")

  @property
  def sparsity(self) -> float:
    return self.n / self.m

  def __str__(self) -> str:
    return f"{self.n}:{self.m}"


Pattern = Union[Unstructured, NM]


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
  """Returns `sparsity` as a float; raises ValueError unless it is a number in [0, 1)."""
  if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
    raise ValueError(f"{name} must be a number in [0, 1), got {sparsity!r}")
  # Written so that NaN fails too.
  if not 0.0 <= float(sparsity) < 1.0:
    raise ValueError(f"{name} must be in [0, 1), got {sparsity!r}")
  return float(sparsity)


def parse_pattern(text: str) -> Pattern:
  """Parses "2:4" into NM(2, 4) and "0.5" into Unstructured(0.5).

  Raises:
    ValueError: naming `text` when it is neither form, or when the values are out of range.
  """
  if not isinstance(text, str):
    raise ValueError(f"parse_pattern: text must be a str like '2:4' or '0.5', got {text!r}")
  s = text.strip()
  if ":" in s:
    parts = s.split(":")
    try:
      n, m = (int(p) for p in parts)
    except ValueError:
      raise ValueError(f"parse_pattern: text {text!r} is not of the form 'n:m' with integer "
                       "n and m") from None
    return NM(n, m)
  try:
    sparsity = float(s)
  except ValueError:
    raise ValueError(f"parse_pattern: text {text!r} is neither 'n:m' nor a sparsity "
                     "like '0.5'") from None
  return Unstructured(sparsity)


def _check_matrix(score, fn: str) -> None:
  if np.ndim(score) < 2:
    raise ValueError(f"{fn}: score must have shape [..., I, O], got shape {tuple(np.shape(score))}")


def prune_count(size: int, sparsity: float) -> int:
  """floor(sparsity * size), computed as the reference code does (`int(size * sparsity)`)."""
  return int(size * sparsity)


def _order_keys(score: jax.Array) -> jax.Array:
  """uint32 keys [...] ordered as the float32 scores (-0.0 equal to +0.0; scores must not be
  NaN): the sign bit flips the order of negative floats, and positive ones sort above them."""
  x = jnp.asarray(score, jnp.float32)
  bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, jnp.float32(0), x), jnp.uint32)
  return jnp.where((bits >> 31) == 1, ~bits, bits | jnp.uint32(0x80000000))


def _kth_smallest_key(keys: jax.Array, k, axis: int) -> jax.Array:
  """The k-th smallest (1-based; k may be traced) of uint32 keys along `axis`, keepdims.

  Bisection on the key bits: 32 passes of compare-and-count, each a reduction along `axis`. On
  XLA:CPU this is 10-100x faster than a sort (a [576, 1536] matrix per column: 8 ms against the
  two stable argsorts' 200 ms), and exact.
  """
  shape = list(keys.shape)
  shape[axis] = 1

  def halve(_, bounds):  # invariant: lo <= answer <= hi
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(keys <= mid, axis=axis, keepdims=True, dtype=jnp.int32) >= k
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  lo = jnp.zeros(shape, jnp.uint32)
  hi = jnp.full(shape, 0xFFFFFFFF, jnp.uint32)
  return jax.lax.fori_loop(0, 32, halve, (lo, hi))[0]


def kth_smallest(score: jax.Array, k, axis: int = -1) -> jax.Array:
  """The k-th smallest float32 score (1-based, 1 <= k <= size; k may be traced) along `axis`,
  keepdims; exact, without sorting (see `_kth_smallest_key`). Scores must not be NaN."""
  key = _kth_smallest_key(_order_keys(score), k, axis)
  bits = jnp.where((key >> 31) == 1, key & jnp.uint32(0x7FFFFFFF), ~key)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _keep_lowest_pruned(score: jax.Array, k: int, axis: int) -> jax.Array:
  """True except at the k lowest entries along `axis`; ties pruned in index order.

  The same mask as ranking by a stable argsort (rank < k pruned), computed from the k-th
  smallest value: everything below it is pruned, and of the entries equal to it, the first
  k - (number below) along `axis`.
  """
  keys = _order_keys(score)
  kth = _kth_smallest_key(keys, k, axis)
  below = keys < kth
  tie = keys == kth
  room = k - jnp.sum(below, axis=axis, keepdims=True, dtype=jnp.int32)
  return ~(below | (tie & (jnp.cumsum(tie, axis=axis, dtype=jnp.int32) <= room)))


def unstructured_mask(score: jax.Array, sparsity: float) -> jax.Array:
  """Keep-mask pruning the k = floor(sparsity * I * O) lowest scores of each matrix.

  Args:
    score: [..., I, O] importance; leading axes are independent matrices.
    sparsity: fraction pruned per matrix, in [0, 1).

  Returns:
    [..., I, O] bool, True = keep; exactly k False per matrix (ties broken by flat position).
  """
  sparsity = check_sparsity(sparsity)
  _check_matrix(score, "unstructured_mask")
  *lead, i, o = score.shape
  k = prune_count(i * o, sparsity)
  if k == 0:
    return jnp.ones(score.shape, bool)
  flat = jnp.reshape(score, (*lead, i * o))
  return jnp.reshape(_keep_lowest_pruned(flat, k, axis=-1), score.shape)


def per_output_mask(score: jax.Array, sparsity: float) -> jax.Array:
  """Keep-mask pruning the floor(sparsity * I) lowest scores of each output column (Wanda).

  Args:
    score: [..., I, O] importance.
    sparsity: fraction pruned per output, in [0, 1).

  Returns:
    [..., I, O] bool, True = keep; exactly floor(sparsity * I) False per column, ties broken by
    input index (the reference's stable sort).
  """
  sparsity = check_sparsity(sparsity)
  _check_matrix(score, "per_output_mask")
  k = prune_count(score.shape[-2], sparsity)
  if k == 0:
    return jnp.ones(score.shape, bool)
  return _keep_lowest_pruned(score, k, axis=-2)


def nm_mask(score: jax.Array, n: int, m: int) -> jax.Array:
  """Keep-mask pruning the n lowest of every m consecutive inputs of each output column.

  Args:
    score: [..., I, O] importance; I must be divisible by m.
    n: pruned per group.
    m: group length along I.

  Returns:
    [..., I, O] bool, True = keep; exactly n False in every group, ties broken by input index.
  """
  NM(n, m)  # validates n and m
  _check_matrix(score, "nm_mask")
  *lead, i, o = score.shape
  if i % m:
    raise ValueError(f"nm_mask: input dim I={i} of score shape {tuple(score.shape)} is not "
                     f"divisible by m={m}")
  groups = jnp.reshape(score, (*lead, i // m, m, o))
  return jnp.reshape(_keep_lowest_pruned(groups, n, axis=-2), score.shape)


def pattern_mask(score: jax.Array, pattern: Pattern, *, per_output: bool) -> jax.Array:
  """The keep-mask of `pattern` on `score`; unstructured compares per output or per matrix.

  Args:
    score: [..., I, O] importance.
    pattern: Unstructured or NM.
    per_output: for Unstructured, whether the count is per output column (Wanda) or per matrix.

  Returns:
    [..., I, O] bool, True = keep.
  """
  if isinstance(pattern, NM):
    return nm_mask(score, pattern.n, pattern.m)
  if isinstance(pattern, Unstructured):
    if per_output:
      return per_output_mask(score, pattern.sparsity)
    return unstructured_mask(score, pattern.sparsity)
  raise ValueError(f"pattern must be Unstructured or NM, got {pattern!r}")


def apply_mask(w: jax.Array, mask: jax.Array) -> jax.Array:
  """Zeroes the pruned entries; kept entries come back bit for bit.

  Args:
    w: [..., I, O] weights.
    mask: [..., I, O] bool, True = keep.
  """
  if tuple(np.shape(mask)) != tuple(np.shape(w)):
    raise ValueError(f"apply_mask: mask shape {tuple(np.shape(mask))} does not match weight "
                     f"shape {tuple(np.shape(w))}")
  return jnp.where(mask, w, jnp.zeros((), w.dtype))
