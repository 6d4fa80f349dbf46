"""Magnitude pruning: the score is |W|, compared across the whole matrix (or within N:M groups).

Unstructured rule (PAPER.md): with k = floor(sparsity * I * O), prune every weight with
|W| <= the k-th smallest |W| of its matrix. Ties at the threshold are all pruned, so when several
weights share the k-th smallest magnitude (exact zeros, duplicated values) more than k are pruned;
without ties exactly k are.

The reference code (locuslab/wanda, prune_magnitude) thresholds at sorted[k] (0-based), the
(k+1)-th smallest, so it prunes one weight more than asked, and one weight even at sparsity 0. We
follow the paper's statement, which gives the exact count and leaves sparsity 0 dense.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from prunerep_jax.prune import patterns


def magnitude_mask(w: jax.Array, pattern: patterns.Pattern) -> jax.Array:
  """Keep-mask of magnitude pruning.

  Args:
    w: [..., I, O] weights; leading axes are independent matrices (e.g. the layer axis L).
    pattern: Unstructured (per-matrix threshold, ties pruned) or NM (n lowest |W| of every m
      consecutive inputs of each output, ties broken by input index).

  Returns:
    [..., I, O] bool, True = keep.
  """
  if np.ndim(w) < 2:
    raise ValueError(f"magnitude_mask: w must have shape [..., I, O], got {tuple(np.shape(w))}")
  patterns.check_finite("magnitude_mask: w", w)
  score = jnp.abs(w)
  if isinstance(pattern, patterns.NM):
    return patterns.nm_mask(score, pattern.n, pattern.m)
  if not isinstance(pattern, patterns.Unstructured):
    raise ValueError(f"magnitude_mask: pattern must be Unstructured or NM, got {pattern!r}")
  *lead, i, o = score.shape
  k = patterns.prune_count(i * o, pattern.sparsity)
  if k == 0:
    return jnp.ones(score.shape, bool)
  flat = jnp.reshape(score, (*lead, i * o))
  threshold = jnp.sort(flat, axis=-1)[..., k - 1]  # the k-th smallest of each matrix
  return score > threshold[..., None, None]
