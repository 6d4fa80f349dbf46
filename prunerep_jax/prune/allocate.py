"""Per-layer sparsity for a global target: KL-allocated, OWL, or given per layer.

Wanda and SparseGPT prune every layer to the target ratio unless given an allocation, which
assigns layer l its own unstructured sparsity s_l with the target met in weights:
sum_l n_l s_l = target * sum_l n_l, n_l the weights of layer l's pruned linears (equal for every
layer of a stacked model). All allocations read the dense model and are decided before pruning.

Counts. Wanda prunes floor(s * I) entries of every output column, so a ratio that is not a
multiple of 1/b, b the gcd of the pruned linears' input dims, loses up to one entry per column
to rounding and a free-valued allocation would miss the target by that much. KL and OWL
allocations are therefore snapped to multiples of 1/b (`quantize`: largest remainders, within the
bounds, summing to round(target * b * L) units), so the realised sparsity is the target whenever
target * b * L is an integer (e.g. 0.5 with b = 192 for SmolLM2-135M), where the continuous
allocation would miss it by up to 1/I per matrix.

KL allocation ("kl", `KL(...)`):
  1. dense statistics: mean x^2 of every linear's input, per layer, over the calibration tokens;
  2. sensitivity curves: for every layer l and grid sparsity g in [lo, hi], the mean over
     calibration tokens of the estimated KL (Theorem 3, Var_p(dz) / 2T^2) at the model's output
     when layer l alone is pruned to g with the Wanda mask of the dense statistics (|W| sqrt(x^2),
     lowest per output). Score-based masks need no re-calibration, so a curve costs forwards only:
     per calibration batch one dense pass, then per layer one jitted pass that runs the G pruned
     variants of layer l and the dense layers after it. SparseGPT is allocated on the same curves:
     its selection score w^2 / [H^-1]_jj is, with H's diagonal alone, w^2 H_jj, the square of
     Wanda's score, so the Wanda mask is its diagonal approximation.
  3. allocation (`water_fill`): minimise sum_l c_l(s_l) subject to the target and
     lo <= s_l <= hi, c_l the piecewise-linear interpolation of the lower convex hull of layer l's
     curve. Greedy water-filling takes the hull segments in order of cost per unit of weighted
     sparsity, the last one partially, which is optimal for these convex separable costs and meets
     the target exactly.

OWL ("owl", `OWL(...)`; Yin et al., "Outlier Weighed Layerwise Sparsity", 2024): layer l's outlier
ratio D_l is the fraction of its Wanda scores (its pruned linears together, dense statistics)
above M times their mean. The ratios are min-max normalised to r_l in [0, 2 lambda] and
s_l = target - (r_l - mean r): layers richer in outliers keep more weights; the (weighted) mean
stays the target. lambda = 0.08 and M = 5 as published.

Shape letters: L layers, G grid points, B batch, T positions, I inputs, O outputs, D hidden.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from prunerep_jax import batching, layout, validate
from prunerep_jax import model as M
from prunerep_jax.config import Config
from prunerep_jax.prune import calibrate
from prunerep_jax.prune import kl_score
from prunerep_jax.prune import patterns

# Default KL bounds: the target +- this (clipped to [0, MAX_SPARSITY]); OWL's lambda = 0.08 moves
# layers by up to about as much.
DEFAULT_SPAN = 0.1
MAX_SPARSITY = 0.99
# The allocated ratios average to the target within this (float64 rounding of the greedy fill).
TARGET_TOLERANCE = 1e-9


@dataclasses.dataclass(frozen=True)
class KL:
  """KL allocation (module docstring).

  Attributes:
    bounds: (lo, hi) per-layer sparsity range, 0 <= lo <= target <= hi < 1; None for
      target -+ DEFAULT_SPAN clipped to [0, MAX_SPARSITY].
    points: grid points of each sensitivity curve, evenly spaced on [lo, hi] (>= 2).
    samples: calibration windows used for the curves (the first ones; None: all).
    temperature: T > 0 of the probability space.
  """

  bounds: Optional[tuple[float, float]] = None
  points: int = 5
  samples: Optional[int] = None
  temperature: float = 1.0


@dataclasses.dataclass(frozen=True)
class OWL:
  """Outlier Weighed Layerwise sparsity (module docstring).

  Attributes:
    lam: lambda, half the spread of the normalised outlier ratios (0 < lam < 0.5).
    m: outlier threshold, in multiples of the layer's mean Wanda score (> 0).
  """

  lam: float = 0.08
  m: float = 5.0


Allocation = Union[None, str, KL, OWL, Sequence[float]]
_EXPECTED = ("None, 'kl', 'owl', allocate.KL(...), allocate.OWL(...), or a sequence of L "
             "per-layer sparsities in [0, 1)")


# ------------------------------------------------------------------------------- entry point

def resolve(allocation: Allocation, params, config: Config, pattern: patterns.Pattern,
            calib: calibrate.Calibration, linears, *, batch_size: int,
            method: str) -> tuple[Optional[list[float]], Optional[dict]]:
  """The per-layer sparsities an intra-layer transform prunes with, and their report.

  Called by `wanda` / `sparsegpt` after they validated params (finite), pattern, linears and the
  calibration. The allocation's own arguments are checked here before any heavy work.

  Returns:
    (None, None) for allocation None (every layer at the pattern's sparsity), else
    ([L] Python floats, report dict with "method", "per_layer" and what the choice rests on).
  """
  if allocation is None:
    return None, None
  if isinstance(pattern, patterns.NM):
    raise validate.fail(method, "allocation", allocation,
                        f"None with pattern {pattern}: per-layer sparsities need an unstructured "
                        "target sparsity")
  target = pattern.sparsity
  if isinstance(allocation, str):
    allocation = {"kl": KL(), "owl": OWL()}.get(allocation, allocation)
    if isinstance(allocation, str):
      raise validate.fail(method, "allocation", allocation, _EXPECTED)
  weights = layer_weights(config, linears)
  t0 = time.perf_counter()
  if isinstance(allocation, KL):
    lo, hi, points, samples, temperature = _check_kl(allocation, target, calib, method)
    acts = dense_act_means(params, config, calib, batch_size)
    grid = np.linspace(lo, hi, points)
    tokens = np.asarray(calib.tokens)[:samples]
    costs = sensitivity(params, config, tokens, acts, linears, grid, temperature=temperature,
                        batch_size=batch_size)
    per_layer = quantize(water_fill(grid, costs, weights, target), target,
                         granularity(config, linears), lo, hi, method=method)
    report = {"method": "kl", "bounds": [lo, hi], "grid": grid.tolist(),
              "curves": costs.tolist(), "samples": int(tokens.shape[0]),
              "temperature": temperature,
              "predicted_kl": float(sum(_hull_cost(grid, c, s) for c, s in zip(costs, per_layer))),
              "predicted_kl_uniform": float(sum(_hull_cost(grid, c, target) for c in costs))}
  elif isinstance(allocation, OWL):
    lam = validate.number(method, "allocation.lam", allocation.lam, minimum=0.0, maximum=0.5,
                          min_open=True, max_open=True)
    m = validate.number(method, "allocation.m", allocation.m, minimum=0.0, min_open=True)
    acts = dense_act_means(params, config, calib, batch_size)
    ratios = outlier_ratios(params, acts, linears, m)
    per_layer = quantize(owl_sparsities(ratios, target, lam, weights, method=method), target,
                         granularity(config, linears), 0.0, MAX_SPARSITY, method=method)
    report = {"method": "owl", "lambda": lam, "m": m, "outlier_ratio": ratios.tolist()}
  else:
    per_layer = _check_sequence(allocation, target, weights, method)
    report = {"method": "given"}
  report.update(per_layer=[float(s) for s in per_layer], target=target,
                time_s=time.perf_counter() - t0)
  return [float(s) for s in per_layer], report


def _check_kl(spec: KL, target: float, calib, method: str):
  name = "allocation"
  if spec.bounds is None:
    lo, hi = max(0.0, target - DEFAULT_SPAN), min(MAX_SPARSITY, target + DEFAULT_SPAN)
  else:
    try:
      lo, hi = spec.bounds
    except (TypeError, ValueError):
      raise validate.fail(method, f"{name}.bounds", spec.bounds,
                          "a pair (lo, hi) of per-layer sparsities") from None
    lo = validate.number(method, f"{name}.bounds[0]", lo, minimum=0.0, maximum=1.0,
                         max_open=True)
    hi = validate.number(method, f"{name}.bounds[1]", hi, minimum=0.0, maximum=1.0,
                         max_open=True)
  if not (lo <= target <= hi and lo < hi):
    raise validate.fail(method, f"{name}.bounds", (lo, hi),
                        f"(lo, hi) with lo <= {target} <= hi and lo < hi: per-layer sparsities "
                        f"within the bounds cannot average to the target sparsity {target} "
                        "otherwise")
  points = validate.integer(method, f"{name}.points", spec.points, minimum=2)
  n = np.shape(calib.tokens)[0]
  samples = n if spec.samples is None else validate.integer(
      method, f"{name}.samples", spec.samples, minimum=1, maximum=n,
      expected=f"None or an integer in [1, {n}] (calibration windows for the curves)")
  temperature = validate.temperature(method, spec.temperature, allow_zero=False,
                                     name=f"{name}.temperature")
  return lo, hi, points, samples, temperature


def _check_sequence(allocation, target: float, weights: np.ndarray, method: str) -> np.ndarray:
  L = weights.shape[0]
  try:
    values = list(allocation)
  except TypeError:
    raise validate.fail(method, "allocation", allocation, _EXPECTED) from None
  if len(values) != L:
    raise validate.fail(method, "allocation", allocation,
                        f"{_EXPECTED}; got {len(values)} values for {L} layers")
  s = np.asarray([validate.number(method, f"allocation[{l}]", v, minimum=0.0, maximum=1.0,
                                  max_open=True) for l, v in enumerate(values)])
  mean = float(np.dot(weights / weights.sum(), s))
  if abs(mean - target) > 1e-6:
    raise validate.fail(method, "allocation", allocation,
                        f"per-layer sparsities whose weighted mean is the target {target}; "
                        f"theirs is {mean:.6g}")
  return s


def granularity(config: Config, linears) -> int:
  """b: the gcd of the pruned linears' input dims (per-output counts are exact at multiples of
  1/b)."""
  shapes = layout.param_shapes(config)["layers"]
  return int(np.gcd.reduce([shapes[sub][name]["kernel"][1] for sub, name in linears]))


def quantize(s, target: float, b: int, lo: float = 0.0, hi: float = MAX_SPARSITY, *,
             method: str = "quantize") -> np.ndarray:
  """Per-layer sparsities snapped to multiples of 1/b within [lo, hi], round(target * b * L)
  units in all: each layer gets floor(s_l * b) units, the remainder goes to the largest
  fractional parts (ties: lower layer).

  Each returned ratio r = u / b is nudged up to the smallest float with int(r * I) == u * I / b
  for every multiple I of b up to 2**14 b, so the methods' `int(size * sparsity)` counts land
  exactly (u / b itself may round below, and int() would then lose one entry).

  Raises:
    ArgumentError: no multiple of 1/b lies in [lo, hi] often enough to meet the target.
  """
  s = np.asarray(s, np.float64)
  L = s.shape[0]
  total = int(round(target * b * L))
  lo_u, hi_u = int(np.ceil(lo * b - 1e-9)), int(np.floor(hi * b + 1e-9))
  if not L * lo_u <= total <= L * hi_u:
    raise validate.fail(method, "allocation", (lo, hi),
                        f"bounds holding enough multiples of 1/{b} (the count granularity of "
                        f"the pruned linears) to meet the target {target}")
  units = np.clip(np.floor(s * b + 1e-9), lo_u, hi_u).astype(np.int64)
  frac = s * b - units
  while units.sum() != total:
    step = 1 if units.sum() < total else -1
    room = (units < hi_u) if step > 0 else (units > lo_u)
    order = np.lexsort((np.arange(L), -frac if step > 0 else frac))
    l = next(i for i in order if room[i])
    units[l] += step
    frac[l] -= step
  return np.array([_exact_ratio(int(u), b) for u in units])


def _exact_ratio(units: int, b: int) -> float:
  r = units / b
  probe = b * np.arange(1, 1 << 14, dtype=np.int64)
  while np.any((r * probe).astype(np.int64) < units * (probe // b)):
    r = float(np.nextafter(r, 1.0))
  return r


def layer_weights(config: Config, linears) -> np.ndarray:
  """[L] float64: prunable weights of each layer's selected linears."""
  shapes = layout.param_shapes(config)["layers"]
  n = sum(int(np.prod(shapes[sub][name]["kernel"][1:])) for sub, name in linears)
  return np.full(config.num_layers, float(n))


