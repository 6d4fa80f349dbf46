"""SparseGPT against a float64 NumPy loop of `fasterprune`, written in torch [O, I] layout."""

import jax.numpy as jnp
import numpy as np
import pytest

from prunerep_jax.prune.sparsegpt import hessian_update, sparsegpt_prune
from prunerep_jax.prune.patterns import NM, Unstructured


def ref_fasterprune(w_oi, h, sparsity=0.0, prunen=0, prunem=0, blocksize=128, percdamp=0.01):
  """SparseGPT.fasterprune in float64, torch orientation: W [O, I], blocks of input columns.

  As in the library, the unstructured threshold is the k-th smallest score of the block
  (k = floor(sparsity * size)); the original code takes the (k+1)-th.
  """
  w = w_oi.astype(np.float64).copy()
  h = h.astype(np.float64).copy()
  cols = w.shape[1]
  dead = np.diag(h) == 0
  h[dead, dead] = 1
  w[:, dead] = 0
  h[np.arange(cols), np.arange(cols)] += percdamp * np.mean(np.diag(h))
  lower_inv = np.linalg.inv(np.linalg.cholesky(h))
  hinv = np.linalg.cholesky(lower_inv.T @ lower_inv).T  # upper factor of H^-1
  pruned = np.zeros(w.shape, bool)
  for i1 in range(0, cols, blocksize):
    i2 = min(i1 + blocksize, cols)
    w1 = w[:, i1:i2].copy()
    q1 = np.zeros_like(w1)
    err1 = np.zeros_like(w1)
    hinv1 = hinv[i1:i2, i1:i2]
    mask1 = np.zeros(w1.shape, bool)
    if prunen == 0:
      tmp = w1 ** 2 / np.diag(hinv1)[None, :] ** 2
      k = int(tmp.size * sparsity)
      if k:
        mask1 = tmp <= np.sort(tmp.ravel())[k - 1]
    for i in range(i2 - i1):
      col = w1[:, i]
      if prunen and i % prunem == 0:
        tmp = w1[:, i:i + prunem] ** 2 / np.diag(hinv1)[i:i + prunem][None, :] ** 2
        for r in range(w1.shape[0]):
          mask1[r, i + np.argsort(tmp[r], kind="stable")[:prunen]] = True
      q = np.where(mask1[:, i], 0.0, col)
      err = (col - q) / hinv1[i, i]
      w1[:, i:] -= np.outer(err, hinv1[i, i:])
      q1[:, i] = q
      err1[:, i] = err
    w[:, i1:i2] = q1
    pruned[:, i1:i2] = mask1
    w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
  return w, ~pruned


def calibration(i, o, tokens=512, dead=None, seed=0, correlation=0.3):
  """Random W [I, O] and correlated inputs X [T, I]; input `dead` never fires."""
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((i, o)).astype(np.float32)
  mix = np.eye(i) + correlation * rng.standard_normal((i, i)) / np.sqrt(i)
  x = (rng.standard_normal((tokens, i)) @ mix).astype(np.float32)
  if dead is not None:
    x[:, dead] = 0.0
  return w, x


def hessian_of(x, batches=2):
  h, n = jnp.zeros((x.shape[1],) * 2, jnp.float32), 0
  for chunk in np.array_split(x, batches):
    h, n = hessian_update(h, n, chunk)
  return h


def assert_close_to_reference(w, x, pattern, blocksize=128):
  h = hessian_of(x)
  new_w, mask = sparsegpt_prune(jnp.asarray(w), h, pattern, blocksize=blocksize)
  if isinstance(pattern, NM):
    kwargs = dict(prunen=pattern.n, prunem=pattern.m)
  else:
    kwargs = dict(sparsity=pattern.sparsity)
  ref_w, ref_mask = ref_fasterprune(w.T, np.asarray(h), blocksize=blocksize, **kwargs)
  np.testing.assert_array_equal(np.asarray(mask), ref_mask.T)
  rel = np.max(np.abs(np.asarray(new_w) - ref_w.T)) / np.max(np.abs(ref_w))
  assert rel < 1e-4, rel
  return np.asarray(new_w), np.asarray(mask)


def test_hessian_update_is_running_mean_of_2_x_xT():
  _, x = calibration(16, 1, tokens=96)
  h, n = jnp.zeros((16, 16)), 0
  for chunk in (x[:10], x[10:50].reshape(4, 10, 16), x[50:]):
    h, n = hessian_update(h, n, chunk)
  assert n == 96
  x64 = x.astype(np.float64)
  np.testing.assert_allclose(h, 2.0 / 96 * x64.T @ x64, rtol=1e-5, atol=1e-6)


