"""The whole study on the tiny random model: every output written, dense compared with itself,
cells equal to the library's transforms, and resuming (nothing recomputed after a finished run;
an interrupted run, a damaged or partial cell file, a changed setting: only that unit recomputed).

One module-scoped run compiles every shape; later runs in other directories reuse the compiled
programs and take seconds.
"""

import io
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import _study_inputs as inp
import prunerep_jax as pj
from prunerep_jax import study
from prunerep_jax.study import cells, grid
from prunerep_jax.study.console import Console, LogBuffer
from prunerep_jax.tasks import mmlu

PROFILE = study.profile("test")
SMALL = grid.Profile(name="small", budget_s=60, cells=PROFILE.cells[:2], sizes=PROFILE.sizes,
                     calibration=PROFILE.calibration,
                     analysis=grid.AnalysisPlan((), prompts=2, decode_steps=0, drift_steps=4))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  return inp.sources(tmp_path_factory.mktemp("data"))


def run(out, sources, profile=PROFILE, console=None, **options):
  console = console or Console(io.StringIO(), LogBuffer("==== test"))
  results = study.run(inp.model(), profile, str(out),
                      study.Options(model_id="tiny", sources=sources, **options), console=console)
  return results, console.stream.getvalue()


@pytest.fixture(scope="module")
def first(tmp_path_factory, sources):
  out = tmp_path_factory.mktemp("study")
  results, text = run(out, sources)
  return out, results, text


def metrics(results):
  return [(c["id"], c["metrics"]) for c in results["cells"]]


def unit_lines(text):
  """{unit name: "cached" or "computed"} from the progress lines."""
  out = {}
  for line in text.splitlines():
    if line.startswith("[") and "/" in line.split("]")[0]:
      name, state = line.split("] ", 1)[1], "computed"
      if name.rstrip().endswith("cached"):
        name, state = name.rstrip()[:-len("cached")], "cached"
      else:
        name = name.split("  ")[0]
      out[name.strip()] = state
  return out


