"""MLP neuron (intermediate channel) pruning against float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunerep_jax.prune.neurons import mask_neurons, neuron_keep, neuron_scores, remove_neurons


def ref_scores(w_down_torch, act_sq_sum):
  """Torch down_proj weight is [D, F]: channel f is column f; mean |W| over the D outputs."""
  a = np.abs(w_down_torch.astype(np.float64))
  return np.array([a[:, f].mean() * act_sq_sum[f] for f in range(a.shape[1])])


def ref_keep(scores, sparsity):
  keep = np.ones(scores.shape, bool)
  keep[np.argsort(scores, kind="stable")[:int(scores.size * sparsity)]] = False
  return keep


def swiglu(x, w_gate, w_up, w_down):
  return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down


def random_mlp(d=8, f=32, seed=0):
  rng = np.random.default_rng(seed)
  w_gate, w_up = (rng.standard_normal((d, f)).astype(np.float32) for _ in range(2))
  w_down = rng.standard_normal((f, d)).astype(np.float32)
  act_sq_sum = (rng.standard_normal(f) * 3.0) ** 2
  return w_gate, w_up, w_down, act_sq_sum.astype(np.float32)


def test_scores_match_reference():
  _, _, w_down, act = random_mlp()
  np.testing.assert_allclose(neuron_scores(w_down, act), ref_scores(w_down.T, act),
                             rtol=1e-6)


def test_keep_matches_reference_with_exact_count():
  _, _, w_down, act = random_mlp()
  scores = neuron_scores(w_down, act)
  keep = np.asarray(neuron_keep(scores, 0.3))
  np.testing.assert_array_equal(keep, ref_keep(np.asarray(scores, np.float64), 0.3))
  assert (~keep).sum() == int(32 * 0.3)


def test_hand_checked_scores_and_keep():
  # mean |W_down| per channel = [1, 2, 0.5, 2]; act_sq_sum = [1, 1, 4, 0.25] -> [1, 2, 2, 0.5].
  w_down = jnp.array([[1.0, -1.0], [2.0, 2.0], [0.0, -1.0], [3.0, -1.0]])
  scores = neuron_scores(w_down, jnp.array([1.0, 1.0, 4.0, 0.25]))
  np.testing.assert_allclose(scores, [1.0, 2.0, 2.0, 0.5])
  np.testing.assert_array_equal(neuron_keep(scores, 0.5), [False, True, True, False])


def test_ties_broken_by_channel_index():
  np.testing.assert_array_equal(neuron_keep(jnp.ones(4), 0.5), [False, False, True, True])


def test_removing_equals_masking_on_the_mlp_output():
  w_gate, w_up, w_down, act = random_mlp()
  keep = neuron_keep(neuron_scores(w_down, act), 0.5)
  x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
  removed = remove_neurons(w_gate, w_up, w_down, keep)
  assert removed[0].shape == (8, 16) and removed[2].shape == (16, 8)
  masked = mask_neurons(w_gate, w_up, w_down, keep)
  np.testing.assert_allclose(swiglu(x, *removed), swiglu(x, *masked), rtol=1e-5, atol=1e-5)


def test_mask_neurons_works_on_stacked_layers():
  layers = [random_mlp(seed=s) for s in range(2)]
  stacked = [np.stack(t) for t in zip(*layers)]
  keep = neuron_keep(neuron_scores(stacked[2], stacked[3]), 0.25)
  out = mask_neurons(*stacked[:3], keep)
  for l in range(2):
    single = mask_neurons(*layers[l][:3], keep[l])
    for a, b in zip(out, single):
      np.testing.assert_array_equal(a[l], b)


def test_sparsity_zero_is_bit_identical():
  w_gate, w_up, w_down, act = random_mlp()
  keep = neuron_keep(neuron_scores(w_down, act), 0.0)
  assert bool(keep.all())
  masked = mask_neurons(w_gate, w_up, w_down, keep)
  for before, after in zip((w_gate, w_up, w_down), masked):
    np.testing.assert_array_equal(np.asarray(after).view(np.uint32), before.view(np.uint32))


def test_rejects_bad_inputs():
  w_gate, w_up, w_down, act = random_mlp()
  with pytest.raises(ValueError, match=r"act_sq_sum must have shape \[..., F\] = \(32,\) .* "
                                       r"got \(8,\)"):
    neuron_scores(w_down, act[:8])
  with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got -0.1"):
    neuron_keep(jnp.ones(4), -0.1)
  with pytest.raises(ValueError, match=r"w_down \[..., F, D\], got shapes \(8, 32\), \(8, 32\), "
                                       r"\(8, 32\)"):
    mask_neurons(w_gate, w_up, w_gate, np.ones(32, bool))
  with pytest.raises(ValueError, match=r"keep must have shape \[..., F\] = \(32,\), got \(8,\)"):
    remove_neurons(w_gate, w_up, w_down, np.ones(8, bool))
