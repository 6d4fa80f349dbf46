"""The verdict rules of the beyond-the-paper report on hand-made numbers, and the variants and
profiles refusing what they cannot run."""

import pytest

from prunerep_jax.study import beyond
from prunerep_jax.study import beyond_report as br


def record(id_, method="drop_attn", point=4, choice="cosine", recovered=False, gen=(0.5, 0.5),
           kl=1.0, dropped=None, nongen=(0.8, 0.8), drift=5.0):
  """A model record as study.beyond writes it, with the numbers the rules read."""
  return {
      "id": id_, "method": method, "point": point, "choice": choice, "recovered": recovered,
      "label": beyond.Variant(method, point, choice, recovered).label if method != "dense"
      else "dense",
      "x": 0.0, "prune": {"dropped": dropped, "time_s": 1.0}, "timings": {"mmlu": 1.0},
      "drift": {"kl": drift, "time_s": 0.5},
      "metrics": {"gsm8k": {"token_agreement": gen[0], "exact_match": 0.0},
                  "humaneval": {"token_agreement": gen[1]},
                  "mmlu": {"agreement": nongen[0]}, "retrieval": {"top1_agreement": nongen[1]},
                  "perplexity": {"kl": kl}},
  }


@pytest.mark.parametrize("gen_new, kl_new, expected", [
    ((0.56, 0.54), 1.0, br.HELPED),         # +0.05 exactly: the margin counts
    ((0.54, 0.55), 0.5, br.HELPED_KL),      # +0.045 < margin; KL halved
    ((0.45, 0.45), 1.0, br.HURT),           # -0.05 exactly
    ((0.52, 0.5), 1.25, br.HURT_KL),        # KL x1.25 exactly
    ((0.52, 0.5), 0.8, br.HELPED_KL),       # KL x1/1.25 exactly
    ((0.52, 0.5), 0.81, br.TIE),            # within both margins
    ((0.9, 0.9), 3.0, br.HELPED),           # fidelity decides before the KL does
])
def test_verdict_follows_the_rule(gen_new, kl_new, expected):
  base = record("a", dropped=[1, 2, 3, 4])
  new = record("b", choice="kl", gen=gen_new, kl=kl_new, dropped=[1, 2, 3, 5])
  assert br.verdict(base, new) == expected


def test_same_sublayers_are_the_same_model_whatever_the_numbers():
  base = record("a", dropped=[1, 2, 3, 4])
  new = record("b", choice="kl", gen=(0.9, 0.9), dropped=[1, 2, 3, 4])
  assert br.verdict(base, new) == br.SAME
  # Recovery of that model changes its weights, not its sublayers: a real comparison.
  after = record("c", recovered=True, gen=(0.9, 0.9), dropped=[1, 2, 3, 4])
  assert br.verdict(base, after) == br.HELPED


def test_missing_generative_numbers_fall_back_to_the_kl():
  base = record("a", method="wanda", point=0.5, choice="uniform", gen=(None, None), kl=1.0)
  new = record("b", method="wanda", point=0.5, choice="kl", gen=(None, None), kl=0.5)
  assert br.verdict(base, new) == br.HELPED_KL


def results_of(cells):
  return {"cells": [record("dense", method="dense", point=None, choice=None, gen=(1, 1), kl=0.0)]
          + cells}


def test_pairs_verdicts_and_summary_on_a_hand_made_run():
  cells = [
      record("drop_attn-4-cosine", dropped=[1, 2, 3, 4], gen=(0.2, 0.2), kl=1.0),
      record("drop_attn-4-kl", choice="kl", dropped=[1, 2, 3, 9], gen=(0.4, 0.4), kl=0.5),
      record("drop_attn-2-cosine", point=2, dropped=[1, 2], gen=(0.5, 0.5)),
      record("drop_attn-2-kl", point=2, choice="kl", dropped=[1, 2], gen=(0.5, 0.5)),
      record("wanda-0.5-uniform", "wanda", 0.5, "uniform", gen=(0.3, 0.3), kl=1.0),
      record("wanda-0.5-owl", "wanda", 0.5, "owl", gen=(0.2, 0.2), kl=1.0),
      record("wanda-0.5-kl", "wanda", 0.5, "kl", gen=(0.31, 0.31), kl=0.99),
      record("wanda-2of4-uniform", "wanda", "2:4", "uniform", gen=(0.1, 0.1)),
      record("drop_attn-4-cosine-recovered", recovered=True, dropped=[1, 2, 3, 4],
             gen=(0.1, 0.1), kl=0.9),
  ]
  results = results_of(cells)
  rows = br.verdicts(results)
  got = [(r["comparison"], r["setting"], r["baseline"], r["prescription"], r["verdict"])
         for r in rows]
  assert got == [
      ("ranking", "drop attention 4", "drop_attn-4-cosine", "drop_attn-4-kl", br.HELPED),
      ("ranking", "drop attention 2", "drop_attn-2-cosine", "drop_attn-2-kl", br.SAME),
      ("owl", "Wanda 50%", "wanda-0.5-uniform", "wanda-0.5-owl", br.HURT),
      ("kl_allocation", "Wanda 50%", "wanda-0.5-uniform", "wanda-0.5-kl", br.TIE),
      ("kl_vs_owl", "Wanda 50%", "wanda-0.5-owl", "wanda-0.5-kl", br.HELPED),
      ("recovery", "drop attention 4, cosine ranking", "drop_attn-4-cosine",
       "drop_attn-4-cosine-recovered", br.HURT),
  ]
  assert rows[0]["gen_fidelity"] == [0.2, 0.4] and rows[0]["next_token_kl"] == [1.0, 0.5]
  results["verdicts"] = rows
  text = br.summary(results)
  assert text[0] == ("**KL ranking vs LLM-Drop's cosine ranking** (2 settings): helped at 1 "
                     "(drop attention 4); same model at 1 (drop attention 2); mean change of "
                     "generative fidelity +0.100; non-generative fidelity +0.000.")
  # OWL vs uniform places the baseline: it is not counted as the prescription.
  assert text[-1] == ("**Overall**: of 5 comparisons of the prescription with its baseline, it "
                      "helped in 2 (KL ranking at drop attention 4, KL allocation (vs OWL) at "
                      "Wanda 50%), hurt in 1 (recovery of drop attention 4, cosine ranking); the "
                      "rest showed no clear difference or the same model.")