# --------------------------------------------------------------------------- dense statistics

def dense_act_means(params, config: Config, calib: calibrate.Calibration,
                    batch_size: int) -> dict:
  """Mean x^2 of every linear-input group on the dense model: {group: [L, I]} float32.

  The sequential calibration driver with nothing pruned: each layer's statistics are taken on
  the outputs of the dense layers before it.
  """
  per_layer = []

  def keep(l, layer_p, stats, ntokens):
    per_layer.append(stats)
    return layer_p, {}, {}

  calibrate.sequential(params, config, calib, "sq_sum", keep, batch_size=batch_size,
                       method="allocate")
  return {g: jnp.stack([s[g] for s in per_layer]) / calib.tokens.size for g in per_layer[0]}


def _wanda_scores(w, act):
  # wanda.py imports this module; its score function is read at call time.
  from prunerep_jax.prune.wanda import wanda_scores
  return wanda_scores(w, act)


# --------------------------------------------------------------------------------- KL curves

@functools.partial(jax.jit, static_argnums=(1,))
def _dense_states(params, config, tokens):
  """Block inputs [L, B, T, D] and the last block's output [B, T, D] of the dense model."""
  ctx = M.prompt_context(config, jnp.ones(tokens.shape, bool))
  h = M.embed(params, tokens).astype(M.compute_dtype(params))
  h_last, residual, _ = M.run_layers(params["layers"], config, h, ctx)
  return residual[0::2], h_last


