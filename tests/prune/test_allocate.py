"""Per-layer sparsity allocation: water-filling against brute force, snapping to exact counts, OWL
against its published formula, the fused sensitivity curves against one run per point, and the
Wanda / SparseGPT options (uniform vs OWL vs KL at equal compression)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prunerep_jax as pj
from prunerep_jax import metrics
from prunerep_jax.prune import allocate, calibrate, linears as lin, patterns
from prunerep_jax.prune.wanda import wanda_mask
from prunerep_jax.validate import ArgumentError

CFG = pj.Config(family="llama", vocab_size=97, hidden_size=32, intermediate_size=64,
                num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8)
L = CFG.num_layers
TOKENS = np.random.RandomState(0).randint(0, 97, (6, 16)).astype(np.int32)
LINEARS = lin.select(None)


@pytest.fixture(scope="module")
def params():
  """Random params with planted outliers: in layer 1, the first three input rows of q_proj and
  gate_proj are 40x larger, as trained LLMs' outlier features are."""
  p = pj.init_params(CFG, jax.random.key(3))
  layers = jax.tree_util.tree_map(lambda x: x, p["layers"])
  for sub, name in (("attn", "q_proj"), ("mlp", "gate_proj")):
    w = layers[sub][name]["kernel"]
    layers[sub][name]["kernel"] = w.at[1, :3, :].multiply(40.0)
  return dict(p, layers=layers)


@pytest.fixture(scope="module")
def acts(params):
  return allocate.dense_act_means(params, CFG, pj.prune.Calibration(TOKENS, {}), 4)


@pytest.fixture(scope="module")
def kl_result(params):
  return pj.prune.wanda(params, CFG, 0.5, calibration=TOKENS, allocation="kl", batch_size=3)


# ------------------------------------------------------------------------- water filling

def test_water_fill_meets_the_target_exactly_and_matches_brute_force():
  rng = np.random.default_rng(0)
  grid = np.linspace(0.3, 0.7, 5)
  # convex increasing curves with different curvature per layer
  costs = np.stack([a * (grid - 0.3) ** 2 + b * grid for a, b in rng.uniform(0.1, 3.0, (3, 2))])
  target = 0.5
  s = allocate.water_fill(grid, costs, np.ones(3), target)
  assert abs(s.mean() - target) < 1e-12
  assert np.all(s >= 0.3) and np.all(s <= 0.7)
  fine = np.linspace(0.3, 0.7, 401)
  cost = lambda l, x: np.interp(x, grid, costs[l])
  best = min(cost(0, a) + cost(1, b) + cost(2, 3 * target - a - b)
             for a, b in itertools.product(fine, fine) if 0.3 <= 3 * target - a - b <= 0.7)
  assert sum(cost(l, x) for l, x in enumerate(s)) <= best + 1e-9


def test_water_fill_uses_the_lower_hull_of_a_nonconvex_curve():
  grid = np.array([0.0, 0.25, 0.5, 0.75])
  flat = np.array([0.0, 1.0, 1.0, 1.0])  # concave: the hull is the chord 0 -> 0.75
  steep = np.array([0.0, 0.1, 5.0, 9.0])
  s = allocate.water_fill(grid, np.stack([flat, steep]), np.ones(2), 0.5)
  np.testing.assert_allclose(s, [0.75, 0.25])


def test_water_fill_refuses_a_target_outside_the_bounds():
  with pytest.raises(ValueError, match=r"water_fill\(target=0.5\): expected a target within "
                     r"the per-layer bounds \[0.6, 0.8\]"):
    allocate.water_fill([0.6, 0.8], np.zeros((2, 2)), np.ones(2), 0.5)


