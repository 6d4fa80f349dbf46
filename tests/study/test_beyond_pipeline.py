"""The beyond-the-paper comparison end to end on the tiny random model: every output written, the
models at equal compression and equal to the library's transforms, the verdicts those of the
rules on the measured numbers, and a rerun served from the cache.
"""

import io
import json
from pathlib import Path

import numpy as np
import pytest

import _study_inputs as inp
import prunerep_jax as pj
from prunerep_jax import study
from prunerep_jax.study import beyond
from prunerep_jax.study import beyond_report as br
from prunerep_jax.study.console import Console, LogBuffer

PROFILE = beyond.profile("test")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  return inp.sources(tmp_path_factory.mktemp("data"))


def run(out, sources, profile=PROFILE, **kwargs):
  console = Console(io.StringIO(), LogBuffer("==== test"))
  results = beyond.run_beyond(inp.model(), profile, str(out),
                              study.Options(model_id="tiny", sources=sources), console=console,
                              **kwargs)
  return results, console.stream.getvalue()


@pytest.fixture(scope="module")
def first(tmp_path_factory, sources):
  out = tmp_path_factory.mktemp("beyond")
  results, text = run(out, sources)
  return out, results, text


def test_writes_every_output(first):
  out, results, text = first
  for name in ("results.json", "results.csv", "report.md", "beyond.log"):
    assert (out / name).is_file(), name
  ids = [v.id for v in PROFILE.variants]
  assert [c["id"] for c in results["cells"]] == ids
  assert ids[-2:] == ["drop_attn-1-cosine-recovered", "wanda-0.5-uniform-recovered"]
  rows = (out / "results.csv").read_text().splitlines()
  assert len(rows) == 1 + len(ids) and rows[0].startswith("id,method,point,choice,recovered")
  saved = json.loads((out / "results.json").read_text())
  assert saved["verdicts"] == results["verdicts"] and saved["summary"] == results["summary"]
  assert sorted(Path(p).name for p in results["figures"]) == ["allocation.png", "ranking.png",
                                                              "recovery.png"]
  report = (out / "report.md").read_text()
  for path in results["figures"]:
    assert (out / path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    assert f"]({path})" in report
  assert "## Where the prescription helped and where it did not" in report
  assert "| comparison | setting | gen fid. |" in report
  for line in results["summary"]:
    assert f"- {line}" in report
  for c in results["cells"][1:]:  # a model equal to another was not analysed again
    if "same_as" not in c:
      for ext in ("json", "csv", "npz"):
        assert (out / "analyses" / f"drift-{c['id']}.{ext}").is_file(), (c["id"], ext)
  assert (out / "cells" / "order-drop_attn-kl.json").is_file()
  assert "Verdicts:" in text and "[ 1/9] dense" in text
  assert all("ETA" in line for line in text.splitlines()
             if line.startswith("[") and "cached" not in line)


def test_verdicts_are_the_rules_on_the_measured_numbers(first):
  _, results, _ = first
  by_id = {c["id"]: c for c in results["cells"]}
  assert [(r["comparison"], r["baseline"], r["prescription"]) for r in results["verdicts"]] == [
      ("ranking", "drop_attn-1-cosine", "drop_attn-1-kl"),
      ("owl", "wanda-0.5-uniform", "wanda-0.5-owl"),
      ("kl_allocation", "wanda-0.5-uniform", "wanda-0.5-kl"),
      ("kl_vs_owl", "wanda-0.5-owl", "wanda-0.5-kl"),
      ("recovery", "drop_attn-1-cosine", "drop_attn-1-cosine-recovered"),
      ("recovery", "wanda-0.5-uniform", "wanda-0.5-uniform-recovered")]
  for r in results["verdicts"]:
    assert r["verdict"] == br.verdict(by_id[r["baseline"]], by_id[r["prescription"]])
    assert r["gen_fidelity"] == [br.gen_fidelity(by_id[r["baseline"]]),
                                 br.gen_fidelity(by_id[r["prescription"]])]


def test_models_are_at_equal_compression(first):
  _, results, _ = first
  by_id = {c["id"]: c for c in results["cells"]}
  for choice in ("cosine", "kl"):
    assert len(by_id[f"drop_attn-1-{choice}"]["prune"]["dropped"]) == 1
  sparsity = {a: by_id[f"wanda-0.5-{a}"]["prune"]["sparsity"] for a in beyond.ALLOCATIONS}
  assert sparsity == {"uniform": 0.5, "owl": 0.5, "kl": 0.5}
  owl, kl = (by_id[f"wanda-0.5-{a}"]["prune"]["per_layer"] for a in ("owl", "kl"))
  assert np.mean(owl) == pytest.approx(0.5) and np.mean(kl) == pytest.approx(0.5)
  assert owl != [0.5, 0.5] and kl != [0.5, 0.5]  # the tiny model's layers differ


def test_drop_orders_are_the_library_rankings(first, sources):
  _, results, _ = first
  model = inp.model()
  calib = pj.prune.calibration(model.tokenizer, sources.text, nsamples=PROFILE.calibration[0],
                               seqlen=PROFILE.calibration[1], seed=0)
  for choice, score in (("cosine", "residual"), ("kl", "kl")):
    lib = pj.prune.drop_sublayers(model.params, model.config, 1, kind="attn", calibration=calib,
                                  score=score)
    assert results["orders"][f"drop_attn-{choice}"]["order"] == [
        d["layer"] for d in lib.report["dropped"]]


def test_recovery_ran_its_budget_and_models_sharing_sublayers_are_evaluated_once(first):
  _, results, _ = first
  by_id = {c["id"]: c for c in results["cells"]}
  for vid in ("drop_attn-1-cosine-recovered", "wanda-0.5-uniform-recovered"):
    rec = by_id[vid]["prune"]["recovery"]
    assert rec["steps"] == PROFILE.recovery.steps and len(rec["losses"]) == rec["steps"]
    assert rec["time_s"] > 0 and all(np.isfinite(rec["losses"]))
  cos, kl = by_id["drop_attn-1-cosine"], by_id["drop_attn-1-kl"]
  if cos["prune"]["dropped"] == kl["prune"]["dropped"]:
    assert kl["same_as"] == "drop_attn-1-cosine" and kl["metrics"] == cos["metrics"]
  else:
    assert "same_as" not in kl


def test_rerun_is_served_from_the_cache_and_fresh_recomputes(first, sources, tmp_path):
  out, results, _ = first
  again, text = run(out, sources)
  lines = [line for line in text.splitlines() if line.startswith("[")]
  assert len(lines) == len(PROFILE.variants) and all(line.endswith("cached") for line in lines)
  assert again["verdicts"] == results["verdicts"] and again["orders"] == results["orders"]
  small = beyond.Profile(name="small", budget_s=60, drops=(("drop_attn", (1,)),), sparsities=(),
                         recover=(), recovery=PROFILE.recovery, sizes=PROFILE.sizes,
                         calibration=PROFILE.calibration, drift_prompts=2, drift_steps=4)
  run(tmp_path, sources, small)
  _, text = run(tmp_path, sources, small, fresh=True)
  assert not any(line.endswith("cached") for line in text.splitlines() if line.startswith("["))


def test_bad_arguments_are_refused_before_any_work(sources, tmp_path):
  model = inp.model()
  options = study.Options(model_id="tiny", sources=sources)
  with pytest.raises(TypeError, match=r"study.beyond\(profile='quick'\): expected a beyond "
                     "Profile"):
    beyond.run_beyond(model, "quick", str(tmp_path), options)
  deep = beyond.Profile(name="deep", budget_s=60, drops=(("drop_attn", (3,)),), sparsities=(),
                        recover=(), recovery=PROFILE.recovery, sizes=PROFILE.sizes,
                        calibration=PROFILE.calibration, drift_prompts=2, drift_steps=4)
  with pytest.raises(ValueError, match="drop counts of at most the model's 2 layers; "
                     "drop_attn-3-cosine drops more"):
    beyond.run_beyond(model, deep, str(tmp_path), options)
  with pytest.raises(ValueError, match=r"study.beyond\(fresh='yes'\)"):
    beyond.run_beyond(model, PROFILE, str(tmp_path), options, fresh="yes")
  assert list(tmp_path.iterdir()) == []
