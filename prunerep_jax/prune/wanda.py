"""Wanda: prune by |W| times the input activation norm, compared within each output.

Score S_jo = |W_jo| * sqrt(mean_t x_j^2) (j an input, o an output; Flax layout [I, O]). Unstructured
Wanda prunes the floor(sparsity * I) lowest scores of every output column; N:M prunes the n lowest
of every m consecutive inputs of each output.

The "variant" (locuslab/wanda `--use_variant`, `return_given_alpha`) replaces the fixed per-output
count by a cumulative threshold: sort each output's scores ascending, and prune the prefix whose
cumulative sum stays within alpha times that output's total score; alpha is one number per matrix,
found by bisection so that the matrix-wide pruned fraction is within 0.001 of the target. Outputs
whose weight is spread evenly lose more entries than outputs dominated by a few large scores.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from prunerep_jax import parallel
from prunerep_jax import validate
from prunerep_jax.prune import allocate
from prunerep_jax.prune import calibrate
from prunerep_jax.prune import linears as lin
from prunerep_jax.prune import patterns
from prunerep_jax.prune.result import PruneResult

# Bisection constants of the reference: start at alpha = 0.4 inside [0, 0.8]; stop when the
# sparsity is within 0.001 of the target or the bracket is narrower than 0.001 (<= 11 steps).
_ALPHA_START = 0.4
_ALPHA_MAX = 0.8
_SPARSITY_TOL = 0.001
_ALPHA_TOL = 0.001


def _check_inputs(w, act_sq_mean, fn: str) -> None:
  w_shape, a_shape = tuple(np.shape(w)), tuple(np.shape(act_sq_mean))
  if len(w_shape) < 2:
    raise ValueError(f"{fn}: w must have shape [..., I, O], got {w_shape}")
  if a_shape != w_shape[:-1]:
    raise ValueError(f"{fn}: act_sq_mean must have shape [..., I] = {w_shape[:-1]} to match w of "
                     f"shape {w_shape}, got {a_shape}")


def wanda_scores(w: jax.Array, act_sq_mean: jax.Array) -> jax.Array:
  """Wanda importance |W| * sqrt(mean_t x_j^2).

  Args:
    w: [..., I, O] weights.
    act_sq_mean: [..., I] mean over calibration tokens of the squared input of each input channel
      (>= 0: a negative entry gives NaN scores).

  Returns:
    [..., I, O] float32 scores.

  Shapes are checked; values are not (no host round trip, so this stays jittable): `wanda`
  refuses non-finite params at its entry and its statistics are sums of squares.
  """
  _check_inputs(w, act_sq_mean, "wanda_scores")
  norm = jnp.sqrt(jnp.asarray(act_sq_mean, jnp.float32))
  return jnp.abs(jnp.asarray(w, jnp.float32)) * norm[..., :, None]


def _pruned_given_alpha(sorted_s, cumsum, total, score, alpha):
  """The reference's `return_given_alpha` on one [I, O] matrix; returns (prune, fraction)."""
  within = cumsum <= (total * alpha)[None, :]
  count = jnp.sum(within, axis=0)
  kth = jnp.take_along_axis(sorted_s, jnp.maximum(count - 1, 0)[None, :], axis=0)[0]
  # An output whose smallest score already exceeds alpha * total prunes nothing (the reference
  # would index position -1 there).
  threshold = jnp.where(count > 0, kth, -jnp.inf)
  prune = score <= threshold[None, :]
  return prune, jnp.mean(prune.astype(jnp.float32))


