"""The claim table's rules on hand-made numbers, the grid's cells and profiles, the ETA, and the
figures drawn from a results dict (no model involved)."""

import io
import sys
from pathlib import Path

import numpy as np
import pytest

from prunerep_jax.study import figures, grid, report
from prunerep_jax.study.console import Console, Eta, LogBuffer, Progress, clock

SUITES = ("mmlu", "retrieval", "perplexity", "gsm8k", "humaneval")


def make_cell(cell_id, mmlu=1.0, retr=1.0, gsm=1.0, he=1.0, kl=0.0):
  c = grid.parse_cell(cell_id)
  return {"id": c.id, "method": c.method, "point": c.point, "label": c.label, "x": c.x,
          "prune": {"time_s": 1.0}, "timings": {s: 1.0 for s in SUITES},
          "examples": {"gsm8k": ["dense says 4"], "humaneval": ["return a"]},
          "metrics": {
              "mmlu": {"accuracy": 0.3, "agreement": mmlu, "option_kl": 0.01,
                       "top1_flip_rate": 0.2, "letter_mass": 0.5, "majority_option": 0.5},
              "retrieval": {"recall_at_1": 0.8, "mrr": 0.9, "cosine_to_dense": 0.99,
                            "top1_agreement": retr},
              "perplexity": {"ppl": 30.0, "kl": kl, "top1_agreement": 0.9},
              "gsm8k": {"accuracy": 0.0, "answered": 0.5, "token_agreement": gsm,
                        "exact_match": 0.0, "first_divergence": 3.0, "answer_match": 0.5},
              "humaneval": {"token_agreement": he, "exact_match": 0.0, "first_divergence": 2.0,
                            "text_match": 0.5, "pass_at_1": None}}}


def layerwise(cos_h=0.95, cos_z=0.99, cos_p=0.8, L=8):
  sub = {"cos_h": [cos_h] * L, "cos_z": [cos_z] * L, "cos_p": [cos_p] * L,
         "one_minus_cos_h": [1 - cos_h] * L, "one_minus_cos_z": [1 - cos_z] * L,
         "one_minus_cos_p": [1 - cos_p] * L, "kl": [0.1] * L, "kl_estimate": [0.1] * L,
         "top1_agree": [0.9] * L}
  def stats(pearson, ratio):
    return {"n": 100, "pearson": pearson, "pearson_log": 0.99, "ratio_mean": ratio,
            "ratio_median": ratio}

  # over every pair the estimates fail (large changes); over the small changes they hold
  theorem = {"all": {"kl": {**stats(0.3, 3.0), "small": stats(0.95, 1.05)},
                     "one_minus_cos_p": {**stats(0.2, 5.0), "small": stats(0.85, 1.3)}}}
  return {"layerwise": {"attn": dict(sub), "mlp": dict(sub)}, "theorem": theorem}


def drift(free_kl=10.0, teacher_kl=0.5, free_cos_p=0.1, S=8):
  def track(kl, cp):
    return {"kl": [kl] * S, "cos_p": [cp] * S, "cos_h": [0.9] * S, "cos_z": [0.9] * S,
            "kl_estimate": [kl] * S, "agree": [0.5] * S, "prompts": [2] * S}

  return {"steps": {"free": track(free_kl, free_cos_p), "teacher": track(teacher_kl, 0.9)},
          "first_divergence": {"free": [1, 3], "teacher": [8, 8]}, "theorem": {}}


def options(flip=0.5, survive=0.9, when=0.8, logp=-12.0):
  return {"summary": {"items": 10, "global_top1_flip_rate": flip,
                      "option_argmax_survival_rate": survive,
                      "option_survival_when_global_flips": when,
                      "option_logp_dense": {"mean": logp, "min": logp - 1, "max": logp + 1},
                      "best_option_rank_dense": {"median": 40.0}},
          "options": [{"option": x, "token_id": i, "logp_dense_mean": logp,
                       "logp_pruned_mean": logp - 0.5, "chosen_dense": 0.25,
                       "chosen_pruned": 0.25} for i, x in enumerate("ABCD")]}


