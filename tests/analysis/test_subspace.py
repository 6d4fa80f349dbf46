"""option_subspace on a case built to have a known answer, against a float64 recomputation.

The "pruned" model is the dense one with two columns of the LM head swapped: the dense top token
of item 0 (option 0) and another option token. Its logits are the dense logits with those two
entries exchanged, so item 0's global argmax and its option argmax both move to the other token,
and every number the analysis reports can be recomputed in float64 from the dense last-position
logits alone.
"""

import numpy as np
import pytest

import prunerep_jax as pj

T = 0.7  # the temperature of the compared distributions (not 1, to exercise it)
ANSWERS = [0, 1, 2]


def log_softmax64(z):
  z = np.asarray(z, np.float64) / T
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def dense_logits(params, cfg, tokens):
  """[B, V] the dense model's next-token logits after each (unpadded) prompt."""
  return np.asarray(pj.forward(params, cfg, tokens).logits[:, -1], np.float64)


@pytest.fixture(scope="module")
def case(params, dense_logits):
  """(option ids [4], the swapped model's params, the swapped pair)."""
  top = int(np.argmax(dense_logits[0]))
  order = np.argsort(dense_logits[0])
  others = [int(t) for t in order if t != top][:3]  # three of item 0's least likely tokens
  ids = np.array([top] + others, np.int32)
  kernel = np.array(params["lm_head"]["kernel"])
  kernel[:, [ids[0], ids[1]]] = kernel[:, [ids[1], ids[0]]]
  swapped = dict(params, lm_head={"kernel": kernel})
  return ids, swapped


@pytest.fixture(scope="module")
def result(params, cfg, tokens, case):
  ids, swapped = case
  return pj.analysis.option_subspace(params, swapped, cfg, tokens, ids, answers=ANSWERS,
                                     temperature=T, option_labels="ABCD")


def test_the_constructed_case_is_what_it_claims(params, cfg, tokens, case, dense_logits):
  ids, swapped = case
  zp = np.asarray(pj.forward(swapped, cfg, tokens).logits[:, -1], np.float64)
  expect = dense_logits.copy()
  expect[:, [ids[0], ids[1]]] = expect[:, [ids[1], ids[0]]]
  np.testing.assert_allclose(zp, expect, rtol=1e-6, atol=1e-6)


