"""`python -m experiments.hierarchy / drift / subspace` as a user runs them.

One end-to-end run per launcher on a tiny local model (2 layers, byte-level chat tokenizer): the
results, figures, log and marker exist, the console shows a summary table and progress but no
third-party INFO log line, and the numbers follow from the pruning asked for. Then the refusals
specific to these launchers, each one stderr line with exit status 2 before the model is loaded
(--model is a decoy the loader would refuse), and one after loading (--drop names a layer the
model does not have). Everything runs in parallel subprocesses.
"""

import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from _launch import decoy_model, error_line, launch, text_file

sys.path.insert(0, str(Path(__file__).parents[1] / "tasks"))
import _tiny_model as tiny  # noqa: E402  (the suites' tiny model and byte-level chat tokenizer)

FAST_S = 60  # a refusal before loading (the decoy proves it); generous for a busy machine
ABSL_INFO = re.compile(r"^I\d{4} ", re.MULTILINE)  # absl's INFO prefix: I<mmdd> <time> ...
MMLU = [{"question": f"Which number comes after {i}?", "answer_a": str(i + 1),
         "answer_b": str(i + 2), "answer_c": str(i + 3), "answer_d": str(i - 1),
         "correct_answer": "A", "topic": "elementary_mathematics"} for i in range(5)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """The inputs: a tiny model directory, MMLU-shaped items, prompts and calibration text."""
  from prunerep_jax.export import export_hf

  root = tmp_path_factory.mktemp("analysis_launchers")
  export_hf(str(root / "model"), tiny.params(0), tiny.config(), tiny.tokenizer())
  (root / "mmlu.jsonl").write_text("\n".join(json.dumps(r) for r in MMLU) + "\n")
  (root / "prompts.txt").write_text("def add(a, b):\nJanet has 3 apples.\n\nWhich answer?\n")
  (root / "prompts.csv").write_text("a,b\n")
  text_file(root / "calib.txt")
  decoy_model(root / "decoy")
  (root / "full").mkdir()
  (root / "full" / "notes.txt").write_text("mine")
  return root


SUCCESS = {
    "experiments.hierarchy": ["--method=drop_sublayers", "--kind=mlp", "--n=1",
                              "--calibration={root}/calib.txt", "--nsamples=4", "--seqlen=16",
                              "--batch_size=4", "--num_prompts=2", "--lens=final_norm",
                              "--decode_steps=3"],
    "experiments.drift": ["--drop=attn:0", "--prompts={root}/prompts.txt", "--steps=4"],
    "experiments.subspace": ["--drop=attn:1", "--mmlu={root}/mmlu.jsonl", "--items=4",
                             "--eval_batch=2"],
}
# (launcher, flags, what the one stderr line says), all with --model=the decoy and a fresh --out
REFUSED = [
    ("experiments.hierarchy", ["--lens=logits"],
     "--lens='logits'): expected a comma-separated list of one or both of ('final_norm', 'raw')"),
    ("experiments.hierarchy", ["--lens=raw,raw"], "--lens='raw,raw'): expected"),
    ("experiments.hierarchy", ["--drop=ffn:1"], "--drop='ffn:1'): entry 'ffn:1': expected "
     "KIND:LAYER with KIND in ('attn', 'mlp') and LAYER an integer >= 0"),
    ("experiments.hierarchy", ["--drop=attn:1,attn:1"], "entry 'attn:1' is listed twice"),
    ("experiments.drift", ["--drop=attn:-1"], "--drop='attn:-1'): entry 'attn:-1': expected"),
    ("experiments.drift", ["--drop=attn:1", "--method=wanda"],
     "--method=wanda and --drop both choose the pruning"),
    ("experiments.subspace", ["--drop=mlp:0", "--n=2"], "--n does not apply to --drop"),
    ("experiments.hierarchy", ["--method=drop_blocks"],
     "--method=drop_blocks): a layerwise counterfactual needs the dense model's layers"),
    ("experiments.hierarchy", ["--prompts={root}/missing.txt"],
     "--prompts='{root}/missing.txt'): expected an existing .txt / .jsonl / .json file"),
    ("experiments.drift", ["--prompts={root}/prompts.csv"],
     "--prompts='{root}/prompts.csv'): expected a .txt / .jsonl / .json file of prompts"),
    ("experiments.drift", ["--steps=0"], "--steps=0): expected an integer >= 1"),
    ("experiments.drift", ["--analysis_temperature=0"],
     "--analysis_temperature=0.0): expected a finite number > 0"),
    ("experiments.hierarchy", ["--decode_steps=-1"],
     "--decode_steps=-1): expected an integer >= 0"),
    ("experiments.subspace", ["--items=3", "--show_item=3"],
     "--show_item=3): expected an item index in [0, --items=3)"),
    ("experiments.subspace", ["--mmlu={root}/missing.jsonl"],
     "--mmlu='{root}/missing.jsonl'): no such file or directory"),
    ("experiments.subspace", ["--out={root}/full"], "is not empty (it holds notes.txt)"),
]


def _fill(args, root):
  return [a.format(root=root) for a in args]


@pytest.fixture(scope="module")
def runs(world):
  """Every run of this file, launched together: {key: (CompletedProcess, seconds)}."""
  cases = {}
  for module, args in SUCCESS.items():
    cases[module] = (module, [f"--model={world}/model", *_fill(args, world),
                              f"--out={world}/out_{module.split('.')[1]}"])
  for i, (module, args, _) in enumerate(REFUSED):
    args = _fill(args, world)
    out = [] if any(a.startswith("--out") for a in args) else [f"--out={world}/refused_{i}"]
    cases[i] = (module, [f"--model={world}/decoy", *args, *out])
  cases["no_out"] = ("experiments.drift", [f"--model={world}/decoy"])
  cases["after_load"] = ("experiments.drift", [f"--model={world}/model", "--drop=attn:7",
                                               f"--out={world}/after_load"])
  with ThreadPoolExecutor(max_workers=6) as pool:
    futures = {key: pool.submit(launch, module, *args) for key, (module, args) in cases.items()}
    return {key: f.result() for key, f in futures.items()}


def succeeded(runs, world, module):
  """The run's output directory, after the checks every launcher shares."""
  proc, _ = runs[module]
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = world / f"out_{module.split('.')[1]}"
  marker = json.loads((out / "run.json").read_text())
  assert marker["launcher"] == module and marker["status"] == "complete"
  assert sorted(marker["outputs"]) == sorted(p.name for p in out.iterdir())
  for png in out.glob("*.png"):
    assert png.stat().st_size > 10_000
  console = proc.stdout + proc.stderr
  assert not ABSL_INFO.search(console) and "orbax" not in console
  assert re.search(r"^\[ +\d+\.\d s\] .*: done in \d+\.\d s$", proc.stderr, re.MULTILINE)
  log = (out / "log.txt").read_text()
  assert ABSL_INFO.search(log) and f"{module} started with" in log  # INFO goes to the file
  assert proc.stdout.strip().splitlines()[0] in log
  return out


def test_hierarchy_writes_results_figures_and_a_table(runs, world):
  from prunerep_jax.analysis.results import Result

  out = succeeded(runs, world, "experiments.hierarchy")
  names = ["layerwise_final_norm", "layerwise_final_norm_decode"]
  assert sorted(p.name for p in out.glob("*.png")) == sorted(
      [f"{n}.png" for n in names] + [f"theorem_{n}.png" for n in names])
  lw = Result.load(str(out), "layerwise_final_norm")
  (dropped,) = lw.meta["pruned"]["dropped"]
  assert dropped["sublayer"] == "mlp" and lw.meta["model"] == str(world / "model")
  # Only the dropped MLP sublayer differs from the dense model; every other one is exact.
  changed = np.asarray(lw.arrays["one_minus_cos_h"]).max(axis=(2, 3)) > 0  # [L, 2]
  expected = np.zeros((2, 2), bool)
  expected[dropped["layer"], 1] = True
  np.testing.assert_array_equal(changed, expected)
  assert Result.load(str(out), "layerwise_final_norm_decode").meta["decode_steps"] == 3
  stdout = runs["experiments.hierarchy"][0].stdout
  assert "== layerwise, lens=final_norm" in stdout and "3 sublayers unchanged" in stdout
  assert re.search(rf"^ +{dropped['layer']}  mlp  ", stdout, re.MULTILINE)
  assert "theorem check" in stdout


def test_drift_writes_results_figures_and_a_table(runs, world):
  from prunerep_jax.analysis.results import Result

  out = succeeded(runs, world, "experiments.drift")
  assert sorted(p.name for p in out.glob("*.png")) == ["drift.png", "theorem_drift.png"]
  result = Result.load(str(out), "drift")
  assert result.meta["steps"] == 4 and result.meta["prompts"] == 3  # the file's 3 prompts
  assert result.meta["pruned"]["dropped"] == [{"layer": 0, "sublayer": "attn"}]
  stdout = runs["experiments.drift"][0].stdout
  for r in result.table("prompts"):
    if r["track"] == "free":  # the table prints each prompt's first divergence
      first = r["first_divergence"] if r["diverged"] else ">= 4 (never)"
      assert re.search(rf"^ +{r['prompt']}  {re.escape(str(first))} ", stdout, re.MULTILINE)
  assert "per step, mean over the prompts still running" in stdout


def test_subspace_writes_results_a_figure_and_rates(runs, world):
  from prunerep_jax.analysis.results import Result

  out = succeeded(runs, world, "experiments.subspace")
  assert [p.name for p in out.glob("*.png")] == ["option_subspace.png"]
  result = Result.load(str(out), "option_subspace")
  items = result.table("items")
  assert len(items) == 4 and all(r["answer"] == "A" for r in items)
  rate = np.mean([r["option_survives"] for r in items])
  assert result.meta["summary"]["option_argmax_survival_rate"] == pytest.approx(rate)
  assert re.search(rf"argmax over the options survives +{rate:.4f}",
                   runs["experiments.subspace"][0].stdout)


@pytest.mark.parametrize("index", range(len(REFUSED)),
                         ids=[f"{m.split('.')[1]}:{' '.join(a)}" for m, a, _ in REFUSED])
def test_bad_flag_is_refused_before_loading(runs, world, index):
  module, _, message = REFUSED[index]
  proc, seconds = runs[index]
  line = error_line(proc)
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  assert seconds < FAST_S and "Traceback" not in proc.stderr
  assert line.startswith(module) and "config.json" not in line  # the decoy was never loaded
  assert message.format(root=world) in line, line


def test_out_is_required(runs):
  proc, _ = runs["no_out"]
  assert proc.returncode == 2 and error_line(proc) == (
      "experiments.drift: --out is required: the directory the results, figures and log are "
      "written to")


def test_drop_of_a_missing_layer_is_refused_after_loading(runs, world):
  proc, _ = runs["after_load"]
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert error_line(proc) == ("experiments.drift(--drop='attn:7'): entry 'attn:7': the model has "
                              "2 layers; expected a layer in [0, 1]")
  assert not (world / "after_load").exists()
