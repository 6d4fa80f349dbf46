"""`python -m experiments.prune` as a user runs it: every bad flag refused before the model loads,
with one stderr line naming the flag and exit status 2; --out never loses data.

Refusal tests pass --model=a decoy directory that passes the pre-load check but that the loader
refuses: an error naming the flag under test (not config.json) shows the flag was checked first.
One end-to-end test prunes a tiny local model, then overwrites its own output.
"""

import json
import math
import os
from pathlib import Path

import jax
import numpy as np
import pytest

import prunerep_jax as pj

from _launch import (decoy_model, error_line, launch, launch_all, snapshot, text_file,
                     tiny_model)

PROG = "experiments.prune"
FAST_S = 30  # generous for a loaded 2-core machine; loading and pruning a model takes longer

# flag given explicitly to a method that does not read it
INAPPLICABLE = [
    ("neurons", "--pattern=2:4"),
    ("drop_blocks", "--pattern=2:4"),
    ("drop_sublayers", "--sparsity=0.3"),
    ("drop_blocks", "--sparsity=0.5"),  # the default value, given explicitly, is still refused
    ("drop_blocks", "--include=mlp/*"),
    ("neurons", "--include=mlp/*"),
    ("wanda", "--kind=mlp"),
    ("drop_blocks", "--iterative"),
    ("magnitude", "--score=no_norm"),
    ("drop_sublayers", "--consecutive"),
    ("sparsegpt", "--wanda_variant"),
    ("wanda", "--blocksize=64"),
    ("magnitude", "--percdamp=0.1"),
    ("wanda", "--n=2"),
    ("magnitude", "--calibration=news"),
    ("magnitude", "--nsamples=8"),
    ("magnitude", "--seqlen=64"),
    ("magnitude", "--seed=1"),
    ("magnitude", "--batch_size=2"),
]

# (flags, what the one stderr line says); all with --model=a decoy the loader would refuse
BAD_VALUES = [
    (["--export_hf"], "--export_hf needs --out"),
    (["--overwrite"], "--overwrite needs --out"),
    (["--pattern=2:x"], "--pattern='2:x'): expected 'n:m'"),
    (["--pattern=5:4"], "--pattern='5:4'): expected 'n:m'"),
    (["--pattern=2:4", "--sparsity=0.5"], "--pattern='2:4' and --sparsity=0.5 both"),
    (["--pattern=2:4", "--wanda_variant"], "--wanda_variant needs an unstructured sparsity"),
    (["--sparsity=1.0"], "--sparsity=1.0): expected a number in [0.0, 1.0)"),
    (["--sparsity=nan"], "--sparsity=nan): expected a number in [0.0, 1.0)"),
    (["--method=neurons", "--sparsity=-0.1"], "--sparsity=-0.1): expected a number in"),
    (["--include=mlp/*,mlp/gate"], "--include)(include=('mlp/gate',)): expected fnmatch"),
    (["--seed=-1"], "--seed=-1): expected an integer in [0, 2**32)"),
    (["--seed=4294967296"], "--seed=4294967296): expected an integer in [0, 2**32)"),
    (["--nsamples=0"], "--nsamples=0): expected an integer >= 1"),
    (["--seqlen=1"], "--seqlen=1): expected an integer >= 2"),
    (["--batch_size=0"], "--batch_size=0): expected an integer >= 1"),
    (["--eval_seqlen=1"], "--eval_seqlen=1): expected an integer >= 2"),
    (["--eval_windows=-1"], "--eval_windows=-1): expected an integer >= 0"),
    (["--method=drop_blocks", "--n=-1"], "--n=-1): expected an integer >= 0"),
    (["--method=sparsegpt", "--blocksize=0"], "--blocksize=0): expected an integer >= 1"),
    (["--method=sparsegpt", "--pattern=2:4", "--blocksize=6"],
     "--blocksize=6): expected a multiple of m=4"),
    (["--method=sparsegpt", "--percdamp=0"], "--percdamp=0.0): expected a finite number > 0"),
    (["--calibration=no/such/file.txt"], "--calibration='no/such/file.txt'): no such file"),
    (["--calibration=wikipedya"], "--calibration='wikipedya'): no such file"),
    (["--eval_source=/dev/null"], "--eval_source='/dev/null'): not a regular file or directory"),
    (["--mesh=data:4,pipeline:2"], "--mesh='data:4,pipeline:2'): expected axes from"),
    (["--mesh=data:x"], "--mesh='data:x'): expected a positive integer size"),
    (["--num_devices=2"], "--num_devices needs --mesh"),
    (["--coordinator_address=h:1"], "--coordinator_address needs --distributed"),
    (["--nsamples=abc"], "--nsamples=abc"),  # absl's parse error: also one line and status 2
    (["--patern=2:4"], "Unknown command line flag 'patern'"),
    (["stray"], "unexpected positional arguments ['stray']"),
    (["--out={root}/file/run"], "--out='{root}/file/run'): expected a path under a directory; "
     "{root}/file is a file"),
    (["--out={root}/file", "--overwrite"], "--out='{root}/file'): exists and is not a directory"),
]