def test_quantize_snaps_to_exact_counts_within_bounds():
  s = allocate.quantize([0.41, 0.52, 0.57], 0.5, 32, 0.4, 0.6)
  units = s * 32
  np.testing.assert_allclose(units, np.round(units), atol=1e-9)
  assert int(np.round(units).sum()) == 48 and np.all(s >= 0.4) and np.all(s <= 0.6)
  for r in s:  # the count a method computes, int(size * sparsity), is exact
    assert int(r * 32) == round(r * 32) and int(r * 64) == round(r * 64)
  with pytest.raises(ArgumentError, match=r"multiples of 1/32"):
    allocate.quantize([0.5, 0.5, 0.5], 0.5, 32, 0.51, 0.52)


# ----------------------------------------------------------------------------------- OWL

def test_outlier_ratios_match_a_numpy_reference(params, acts):
  ratios = allocate.outlier_ratios(params, acts, LINEARS, 5.0)
  for l in range(L):
    scores = np.concatenate([
        (np.abs(np.asarray(params["layers"][s][n]["kernel"][l], np.float64))
         * np.sqrt(np.asarray(acts[calibrate.GROUP_OF[(s, n)]][l], np.float64))[:, None]).ravel()
        for s, n in LINEARS])
    assert ratios[l] == pytest.approx(np.mean(scores > 5.0 * scores.mean()), abs=1e-6)
  assert ratios[1] > ratios[0] and ratios[1] > ratios[2]


def test_owl_sparsities_keep_the_mean_and_spread_two_lambda():
  ratios = np.array([0.01, 0.05, 0.02, 0.03])
  s = allocate.owl_sparsities(ratios, 0.6, 0.08)
  assert s.mean() == pytest.approx(0.6, abs=1e-15)
  assert s.max() - s.min() == pytest.approx(0.16, abs=1e-15)
  assert list(np.argsort(s)) == list(np.argsort(-ratios))  # more outliers, lower sparsity
  np.testing.assert_allclose(allocate.owl_sparsities(np.full(3, 0.02), 0.5), 0.5)
  with pytest.raises(ArgumentError, match=r"owl_sparsities\(allocation=OWL\(lam=0.08, m=5.0\)\): "
                     r"expected a lambda that keeps every layer's sparsity in \[0, 1\)"):
    allocate.owl_sparsities(ratios, 0.05, 0.08)


def test_wanda_owl_prunes_outlier_layers_less_at_the_same_sparsity(params):
  result = pj.prune.wanda(params, CFG, 0.5, calibration=TOKENS, allocation="owl")
  alloc = result.report["allocation"]
  assert alloc["method"] == "owl" and result.report["sparsity"] == 0.5
  per_layer = np.asarray(alloc["per_layer"])
  assert per_layer.mean() == 0.5 and np.argmin(per_layer) == 1
  np.testing.assert_allclose(result.report["per_layer_sparsity"], per_layer, atol=1e-12)


# ----------------------------------------------------------------------------------- KL

def test_sensitivity_curves_equal_one_run_per_pruned_layer(params, acts):
  grid = (0.25, 0.75)
  curves = allocate.sensitivity(params, CFG, TOKENS, acts, LINEARS, grid, batch_size=4)
  dense = pj.forward(params, CFG, TOKENS, capture=False).logits
  for l in range(L):
    for g, s in enumerate(grid):
      layers = jax.tree_util.tree_map(lambda x: x, params["layers"])
      for sub, name in LINEARS:
        w = layers[sub][name]["kernel"]
        mask = wanda_mask(w[l], acts[calibrate.GROUP_OF[(sub, name)]][l],
                          patterns.Unstructured(s))
        layers[sub][name]["kernel"] = w.at[l].set(jnp.where(mask, w[l], 0.0))
      pruned = pj.forward(dict(params, layers=layers), CFG, TOKENS, capture=False).logits
      ref = float(jnp.mean(metrics.kl_estimate(dense, pruned)))
      assert curves[l, g] == pytest.approx(ref, rel=1e-4)


