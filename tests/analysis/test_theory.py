"""theorem_check / compare: statistics on synthetic pairs with known answers, and the second-order
estimates tracking the exact values on real analysis results with small perturbations."""

import numpy as np
import pytest

import prunerep_jax as pj
from prunerep_jax.analysis import theory


def orthonormal_pair(n, seed=0):
  """Two zero-mean, unit-norm, mutually orthogonal vectors [n]."""
  r = np.random.default_rng(seed).standard_normal((n, 2))
  r -= r.mean(0)
  q, _ = np.linalg.qr(r)
  return q[:, 0], q[:, 1]


def test_compare_recovers_a_known_correlation():
  x, y = orthonormal_pair(200)
  c = 0.8
  real = 10.0 + x
  estimate = 10.0 + c * x + np.sqrt(1 - c * c) * y  # Pearson correlation exactly c
  s = theory.compare(real, estimate)
  assert s["n"] == 200
  assert s["pearson"] == pytest.approx(c, abs=1e-12)
  np.testing.assert_allclose(s["ratio_mean"], np.mean(estimate / real), rtol=1e-12)
  np.testing.assert_allclose(s["ratio_median"], np.median(estimate / real), rtol=1e-12)


def test_compare_of_a_constant_ratio():
  real = np.exp(np.random.default_rng(1).standard_normal(50))
  s = theory.compare(real, 1.25 * real)
  assert s["ratio_mean"] == pytest.approx(1.25) and s["ratio_median"] == pytest.approx(1.25)
  assert s["pearson"] == pytest.approx(1.0) and s["pearson_log"] == pytest.approx(1.0)


def test_compare_drops_non_finite_pairs_and_keeps_tiny_values_out_of_the_ratios():
  real = np.array([1.0, 2.0, np.nan, 4.0, 1e-14, np.inf])
  estimate = np.array([2.0, 4.0, 1.0, 8.0, 1e-10, 1.0])
  s = theory.compare(real, estimate)
  assert s["n"] == 4  # the NaN and inf pairs are gone
  assert s["ratio_mean"] == 2.0  # 1e-14 is below the float32 noise floor: not a ratio
  np.testing.assert_allclose(s["pearson"], np.corrcoef(real[[0, 1, 3, 4]],
                                                       estimate[[0, 1, 3, 4]])[0, 1])


def test_compare_bins_by_decade_of_the_change():
  real = np.array([1.0, 1.0, 2.0, 3.0, 5.0, 7.0])
  estimate = real * np.array([1.0, 1.0, 1.0, 1.1, 1.5, 1.5])
  size = np.array([0.02, 0.05, 0.5, 0.9, 3.0, 0.0])  # the last has no decade
  bins = theory.compare(real, estimate, size)["by_size"]
  assert [(b["rms_dz_from"], b["rms_dz_to"], b["n"]) for b in bins] == [
      (0.01, 0.1, 2), (0.1, 1.0, 2), (1.0, 10.0, 1)]
  assert bins[0]["ratio_mean"] == 1.0 and bins[2]["ratio_mean"] == 1.5
  assert bins[1]["ratio_mean"] == pytest.approx(1.05)


def check_estimates_track_the_real_values(result, groups):
  rows = {(r["group"], r["quantity"]): r for r in result.table()}
  for group in groups:
    for quantity in ("kl", "one_minus_cos_p"):
      r = rows[(group, quantity)]
      assert r["pearson"] > 0.99, (group, quantity, r)
      assert abs(r["ratio_mean"] - 1) < 0.05, (group, quantity, r)
      assert abs(r["ratio_median"] - 1) < 0.05, (group, quantity, r)
      bins = [b for b in result.table()
              if b["group"] == group and b["quantity"] == f"{quantity}@rms_dz"]
      assert sum(b["n"] for b in bins) == r["n"]
  assert result.kind == "theorem_check"


def test_theorem_check_of_a_layerwise_result(params, cfg, tokens):
  pruned = pj.prune.magnitude(params, cfg, 0.1)
  lw = pj.analysis.layerwise(params, cfg, tokens, pruned)
  check = pj.analysis.theorem_check(lw)
  check_estimates_track_the_real_values(check, ("attn", "mlp", "all"))
  n = {r["group"]: r["n"] for r in check.table() if r["quantity"] == "kl"}
  L, (B, T) = cfg.num_layers, tokens.shape
  assert n == {"attn": L * B * T, "mlp": L * B * T, "all": 2 * L * B * T}
  np.testing.assert_array_equal(check.arrays["all/kl/real"],
                                lw.arrays["kl"][np.broadcast_to(lw.arrays["valid"],
                                                                lw.arrays["kl"].shape)])
  assert check.meta["source"] == "layerwise"


def test_theorem_check_of_a_drift_result(params, cfg, tokens, eos):
  # Every layer pruned at once, read at T_a = 0.7 (dz / T grows), moves p more than one
  # sublayer does: sparsity 0.02 keeps the change in the second-order regime. (The settings are
  # test_drift's main run, so the scan compiles once per session.)
  pruned = pj.prune.magnitude(params, cfg, 0.02).params
  dr = pj.analysis.drift(params, pruned, cfg, tokens, 6, eos_token_ids=(eos,), temperature=1.5,
                         seed=3, analysis_temperature=0.7)
  check = pj.analysis.theorem_check(dr)
  check_estimates_track_the_real_values(check, ("free", "teacher"))
  valid = dr.arrays["teacher/valid"]
  np.testing.assert_array_equal(check.arrays["teacher/kl/estimate"],
                                dr.arrays["teacher/kl_estimate"][valid])


def test_theorem_check_refuses_other_results():
  with pytest.raises(ValueError, match=r"theorem_check\(result.kind='option_subspace'\): "
                                       r"expected a 'layerwise' or 'drift' result"):
    pj.analysis.theorem_check(pj.analysis.Result("option_subspace", {}, {}, {}))