def _cumulative_threshold_one(score: jax.Array, sparsity: float):
  """Bisection on one [I, O] matrix; returns (keep [I, O], alpha)."""
  sorted_s = jnp.sort(score, axis=0)
  cumsum = jnp.cumsum(sorted_s, axis=0)
  total = jnp.sum(score, axis=0)
  given = lambda alpha: _pruned_given_alpha(sorted_s, cumsum, total, score, alpha)
  target = jnp.float32(sparsity)

  def cond(state):
    _, lo, hi, frac = state
    return (jnp.abs(frac - target) > _SPARSITY_TOL) & (hi - lo >= _ALPHA_TOL)

  def body(state):
    alpha, lo, hi, frac = state
    too_sparse = frac > target
    new_alpha = jnp.where(too_sparse, (alpha + lo) / 2, (alpha + hi) / 2)
    lo = jnp.where(too_sparse, lo, alpha)
    hi = jnp.where(too_sparse, alpha, hi)
    return new_alpha, lo, hi, given(new_alpha)[1]

  alpha0 = jnp.float32(_ALPHA_START)
  state = (alpha0, jnp.float32(0.0), jnp.float32(_ALPHA_MAX), given(alpha0)[1])
  alpha = jax.lax.while_loop(cond, body, state)[0]
  return ~given(alpha)[0], alpha


@functools.partial(jax.jit, static_argnames="sparsity")
def _cumulative_threshold(flat: jax.Array, sparsity: float):
  return jax.vmap(_cumulative_threshold_one, in_axes=(0, None))(flat, sparsity)


def cumulative_threshold_mask(score: jax.Array, sparsity: float) -> tuple[jax.Array, jax.Array]:
  """Wanda's variant: per-output cumulative-sum threshold with alpha found by bisection.

  For each output o, with s the ascending scores of column o and c their cumulative sum, the
  entries with score <= the largest s_i such that c_i <= alpha * sum(s) are pruned (ties pruned).
  alpha (one per matrix) is bisected from 0.4 within [0, 0.8] until the matrix-wide pruned
  fraction is within 0.001 of `sparsity` or the bracket is narrower than 0.001, as in the
  reference; the fraction reached is therefore approximate and capped by alpha <= 0.8.

  Args:
    score: [..., I, O] nonnegative scores (wanda_scores); leading axes are independent matrices.
    sparsity: target pruned fraction per matrix, in [0, 1).

  Returns:
    (mask, alpha): mask [..., I, O] bool, True = keep; alpha [...] float32, the alpha used.
  """
  sparsity = patterns.check_sparsity(sparsity)
  if np.ndim(score) < 2:
    raise ValueError(f"cumulative_threshold_mask: score must have shape [..., I, O], got "
                     f"{tuple(np.shape(score))}")
  score = jnp.asarray(score, jnp.float32)
  if sparsity == 0.0:
    return jnp.ones(score.shape, bool), jnp.zeros(score.shape[:-2], jnp.float32)
  *lead, i, o = score.shape
  flat = jnp.reshape(score, (-1, i, o))
  mask, alpha = _cumulative_threshold(flat, sparsity)
  return jnp.reshape(mask, score.shape), jnp.reshape(alpha, lead)


def wanda_mask(w: jax.Array, act_sq_mean: jax.Array, pattern: patterns.Pattern, *,
               use_variant: bool = False) -> jax.Array:
  """Keep-mask of Wanda pruning.

  Args:
    w: [..., I, O] weights.
    act_sq_mean: [..., I] mean squared input activation per input channel.
    pattern: Unstructured (floor(sparsity * I) lowest per output column, ties by input index) or
      NM (n lowest of every m consecutive inputs of each output).
    use_variant: the cumulative-threshold variant (`cumulative_threshold_mask`); Unstructured only.

  Returns:
    [..., I, O] bool, True = keep.
  """
  score = wanda_scores(w, act_sq_mean)
  if use_variant:
    if not isinstance(pattern, patterns.Unstructured):
      # The reference silently ignores the variant under N:M; we refuse instead.
      raise ValueError(f"wanda_mask: use_variant=True needs an Unstructured pattern, got {pattern}")
    return cumulative_threshold_mask(score, pattern.sparsity)[0]
  return patterns.pattern_mask(score, pattern, per_output=True)