@functools.partial(jax.jit, static_argnums=(1, 6, 7, 9))
def _layer_curve(params, config, layer, h_in, h_final, acts, linears, grid, weight, chunk,
                 temperature):
  """[G] weighted sums over the batch's tokens of the output KL estimate when `layer` (traced)
  alone is pruned to each grid sparsity, from the dense state h_in [B, T, D] entering it."""
  B, T, D = h_in.shape
  G = len(grid)
  dense = jax.tree_util.tree_map(lambda x: x[layer], params["layers"])

  def variant(s):
    p = jax.tree_util.tree_map(lambda x: x, dense)
    for sub, name in linears:
      w = dense[sub][name]["kernel"]
      score = _wanda_scores(w, acts[calibrate.GROUP_OF[(sub, name)]][layer])
      p[sub][name]["kernel"] = patterns.apply_mask(w, patterns.per_output_mask(score, s))
    return p

  variants = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[variant(s) for s in grid])
  ctx = M.prompt_context(config, jnp.ones((B, T), bool))
  h = jax.vmap(lambda p: M.block(p, config, h_in, ctx).h_out)(variants)  # [G, B, T, D]
  ctx_all = M.prompt_context(config, jnp.ones((G * B, T), bool))

  def body(h, xs):
    idx, p = xs
    # Layers up to `layer` are already in h_in or the variants; only later ones run (dense).
    h = jax.lax.cond(idx > layer, lambda h: M.block(p, config, h, ctx_all).h_out, lambda h: h, h)
    return h, None

  idx = jnp.arange(config.num_layers, dtype=jnp.int32)
  h, _ = jax.lax.scan(body, h.reshape(G * B, T, D), (idx, params["layers"]))
  states = jnp.concatenate([h_final[:, :, None], jnp.moveaxis(h.reshape(G, B, T, D), 0, 2)],
                           axis=2)  # [B, T, 1 + G, D]: the dense output first
  pruned_pos = jnp.arange(1, G + 1, dtype=jnp.int32)
  return kl_score.lens_pair_sums(params, config, states, weight, jnp.zeros_like(pruned_pos),
                                 pruned_pos, "kl", temperature, chunk)


