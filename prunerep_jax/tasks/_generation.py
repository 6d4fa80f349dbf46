"""Greedy generation for the generative suites, and their fidelity-to-dense metrics.

Generation: prompts are batched by `batching.token_batches` (fixed B, left-padded, length buckets) and
decoded greedily by `prunerep_jax.generate` for a fixed number of steps; a row stops at its first
EOS. What comes back per prompt is its *valid* tokens: everything generated up to and including
the EOS (the EOS is kept: stopping is a decision the pruned model can get wrong too).

Fidelity of a pruned output p (length Lp) to the dense output d (length Ld), per item, in pure
NumPy on the host's token lists:
  * first_divergence: the first step i where the two differ, i.e. i < min(Ld, Lp) with
    d[i] != p[i], else min(Ld, Lp) when the lengths differ (one output stopped and the other
    went on); None when the outputs are identical.
  * token_agreement: the fraction of the dense output's Ld positions where the pruned output has
    the same token at the same position. Positions past the pruned output's end count as
    disagreements, so a pruned model that stops early is not rewarded; extra pruned tokens past
    Ld are not counted (first_divergence records them). Positional, so tokens after a divergence
    only agree by coincidence: read it together with first_divergence.
  * exact_match: the token sequences are identical (first_divergence is None).
Suites add a text-level match on what they extract (the final answer, the truncated completion).

Shape letters: B batch, T prompt positions, S decoding steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from prunerep_jax import progress as progress_lib
from prunerep_jax import batching, parallel
from prunerep_jax import decode
from prunerep_jax.config import Config
from prunerep_jax.tasks import _suite


# -------------------------------------------------------------------------------- fidelity

def first_divergence(dense: Sequence[int], pruned: Sequence[int]) -> Optional[int]:
  """The first step where two token sequences differ; None if they are identical."""
  d, p = np.asarray(dense, np.int64), np.asarray(pruned, np.int64)
  n = min(len(d), len(p))
  differ = np.flatnonzero(d[:n] != p[:n])
  if differ.size:
    return int(differ[0])
  return None if len(d) == len(p) else n


def token_agreement(dense: Sequence[int], pruned: Sequence[int]) -> float:
  """Fraction of the dense sequence's positions where the pruned one has the same token
  (positions the pruned sequence does not reach disagree). An empty dense sequence agrees with
  an empty pruned one (1.0) and with nothing else (0.0)."""
  d, p = np.asarray(dense, np.int64), np.asarray(pruned, np.int64)
  if len(d) == 0:
    return 1.0 if len(p) == 0 else 0.0
  n = min(len(d), len(p))
  return float(np.sum(d[:n] == p[:n]) / len(d))


def fidelity(dense: Sequence[Sequence[int]], pruned: Sequence[Sequence[int]]) -> dict:
  """Per-item and summary fidelity of pruned outputs to dense outputs (see the module docstring).

  Args:
    dense, pruned: one token sequence per item, in the same item order.

  Returns:
    {"token_agreement": mean over items, "exact_match": fraction of identical sequences,
    "diverged": fraction that diverge, "first_divergence_mean": mean first divergence step over
    the items that diverge (None if none do), "first_divergence_median": likewise,
    "per_item": {"token_agreement": [...], "first_divergence": [... or None]}}.
  """
  if len(dense) != len(pruned):
    raise ValueError(f"fidelity: {len(dense)} dense outputs but {len(pruned)} pruned outputs; "
                     "expected one of each per item")
  agreement = [token_agreement(d, p) for d, p in zip(dense, pruned)]
  divergence = [first_divergence(d, p) for d, p in zip(dense, pruned)]
  steps = [s for s in divergence if s is not None]
  return {
      "token_agreement": _suite.mean(agreement),
      "exact_match": _suite.mean([s is None for s in divergence]),
      "diverged": _suite.mean([s is not None for s in divergence]),
      "first_divergence_mean": _suite.mean(steps),
      "first_divergence_median": float(np.median(steps)) if steps else None,
      "per_item": {"token_agreement": agreement, "first_divergence": divergence},
  }


def match_rate(dense: Sequence[Any], pruned: Sequence[Any]) -> Optional[float]:
  """Fraction of items whose two values are equal (e.g. extracted answers, completion texts)."""
  return _suite.mean([a == b for a, b in zip(dense, pruned)])


# ------------------------------------------------------------------------------ generation

def eos_ids(tokenizer, config: Config) -> tuple[int, ...]:
  """The config's EOS ids, else the tokenizer's EOS."""
  if config.eos_token_ids:
    return tuple(config.eos_token_ids)
  eos = getattr(tokenizer, "eos_token_id", None)
  return () if eos is None else (int(eos),)


def generate(params, config: Config, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             batch_size: int, eos: tuple[int, ...], pad_id: int,
             reporter: progress_lib.Reporter, mesh=None) -> list[list[int]]:
  """Greedy continuations of token prompts, batched; returns each prompt's valid new tokens.

  Args:
    prompts: one token id list per item (any lengths).
    max_new_tokens: S, decoding steps per batch.
    batch_size: B.
    eos: ids that end a row (kept in its output).
    pad_id: id for prompt padding and for steps after a row's EOS (never returned).
    reporter: called with the number of items done after each batch.
    mesh: None or a ("data", "model") mesh (`prunerep_jax.parallel`): each batch is split over its
      data axis (`decode.generate` places params and prompts).
  """
  outputs: list[Optional[list[int]]] = [None] * len(prompts)
  done = 0
  room = config.max_position_embeddings - max_new_tokens
  for batch in batching.token_batches(prompts, batch_size, pad_id,
                                      max_length=room if room > 0 else None,
                                      multiple_of=parallel.padded_size(1, mesh)):
    gen = decode.generate(params, config, batch.tokens, max_new_tokens, prompt_mask=batch.mask,
                          temperature=0.0, eos_token_ids=eos, pad_id=pad_id, mesh=mesh)
    tokens, lengths = parallel.fetch((gen.tokens, gen.lengths))
    for b, i in enumerate(batch.rows):
      outputs[i] = tokens[b, :lengths[b]].tolist()
    done += len(batch.rows)
    reporter(done)
  return outputs


def decode_text(tokenizer, tokens: Sequence[int]) -> str:
  """Text of generated tokens without special tokens (the EOS is not text), exactly as the
  tokens spell it (no clean-up of spaces, so a prefix of the tokens decodes to a prefix)."""
  return tokenizer.decode(list(tokens), skip_special_tokens=True,
                          clean_up_tokenization_spaces=False)


def prompt_lengths_fit(fn: str, lengths: Sequence[int], ids: Sequence[str], config: Config,
                       max_new_tokens: int) -> None:
  """Every prompt plus `max_new_tokens` fits the model's context (else a clear error)."""
  limit = config.max_position_embeddings
  for n, item_id in zip(lengths, ids):
    if n + max_new_tokens > limit:
      raise ValueError(f"{fn}: item {item_id!r}: its prompt has {n} tokens, and with "
                       f"max_new_tokens={max_new_tokens} that exceeds the model's context of "
                       f"{limit} positions; lower max_new_tokens or drop the item")