def results(cells, analyses=None):
  r = {"model": "hand-made", "num_layers": 8, "dtype": "float32", "profile": "quick",
       "cells": cells, "analyses": analyses or {}, "skipped": [],
       "sizes": {"mmlu_max_tokens": 192, "passage_tokens": 64, "ppl_windows": 2,
                 "ppl_seqlen": 128, "max_new_tokens": 32},
       "workload": {"mmlu": ["a"] * 4, "retrieval": ["b"] * 6, "gsm8k": ["c"] * 2,
                    "humaneval": ["d"] * 2},
       "calibration": {"nsamples": 8, "seqlen": 128, "source": "wikipedia"},
       "analysis_plan": {"prompts": 4, "decode_steps": 8, "drift_steps": 24},
       "analysis_settings": ["drop attention 4"],
       "run": {"wall_s": 100.0, "cpu_s": 150.0, "compute_s": 90.0, "budget_s": 300,
               "load_average_start": [1.0, 1.0, 1.0], "load_average_end": [2.0, 1.5, 1.0],
               "cpu_count": 2}}
  r["claims"] = report.claims(r)
  return r


def verdicts(r):
  return {c["key"]: c["held"] for c in r["claims"]}


PAPER_LIKE = [make_cell("dense"), make_cell("drop_attn-4", 0.9, 0.9, 0.4, 0.5, 0.2),
              make_cell("drop_attn-8", 0.8, 0.8, 0.2, 0.3, 0.5),
              make_cell("drop_mlp-4", 0.8, 0.85, 0.1, 0.2, 0.6),
              make_cell("drop_mlp-8", 0.6, 0.7, 0.05, 0.05, 3.0),
              make_cell("wanda-0.5", 0.85, 0.9, 0.2, 0.3, 0.4),
              make_cell("wanda-2of4", 0.75, 0.8, 0.1, 0.1, 1.0)]
ANALYSES = {"layerwise-drop-final_norm": layerwise(), "drift-drop_attn-4": drift(),
            "option_subspace-drop_attn-4": options()}


def test_every_claim_holds_on_paper_like_numbers():
  r = results(PAPER_LIKE, ANALYSES)
  assert set(verdicts(r).values()) == {"yes"}, r["claims"]
  nongen = next(c for c in r["claims"] if c["key"] == "nongen_close")
  assert nongen["ours"].startswith("drop attention 8: non-generative fidelity 0.80")
  assert nongen["ours"].endswith("MMLU accuracy 0.30 -> 0.30, retrieval recall@1 0.80 -> 0.80")


def test_nothing_measured_is_not_applicable_never_held():
  r = results([make_cell("dense")])
  assert set(verdicts(r).values()) == {"n/a"}


