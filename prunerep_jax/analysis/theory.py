"""Theory vs measurement: how well the second-order estimates track the exact values.

Theorem 3 (KL(p || p') ~= Var_p(dz) / 2T^2) and Theorem 2 (1 - cos(p, p') ~= Var_r(dz) / 2T^2)
are second-order expansions in dz. Given pairs (real, estimate) gathered over sublayers, prompts
and steps (from a layerwise or drift `Result`), `theorem_check` reports their Pearson correlation
(on the values and on their logarithms), the mean and median ratio estimate / real, and the same
per bin of the size of the change (pairs where both are exactly 0, i.e. sublayers the pruning
left untouched, are left out) (RMS of dz over the vocabulary, in decades), which shows where
the expansion breaks down.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from prunerep_jax.analysis.results import Result

PAIRS = {"kl": ("kl", "kl_estimate"), "one_minus_cos_p": ("one_minus_cos_p", "cos_p_estimate")}
_FLOOR = 1e-12  # below this a float32 value is noise; such pairs are left out of the ratios


def compare(real: np.ndarray, estimate: np.ndarray, size: Optional[np.ndarray] = None) -> dict:
  """Correlation and ratios of estimate vs real over finite pairs; by decade of `size` if given."""
  real, estimate = np.asarray(real, np.float64).ravel(), np.asarray(estimate, np.float64).ravel()
  # Pairs that are both exactly 0 (a sublayer the pruning left untouched) say nothing about the
  # expansion and would only dilute the statistics.
  ok = np.isfinite(real) & np.isfinite(estimate) & ((real != 0) | (estimate != 0))
  out = _stats(real[ok], estimate[ok])
  if size is not None:
    size = np.asarray(size, np.float64).ravel()[ok]
    real, estimate = real[ok], estimate[ok]
    bins = []
    with np.errstate(divide="ignore"):
      decade = np.floor(np.log10(size))
    for d in np.unique(decade[np.isfinite(decade)]):
      sel = decade == d
      bins.append({"rms_dz_from": float(10**d), "rms_dz_to": float(10**(d + 1)),
                   **_stats(real[sel], estimate[sel])})
    out["by_size"] = bins
  return out


def _stats(real: np.ndarray, estimate: np.ndarray) -> dict:
  n = real.size
  out = {"n": int(n), "pearson": None, "pearson_log": None, "ratio_mean": None,
         "ratio_median": None}
  if n >= 2 and real.std() > 0 and estimate.std() > 0:
    out["pearson"] = float(np.corrcoef(real, estimate)[0, 1])
  big = (real > _FLOOR) & (estimate > _FLOOR)
  if big.sum() >= 2:
    lr, le = np.log(real[big]), np.log(estimate[big])
    if lr.std() > 0 and le.std() > 0:
      out["pearson_log"] = float(np.corrcoef(lr, le)[0, 1])
  if big.any():
    ratio = estimate[big] / real[big]
    out["ratio_mean"], out["ratio_median"] = float(ratio.mean()), float(np.median(ratio))
  return out


def theorem_check(result: Result) -> Result:
  """Estimate-vs-real statistics of a layerwise or drift result, per pair and overall.

  For a layerwise result the statistics are also given per sublayer kind (attention, MLP); for a
  drift result per track (free, teacher). Only valid entries (real positions, running steps)
  count.
  """
  groups = _groups(result)
  summary, arrays = [], {}
  for group, (values, valid) in groups.items():
    for name, (real_key, est_key) in PAIRS.items():
      real, est, size = (values[real_key][valid], values[est_key][valid],
                         values["rms_dz"][valid])
      stats = compare(real, est, size)
      by_size = stats.pop("by_size")
      summary.append({"group": group, "quantity": name, **stats})
      for b in by_size:
        summary.append({"group": group, "quantity": f"{name}@rms_dz", **b})
      arrays[f"{group}/{name}/real"] = real.astype(np.float32)
      arrays[f"{group}/{name}/estimate"] = est.astype(np.float32)
      arrays[f"{group}/{name}/rms_dz"] = size.astype(np.float32)
  meta = {"source": result.kind, "source_meta": result.meta}
  return Result("theorem_check", meta, arrays, {"summary": summary})


def _groups(result: Result) -> dict:
  """group name -> ({metric: array}, valid mask of the same shape)."""
  a = result.arrays
  if result.kind == "layerwise":
    valid = np.asarray(a["valid"], bool)
    out = {}
    for s, sub in enumerate(("attn", "mlp")):
      vals = {k: a[k][:, s] for k in ("kl", "kl_estimate", "one_minus_cos_p", "cos_p_estimate",
                                      "rms_dz")}
      out[sub] = (vals, np.broadcast_to(valid, vals["kl"].shape))
    allv = {k: a[k] for k in ("kl", "kl_estimate", "one_minus_cos_p", "cos_p_estimate", "rms_dz")}
    out["all"] = (allv, np.broadcast_to(valid, allv["kl"].shape))
    return out
  if result.kind == "drift":
    out = {}
    for track in ("free", "teacher"):
      if f"{track}/kl" in a:
        vals = {k: a[f"{track}/{k}"] for k in ("kl", "kl_estimate", "one_minus_cos_p",
                                               "cos_p_estimate", "rms_dz")}
        out[track] = (vals, np.asarray(a[f"{track}/valid"], bool))
    return out
  raise ValueError(f"theorem_check(result.kind={result.kind!r}): expected a 'layerwise' or "
                   "'drift' result")
