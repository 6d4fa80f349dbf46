"""data:4, model:4 and data:2,model:2 on 4 forced CPU devices give what one device gives.

The meshes run in one child interpreter (XLA_FLAGS set before it imports JAX; see
_multi_device.py), so the rest of the suite keeps a single device. Batches of 3 rows are not a
multiple of the data axis: every result below also shows that the padding reaches nothing.
"""

import pytest

from _subprocess import finish, read_json

MESHES = ("data:4", "model:4", "data:2,model:2")


@pytest.fixture(scope="module")
def results(children):
  proc, out = children["multi_device"]
  finish(proc, timeout=600)
  return read_json(out)


@pytest.mark.parametrize("mesh", MESHES)
def test_logits_and_residual_stream_match_one_device(results, mesh):
  r = results[mesh]
  assert r["logits_shape"] == [3, 12, 96]  # padding rows cut off
  assert r["logits_diff"] <= 1e-5
  assert r["residual_diff"] <= 1e-5


@pytest.mark.parametrize("mesh, q_spec", [("data:4", "()"),
                                          ("model:4", "(None, None, 'model')"),
                                          ("data:2,model:2", "(None, None, 'model')")])
def test_params_are_split_over_the_model_axis_and_placing_twice_is_free(results, mesh, q_spec):
  assert results[mesh]["q_kernel_spec"] == q_spec
  assert results[mesh]["reshard_is_noop"]


def test_logits_are_of_order_one_so_the_bound_means_something(results):
  assert 1.0 <= results["logits_scale"]["even"] <= 10.0
  assert 1.0 <= results["logits_scale"]["odd"] <= 10.0


def test_dims_that_do_not_divide_are_replicated_and_give_the_same_logits(results):
  # vocab 97 and 2 kv heads on model:4: embedding (tied head) and k/v replicated, q split
  assert results["model:4"]["odd_specs"] == {
      "embedding": "()", "q_kernel": "(None, None, 'model')", "k_kernel": "()"}
  # on model:2 the 2 kv heads divide
  assert results["data:2,model:2"]["odd_specs"] == {
      "embedding": "()", "q_kernel": "(None, None, 'model')", "k_kernel": "(None, None, 'model')"}
  for mesh in ("model:4", "data:2,model:2"):
    assert results[mesh]["odd_logits_diff"] <= 1e-5


@pytest.mark.parametrize("mesh", MESHES)
def test_greedy_generation_gives_the_same_tokens(results, mesh):
  assert results[mesh]["greedy_equal"]


def test_sampling_draws_the_same_tokens_whatever_the_padding(results):
  assert results["data:4"]["sampled_equal"]


@pytest.mark.parametrize("mesh", MESHES)
def test_wanda_gives_the_same_masks(results, mesh):
  r = results[mesh]
  assert r["wanda_masks_equal"]
  assert r["wanda_report_equal"]
  assert r["wanda_params_diff"] == 0.0  # kept weights are copied, pruned ones zero


@pytest.mark.parametrize("mesh", MESHES)
def test_sparsegpt_gives_the_same_weights(results, mesh):
  r = results[mesh]
  assert r["sparsegpt_masks_equal"]
  assert r["sparsegpt_params_rel"] <= 1e-5


def test_neurons_and_magnitude_give_the_same_params(results):
  assert results["data:2,model:2"]["neurons_equal"]
  assert results["data:2,model:2"]["magnitude_equal"]


@pytest.mark.parametrize("mesh", MESHES)
def test_perplexity_matches(results, mesh):
  r = results[mesh]
  assert r["ppl_tokens"] == 5 * 9
  assert r["nll_rel"] <= 1e-6


def test_next_token_kl_matches(results):
  r = results["data:2,model:2"]
  assert r["kl_abs"] <= 1e-6
  assert r["top1_equal"]


@pytest.mark.parametrize("mesh", MESHES)
def test_drift_curves_match_one_device(results, mesh):
  r = results[mesh]
  assert r["drift_tokens_equal"]
  assert r["drift_curves_diff"] <= 1e-5


def test_layerwise_subspace_and_drop_scoring_match_one_device(results):
  r = results["data:2,model:2"]
  assert r["layerwise_diff"] <= 1e-5
  assert r["subspace_diff"] <= 1e-5 and r["subspace_choice_equal"]
  assert r["drop_same_choice"] and r["drop_scores_diff"] <= 1e-5


def test_a_checkpoint_saved_on_a_mesh_restores_on_one_device_and_onto_a_mesh(results):
  r = results["data:2,model:2"]
  assert r["restore_one_device"]
  assert r["restore_on_mesh"]
