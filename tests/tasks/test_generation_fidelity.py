"""Fidelity metrics of generated token sequences, on hand-made sequences."""

import json

import pytest

from prunerep_jax.tasks import _generation as G


@pytest.mark.parametrize("dense, pruned, step", [
    ([5, 6, 7, 2], [5, 6, 7, 2], None),  # identical
    ([5, 6, 7, 2], [5, 9, 7, 2], 1),  # a substitution
    ([5, 6, 7, 2], [4, 6, 7, 2], 0),  # differs at once
    ([5, 6, 7, 2], [5, 6, 2], 2),  # pruned stops early, at the shorter length
    ([5, 6], [5, 6, 7, 8], 2),  # pruned runs on
    ([], [], None),
    ([], [3], 0),
])
def test_first_divergence(dense, pruned, step):
  assert G.first_divergence(dense, pruned) == step


@pytest.mark.parametrize("dense, pruned, agreement", [
    ([5, 6, 7, 2], [5, 6, 7, 2], 1.0),
    ([5, 6, 7, 2], [5, 9, 7, 2], 0.75),  # positional: tokens after a divergence still count
    ([5, 6, 7, 2], [5, 6], 0.5),  # positions the pruned output never reaches disagree
    ([5, 6], [5, 6, 7, 8], 1.0),  # extra pruned tokens are not counted (first divergence is)
    ([1, 2, 3], [3, 1, 2], 0.0),  # a shift is not agreement
    ([], [], 1.0),
    ([], [4], 0.0),
])
def test_token_agreement_is_over_the_dense_length(dense, pruned, agreement):
  assert G.token_agreement(dense, pruned) == agreement


def test_fidelity_summarises_per_item_numbers():
  dense = [[1, 2, 3, 4], [1, 2], [7, 7, 7]]
  pruned = [[1, 2, 3, 4], [1, 3], [7, 7]]
  out = G.fidelity(dense, pruned)
  assert out["per_item"] == {"token_agreement": [1.0, 0.5, 2 / 3],
                             "first_divergence": [None, 1, 2]}
  assert out["token_agreement"] == pytest.approx((1 + 0.5 + 2 / 3) / 3)
  assert out["exact_match"] == pytest.approx(1 / 3)
  assert out["diverged"] == pytest.approx(2 / 3)
  assert out["first_divergence_mean"] == 1.5
  assert out["first_divergence_median"] == 1.5
  json.dumps(out, allow_nan=False)


def test_identical_outputs_have_no_divergence_statistics():
  out = G.fidelity([[1, 2], [3]], [[1, 2], [3]])
  assert (out["token_agreement"], out["exact_match"], out["diverged"]) == (1.0, 1.0, 0.0)
  assert out["first_divergence_mean"] is None and out["first_divergence_median"] is None


def test_fidelity_refuses_different_item_counts():
  with pytest.raises(ValueError, match=r"fidelity: 2 dense outputs but 1 pruned outputs"):
    G.fidelity([[1], [2]], [[1]])


def test_match_rate():
  assert G.match_rate(["12", None, "3"], ["12", None, "4"]) == pytest.approx(2 / 3)