def sensitivity(params, config: Config, tokens, acts: dict, linears, grid, *,
                temperature: float = 1.0, batch_size: int = 4) -> np.ndarray:
  """Per-layer sensitivity curves: [L, G] mean estimated output KL with layer l alone pruned.

  Args:
    params, config: the dense model (validated by the caller).
    tokens: int32 [N, T] calibration windows.
    acts: {group: [L, I]} mean x^2 of the dense model's linear inputs (`dense_act_means`).
    linears: the (sublayer, name) linears pruned.
    grid: [G] sparsities in [0, 1).
    temperature: T > 0.
    batch_size: windows per jitted pass.
  """
  tokens = np.asarray(tokens)
  N, T = tokens.shape
  grid = tuple(float(g) for g in grid)
  linears = tuple(tuple(x) for x in linears)
  B = batching.batch_size_for(N, batch_size)
  chunk = batching.chunk_size(B * (len(grid) + 1), T, config.vocab_size)
  temp = jnp.float32(temperature)
  sums = np.zeros((config.num_layers, len(grid)))
  for b in batching.batches(N, batch_size):
    block_inputs, h_final = _dense_states(params, config, jnp.asarray(tokens[b.rows]))
    weight = jnp.asarray(b.weight)
    for l in range(config.num_layers):
      sums[l] += np.asarray(_layer_curve(params, config, jnp.int32(l), block_inputs[l], h_final,
                                         acts, linears, grid, weight, chunk, temp))
  return sums / tokens.size


