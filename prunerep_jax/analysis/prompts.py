"""Prompts for the generation analyses (drift, layerwise at decoding positions).

A built-in set of varied chat prompts (explanation, instructions, arithmetic, code, facts,
creative writing, advice, translation), so a run compares the dense and the pruned model on
several kinds of continuation, not on one toy sentence. Users bring their own as a file:

  ``.txt``    one prompt per non-empty line;
  ``.jsonl``  one record per line: a JSON string, or an object with a "prompt" or "text" field;
  ``.json``   a list of such records.

`encode` renders each prompt through the model's chat template (one user message; plain text when
the tokenizer has none) and left-pads the batch.

Shape letters: B prompts, T positions.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

import numpy as np

from prunerep_jax import validate

BUILTIN = (
    "Explain in a few sentences why the sky is blue during the day and red at sunset.",
    "Write a Python function that returns the n-th Fibonacci number, with a short docstring.",
    "A train leaves at 9:40 and arrives at 13:15. How long is the journey? Show your steps.",
    "List three practical tips for keeping a small vegetable garden healthy in summer.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Write a four-line poem about a lighthouse keeper on a stormy night.",
    "Translate into French: 'The library opens at eight and closes at six.'",
    "My laptop gets very slow after an hour of use. What could be the causes?",
)
FIELDS = ("prompt", "text")
SUFFIXES = (".txt", ".jsonl", ".json")


def load(source: Optional[str] = None, n: Optional[int] = None) -> list[str]:
  """The built-in prompts (source None) or those of a local file, the first n of them.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: an unknown suffix, a record without a prompt, an empty file, or a bad n; the
      message names the file and line.
  """
  fn = "prompts.load"
  if source is None:
    prompts = list(BUILTIN)
  else:
    prompts = _read(fn, source)
  if n is not None:
    n = validate.integer(fn, "n", n, minimum=1)
    prompts = prompts[:n]
  return prompts


def check_source(fn: str, name: str, source: Any) -> str:
  """`source` as an absolute path after checking it is a readable prompts file (no reading)."""
  if not isinstance(source, (str, os.PathLike)) or not os.fspath(source):
    raise validate.fail(fn, name, source, f"a path to a {' / '.join(SUFFIXES)} file of prompts",
                        error=TypeError)
  path = os.path.abspath(os.path.expanduser(os.fspath(source)))
  if not os.path.exists(path):
    raise validate.fail(fn, name, source, f"an existing {' / '.join(SUFFIXES)} file of prompts; "
                        f"{path} does not exist", error=FileNotFoundError)
  if not os.path.isfile(path):
    raise validate.fail(fn, name, source, f"a regular {' / '.join(SUFFIXES)} file of prompts")
  if not path.lower().endswith(SUFFIXES):
    raise validate.fail(fn, name, source, f"a {' / '.join(SUFFIXES)} file of prompts")
  if not os.access(path, os.R_OK):
    raise validate.fail(fn, name, source, "a readable file", error=PermissionError)
  return path


def _read(fn: str, source: Any) -> list[str]:
  path = check_source(fn, "source", source)
  name = os.path.basename(path)
  try:
    with open(path, encoding="utf-8") as f:
      raw = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"{fn}: {name}: cannot be read as UTF-8 text ({e})") from None
  if path.lower().endswith(".txt"):
    prompts = [line.strip() for line in raw.splitlines() if line.strip()]
  elif path.lower().endswith(".jsonl"):
    prompts = []
    for i, line in enumerate(raw.splitlines(), 1):
      if line.strip():
        prompts.append(_record(fn, f"{name} line {i}", _json(fn, f"{name} line {i}", line)))
  else:
    records = _json(fn, name, raw)
    if not isinstance(records, list):
      raise ValueError(f"{fn}: {name}: expected a JSON list of prompts, got a "
                       f"{type(records).__name__}")
    prompts = [_record(fn, f"{name} record {i}", r) for i, r in enumerate(records)]
  if not prompts:
    raise ValueError(f"{fn}: {name}: holds no prompt; expected at least one")
  return prompts


def _json(fn: str, where: str, text: str) -> Any:
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{fn}: {where}: not valid JSON ({e.msg} at column {e.colno})") from None


def _record(fn: str, where: str, record: Any) -> str:
  if isinstance(record, dict):
    field = next((f for f in FIELDS if f in record), None)
    if field is None:
      raise ValueError(f"{fn}: {where}: the record has no field {' or '.join(map(repr, FIELDS))} "
                       f"(it has {sorted(record)})")
    record = record[field]
  if not isinstance(record, str) or not record.strip():
    raise ValueError(f"{fn}: {where}: expected a non-empty prompt string, got {record!r:.60}")
  return record.strip()


def encode(tokenizer, prompts: Sequence[str], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Chat-templated token ids of each prompt, left-padded into one batch.

  Args:
    tokenizer: a transformers tokenizer; its chat template is used when it has one.
    prompts: B user messages.
    pad_id: the id written on padding (masked out).

  Returns:
    (tokens int32 [B, T], mask int32 [B, T], 1 on real tokens), T the longest prompt.
  """
  from prunerep_jax.loading.tokenizer import chat_prompt

  if getattr(tokenizer, "chat_template", None):
    rows = [chat_prompt(tokenizer, p) for p in prompts]
  else:
    rows = [list(tokenizer.encode(p)) for p in prompts]
  return left_pad(rows, pad_id)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Token rows as one left-padded batch: (tokens int32 [B, T], mask int32 [B, T])."""
  if not rows or any(len(r) == 0 for r in rows):
    raise ValueError("prompts.left_pad: expected at least one row, each with at least one token")
  T = max(len(r) for r in rows)
  tokens = np.full((len(rows), T), pad_id, np.int32)
  mask = np.zeros((len(rows), T), np.int32)
  for b, r in enumerate(rows):
    tokens[b, T - len(r):] = r
    mask[b, T - len(r):] = 1
  return tokens, mask