@pytest.mark.parametrize("key, cells, analyses", [
    # MMLU agreement 0.5 and retrieval 0.6 at drop 8: fidelity 0.55 < 0.7
    ("nongen_close", [make_cell("dense"), make_cell("drop_attn-8", 0.5, 0.6, 0.2, 0.2)], {}),
    # generation keeps 0.6 at every drop <= 8
    ("gen_collapses", [make_cell("dense"), make_cell("drop_attn-8", 0.9, 0.9, 0.6, 0.6),
                       make_cell("drop_mlp-8", 0.9, 0.9, 0.7, 0.7)], {}),
    # half the pruned models show no margin
    ("gap", [make_cell("dense"), make_cell("drop_attn-4", 0.9, 0.9, 0.2, 0.2),
             make_cell("drop_attn-8", 0.5, 0.5, 0.5, 0.5)], {}),
    # MLP drop better than attention drop on generation
    ("mlp_worse", [make_cell("dense"), make_cell("drop_attn-8", 0.8, 0.8, 0.2, 0.2),
                   make_cell("drop_mlp-8", 0.7, 0.7, 0.3, 0.3)], {}),
    ("wanda", [make_cell("dense"), make_cell("wanda-0.3", 0.9, 0.9, 0.85, 0.85)], {}),
    ("h_stable", [make_cell("dense")], {"layerwise-drop-final_norm": layerwise(cos_h=0.85)}),
    ("z_vs_h", [make_cell("dense")], {"layerwise-drop-final_norm": layerwise(cos_z=0.9)}),
    ("p_amplifies", [make_cell("dense")], {"layerwise-drop-final_norm": layerwise(cos_p=0.995)}),
    ("drift", [make_cell("dense")], {"drift-drop_attn-4": drift(free_kl=0.8)}),
    ("drift", [make_cell("dense")], {"drift-drop_attn-4": drift(free_cos_p=0.7)}),
    ("options_survive", [make_cell("dense")],
     {"option_subspace-drop_attn-4": options(flip=0.1, survive=0.8)}),
    ("options_survive", [make_cell("dense")],
     {"option_subspace-drop_attn-4": options(when=0.4)}),
    ("options_tail", [make_cell("dense")], {"option_subspace-drop_attn-4": options(logp=-1.5)}),
])
def test_a_claim_fails_when_its_rule_fails(key, cells, analyses):
  assert verdicts(results(cells, analyses))[key] == "no"


@pytest.mark.parametrize("quantity, key, pearson, ratio, held", [
    ("kl", "theorem3", 0.95, 1.05, "yes"), ("kl", "theorem3", 0.85, 1.05, "no"),
    ("kl", "theorem3", 0.95, 1.3, "no"), ("kl", "theorem3", 0.95, 0.79, "no"),
    ("one_minus_cos_p", "theorem2", 0.85, 1.55, "yes"),
    ("one_minus_cos_p", "theorem2", 0.75, 1.2, "no"),
    ("one_minus_cos_p", "theorem2", 0.85, 1.7, "no"),
])
def test_theorem_rules(quantity, key, pearson, ratio, held):
  lw = layerwise()
  lw["theorem"]["all"][quantity]["small"].update(pearson=pearson, ratio_median=ratio)
  assert verdicts(results([make_cell("dense")], {"layerwise-drop-final_norm": lw}))[key] == held


def test_mlp_worse_falls_back_to_the_largest_common_n():
  cells = [make_cell("dense"), make_cell("drop_attn-4", 0.9, 0.9, 0.5, 0.5),
           make_cell("drop_mlp-4", 0.8, 0.8, 0.2, 0.2), make_cell("drop_attn-8", 0.1, 0.1, 0, 0)]
  claim = next(c for c in results(cells)["claims"] if c["key"] == "mlp_worse")
  assert claim["held"] == "yes" and claim["ours"].startswith("n=4:")


def test_fidelity_summaries():
  c = make_cell("drop_attn-4", mmlu=0.8, retr=0.6, gsm=0.3, he=0.1)
  assert report.nongen_fidelity(c) == pytest.approx(0.7)
  assert report.gen_fidelity(c) == pytest.approx(0.2)


def test_report_markdown_and_tables():
  r = results(PAPER_LIKE, ANALYSES)
  md = report.markdown(r)
  assert "**13 of 13 claims held, 0 did not, 0 not measured in this profile.**" in md
  assert "| claim | paper | ours | held? |" in md
  for c in r["claims"]:
    cells = [c["claim"], c["paper"], c["ours"], "yes"]
    assert "| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |" in md
    assert f"- **{c['claim']}**: {c['rule']}." in md
  assert "| KL(p \\|\\| p') ~= Var_p(dz) / 2T^2 (Theorem 3) |" in md
  main = report.main_table(r)
  assert [row["model"] for row in main] == ["dense", "drop attention 4", "drop attention 8",
                                            "drop MLP 4", "drop MLP 8"]
  assert main[2]["MMLU agree"] == 0.8 and main[2]["generative fidelity"] == pytest.approx(0.25)
  rows = report.cell_rows(r)
  assert rows[1]["mmlu.agreement"] == 0.9 and rows[1]["eval_s"] == 5.0
  text = report.console_summary(r)
  assert "drop MLP 8" in text and "[yes] Generation collapses" in text


