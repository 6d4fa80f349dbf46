"""Magnitude pruning against a float64 NumPy reference in torch [O, I] layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunerep_jax.prune import patterns
from prunerep_jax.prune.magnitude import magnitude_mask
from prunerep_jax.prune.patterns import NM, Unstructured


def ref_magnitude_keep(w_oi, sparsity):
  """PAPER.md: prune |W| <= the k-th smallest |W| of the matrix, k = floor(sparsity * size)."""
  a = np.abs(w_oi.astype(np.float64))
  k = int(a.size * sparsity)
  if k == 0:
    return np.ones(a.shape, bool)
  return ~(a <= np.sort(a.ravel())[k - 1])


def ref_nm_keep(w_oi, n, m):
  a = np.abs(w_oi.astype(np.float64))
  keep = np.ones(a.shape, bool)
  for r in range(a.shape[0]):
    for g in range(0, a.shape[1], m):
      keep[r, g + np.argsort(a[r, g:g + m], kind="stable")[:n]] = False
  return keep


def random_weight(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.7])
def test_unstructured_matches_reference_with_exact_count(sparsity):
  w = random_weight((48, 32))
  mask = np.asarray(magnitude_mask(jnp.asarray(w), Unstructured(sparsity)))
  np.testing.assert_array_equal(mask, ref_magnitude_keep(w.T, sparsity).T)
  assert (~mask).sum() == int(w.size * sparsity)


def test_nm_matches_reference():
  w = random_weight((64, 16), seed=1)
  mask = np.asarray(magnitude_mask(jnp.asarray(w), NM(2, 4)))
  np.testing.assert_array_equal(mask, ref_nm_keep(w.T, 2, 4).T)
  np.testing.assert_array_equal((~mask).reshape(16, 4, 16).sum(axis=1), 2)


def test_hand_checked_4x2():
  # |W| sorted: 0.1 0.2 0.3 0.4 ...; sparsity 0.5 -> k = 4 -> prune |W| <= 0.4; signs do not matter.
  w = jnp.array([[-0.1, 0.8], [0.5, -0.4], [0.3, 0.6], [-0.7, 0.2]])
  expected = np.array([[0, 1], [1, 0], [0, 1], [1, 0]], bool)
  np.testing.assert_array_equal(magnitude_mask(w, Unstructured(0.5)), expected)


def test_ties_at_threshold_are_all_pruned():
  # k = floor(0.25 * 8) = 2, the 2nd smallest |W| is 0.2, shared by three weights: 4 pruned.
  w = jnp.array([[0.1, 0.2], [-0.2, 0.9], [0.2, 0.8], [0.7, 0.6]])
  mask = np.asarray(magnitude_mask(w, Unstructured(0.25)))
  np.testing.assert_array_equal(mask, [[0, 0], [0, 1], [0, 1], [1, 1]])


def test_threshold_is_per_matrix_over_stacked_layers():
  w = random_weight((3, 16, 8), seed=2)
  w[1] *= 100.0  # a global threshold would prune nothing in this layer
  mask = np.asarray(magnitude_mask(jnp.asarray(w), Unstructured(0.5)))
  for l in range(3):
    np.testing.assert_array_equal(mask[l], ref_magnitude_keep(w[l].T, 0.5).T)


def test_sparsity_zero_keeps_weights_bit_identical():
  w = jnp.asarray(random_weight((8, 4)))
  mask = magnitude_mask(w, Unstructured(0.0))
  assert bool(mask.all())
  np.testing.assert_array_equal(np.asarray(patterns.apply_mask(w, mask)).view(np.uint32),
                                np.asarray(w).view(np.uint32))


def test_rejects_bad_inputs():
  with pytest.raises(ValueError, match=r"not divisible by m=4"):
    magnitude_mask(jnp.ones((6, 2)), NM(2, 4))
  with pytest.raises(ValueError, match=r"w must have shape \[..., I, O\], got \(6,\)"):
    magnitude_mask(jnp.ones((6,)), Unstructured(0.5))
  with pytest.raises(ValueError, match="pattern must be Unstructured or NM, got 0.5"):
    magnitude_mask(jnp.ones((6, 2)), 0.5)


def test_jittable_with_static_pattern():
  w = jnp.asarray(random_weight((16, 8), seed=5))
  jitted = jax.jit(magnitude_mask, static_argnums=1)
  for pattern in (Unstructured(0.5), NM(2, 4)):
    np.testing.assert_array_equal(jitted(w, pattern), magnitude_mask(w, pattern))