def test_writes_every_output(first):
  out, results, text = first
  for name in ("run.json", "results.json", "results.csv", "main_table.csv", "report.md",
               "reproduce.log"):
    if name != "run.json":  # the launcher writes the marker, not the library
      assert (out / name).is_file(), name
  ids = [c.id for c in PROFILE.cells]
  assert [c["id"] for c in results["cells"]] == ids
  rows = (out / "results.csv").read_text().splitlines()
  assert len(rows) == 1 + len(ids) and rows[0].startswith("id,method,point,label")
  assert json.loads((out / "results.json").read_text())["claims"] == results["claims"]
  report = (out / "report.md").read_text()
  assert "| claim | paper | ours | held? |" in report
  assert len(results["claims"]) == 13 and all(c["held"] in ("yes", "no", "n/a")
                                                for c in results["claims"])
  for path in results["figures"]:
    assert (out / path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    assert f"]({path})" in report
  figures = {Path(p).name for p in results["figures"]}
  assert {"sweep-drop_attn.png", "sweep-drop_mlp.png", "sweep-magnitude.png", "layerwise-drop-final_norm.png",
          "drift-drop_attn-1.png", "option_subspace-drop_attn-1.png",
          "theorem-layerwise-drop-final_norm.png"} <= figures
  for name in ("layerwise-drop-final_norm", "theorem-layerwise-drop-final_norm",
               "drift-drop_attn-1", "theorem-drift-drop_attn-1", "option_subspace-drop_attn-1"):
    for ext in ("json", "csv", "npz"):
      assert (out / "analyses" / f"{name}.{ext}").is_file(), (name, ext)
  assert pj.analysis.Result.load(str(out / "analyses"), "drift-drop_attn-1").meta["mode"] == "both"
  log = (out / "reproduce.log").read_text()
  assert "[ 1/" in log and "dense" in log
  assert "Claims of the paper" in text and "Fidelity to the dense model" in text


def test_progress_lines_have_an_eta(first):
  _, _, text = first
  lines = [line for line in text.splitlines() if line.startswith("[")]
  units = len(PROFILE.cells) + 3  # + layerwise, drift and option subspace of drop attention 1
  assert len(lines) == units
  assert lines[0].startswith(f"[ 1/{units}] dense")
  assert all("ETA" in line and "elapsed" in line for line in lines), lines


def test_dense_against_itself_is_the_identity(first):
  _, results, _ = first
  m = results["cells"][0]["metrics"]
  assert m["mmlu"]["agreement"] == 1.0 and m["mmlu"]["option_kl"] == 0.0
  assert m["retrieval"]["top1_agreement"] == 1.0
  assert m["retrieval"]["cosine_to_dense"] == pytest.approx(1.0, abs=1e-6)
  assert m["perplexity"]["kl"] == 0.0 and m["perplexity"]["top1_agreement"] == 1.0
  for suite in ("gsm8k", "humaneval"):
    assert m[suite]["token_agreement"] == 1.0 and m[suite]["exact_match"] == 1.0
    assert m[suite]["first_divergence"] is None


def test_drop_cell_is_the_library_transform(first, sources):
  """The cell "drop attention 1" (top 1 of one scoring) is drop_sublayers(n=1), and its MMLU
  fidelity is what mmlu.compare gives for that model against the dense one."""
  _, results, _ = first
  model = inp.model()
  calib = pj.prune.calibration(model.tokenizer, sources.text, nsamples=PROFILE.calibration[0],
                               seqlen=PROFILE.calibration[1], seed=0)
  lib = pj.prune.drop_sublayers(model.params, model.config, 1, kind="attn", calibration=calib)
  cell = next(c for c in results["cells"] if c["id"] == "drop_attn-1")
  assert cell["prune"]["dropped"] == [d["layer"] for d in lib.report["dropped"]]
  items = [it for it in mmlu.load(sources.mmlu) if it.id in results["workload"]["mmlu"]]
  dense = mmlu.evaluate(model.params, model.config, model.tokenizer, items, batch_size=8,
                        progress=lambda line: None)
  pruned = mmlu.evaluate(lib.params, lib.config, model.tokenizer, items, batch_size=8,
                         progress=lambda line: None)
  assert cell["metrics"]["mmlu"]["agreement"] == mmlu.compare(dense, pruned)["agreement"]


def test_drop_orders_are_the_library_drops(sources):
  """Top-n of one scoring pass == drop_sublayers(n) / drop_blocks(n), params bit for bit."""
  model = inp.model()
  p, c = model.params, model.config
  calib = pj.prune.calibration(model.tokenizer, sources.text, nsamples=2, seqlen=16, seed=0)
  for method, kind in (("drop_attn", "attn"), ("drop_mlp", "mlp")):
    order = cells.drop_order(method, p, c, calib, 2)
    for n in (1, 2):
      mine = cells.prune_cell(grid.Cell(method, n), p, c, calib, {method: order})
      lib = pj.prune.drop_sublayers(p, c, n, kind=kind, calibration=calib)
      assert mine.info["dropped"] == sorted(d["layer"] for d in lib.report["dropped"])
      for a, b in zip(jax.tree_util.tree_leaves(mine.params),
                      jax.tree_util.tree_leaves(lib.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  order = cells.drop_order("drop_block", p, c, calib, 1)
  mine = cells.prune_cell(grid.Cell("drop_block", 1), p, c, calib, {"drop_block": order})
  lib = pj.prune.drop_blocks(p, c, 1, calibration=calib)
  assert mine.config == lib.config and mine.config.num_layers == 1
  assert mine.info["dropped"] == [d["layer"] for d in lib.report["dropped"]]


def test_rerun_recomputes_nothing(first, sources):
  out, results, _ = first
  before = {f: os.stat(f).st_mtime_ns for f in (out / "cells").iterdir()}
  again, text = run(out, sources)
  states = unit_lines(text)
  assert states and set(states.values()) == {"cached"}, states
  assert {f: os.stat(f).st_mtime_ns for f in (out / "cells").iterdir()} == before
  assert again["cells"] == results["cells"] and again["analyses"] == results["analyses"]


def test_damaged_partial_or_stale_cells_are_recomputed(first, sources, tmp_path):
  out = tmp_path / "copy"
  shutil.copytree(first[0], out)
  cache = out / "cells"
  partial = (cache / "drop_attn-1.json").read_bytes()
  (cache / "drop_attn-1.json").write_bytes(partial[:len(partial) // 2])  # a half-written file
  (cache / "drop_mlp-1.json").write_text("not json")
  stale = json.loads((cache / "magnitude-0.5.json").read_text())
  stale["fingerprint"] = "computed-with-other-settings"
  (cache / "magnitude-0.5.json").write_text(json.dumps(stale))
  npz = (cache / "dense.npz").read_bytes()
  (cache / "dense.npz").write_bytes(npz[:-10] + b"0123456789")  # damaged arrays
  again, text = run(out, sources)
  states = unit_lines(text)
  recomputed = {k for k, v in states.items() if v == "computed"}
  assert recomputed == {"dense", "drop attention 1", "drop MLP 1", "magnitude 50%"}, states
  assert metrics(again) == metrics(first[1])  # deterministic: the same numbers again


def test_interrupted_run_resumes_where_it_stopped(first, sources, tmp_path):
  class Interrupt(Console):
    def status(self, text):
      if "drop MLP 1: pruning" in text:
        raise KeyboardInterrupt
      super().status(text)

  out = tmp_path / "killed"
  with pytest.raises(KeyboardInterrupt):
    run(out, sources, console=Interrupt(io.StringIO(), LogBuffer()))
  assert not (out / "results.json").exists()
  assert (out / "cells" / "drop_attn-1.json").is_file()
  assert not (out / "cells" / "drop_mlp-1.json").exists()
  assert (out / "reproduce.log").is_file()
  again, text = run(out, sources)
  states = unit_lines(text)
  assert states["dense"] == states["drop attention 1"] == "cached"
  assert states["drift-drop_attn-1"] == "cached"
  assert states["drop MLP 1"] == states["magnitude 50%"] == "computed"
  assert metrics(again) == metrics(first[1])


def test_changed_setting_changes_every_fingerprint(sources, tmp_path):
  out = tmp_path / "small"
  run(out, sources, profile=SMALL)
  _, text = run(out, sources, profile=SMALL)
  assert set(unit_lines(text).values()) == {"cached"}
  _, text = run(out, sources, profile=SMALL, gen_batch_size=2)
  assert set(unit_lines(text).values()) == {"computed"}


def test_a_model_too_shallow_for_a_cell_skips_it(sources, tmp_path):
  deep = grid.Profile(name="deep", budget_s=60, cells=(grid.Cell("dense"),
                                                       grid.Cell("drop_attn", 3)),
                      sizes=PROFILE.sizes, calibration=PROFILE.calibration,
                      analysis=SMALL.analysis)
  results, text = run(tmp_path / "deep", sources, profile=deep)
  assert [c["id"] for c in results["cells"]] == ["dense"]
  assert results["skipped"] == ["drop_attn-3"]
  assert "skipping drop attention 3: the model has only 2 layers" in text


def test_bad_arguments_are_refused_before_any_work(sources, tmp_path):
  model = inp.model()
  with pytest.raises(ValueError, match=r"study\.run\(options\.dtype='float16'\): expected one of "
                     r"\('bfloat16', 'float32'\)"):
    study.run(model, PROFILE, str(tmp_path / "a"), study.Options("tiny", dtype="float16"))
  with pytest.raises(TypeError, match=r"study\.run\(profile='quick'\): expected a study Profile"):
    study.run(model, "quick", str(tmp_path / "b"), study.Options("tiny"))
  plain = pj.Model(model.config, model.params, None)
  with pytest.raises(ValueError, match=r"study\.run\(model=.*\): expected a model whose "
                     "tokenizer has a chat template"):
    study.run(plain, PROFILE, str(tmp_path / "c"), study.Options("tiny"))
  assert not any(tmp_path.iterdir())