def wanda(params, config, pattern=0.5, *, calibration=None, use_variant: bool = False,
          include=None, allocation=None, batch_size: int = 8, mesh=None, donate: bool = False):
  """Wanda: prune by |W| * sqrt(mean x^2), compared within each output, layer by layer.

  Args:
    params, config: the dense model (not modified unless `donate`).
    pattern: sparsity in [0, 1) (per output row), "n:m", or a patterns value.
    calibration: a `Calibration` (pj.prune.calibration(...)) or int tokens [N, T]; statistics
      are collected sequentially on the already pruned earlier layers.
    use_variant: the cumulative-threshold variant (alpha bisection); unstructured only.
    include: fnmatch patterns over "attn/q_proj"-style names (default: all seven linears).
    allocation: per-layer sparsities for an unstructured target (`prune.allocate`): None (every
      layer at the target), "kl" / allocate.KL(...), "owl" / allocate.OWL(...), or L sparsities
      whose weighted mean is the target; reported in report["allocation"].
    batch_size: calibration samples per batch.
    mesh: None, a ("data", "model") mesh or a spec such as "data:4" (`prunerep_jax.parallel`):
      params are placed on it and the calibration batches split over its data axis (statistics
      summed across it); the pruned params come back placed on the mesh.
    donate: True to give `params`' block weights up for the result (JAX buffer donation):
      the pruned layers are written into their buffers in place, saving one copy of the block
      weights (425 MB for the default model in float32); the given `params["layers"]` arrays are
      deleted (reading them afterwards raises). Default False: `params` is left as it was.
  """

  t0 = time.perf_counter()
  pattern = lin.as_pattern(pattern, "wanda")
  use_variant = validate.boolean("wanda", "use_variant", use_variant)
  if use_variant and not isinstance(pattern, patterns.Unstructured):
    raise validate.fail("wanda", "use_variant", use_variant,
                        f"False with pattern {pattern}: use_variant=True needs an unstructured "
                        "sparsity")
  chosen = lin.select(include, "wanda")
  batch_size = validate.integer("wanda", "batch_size", batch_size, minimum=1)
  donate = validate.boolean("wanda", "donate", donate)
  validate.params("wanda", params, config, finite=True)
  lin.check_nm_divides(pattern, config, chosen, "wanda")
  calib = calibrate.as_calibration(calibration, config, "wanda")
  mesh = parallel.as_mesh("wanda", mesh)
  per_layer, allocated = allocate.resolve(allocation, params, config, pattern, calib, chosen,
                                          batch_size=batch_size, method="wanda")
  alphas = {}

  def prune_layer(l, layer_p, stats, ntokens):
    layer_p = jax.tree_util.tree_map(lambda x: x, layer_p)
    layer_pattern = pattern if per_layer is None else patterns.Unstructured(per_layer[l])
    masks = {}
    for sub, name in chosen:
      w = layer_p[sub][name]["kernel"]
      act = stats[calibrate.GROUP_OF[(sub, name)]] / ntokens
      if use_variant:
        mask, alpha = cumulative_threshold_mask(wanda_scores(w, act), layer_pattern.sparsity)
        alphas[f"layers/{l}/{sub}/{name}"] = float(alpha)
      else:
        mask = wanda_mask(w, act, layer_pattern)
      layer_p[sub][name]["kernel"] = patterns.apply_mask(w, mask)
      masks[(sub, name)] = mask
    return layer_p, masks, {}

  new_params, stacked, _, timings = calibrate.sequential(
      params, config, calib, "sq_sum", prune_layer, batch_size=batch_size, method="wanda",
      mesh=mesh, donate=donate)
  masks = lin.masks_tree(stacked, chosen)
  report = {"method": "wanda", "variant": "cumulative_threshold" if use_variant else "per_output",
            "pattern": str(pattern) if isinstance(pattern, patterns.NM) else pattern.sparsity,
            "include": [f"{s}/{n}" for s, n in chosen], "calibration": calib.info,
            **lin.sparsity_report(masks, chosen),
            "timings": dict(timings, total_s=time.perf_counter() - t0)}
  if use_variant:
    report["alpha"] = alphas
  if allocated is not None:
    report["allocation"] = allocated
  return PruneResult(new_params, masks, report, config)