def test_unstructured_two_blocks_with_dead_input_matches_reference():
  w, x = calibration(256, 64, dead=7)
  new_w, mask = assert_close_to_reference(w, x, Unstructured(0.5))
  assert np.all(new_w[7] == 0.0)
  # floor(0.5 * 128 * 64) pruned in each block, pruned weights exactly zero.
  np.testing.assert_array_equal((~mask).reshape(2, -1).sum(axis=1), 128 * 64 // 2)
  assert np.all(new_w[~mask] == 0.0)


def test_unstructured_partial_last_block_matches_reference():
  w, x = calibration(200, 32, seed=1)
  _, mask = assert_close_to_reference(w, x, Unstructured(0.5))
  assert (~mask[128:]).sum() == int(72 * 32 * 0.5)


def test_nm_matches_reference_with_n_of_every_m_zero():
  w, x = calibration(128, 32, seed=2)
  new_w, mask = assert_close_to_reference(w, x, NM(2, 4), blocksize=64)
  np.testing.assert_array_equal((new_w == 0).reshape(32, 4, 32).sum(axis=1), 2)
  np.testing.assert_array_equal((~mask).reshape(32, 4, 32).sum(axis=1), 2)


def test_obs_update_beats_masking_alone():
  w, x = calibration(200, 32, seed=1, correlation=2.0)
  new_w, mask = sparsegpt_prune(w, hessian_of(x), Unstructured(0.5))
  err_obs = np.linalg.norm(x @ (np.asarray(new_w) - w))
  err_mask = np.linalg.norm(x @ (np.where(mask, w, 0.0) - w))
  assert err_obs < 0.85 * err_mask  # measured 0.73


def test_uncorrelated_inputs_reduce_to_magnitude_per_block_hand_checked():
  # H = Id: Hinv is diagonal, so no weight moves and the score is |w| up to a constant.
  w = jnp.array([[0.9, -0.1], [0.2, 0.7], [-0.3, 0.5], [0.8, 0.4]])
  new_w, mask = sparsegpt_prune(w, jnp.eye(4), Unstructured(0.5))
  np.testing.assert_array_equal(mask, [[1, 0], [0, 1], [0, 1], [1, 0]])
  np.testing.assert_array_equal(new_w, np.where(mask, w, 0.0))


def test_pruned_weight_error_moves_to_correlated_input_hand_checked():
  # H = [[1, r], [r, 1]] + 0.01 Id; pruning w_0 gives the OBS update w_1 += w_0 * r / 1.01.
  r = 0.5
  h = jnp.array([[1.0, r], [r, 1.0]])
  new_w, mask = sparsegpt_prune(jnp.array([[0.1], [1.0]]), h, Unstructured(0.5))
  np.testing.assert_array_equal(mask, [[False], [True]])
  np.testing.assert_allclose(new_w, [[0.0], [1.0 + 0.1 * r / 1.01]], rtol=1e-6)


def test_returns_the_weight_dtype():
  w = jnp.array([[0.9, -0.1], [0.2, 0.7], [-0.3, 0.5], [0.8, 0.4]], jnp.bfloat16)
  new_w, _ = sparsegpt_prune(w, jnp.eye(4), Unstructured(0.5))
  assert new_w.dtype == jnp.bfloat16


def test_sparsity_zero_returns_weight_bit_identical():
  w, x = calibration(8, 4, dead=2)
  new_w, mask = sparsegpt_prune(w, hessian_of(x), Unstructured(0.0))
  assert bool(mask.all())
  np.testing.assert_array_equal(np.asarray(new_w).view(np.uint32), w.view(np.uint32))


def test_indefinite_hessian_is_retried_with_more_damping():
  # Eigenvalue -0.05: fails with damping 0.01 * mean(diag H), succeeds with 0.1.
  v = np.ones(4) / 2.0
  h = jnp.asarray(np.eye(4) - 1.05 * np.outer(v, v), jnp.float32)
  w = jnp.array([[0.9, -0.1], [0.2, 0.7], [-0.3, 0.5], [0.8, 0.4]])
  new_w, mask = sparsegpt_prune(w, h, Unstructured(0.5))
  again = sparsegpt_prune(w, h, Unstructured(0.5), percdamp=0.1)
  assert np.isfinite(np.asarray(new_w)).all()
  np.testing.assert_array_equal(new_w, again[0])
  np.testing.assert_array_equal(mask, again[1])


def test_hessian_that_no_damping_fixes_raises_naming_the_matrix():
  with pytest.raises(ValueError, match=r"Cholesky of the hessian of layers/0/mlp/up_proj .* "
                                       r"percdamp \[0.01, 0.1, 1.0, 10.0\]"):
    sparsegpt_prune(jnp.ones((4, 2)), -jnp.eye(4), Unstructured(0.5),
                              name="layers/0/mlp/up_proj")


@pytest.mark.parametrize("kwargs,needle", [
    (dict(hessian=np.where(np.eye(4), np.nan, 0.0)),
     r"Cholesky of the hessian of w \(shape \(4, 4\)\) is not finite .* expected a finite"),
    (dict(hessian=np.eye(3)), r"hessian of w must have shape \[I, I\] = \(4, 4\) .* got \(3, 3\)"),
    (dict(w=np.ones((4, 2, 1))), r"w must have shape \[I, O\], got \(4, 2, 1\)"),
    (dict(pattern=NM(4, 8)), r"input dim I=4 of w .* not divisible by m=8"),
    (dict(pattern=NM(2, 4), blocksize=6), "blocksize=6 is not a multiple of m=4"),
    (dict(blocksize=0), r"sparsegpt_prune\(blocksize=0\): expected an integer >= 1"),
    (dict(blocksize=8.0), r"sparsegpt_prune\(blocksize=8.0\): expected an integer >= 1"),
    (dict(percdamp=0.0), r"sparsegpt_prune\(percdamp=0.0\): expected a finite number > 0"),
    (dict(percdamp=float("inf")), r"sparsegpt_prune\(percdamp=inf\): expected a finite number"),
    (dict(pattern="2:4"), "pattern must be Unstructured or NM, got '2:4'"),
])
def test_rejects_bad_inputs(kwargs, needle):
  args = dict(w=np.ones((4, 2)), hessian=np.eye(4), pattern=Unstructured(0.5))
  args.update(kwargs)
  with pytest.raises(ValueError, match=needle):
    sparsegpt_prune(**args)


def test_hessian_update_rejects_mismatched_input():
  with pytest.raises(ValueError, match=r"x must have shape \[..., I\] with I=4, got \(3, 5\)"):
    hessian_update(jnp.zeros((4, 4)), 0, np.ones((3, 5)))