def test_per_item_arrays_match_a_float64_recomputation(result, case, dense_logits):
  ids, _ = case
  zd = dense_logits
  zp = zd.copy()
  zp[:, [ids[0], ids[1]]] = zp[:, [ids[1], ids[0]]]
  lpd, lpp = log_softmax64(zd), log_softmax64(zp)
  a = result.arrays
  np.testing.assert_array_equal(a["option_ids"], ids)
  np.testing.assert_allclose(a["option_logp_dense"], lpd[:, ids], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(a["option_logp_pruned"], lpp[:, ids], rtol=1e-5, atol=1e-5)
  pd = np.exp(lpd)
  np.testing.assert_allclose(a["kl"], (pd * (lpd - lpp)).sum(-1), rtol=1e-4, atol=1e-7)
  sd, sp = log_softmax64(zd[:, ids]), log_softmax64(zp[:, ids])  # renormalised inside the options
  np.testing.assert_allclose(a["subset_kl"], (np.exp(sd) * (sd - sp)).sum(-1), rtol=1e-4,
                             atol=1e-7)
  qd, qp = np.exp(sd), np.exp(sp)
  cos = (qd * qp).sum(-1) / np.linalg.norm(qd, axis=-1) / np.linalg.norm(qp, axis=-1)
  np.testing.assert_allclose(a["subset_one_minus_cos_p"], 1 - cos, rtol=1e-4, atol=1e-7)
  np.testing.assert_array_equal(a["top1_dense"], np.argmax(zd, -1))
  np.testing.assert_array_equal(a["top1_pruned"], np.argmax(zp, -1))
  np.testing.assert_array_equal(a["option_dense"], np.argmax(zd[:, ids], -1))
  np.testing.assert_array_equal(a["option_pruned"], np.argmax(zp[:, ids], -1))
  best = ids[np.argmax(zd[:, ids], -1)]
  np.testing.assert_array_equal(a["best_option_rank_dense"],
                                (zd > zd[np.arange(3), best][:, None]).sum(-1))
  np.testing.assert_array_equal(a["top_ids_dense"], np.argsort(-zd, -1)[:, :5])
  np.testing.assert_allclose(a["top_logp_pruned"], np.sort(lpp, -1)[:, ::-1][:, :5], atol=1e-5)


def test_item_zero_flips_globally_and_inside_the_options(result, case):
  ids, _ = case
  a = result.arrays
  assert a["top1_dense"][0] == ids[0] and a["top1_pruned"][0] == ids[1]
  assert a["option_dense"][0] == 0 and a["option_pruned"][0] == 1
  assert a["best_option_rank_dense"][0] == 0
  item = result.table("items")[0]
  assert item["global_flip"] and not item["option_survives"]
  assert (item["option_dense"], item["option_pruned"], item["answer"]) == ("A", "B", "A")


def test_summary_rates_and_accuracy_follow_from_the_items(result):
  a = result.arrays
  flips = a["top1_dense"] != a["top1_pruned"]
  survive = a["option_dense"] == a["option_pruned"]
  (s,) = result.table("summary")
  assert s["items"] == 3 and s["options"] == 4 and s["temperature"] == T
  assert s["global_top1_flip_rate"] == pytest.approx(flips.mean())
  assert s["option_argmax_survival_rate"] == pytest.approx(survive.mean())
  assert s["option_survival_when_global_flips"] == pytest.approx(survive[flips].mean())
  assert s["accuracy_dense"] == pytest.approx((a["option_dense"] == ANSWERS).mean())
  assert s["accuracy_pruned"] == pytest.approx((a["option_pruned"] == ANSWERS).mean())
  assert s["subset_kl_mean"] == pytest.approx(a["subset_kl"].astype(np.float64).mean())
  options = result.table("options")
  assert [o["option"] for o in options] == list("ABCD")
  for k, o in enumerate(options):
    assert o["logp_dense_mean"] == pytest.approx(a["option_logp_dense"][:, k].mean(), rel=1e-6)
    assert o["chosen_pruned"] == pytest.approx((a["option_pruned"] == k).mean())


def test_identical_models_give_zero_kl_and_full_survival(params, cfg, tokens, case):
  ids, _ = case
  r = pj.analysis.option_subspace(params, params, cfg, tokens, ids, temperature=T)
  for k in ("kl", "subset_kl", "one_minus_cos_p", "subset_one_minus_cos_p"):
    np.testing.assert_array_equal(r.arrays[k], 0.0, err_msg=k)
  (s,) = r.table("summary")
  assert s["option_argmax_survival_rate"] == 1.0 and s["global_top1_flip_rate"] == 0.0
  assert s["option_survival_when_global_flips"] is None and "accuracy_dense" not in s


@pytest.mark.parametrize("kwargs, match", [
    ({"option_ids": [5, 5, 6]}, r"option_subspace\(option_ids=\[5, 5, 6\]\): expected at least "
                                r"two distinct token ids"),
    ({"option_ids": [5]}, r"option_subspace\(option_ids=\[5\]\)"),
    ({"answers": [0, 4, 1]}, r"option_subspace\(answers\[1\]=4\)"),
    ({"answers": [0, 1]}, r"option_subspace\(answers=.*3 answers, one per prompt"),
    ({"option_labels": "AB"}, r"option_subspace\(option_labels='AB'\): expected 4 labels"),
    ({"temperature": 0}, r"option_subspace\(temperature=0\)"),
])
def test_bad_inputs_are_refused(params, cfg, tokens, kwargs, match):
  args = {"option_ids": [5, 6, 9, 11], **kwargs}
  with pytest.raises(ValueError, match=match):
    pj.analysis.option_subspace(params, params, cfg, tokens, **args)