def test_kl_allocation_meets_the_target_within_bounds_and_beats_uniform(kl_result):
  alloc = kl_result.report["allocation"]
  assert alloc["method"] == "kl" and alloc["bounds"] == pytest.approx([0.4, 0.6])
  per_layer = np.asarray(alloc["per_layer"])
  assert per_layer.mean() == 0.5 and np.all(per_layer >= 0.4) and np.all(per_layer <= 0.6)
  assert not np.all(per_layer == 0.5)
  assert kl_result.report["sparsity"] == 0.5  # realised, counted from the masks
  np.testing.assert_allclose(kl_result.report["per_layer_sparsity"], per_layer, atol=1e-12)
  assert alloc["predicted_kl"] <= alloc["predicted_kl_uniform"]
  assert np.asarray(alloc["curves"]).shape == (L, 5)


def test_uniform_owl_and_kl_prune_the_same_number_of_weights(params, kl_result):
  uniform = pj.prune.wanda(params, CFG, 0.5, calibration=TOKENS)
  owl = pj.prune.wanda(params, CFG, 0.5, calibration=TOKENS, allocation="owl")
  counts = {r.report["pruned_weights"] for r in (uniform, owl, kl_result)}
  assert len(counts) == 1 and "allocation" not in uniform.report


def test_sparsegpt_takes_a_given_per_layer_allocation(params):
  result = pj.prune.sparsegpt(params, CFG, 0.5, calibration=TOKENS,
                              allocation=[0.375, 0.5, 0.625], include=("mlp/*",))
  np.testing.assert_allclose(result.report["per_layer_sparsity"], [0.375, 0.5, 0.625])
  assert result.report["allocation"] == {"method": "given", "per_layer": [0.375, 0.5, 0.625],
                                         "target": 0.5,
                                         "time_s": result.report["allocation"]["time_s"]}


@pytest.mark.parametrize("method", [pj.prune.wanda, pj.prune.sparsegpt])
@pytest.mark.parametrize("pattern, allocation, regex", [
    (0.5, allocate.KL(bounds=(0.6, 0.8)),
     r"\(allocation.bounds=\(0.6, 0.8\)\): expected \(lo, hi\) with lo <= 0.5 <= hi and lo < hi"),
    (0.5, allocate.KL(bounds=(0.5, 0.5)), r"\(allocation.bounds=\(0.5, 0.5\)\)"),
    (0.5, allocate.KL(bounds=(0.2, 1.0)), r"\(allocation.bounds\[1\]=1.0\): expected a number "
     r"in \[0.0, 1.0\)"),
    (0.5, allocate.KL(points=1), r"\(allocation.points=1\): expected an integer >= 2"),
    (0.5, allocate.KL(samples=7), r"\(allocation.samples=7\): expected None or an integer in "
     r"\[1, 6\]"),
    (0.5, allocate.OWL(lam=0.6), r"\(allocation.lam=0.6\): expected a number in \(0.0, 0.5\)"),
    ("2:4", "kl", r"\(allocation='kl'\): expected None with pattern 2:4"),
    (0.5, "uniform", r"\(allocation='uniform'\): expected None, 'kl', 'owl'"),
    (0.5, [0.5, 0.5], r"\(allocation=\[0.5, 0.5\]\): expected .*got 2 values for 3 layers"),
    (0.5, [0.4, 0.5, 0.5], r"\(allocation=\[0.4, 0.5, 0.5\]\): expected per-layer sparsities "
     r"whose weighted mean is the target 0.5; theirs is 0.466667"),
    (0.5, [0.5, 0.5, 1.0], r"\(allocation\[2\]=1.0\): expected a number in \[0.0, 1.0\)"),
])
def test_bad_allocations_are_refused_before_any_work(params, method, pattern, allocation, regex,
                                                     monkeypatch):
  monkeypatch.setattr(allocate, "dense_act_means", _no_statistics)
  with pytest.raises(ArgumentError, match=method.__name__ + regex):
    method(params, CFG, pattern, calibration=TOKENS, allocation=allocation)


def _no_statistics(*args):
  raise AssertionError("the allocation should have been refused before any statistics")