# ------------------------------------------------------------------------------- allocation

def _lower_hull(x: np.ndarray, y: np.ndarray) -> list[int]:
  """Indices of the lower convex hull of the points (x, y), x strictly increasing."""
  hull: list[int] = []
  for i in range(len(x)):
    while len(hull) >= 2:
      a, b = hull[-2], hull[-1]
      # b lies on or above the chord a -> i: it cannot be on the lower hull
      if (y[b] - y[a]) * (x[i] - x[a]) >= (y[i] - y[a]) * (x[b] - x[a]):
        hull.pop()
      else:
        break
    hull.append(i)
  return hull


def _hull_cost(grid: np.ndarray, costs: np.ndarray, s: float) -> float:
  """The lower convex hull of (grid, costs), interpolated at s."""
  hull = _lower_hull(grid, costs)
  return float(np.interp(s, grid[hull], costs[hull]))


def water_fill(grid, costs, weights, target: float) -> np.ndarray:
  """Per-layer sparsities minimising the summed cost, meeting the target exactly.

  Args:
    grid: [G] strictly increasing sparsities; grid[0] and grid[-1] are the per-layer bounds.
    costs: [L, G] cost of layer l at each grid sparsity (any shape of curve: its lower convex
      hull is used).
    weights: [L] positive prunable weights per layer.
    target: the global sparsity, grid[0] <= target <= grid[-1].

  Returns:
    [L] float64 sparsities in [grid[0], grid[-1]] with sum(w s) / sum(w) == target (to float64
    rounding, checked within TARGET_TOLERANCE).

  Raises:
    ValueError: the bounds cannot meet the target, or malformed inputs.
  """
  grid, costs = np.asarray(grid, np.float64), np.asarray(costs, np.float64)
  w = np.asarray(weights, np.float64)
  if grid.ndim != 1 or grid.size < 2 or not np.all(np.diff(grid) > 0):
    raise ValueError(f"water_fill: grid must be [G >= 2] strictly increasing, got {grid}")
  if costs.shape != (w.shape[0], grid.size) or not np.all(w > 0):
    raise ValueError(f"water_fill: costs must be [L, G] = [{w.shape[0]}, {grid.size}] and "
                     f"weights [L] positive; got costs {costs.shape}, weights {w}")
  lo, hi = grid[0], grid[-1]
  if not lo <= target <= hi:
    raise ValueError(f"water_fill(target={target}): expected a target within the per-layer "
                     f"bounds [{lo}, {hi}]")
  w = w / w.sum()
  s = np.full(w.shape, lo)
  budget = target - lo
  segments = []
  for l, c in enumerate(costs):
    hull = _lower_hull(grid, c)
    for j, (a, b) in enumerate(zip(hull[:-1], hull[1:])):
      # cost per unit of global sparsity; the hull's slopes rise, so a layer's segments come in
      # order (ties by segment index)
      slope = (c[b] - c[a]) / ((grid[b] - grid[a]) * w[l])
      segments.append((slope, l, j, grid[b] - grid[a]))
  for _, l, _, width in sorted(segments):
    if budget <= 0:
      break
    take = min(width, budget / w[l])
    s[l] += take
    budget -= take * w[l]
  s = np.clip(s, lo, hi)
  assert abs(float(np.dot(w, s)) - target) <= TARGET_TOLERANCE, (np.dot(w, s), target)
  return s


