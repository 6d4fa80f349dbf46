"""`python -m experiments.reproduce` refuses bad flags before loading anything: one stderr line
naming the flag, exit status 2, and nothing written. (The pipeline itself is tested in-process on
the tiny model: a subprocess would compile every program again.)"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from _launch import error_line, launch_all  # noqa: E402

PROG = "experiments.reproduce"


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
  root = tmp_path_factory.mktemp("launcher")
  foreign = root / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine")
  fresh = str(root / "fresh")
  cases = {
      "batch_size": (["--batch_size=0", f"--out={fresh}"],
                     f"{PROG}(--batch_size=0): expected an integer >= 1"),
      "seed": (["--seed=-1", f"--out={fresh}"], f"{PROG}(--seed=-1): expected an integer in"),
      "profile": (["--profile=huge", f"--out={fresh}"], "--profile"),
      "model": (["--model=/no/such/model", f"--out={fresh}"],
                f"{PROG}(--model='/no/such/model'): not a registered model"),
      "mmlu_source": (["--mmlu_source=/no/such.jsonl", f"--out={fresh}"],
                      f"{PROG}(--mmlu_source='/no/such.jsonl'): no such file or directory"),
      "foreign_out": ([f"--out={foreign}"],
                      f"has no run.json written by {PROG}; choose a new directory"),
  }
  results = launch_all(PROG, {k: v[0] for k, v in cases.items()})
  return {k: (results[k], cases[k][1]) for k in cases}, root


@pytest.mark.parametrize("case", ["batch_size", "seed", "profile", "model", "mmlu_source",
                                  "foreign_out"])
def test_bad_flag_is_refused_in_one_line(refusals, case):
  (proc, _), expected = refusals[0][case]
  assert proc.returncode == 2, proc.stderr[-2000:]
  line = error_line(proc)
  assert expected in line, line
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_refusals_write_nothing(refusals):
  _, root = refusals
  assert sorted(p.name for p in root.iterdir()) == ["foreign"]
  assert [p.name for p in (root / "foreign").iterdir()] == ["notes.txt"]