# --out refusals: name -> (flags, what the line says); the directory named like the case must
# come out byte for byte and mtime for mtime as it went in.
OUT_CASES = {
    "nonempty_without_overwrite": (["--out={root}/nonempty_without_overwrite"],
                                   "is not empty (it holds notes.txt, report.json, sub); pass "
                                   "--overwrite"),
    "nonempty_without_marker": (["--out={root}/nonempty_without_marker", "--overwrite"],
                                "has no run.json written by experiments.prune"),
    "entry_the_marker_does_not_list": (["--out={root}/entry_the_marker_does_not_list",
                                        "--overwrite"],
                                       "checkpoint was not written by experiments.prune"),
    "earlier_export_left_stale": (["--out={root}/earlier_export_left_stale", "--overwrite"],
                                  "holds hf from an earlier run that this run would not rewrite"),
    "model_inside_out": (["--out={root}/model_inside_out", "--overwrite", "--export_hf",
                          "--model={root}/model_inside_out/hf"], "overlaps the input model"),
    "out_inside_model": (["--out={decoy}/pruned"], "overlaps the input model"),
}


def _user_files(out):
  (out / "sub").mkdir(parents=True)
  (out / "notes.txt").write_text("my notes")
  (out / "sub" / "data.bin").write_bytes(bytes(range(256)))
  (out / "report.json").write_text('{"mine": true}')


def _marked(out, outputs):
  out.mkdir(parents=True)
  (out / "run.json").write_text(json.dumps({"launcher": PROG, "outputs": outputs}))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """The inputs of every refusal case; {root} and {decoy} in the tables point here."""
  root = tmp_path_factory.mktemp("prune_launcher")
  decoy = decoy_model(root / "decoy")
  (root / "file").write_text("x")
  _user_files(root / "nonempty_without_overwrite")
  _user_files(root / "nonempty_without_marker")
  _marked(root / "entry_the_marker_does_not_list", ["run.json", "report.json"])
  (root / "entry_the_marker_does_not_list" / "checkpoint").mkdir()
  (root / "entry_the_marker_does_not_list" / "checkpoint" / "mine").write_text("x")
  _marked(root / "earlier_export_left_stale", ["run.json", "checkpoint", "report.json", "hf"])
  (root / "earlier_export_left_stale" / "hf").mkdir()
  _marked(root / "model_inside_out", ["run.json", "checkpoint", "report.json", "hf"])
  decoy_model(root / "model_inside_out" / "hf")
  return {"root": str(root), "decoy": str(decoy)}


def _fill(texts, world):
  return [t.format(**world) for t in texts]


@pytest.fixture(scope="module")
def runs(world):
  """Every refusal case, launched together; and snapshots of the --out cases' directories."""
  decoy = f"--model={world['decoy']}"
  cases = {}
  for method, flag in INAPPLICABLE:
    cases[("inapplicable", method, flag)] = [decoy, f"--method={method}", flag]
  for args, _ in BAD_VALUES:
    cases[("bad", *args)] = [decoy, *_fill(args, world)]
  for name, (args, _) in OUT_CASES.items():
    cases[("out", name)] = [decoy, "--method=magnitude", *_fill(args, world)]
  watched = {name: Path(world["root"], name) for name in OUT_CASES}
  watched["out_inside_model"] = Path(world["decoy"])
  before = {name: snapshot(path) for name, path in watched.items()}
  results = launch_all(PROG, cases)
  after = {name: snapshot(path) for name, path in watched.items()}
  return results, before, after


def refused(result, *needles):
  """Asserts the launcher refused at once with one line naming every needle."""
  proc, seconds = result
  line = error_line(proc)
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  assert seconds < FAST_S
  assert line.startswith(PROG), line
  assert "Traceback" not in proc.stderr
  assert "config.json" not in line  # the decoy model was never loaded
  for needle in needles:
    assert needle in line, (needle, line)
  return line


@pytest.mark.parametrize("method,flag", INAPPLICABLE)
def test_flag_that_does_not_apply_to_the_method_is_refused(runs, method, flag):
  name = flag.split("=")[0]
  refused(runs[0][("inapplicable", method, flag)], f"{name} does not apply to --method={method}")


@pytest.mark.parametrize("args,message", BAD_VALUES, ids=lambda a: str(a))
def test_bad_flag_value_is_refused_before_loading(runs, world, args, message):
  refused(runs[0][("bad", *args)], message.format(**world))


@pytest.mark.parametrize("name", sorted(OUT_CASES))
def test_out_refusal_leaves_the_directory_untouched(runs, world, name):
  results, before, after = runs
  refused(results[("out", name)], OUT_CASES[name][1])
  assert before[name] and after[name] == before[name]