# ------------------------------------------------------------------------------------- OWL

@functools.partial(jax.jit, static_argnums=(2,))
def _outliers(layers, acts, linears, m):
  """[L] fraction of each layer's Wanda scores above m times the layer's mean score."""
  scores = [_wanda_scores(layers[sub][name]["kernel"], acts[calibrate.GROUP_OF[(sub, name)]])
            for sub, name in linears]  # each [L, I, O]
  total = sum(s[0].size for s in scores)
  mean = sum(jnp.sum(s, axis=(1, 2)) for s in scores) / total
  count = sum(jnp.sum(s > m * mean[:, None, None], axis=(1, 2)) for s in scores)
  return count / total


def outlier_ratios(params, acts: dict, linears, m: float = 5.0) -> np.ndarray:
  """OWL's layerwise outlier ratio D_l [L] from the dense statistics (`dense_act_means`)."""
  linears = tuple(tuple(x) for x in linears)
  return np.asarray(_outliers(params["layers"], acts, linears, jnp.float32(m)), np.float64)


def owl_sparsities(ratios, target: float, lam: float = 0.08, weights=None, *,
                   method: str = "owl_sparsities") -> np.ndarray:
  """OWL's per-layer sparsities: target - (r_l - mean r), r the ratios min-max scaled to
  [0, 2 lam]; the mean (weighted by `weights`, default equal) is the target exactly.

  Raises:
    ArgumentError: a layer's sparsity falls outside [0, 1) (lam too large for the target).
  """
  d = np.asarray(ratios, np.float64)
  w = np.ones_like(d) if weights is None else np.asarray(weights, np.float64)
  w = w / w.sum()
  span = d.max() - d.min()
  r = np.zeros_like(d) if span == 0 else (d - d.min()) / span * 2.0 * lam
  s = target - (r - np.dot(w, r))
  if s.min() < 0 or s.max() >= 1:
    raise validate.fail(method, "allocation", OWL(lam=lam),
                        f"a lambda that keeps every layer's sparsity in [0, 1) around the target "
                        f"{target}; it gives [{s.min():.4g}, {s.max():.4g}]")
  return s
