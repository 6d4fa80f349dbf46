"""Pattern values and the shared mask functions, against NumPy loops in torch [O, I] layout."""

import jax.numpy as jnp
import numpy as np
import pytest

from _references import ref_nm_keep, ref_per_row_keep
from prunerep_jax.prune import patterns
from prunerep_jax.prune.patterns import NM, Unstructured


# References: written per output row of a torch [O, I] matrix; callers transpose Flax [I, O].

def random_scores(shape, seed=0):
  return np.abs(np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("bad", [1.5, 1.0, -0.1, float("nan"), "0.5", True])
def test_unstructured_rejects_sparsity_outside_0_1(bad):
  with pytest.raises(ValueError, match=r"sparsity.*" + (r"nan" if bad != bad else "")):
    Unstructured(bad)


def test_unstructured_error_names_value():
  with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.5"):
    Unstructured(1.5)


@pytest.mark.parametrize("n,m,needle", [(3, 2, "0 < n < m, got n=3, m=2"),
                                        (0, 4, "0 < n < m, got n=0, m=4"),
                                        (2, 2, "0 < n < m, got n=2, m=2"),
                                        (2.0, 4, "n must be an int, got 2.0")])
def test_nm_rejects_bad_n_m(n, m, needle):
  with pytest.raises(ValueError, match=needle):
    NM(n, m)


def test_patterns_are_immutable_and_hashable():
  p = NM(2, 4)
  with pytest.raises(AttributeError):
    p.n = 3
  assert {p: 1}[NM(2, 4)] == 1 and p.sparsity == 0.5 and str(p) == "2:4"


def test_parse_pattern_reads_nm_and_fraction():
  assert patterns.parse_pattern("2:4") == NM(2, 4)
  assert patterns.parse_pattern(" 4:8 ") == NM(4, 8)
  assert patterns.parse_pattern("0.5") == Unstructured(0.5)


@pytest.mark.parametrize("text,needle", [("3:2", "got n=3, m=2"), ("a:4", "'a:4'"),
                                         ("2:4:8", "'2:4:8'"), ("half", "'half'"),
                                         ("1.5", "got 1.5")])
def test_parse_pattern_rejects_bad_text(text, needle):
  with pytest.raises(ValueError, match=needle):
    patterns.parse_pattern(text)


def test_unstructured_mask_hand_checked_4x2():
  # [I=4, O=2]; the 3 lowest of 8 (floor(0.4 * 8) = 3) are 0.1, 0.2, 0.3.
  score = jnp.array([[0.5, 0.1], [0.9, 0.3], [0.2, 0.8], [0.7, 0.6]])
  expected = np.array([[1, 0], [1, 0], [0, 1], [1, 1]], bool)
  np.testing.assert_array_equal(patterns.unstructured_mask(score, 0.4), expected)


def test_unstructured_mask_breaks_ties_by_position_for_exact_count():
  score = jnp.ones((4, 3))
  mask = np.asarray(patterns.unstructured_mask(score, 0.5))
  assert (~mask).sum() == 6
  np.testing.assert_array_equal(mask.ravel(), np.arange(12) >= 6)


def test_unstructured_mask_is_per_matrix_over_leading_axes():
  score = random_scores((3, 16, 8))
  stacked = np.asarray(patterns.unstructured_mask(jnp.asarray(score), 0.3))
  for l in range(3):
    single = patterns.unstructured_mask(jnp.asarray(score[l]), 0.3)
    np.testing.assert_array_equal(stacked[l], single)
    assert (~stacked[l]).sum() == int(16 * 8 * 0.3)


def test_per_output_mask_matches_reference_and_exact_per_column():
  score = random_scores((64, 16))
  mask = np.asarray(patterns.per_output_mask(jnp.asarray(score), 0.3))
  np.testing.assert_array_equal(mask, ref_per_row_keep(score.T.astype(np.float64), 0.3).T)
  np.testing.assert_array_equal((~mask).sum(axis=0), np.full(16, int(64 * 0.3)))


def test_per_output_mask_hand_checked_4x2():
  # Each output column loses its 2 lowest inputs; ties go to the earlier input.
  score = jnp.array([[0.5, 0.1], [0.9, 0.1], [0.2, 0.1], [0.7, 0.6]])
  expected = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], bool)
  np.testing.assert_array_equal(patterns.per_output_mask(score, 0.5), expected)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_matches_reference_and_prunes_n_of_every_m(n, m):
  score = random_scores((64, 8), seed=n + m)
  mask = np.asarray(patterns.nm_mask(jnp.asarray(score), n, m))
  np.testing.assert_array_equal(mask, ref_nm_keep(score.T.astype(np.float64), n, m).T)
  pruned_per_group = (~mask).reshape(64 // m, m, 8).sum(axis=1)
  np.testing.assert_array_equal(pruned_per_group, np.full((64 // m, 8), n))


def test_nm_mask_hand_checked_4x2():
  score = jnp.array([[0.5, 0.1], [0.9, 0.3], [0.2, 0.8], [0.7, 0.6]])
  expected = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], bool)
  np.testing.assert_array_equal(patterns.nm_mask(score, 2, 4), expected)


def test_nm_mask_rejects_input_dim_not_divisible_by_m():
  with pytest.raises(ValueError, match=r"input dim I=6 .* not divisible by m=4"):
    patterns.nm_mask(jnp.ones((6, 2)), 2, 4)


def test_nm_mask_rejects_bad_n_m():
  with pytest.raises(ValueError, match="got n=3, m=2"):
    patterns.nm_mask(jnp.ones((4, 2)), 3, 2)


def test_sparsity_zero_keeps_everything_and_apply_mask_is_bit_identical():
  w = jnp.asarray(np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32))
  for mask in (patterns.unstructured_mask(w, 0.0), patterns.per_output_mask(w, 0.0)):
    assert bool(mask.all())
    out = patterns.apply_mask(w, mask)
    np.testing.assert_array_equal(np.asarray(out).view(np.uint32), np.asarray(w).view(np.uint32))


def test_apply_mask_zeroes_pruned_and_checks_shape():
  w = jnp.array([[1.0, -2.0], [3.0, 4.0]])
  out = patterns.apply_mask(w, jnp.array([[True, False], [False, True]]))
  np.testing.assert_array_equal(out, [[1.0, 0.0], [0.0, 4.0]])
  with pytest.raises(ValueError, match=r"mask shape \(2,\) does not match weight shape \(2, 2\)"):
    patterns.apply_mask(w, jnp.array([True, False]))
