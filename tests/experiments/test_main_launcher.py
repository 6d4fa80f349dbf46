"""`python -m experiments.main` as a user runs it: bad flags refused before the model loads (or,
for the context window, before generating), as one stderr line with exit status 2.

Pre-load cases pass --model=a decoy directory the loader would refuse: an error naming the flag
under test (not config.json) shows the flag was checked first.
"""

import pytest

from _launch import decoy_model, error_line, launch, launch_all, tiny_model

PROG = "experiments.main"
FAST_S = 30  # generous for a loaded 2-core machine

# (flags, what the one stderr line says)
BAD_FLAGS = [
    (["--temperature=0"], "--temperature=0.0): expected a finite number > 0"),
    (["--temperature=-1"], "--temperature=-1.0): expected a finite number > 0"),
    (["--temperature=nan"], "--temperature=nan): expected a finite number > 0"),
    (["--temperature=inf"], "--temperature=inf): expected a finite number > 0"),
    (["--max_new_tokens=0"], "--max_new_tokens=0): expected an integer >= 1"),
    (["--max_new_tokens=-5"], "--max_new_tokens=-5): expected an integer >= 1"),
    (["--prompt=  "], "--prompt='  '): expected a non-empty message"),
    (["--lens=logits"], "--lens"),  # absl's parse error: also one line and status 2
    (["--sparsity=0.5"], "Unknown command line flag 'sparsity'"),
    (["stray"], "unexpected positional arguments ['stray']"),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  decoy = decoy_model(tmp_path_factory.mktemp("main_launcher") / "decoy")
  missing = tmp_path_factory.mktemp("main_launcher_missing") / "nope"
  cases = {tuple(args): [f"--model={decoy}", *args] for args, _ in BAD_FLAGS}
  cases["missing_model"] = [f"--model={missing}"]
  return launch_all(PROG, cases), missing


def refused(result, *needles):
  proc, seconds = result
  line = error_line(proc)
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  assert seconds < FAST_S
  assert line.startswith(PROG), line
  assert "Traceback" not in proc.stderr
  assert "config.json" not in line  # the decoy model was never loaded
  for needle in needles:
    assert needle in line, (needle, line)


@pytest.mark.parametrize("args,message", BAD_FLAGS, ids=lambda a: str(a))
def test_bad_flag_is_refused_before_loading(runs, args, message):
  refused(runs[0][tuple(args)], message)


def test_missing_model_is_refused(runs):
  results, missing = runs
  refused(results["missing_model"], f"--model='{missing}'): not a registered model")


def test_answer_longer_than_the_context_window_is_refused_before_generating(tmp_path):
  model = tiny_model(tmp_path / "model")  # max_position_embeddings = 128
  proc, _ = launch(PROG, f"--model={model}", "--prompt=the river runs", "--max_new_tokens=1000")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert error_line(proc) == (f"{PROG}(--max_new_tokens=1000): the prompt has 5 tokens and the "
                              "model's context window is 128; expected at most 123")
