"""KL-guided drop scoring: the fused costs against one model run per candidate, the drops they
choose, the iterative variant, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prunerep_jax as pj
from prunerep_jax import metrics
from prunerep_jax import model as M
from prunerep_jax.prune import drop, kl_score
from prunerep_jax.validate import ArgumentError

CFG = pj.Config(family="llama", vocab_size=97, hidden_size=32, intermediate_size=64,
                num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8)
L = CFG.num_layers
TOKENS = np.random.RandomState(0).randint(0, 97, (5, 16)).astype(np.int32)
METRIC = {"kl": metrics.kl_estimate, "kl_exact": metrics.kl}


@pytest.fixture(scope="module")
def params():
  return pj.init_params(CFG, jax.random.key(3))


@pytest.fixture(scope="module")
def dense(params):
  return pj.forward(params, CFG, TOKENS)


def _lens(params, h):
  return M.lm_head(params, CFG, M.final_norm(params, CFG, h))


def reference_cost(params, dense, dropped, score, at, boundary):
  """Drop `dropped` with zero_sublayers, run the model, and measure: at the model's logits, or
  through the lens at residual index `boundary` (the state right after the removed span)."""
  out = pj.forward(drop.zero_sublayers(params, dropped), CFG, TOKENS)
  if at == "output":
    z, z_cut = dense.logits, out.logits
  else:
    z, z_cut = _lens(params, dense.residual[boundary]), _lens(params, out.residual[boundary])
  return float(jnp.mean(METRIC[score](z, z_cut)))


@pytest.mark.parametrize("at", kl_score.PLACES)
@pytest.mark.parametrize("score", kl_score.SCORES)
def test_sublayer_costs_equal_one_run_per_dropped_sublayer(params, dense, score, at):
  fused = kl_score.sublayer_costs(params, CFG, TOKENS, score=score, at=at, batch_size=2)
  for k, offset in (("attn", 1), ("mlp", 2)):
    ref = [reference_cost(params, dense, [(l, k)], score, at, 2 * l + offset) for l in range(L)]
    np.testing.assert_allclose(fused[k], ref, rtol=2e-5)
    assert np.all(fused[k] > 0)


@pytest.mark.parametrize("at", kl_score.PLACES)
def test_block_and_window_costs_equal_one_run_per_dropped_block(params, dense, at):
  both = ("attn", "mlp")
  blocks = kl_score.block_costs(params, CFG, TOKENS, at=at, batch_size=2)
  ref = [reference_cost(params, dense, [(l, k) for k in both], "kl", at, 2 * l + 2)
         for l in range(L)]
  np.testing.assert_allclose(blocks, ref, rtol=2e-5)
  windows = kl_score.window_costs(params, CFG, TOKENS, 2, at=at, batch_size=2)
  ref = [reference_cost(params, dense, [(l, k) for l in (i, i + 1) for k in both], "kl", at,
                        2 * i + 4) for i in range(L - 1)]
  np.testing.assert_allclose(windows, ref, rtol=2e-5)


def test_estimate_is_close_to_the_exact_kl_for_small_changes(params):
  est = kl_score.sublayer_costs(params, CFG, TOKENS, score="kl", batch_size=2)
  exact = kl_score.sublayer_costs(params, CFG, TOKENS, score="kl_exact", batch_size=2)
  for k in ("attn", "mlp"):
    np.testing.assert_allclose(est[k], exact[k], rtol=0.05)


def test_batch_size_does_not_change_the_costs(params):
  one = kl_score.sublayer_costs(params, CFG, TOKENS, batch_size=5)
  two = kl_score.sublayer_costs(params, CFG, TOKENS, batch_size=2)  # padded last batch
  for k in ("attn", "mlp"):
    np.testing.assert_allclose(one[k], two[k], rtol=1e-5)


def test_output_costs_do_not_depend_on_how_candidates_are_grouped(params, monkeypatch):
  whole = kl_score.sublayer_costs(params, CFG, TOKENS, at="output", batch_size=5)
  monkeypatch.setattr(kl_score, "OUTPUT_STREAMS", 4)  # 6 candidates: a full and a padded group
  grouped = kl_score.sublayer_costs(params, CFG, TOKENS, at="output", batch_size=5)
  for k in ("attn", "mlp"):
    np.testing.assert_allclose(grouped[k], whole[k], rtol=1e-5)


def test_drop_sublayers_kl_drops_the_cheapest_and_reports_the_costs(params):
  costs = kl_score.sublayer_costs(params, CFG, TOKENS, batch_size=2)
  result = pj.prune.drop_sublayers(params, CFG, 2, kind="joint", score="kl", calibration=TOKENS,
                                   batch_size=2)
  ranked = sorted((costs[k][l], i, l, k) for i, k in enumerate(("attn", "mlp")) for l in range(L))
  chosen = [(l, k) for _, _, l, k in ranked[:2]]
  assert result.report["dropped"] == [{"layer": l, "sublayer": k} for l, k in chosen]
  assert result.report["score"] == "kl" and result.report["kl_at"] == "boundary"
  for k in ("attn", "mlp"):
    np.testing.assert_allclose(result.report["importance"][k], costs[k], rtol=1e-6)
  expected = drop.zero_sublayers(params, chosen)
  for a, b in zip(jax.tree_util.tree_leaves(result.params), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_array_equal(a, b)


def test_iterative_rescores_on_the_pruned_model(params):
  result = pj.prune.drop_sublayers(params, CFG, 2, kind="joint", score="kl", iterative=True,
                                   calibration=TOKENS, batch_size=2)
  rounds = result.report["importance"]
  first = result.report["dropped"][0]
  one_shot = pj.prune.drop_sublayers(params, CFG, 1, kind="joint", score="kl",
                                     calibration=TOKENS, batch_size=2)
  assert one_shot.report["dropped"] == [first]
  pruned = drop.zero_sublayers(params, [(first["layer"], first["sublayer"])])
  again = kl_score.sublayer_costs(pruned, CFG, TOKENS, batch_size=2)
  for k in ("attn", "mlp"):
    np.testing.assert_allclose(rounds[1][k], again[k], rtol=1e-6)
  # The removed sublayer costs nothing to remove again, and is not chosen twice.
  assert rounds[1][first["sublayer"]][first["layer"]] == 0.0
  second = result.report["dropped"][1]
  assert second != first
  assert rounds[1][second["sublayer"]][second["layer"]] == min(
      rounds[1][k][l] for k in ("attn", "mlp") for l in range(L)
      if (l, k) != (first["layer"], first["sublayer"]))


def test_drop_blocks_kl_removes_the_cheapest_blocks(params):
  costs = kl_score.block_costs(params, CFG, TOKENS, batch_size=2)
  result = pj.prune.drop_blocks(params, CFG, 1, score="kl", calibration=TOKENS, batch_size=2)
  assert result.report["dropped"] == [{"layer": int(np.argmin(costs)), "sublayer": "block"}]
  assert result.config.num_layers == L - 1
  np.testing.assert_allclose(result.report["importance"]["block"], costs, rtol=1e-6)
  window = pj.prune.drop_blocks(params, CFG, 2, score="kl", consecutive=True,
                                calibration=TOKENS, batch_size=2)
  costs2 = kl_score.window_costs(params, CFG, TOKENS, 2, batch_size=2)
  start = int(np.argmin(costs2))
  assert [d["layer"] for d in window.report["dropped"]] == [start, start + 1]


def test_drop_blocks_iterative_matches_rescoring_by_hand(params):
  result = pj.prune.drop_blocks(params, CFG, 2, score="kl", iterative=True, calibration=TOKENS,
                                batch_size=2)
  rounds = result.report["importance"]
  first = int(np.argmin(rounds[0]["block"]))
  pruned = drop.zero_sublayers(params, [(first, "attn"), (first, "mlp")])
  np.testing.assert_allclose(rounds[1]["block"], kl_score.block_costs(pruned, CFG, TOKENS,
                                                                      batch_size=2), rtol=1e-6)
  second = min((c, l) for l, c in enumerate(rounds[1]["block"]) if l != first)[1]
  assert [d["layer"] for d in result.report["dropped"]] == sorted([first, second])


@pytest.mark.parametrize("fn, kwargs, regex", [
    (pj.prune.drop_sublayers, dict(score="kl_estimate"),
     r"drop_sublayers\(score='kl_estimate'\): expected one of "
     r"\('residual', 'no_norm', 'kl', 'kl_exact'\)"),
    (pj.prune.drop_sublayers, dict(score="kl", kl_at="final"),
     r"drop_sublayers\(kl_at='final'\): expected one of \('boundary', 'output'\)"),
    (pj.prune.drop_sublayers, dict(kl_at="output"),
     r"drop_sublayers\(kl_at='output'\): expected 'boundary' \(the default\) with "
     r"score='residual'"),
    (pj.prune.drop_blocks, dict(score="no_norm"),
     r"drop_blocks\(score='no_norm'\): expected one of \('residual', 'kl', 'kl_exact'\)"),
    (pj.prune.drop_blocks, dict(score="kl", iterative=True, consecutive=True),
     r"drop_blocks\(iterative=True\): expected False with consecutive=True"),
])
def test_bad_drop_arguments_are_refused(params, fn, kwargs, regex):
  with pytest.raises(ArgumentError, match=regex):
    fn(params, CFG, 1, calibration=TOKENS, **kwargs)


@pytest.mark.parametrize("spans, regex", [
    ([], r"span_costs\(spans=\[\]\): expected a non-empty sequence of sublayer spans"),
    ([(0, 1), (3, 3)], r"span_costs\(spans\[1\]=\(3, 3\)\): expected .* 0 <= a < b <= 6"),
    ([(0, 7)], r"span_costs\(spans\[0\]=\(0, 7\)\)"),
])
def test_bad_spans_are_refused(params, spans, regex):
  with pytest.raises(ArgumentError, match=regex):
    kl_score.span_costs(params, CFG, TOKENS, spans)


def test_bad_score_and_place_are_refused(params):
  with pytest.raises(ArgumentError, match=r"span_costs\(score='cosine'\): expected one of "
                     r"\('kl', 'kl_exact'\)"):
    kl_score.span_costs(params, CFG, TOKENS, [(0, 1)], score="cosine")
  with pytest.raises(ArgumentError, match=r"block_costs\(at='logits'\)"):
    kl_score.block_costs(params, CFG, TOKENS, at="logits")
