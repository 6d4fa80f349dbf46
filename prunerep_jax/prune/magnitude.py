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

import time

import jax
import jax.numpy as jnp
import numpy as np

from prunerep_jax import parallel
from prunerep_jax import validate
from prunerep_jax.prune import linears as lin
from prunerep_jax.prune import patterns
from prunerep_jax.prune.result import PruneResult


def magnitude_mask(w: jax.Array, pattern: patterns.Pattern) -> jax.Array:
  """Keep-mask of magnitude pruning.

  Args:
    w: [..., I, O] weights; leading axes are independent matrices (e.g. the layer axis L).
    pattern: Unstructured (per-matrix threshold, ties pruned) or NM (n lowest |W| of every m
      consecutive inputs of each output, ties broken by input index).

  Returns:
    [..., I, O] bool, True = keep.

  Values are not checked (no host round trip, so this stays jittable); `magnitude` refuses
  non-finite params at its entry.
  """
  if np.ndim(w) < 2:
    raise ValueError(f"magnitude_mask: w must have shape [..., I, O], got {tuple(np.shape(w))}")
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


def magnitude(params, config, pattern=0.5, *, include=None, mesh=None):
  """Magnitude pruning of every selected block linear; needs no calibration.

  Args:
    params, config: the dense model (params are not modified).
    pattern: sparsity in [0, 1) (per-matrix threshold), "n:m", or a patterns value.
    include: fnmatch patterns over "attn/q_proj"-style names (default: all seven linears).
    mesh: None, a ("data", "model") mesh or a spec such as "model:4" (`prunerep_jax.parallel`):
      the params are placed on it (`parallel.shard_params`) and pruned where they lie; the
      result stays placed on the mesh.

  Returns:
    PruneResult; report holds per-matrix / per-layer sparsity and timings.
  """

  t0 = time.perf_counter()
  pattern = lin.as_pattern(pattern, "magnitude")
  chosen = lin.select(include, "magnitude")
  validate.params("magnitude", params, config, finite=True)
  lin.check_nm_divides(pattern, config, chosen, "magnitude")
  mesh = parallel.as_mesh("magnitude", mesh)
  if mesh is not None:
    params = parallel.shard_params(params, config, mesh)
  new_layers = jax.tree_util.tree_map(lambda x: x, params["layers"])
  masks = {"layers": {}}
  for sub, name in chosen:
    w = params["layers"][sub][name]["kernel"]
    mask = magnitude_mask(w, pattern)  # per matrix: the leading L axis is independent
    new_layers[sub][name] = dict(new_layers[sub][name], kernel=patterns.apply_mask(w, mask))
    masks["layers"].setdefault(sub, {})[name] = {"kernel": mask}
  new_params = dict(params, layers=new_layers)
  report = {"method": "magnitude", "pattern": str(pattern) if isinstance(pattern, patterns.NM)
            else pattern.sparsity, "include": [f"{s}/{n}" for s, n in chosen],
            "calibration": None, **lin.sparsity_report(masks, chosen),
            "timings": {"total_s": time.perf_counter() - t0}}
  return PruneResult(new_params, masks, report, config)
