"""Tiny inputs for the study tests: the random model and chat tokenizer of tests/tasks, and small
local data files in each suite's format (so nothing depends on the size of the built-in sets)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tasks"))

import _tiny_model as tiny  # noqa: E402

import prunerep_jax as pj  # noqa: E402
from prunerep_jax import study  # noqa: E402

WORDS = ("the river runs past old stone mills while farmers carry grain to market and children "
         "watch boats drift slowly under bridges near quiet villages in early autumn").split()


def model(num_layers: int = 2) -> pj.Model:
  config = tiny.config(num_layers=num_layers)
  return pj.Model(config, tiny.params(0), tiny.tokenizer())


def _jsonl(path: Path, records) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def sources(root: Path) -> study.Sources:
  """Five MMLU questions, four GSM8K problems, three HumanEval problems, 24 short documents."""
  root.mkdir(parents=True, exist_ok=True)
  mmlu = [{"question": f"Which number is {i}?", "answer_a": str(i), "answer_b": str(i + 1),
           "answer_c": str(i + 2), "answer_d": str(i + 3), "correct_answer": "A",
           "topic": ("arithmetic", "counting")[i % 2]} for i in range(5)]
  gsm = [{"question": f"Janet has {i} apples and buys 2 more. How many apples?",
          "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"} for i in range(4)]
  code = [{"task_id": f"HumanEval/{i}", "prompt": f"def add{i}(a, b):\n    \"\"\"Add.\"\"\"\n",
           "entry_point": f"add{i}", "canonical_solution": "    return a + b\n",
           "test": f"def check(candidate):\n    assert candidate(1, 2) == 3\n"} for i in range(3)]
  docs = [" ".join(WORDS[(5 * d + 3 * i) % len(WORDS)] for i in range(30)) for d in range(24)]
  text = root / "text.txt"
  text.write_text("\n\n".join(docs) + "\n")
  return study.Sources(mmlu=_jsonl(root / "mmlu.jsonl", mmlu),
                       gsm8k=_jsonl(root / "gsm8k.jsonl", gsm),
                       humaneval=_jsonl(root / "humaneval.jsonl", code), text=str(text))