def test_missing_model_is_refused(tmp_path):
  missing = tmp_path / "nope"
  refused(launch(PROG, f"--model={missing}"), f"--model='{missing}'): not a registered model")


# ------------------------------------------------------------------------- end to end

def test_prunes_to_out_then_overwrites_only_its_own_outputs(tmp_path):
  model = tiny_model(tmp_path / "model")
  text = text_file(tmp_path / "text.txt")
  out = tmp_path / "out"
  out.mkdir()  # an existing empty directory is a fine --out
  common = [f"--model={model}", "--eval_seqlen=8", "--eval_windows=2", f"--out={out}",
            "--export_hf"]

  proc, _ = launch(PROG, *common, "--method=wanda", "--sparsity=0.5", f"--calibration={text}",
                   "--nsamples=4", "--seqlen=8", "--batch_size=4")
  assert proc.returncode == 0, proc.stderr[-3000:]
  marker = json.loads((out / "run.json").read_text())
  assert marker["launcher"] == PROG and marker["status"] == "complete"
  assert marker["outputs"] == ["run.json", "log.txt", "checkpoint", "report.json", "hf"]
  assert marker["flags"]["method"] == "wanda" and marker["flags"]["nsamples"] == 4
  report = json.loads((out / "report.json").read_text())
  assert report["report"]["method"] == "wanda"
  # Wanda prunes floor(0.5 * I) of every output's I inputs; every I here is even.
  assert set(report["report"]["per_matrix_sparsity"].values()) == {0.5}
  evaluation = report["evaluation"]
  assert evaluation["heldout"]["windows"] == 2 and evaluation["heldout"]["seqlen"] == 8
  for key in ("dense_ppl", "pruned_ppl", "kl_dense_pruned", "top1_agreement"):
    assert math.isfinite(evaluation[key]), key
  assert 1.0 < evaluation["dense_ppl"] and 0.0 <= evaluation["top1_agreement"] <= 1.0
  assert json.loads((out / "hf" / "config.json").read_text())["num_hidden_layers"] == 2
  # People read a summary table; logs (orbax's INFO lines included) go to log.txt only.
  assert "perplexity" in proc.stdout and "per layer" in proc.stdout
  assert "orbax" not in proc.stderr and " I1" not in proc.stderr and " I0" not in proc.stderr
  log = (out / "log.txt").read_text()
  assert "perplexity" in log and "experiments.prune started with" in log

  (out / "notes.txt").write_text("mine")
  before = snapshot(out)
  proc, _ = launch(PROG, *common, "--method=magnitude", f"--eval_source={text}")
  assert proc.returncode == 2 and "--overwrite" in error_line(proc)
  assert snapshot(out) == before

  proc, _ = launch(PROG, *common, "--method=magnitude", f"--eval_source={text}", "--overwrite")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(os.listdir(out)) == ["checkpoint", "hf", "log.txt", "notes.txt", "report.json",
                                     "run.json"]
  assert snapshot(out)["notes.txt"] == before["notes.txt"]  # same bytes, same mtime
  assert json.loads((out / "run.json").read_text())["flags"]["method"] == "magnitude"
  report = json.loads((out / "report.json").read_text())
  assert report["report"]["method"] == "magnitude"
  assert report["evaluation"]["heldout"]["source"] == str(text)
  assert np.isclose(report["evaluation"]["dense_ppl"], evaluation["dense_ppl"], rtol=1e-6)


def test_prunes_on_a_device_mesh_like_on_one_device(tmp_path):
  """--mesh=data:2,model:2 on four forced CPU devices prunes to the same masks as one device."""
  model = tiny_model(tmp_path / "model")
  text = text_file(tmp_path / "text.txt")
  common = [f"--model={model}", "--method=wanda", "--sparsity=0.5", f"--calibration={text}",
            "--nsamples=4", "--seqlen=8", "--batch_size=4", "--eval_seqlen=8",
            "--eval_windows=2"]
  one, _ = launch(PROG, *common, f"--out={tmp_path / 'one'}")
  four, _ = launch(PROG, *common, f"--out={tmp_path / 'four'}", "--mesh=data:2,model:2",
                   env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert one.returncode == 0 and four.returncode == 0, (one.stderr[-2000:], four.stderr[-2000:])
  a = json.loads((tmp_path / "one" / "report.json").read_text())
  b = json.loads((tmp_path / "four" / "report.json").read_text())
  masks_one = pj.checkpoint.restore_pruned(str(tmp_path / "one" / "checkpoint")).masks
  masks_four = pj.checkpoint.restore_pruned(str(tmp_path / "four" / "checkpoint")).masks
  for x, y in zip(jax.tree_util.tree_leaves(masks_one), jax.tree_util.tree_leaves(masks_four)):
    np.testing.assert_array_equal(x, y)
  for key in ("dense_ppl", "pruned_ppl", "kl_dense_pruned"):
    assert np.isclose(a["evaluation"][key], b["evaluation"][key], rtol=1e-5), key