def test_figures_are_written(tmp_path):
  """Suite figures from the results; analysis figures from the result files saved under
  OUT/analyses (here a real drift result of a tiny model), through prunerep_jax.plots."""
  r = results(PAPER_LIKE, ANALYSES)
  paths = figures.draw_all(r, str(tmp_path))
  assert sorted(p.split("/")[-1] for p in paths) == [
      "main-table.png", "sweep-drop_attn.png", "sweep-drop_mlp.png", "sweep-wanda.png"]
  sys.path.insert(0, str(Path(__file__).parents[1] / "tasks"))
  import _tiny_model as tiny  # pylint: disable=import-outside-toplevel
  from prunerep_jax.analysis import drift  # pylint: disable=import-outside-toplevel
  from prunerep_jax.prune.drop import drop_listed  # pylint: disable=import-outside-toplevel
  config, params = tiny.config(), tiny.params(0)
  tokens = np.random.default_rng(0).integers(3, tiny.VOCAB, size=(2, 6)).astype(np.int32)
  pruned = drop_listed(params, config, [(0, "attn")])
  drift(params, pruned.params, config, tokens, 3).save(str(tmp_path / "analyses"),
                                                      "drift-drop_attn-4")
  paths = figures.draw_all(r, str(tmp_path))
  names = sorted(p.split("/")[-1] for p in paths)
  assert names == ["drift-drop_attn-4.png", "main-table.png", "sweep-drop_attn.png",
                   "sweep-drop_mlp.png", "sweep-wanda.png"]
  for p in paths:
    assert (tmp_path / p).read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------- grid

@pytest.mark.parametrize("cell, cell_id, label, x", [
    (grid.Cell("dense"), "dense", "dense", 0.0),
    (grid.Cell("drop_attn", 4), "drop_attn-4", "drop attention 4", 4.0),
    (grid.Cell("drop_block", 2), "drop_block-2", "drop block 2", 2.0),
    (grid.Cell("wanda", 0.5), "wanda-0.5", "Wanda 50%", 0.5),
    (grid.Cell("sparsegpt", "2:4"), "sparsegpt-2of4", "SparseGPT 2:4", 0.5),
    (grid.Cell("magnitude", "4:8"), "magnitude-4of8", "magnitude 4:8", 0.5),
])
def test_cell_names(cell, cell_id, label, x):
  assert (cell.id, cell.label, cell.x) == (cell_id, label, x)
  assert grid.parse_cell(cell_id) == cell


@pytest.mark.parametrize("method, point, expected", [
    ("prune", None, "expected one of"), ("dense", 1, "expected no point"),
    ("drop_attn", 0, "an integer >= 1"), ("drop_mlp", 2.0, "an integer >= 1"),
    ("drop_attn", True, "an integer >= 1"), ("wanda", 1.0, "a sparsity in (0, 1) or 'n:m'"),
    ("wanda", "4:2", "a sparsity in (0, 1) or 'n:m'"), ("magnitude", 0, "a sparsity in"),
])
def test_bad_cells_are_refused(method, point, expected):
  with pytest.raises(ValueError, match=r"Cell\(method=.*" + expected.replace("(", r"\(")
                     .replace(")", r"\)")):
    grid.Cell(method, point)