def test_metric_wins_count_the_settings_where_the_prescription_is_better():
  cells = [
      record("drop_attn-4-cosine", dropped=[1, 2, 3, 4], gen=(0.2, 0.2), kl=1.0, drift=5.0),
      record("drop_attn-4-kl", choice="kl", dropped=[1, 2, 3, 9], gen=(0.4, 0.1), kl=0.5,
             drift=5.0, nongen=(0.7, 0.9)),
      record("drop_attn-6-cosine", point=6, dropped=[1, 2, 3, 4, 5, 6], gen=(0.2, 0.2), kl=1.0,
             drift=6.0),
      record("drop_attn-6-kl", point=6, choice="kl", dropped=[1, 2, 3, 4, 5, 7], gen=(0.1, 0.1),
             kl=1.1, drift=4.0),
      record("drop_attn-2-cosine", point=2, dropped=[1, 2], gen=(0.5, 0.5)),
      record("drop_attn-2-kl", point=2, choice="kl", dropped=[1, 2], gen=(0.5, 0.5)),
  ]
  results = results_of(cells)
  (row,) = br.metric_wins(results)
  assert row["comparison"] == "ranking" and row["settings"] == 2  # drop 2: the same model
  assert row["gen fid."] == "1/2"          # 0.25 > 0.2; 0.1 < 0.2
  assert row["GSM8K tokens"] == "1/2" and row["HumanEval tokens"] == "0/2"
  assert row["drift KL"] == "1/2"          # equal at 4 counts for neither; lower at 6
  assert row["next-token KL"] == "1/2"
  assert row["non-gen fid."] == "0/2"      # mean of (0.7, 0.9) is the baseline's 0.8: equal
  assert row["MMLU agree"] == "0/2" and row["retr agree"] == "1/2"
  assert row["GSM8K 1st div"] == "0/0"     # not measured in these records


def test_compute_counts_a_shared_model_once():
  twin = dict(record("drop_attn-2-kl", point=2, choice="kl", dropped=[1, 2]),
              same_as="drop_attn-2-cosine")
  after = record("x-recovered", recovered=True)
  after["prune"]["recovery"] = {"time_s": 10.0}
  results = results_of([record("drop_attn-2-cosine", point=2, dropped=[1, 2]), twin, after])
  # dense 1 + 1.5; cosine 1 + 1.5; twin 1 (prune only); recovered 1 + 10 + 1.5
  assert br.compute_s(results) == pytest.approx(2.5 + 2.5 + 1.0 + 12.5)


@pytest.mark.parametrize("args, message", [
    (("drop_attn", 4, "owl"), "beyond.Variant(choice='owl'): expected one of"),
    (("wanda", 0.5, "cosine"), "beyond.Variant(choice='cosine'): expected one of"),
    (("wanda", "2:4", "kl"), "expected 'uniform' for the N:M pattern 2:4"),
    (("drop_attn", 0, "kl"), "Cell(method='drop_attn', point=0): expected an integer >= 1"),
    (("prune_all", 4, "kl"), "beyond.Variant(method='prune_all'): expected one of"),
])
def test_bad_variants_are_refused(args, message):
  with pytest.raises(ValueError) as e:
    beyond.Variant(*args)
  assert message in str(e.value)


def test_profiles_list_every_comparison_and_refuse_unknown_names():
  readme = beyond.profile("readme")
  ids = [v.id for v in readme.variants]
  assert ids[0] == "dense" and len(ids) == len(set(ids))
  for n in (2, 4, 6, 8):
    assert {f"drop_attn-{n}-cosine", f"drop_attn-{n}-kl"} <= set(ids)
  assert {"wanda-0.5-uniform", "wanda-0.5-owl", "wanda-0.5-kl", "wanda-2of4-uniform",
          "drop_attn-4-cosine-recovered", "wanda-0.5-uniform-recovered"} <= set(ids)
  with pytest.raises(ValueError, match=r"beyond.profile\(name='huge'\): expected one of"):
    beyond.profile("huge")
