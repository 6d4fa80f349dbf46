"""Wanda, plain and cumulative-threshold variant, against float64 NumPy loops in torch [O, I]."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _references import ref_nm_keep, ref_per_row_keep
from prunerep_jax.prune import patterns
from prunerep_jax.prune.wanda import cumulative_threshold_mask, wanda_mask, wanda_scores
from prunerep_jax.prune.patterns import NM, Unstructured


def ref_scores(w_oi, act_sq_mean):
  return np.abs(w_oi.astype(np.float64)) * np.sqrt(act_sq_mean.astype(np.float64))[None, :]


def ref_variant_keep(s_oi, sparsity):
  """Wanda's use_variant: per-row cumulative threshold, alpha bisected from 0.4 in [0, 0.8]."""
  sorted_rows = np.sort(s_oi, axis=1)
  cumsum = np.cumsum(sorted_rows, axis=1)
  total = s_oi.sum(axis=1)

  def pruned_given(alpha):
    prune = np.zeros(s_oi.shape, bool)
    for r in range(s_oi.shape[0]):
      count = int((cumsum[r] <= alpha * total[r]).sum())
      if count:
        prune[r] = s_oi[r] <= sorted_rows[r, count - 1]
    return prune, prune.mean()

  alpha, lo, hi = 0.4, 0.0, 0.8
  prune, frac = pruned_given(alpha)
  while abs(frac - sparsity) > 0.001 and hi - lo >= 0.001:
    if frac > sparsity:
      alpha, hi = (alpha + lo) / 2, alpha
    else:
      alpha, lo = (alpha + hi) / 2, alpha
    prune, frac = pruned_given(alpha)
  return ~prune, alpha