def test_profiles():
  for name, p in grid.PROFILES.items():
    assert p.name == name and p.cells[0] == grid.Cell("dense")
    assert all(c in p.cells for c in p.analysis.settings)
  assert grid.PROFILES["quick"].budget_s == 300 and grid.PROFILES["readme"].budget_s == 900
  assert grid.PROFILES["full"].budget_s == 3600
  full = grid.PROFILES["full"].cells
  assert grid.drop_points(full, "drop_attn") == list(range(1, 13))
  assert {c.point for c in full if c.method == "wanda"} >= {0.1, 0.5, 0.7, "2:4", "4:8"}
  with pytest.raises(ValueError, match=r"profile\(name='huge'\): expected one of"):
    grid.profile("huge")
  with pytest.raises(ValueError, match="analysis setting drop_attn-4 is not a cell"):
    grid.Profile("x", 1, (grid.Cell("dense"),), grid.PROFILES["quick"].sizes, (1, 2),
                 grid.AnalysisPlan((grid.Cell("drop_attn", 4),), 1, 1, 1))


def test_max_points_skips_what_the_model_cannot_drop():
  cells = (grid.Cell("dense"), grid.Cell("drop_attn", 2), grid.Cell("drop_attn", 3),
           grid.Cell("drop_block", 2), grid.Cell("wanda", 0.5))
  feasible, skipped = grid.max_points(cells, 2)
  assert skipped == (grid.Cell("drop_attn", 3), grid.Cell("drop_block", 2))
  assert feasible == (grid.Cell("dense"), grid.Cell("drop_attn", 2), grid.Cell("wanda", 0.5))


# ---------------------------------------------------------------------------- console

def test_eta_uses_finished_units_and_weights():
  eta = Eta(prior=10.0, weights={"cell:drop_attn": 1.0, "cell:wanda": 3.0, "analysis": 0.5})
  assert eta.remaining(["cell:drop_attn", "cell:wanda"]) == 40.0  # prior x weights
  eta.record("cell:drop_attn", 20.0)
  assert eta.estimate("cell:drop_attn") == 20.0
  assert eta.estimate("cell:wanda") == 60.0  # 20 s per unit of weight
  eta.record("cell:wanda", 30.0)
  assert eta.estimate("cell:wanda") == 30.0
  assert eta.estimate("analysis") == pytest.approx(0.5 * 50.0 / 4.0)


def test_clock():
  assert [clock(s) for s in (None, 5, 65, 3600 + 62)] == ["?", "0:05", "1:05", "1:01:02"]


def test_progress_lines_count_units_and_estimate_what_is_left(monkeypatch):
  stream, flushes = io.StringIO(), []
  now = [100.0]
  monkeypatch.setattr("prunerep_jax.study.console.time.perf_counter", lambda: now[0])
  pending = ["cell:a", "cell:a", "analysis"]
  tracker = Progress(Console(stream), Eta(5.0, {"analysis": 0.5}), pending, 4, 40.0, width=6,
                     after=lambda: flushes.append(1))
  tracker.finished("cell:a", "dense", None)
  tracker.finished("cell:a", "a-1", 20.0, "MMLU 0.5")
  tracker.reporter("a-2")("pruning")  # not a tty: status lines stay off the stream
  assert stream.getvalue().splitlines() == [
      "[ 1/4] dense  cached",
      # elapsed 100 - 40 s; left: one more cell:a (its mean, 20 s) + one analysis (0.5 x 20 s)
      "[ 2/4] a-1      20.0 s  MMLU 0.5  | elapsed 1:00, ETA 0:30"]
  assert pending == ["cell:a", "analysis"] and len(flushes) == 2 and tracker.done == 2


def test_console_keeps_status_lines_out_of_a_file_but_in_the_log(tmp_path):
  buffer = LogBuffer("==== header")
  stream = io.StringIO()
  console = Console(stream, buffer)
  console.status("mmlu: 8/16 items")
  console.line("[ 1/3] dense  done")
  assert stream.getvalue() == "[ 1/3] dense  done\n"
  buffer.flush_to(str(tmp_path / "x.log"))
  log = (tmp_path / "x.log").read_text().splitlines()
  assert log[0] == "==== header"
  assert log[1].endswith("mmlu: 8/16 items") and log[2].endswith("[ 1/3] dense  done")
