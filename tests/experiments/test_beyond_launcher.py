"""`python -m experiments.beyond` refuses bad flags before loading anything: one stderr line naming
the flag, exit status 2, and nothing written. (The pipeline is tested in-process on the tiny
model, tests/study/test_beyond_pipeline.py: a subprocess would compile every program again.)"""

import pytest

from _launch import error_line, launch_all

PROG = "experiments.beyond"


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
  root = tmp_path_factory.mktemp("launcher")
  foreign = root / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine")
  fresh = str(root / "fresh")
  cases = {
      "profile": (["--profile=huge", f"--out={fresh}"],
                  "flag --profile=huge: value should be one of <quick|readme|full>"),
      "batch_size": (["--batch_size=0", f"--out={fresh}"],
                     f"{PROG}(--batch_size=0): expected an integer >= 1"),
      "seed": (["--seed=-1", f"--out={fresh}"], f"{PROG}(--seed=-1): expected an integer in"),
      "model": (["--model=/no/such/model", f"--out={fresh}"],
                f"{PROG}(--model='/no/such/model'): not a registered model"),
      "gsm8k_source": (["--gsm8k_source=/no/such.jsonl", f"--out={fresh}"],
                       f"{PROG}(--gsm8k_source='/no/such.jsonl'): no such file or directory"),
      "mesh": (["--mesh=data:x", f"--out={fresh}"], f"{PROG}(--mesh="),
      "num_devices": (["--num_devices=2", f"--out={fresh}"], "--num_devices needs --mesh"),
      "execute": (["--execute", f"--out={fresh}"], "Unknown command line flag 'execute'"),
      "positional": (["extra", f"--out={fresh}"], f"{PROG}: unexpected positional arguments"),
      "foreign_out": ([f"--out={foreign}"],
                      f"has no run.json written by {PROG}; choose a new directory"),
      "foreign_out_overwrite": ([f"--out={foreign}", "--overwrite"],
                                f"has no run.json written by {PROG}; choose a new directory"),
  }
  results = launch_all(PROG, {k: v[0] for k, v in cases.items()})
  return {k: (results[k], cases[k][1]) for k in cases}, root


@pytest.mark.parametrize("case", ["profile", "batch_size", "seed", "model", "gsm8k_source",
                                  "mesh", "num_devices", "execute", "positional", "foreign_out",
                                  "foreign_out_overwrite"])
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