def random_inputs(i, o, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((i, o)).astype(np.float32)
  # Channel scales spread over two decades, as real activations are.
  act = (rng.standard_normal(i) * 10.0 ** rng.uniform(-1, 1, i)) ** 2
  return w, act.astype(np.float32)


def test_scores_match_reference():
  w, act = random_inputs(32, 8)
  np.testing.assert_allclose(wanda_scores(jnp.asarray(w), jnp.asarray(act)),
                             ref_scores(w.T, act).T, rtol=1e-6)


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_unstructured_matches_reference_with_exact_per_output_count(sparsity):
  w, act = random_inputs(64, 16)
  mask = np.asarray(wanda_mask(jnp.asarray(w), jnp.asarray(act), Unstructured(sparsity)))
  np.testing.assert_array_equal(mask, ref_per_row_keep(ref_scores(w.T, act), sparsity).T)
  np.testing.assert_array_equal((~mask).sum(axis=0), int(64 * sparsity))


def test_nm_matches_reference():
  w, act = random_inputs(64, 16, seed=1)
  mask = np.asarray(wanda_mask(jnp.asarray(w), jnp.asarray(act), NM(4, 8)))
  np.testing.assert_array_equal(mask, ref_nm_keep(ref_scores(w.T, act), 4, 8).T)
  np.testing.assert_array_equal((~mask).reshape(8, 8, 16).sum(axis=1), 4)


def test_activation_norm_changes_the_choice_hand_checked_4x2():
  # sqrt(act) = [4, 1, 1, 0.5]: scores col 0 = [4, 2, 3, 2.5], col 1 = [4, 0.5, 2, 4].
  w = jnp.array([[1.0, -1.0], [2.0, 0.5], [3.0, 2.0], [5.0, 8.0]])
  act = jnp.array([16.0, 1.0, 1.0, 0.25])
  expected = np.array([[1, 1], [0, 0], [1, 0], [0, 1]], bool)
  np.testing.assert_array_equal(wanda_mask(w, act, Unstructured(0.5)), expected)


@pytest.mark.parametrize("sparsity,seed", [(0.5, 0), (0.3, 1)])
def test_variant_matches_reference(sparsity, seed):
  w, act = random_inputs(64, 16, seed=seed)
  mask, alpha = cumulative_threshold_mask(wanda_scores(w, act), sparsity)
  ref_mask, ref_alpha = ref_variant_keep(ref_scores(w.T, act), sparsity)
  np.testing.assert_array_equal(np.asarray(mask), ref_mask.T)
  np.testing.assert_allclose(float(alpha), ref_alpha, rtol=1e-6)
  np.testing.assert_array_equal(
      wanda_mask(jnp.asarray(w), jnp.asarray(act), Unstructured(sparsity), use_variant=True),
      mask)


def test_variant_reaches_target_with_uneven_outputs():
  w, act = random_inputs(64, 16, seed=3)
  mask = np.asarray(wanda_mask(w, act, Unstructured(0.5), use_variant=True))
  assert abs((~mask).mean() - 0.5) <= 0.001
  assert len(set((~mask).sum(axis=0).tolist())) > 1  # per-output counts differ, unlike plain Wanda


def test_variant_hand_checked_4x2():
  # Column 0 scores {1,2,3,4} (total 10), column 1 {0.1,0.2,0.3,10} (total 10.6). alpha 0.4
  # prunes 2 + 3 = 5/8 > 0.5; alpha 0.2 prunes 1 + 3 = 4/8 and the bisection stops.
  score = jnp.array([[3.0, 0.2], [1.0, 10.0], [4.0, 0.1], [2.0, 0.3]])
  mask, alpha = cumulative_threshold_mask(score, 0.5)
  np.testing.assert_array_equal(mask, [[1, 0], [0, 1], [1, 0], [1, 0]])
  assert float(alpha) == pytest.approx(0.2)


def test_variant_is_per_matrix_over_stacked_layers():
  w, act = random_inputs(32, 8, seed=4)
  scores = wanda_scores(w, act)
  stacked, alphas = cumulative_threshold_mask(jnp.stack([scores, scores * 3.0]), 0.5)
  single, alpha = cumulative_threshold_mask(scores, 0.5)
  np.testing.assert_array_equal(stacked[0], single)
  np.testing.assert_array_equal(stacked[1], single)  # the criterion is scale-free
  assert alphas.shape == (2,) and float(alphas[0]) == float(alpha)


def test_sparsity_zero_keeps_weights_bit_identical():
  w, act = random_inputs(8, 4)
  for use_variant in (False, True):
    mask = wanda_mask(w, act, Unstructured(0.0), use_variant=use_variant)
    assert bool(mask.all())
    np.testing.assert_array_equal(np.asarray(patterns.apply_mask(jnp.asarray(w), mask)).view(
        np.uint32), w.view(np.uint32))


def test_rejects_bad_inputs():
  w, act = random_inputs(8, 4)
  with pytest.raises(ValueError, match=r"act_sq_mean must have shape \[..., I\] = \(8,\) .* "
                                       r"got \(4,\)"):
    wanda_mask(w, act[:4], Unstructured(0.5))
  with pytest.raises(ValueError, match="use_variant=True needs an Unstructured pattern, got 2:4"):
    wanda_mask(w, act, NM(2, 4), use_variant=True)
  with pytest.raises(ValueError, match="not divisible by m=8"):
    wanda_mask(np.ones((12, 4), np.float32), np.ones(12, np.float32), NM(4, 8))
  with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.5"):
    cumulative_threshold_mask(jnp.ones((4, 2)), 1.5)


def test_jittable_with_static_pattern():
  w, act = random_inputs(32, 8, seed=6)
  jitted = jax.jit(wanda_mask, static_argnames=("pattern", "use_variant"))
  for pattern, use_variant in ((Unstructured(0.5), False), (Unstructured(0.5), True)):
    np.testing.assert_array_equal(
        jitted(w, act, pattern=pattern, use_variant=use_variant),
        wanda_mask(w, act, pattern, use_variant=use_variant))
