"""Passage retrieval with mean-pooled hidden states: can the first half of a passage find its
second half?

Data: documents from `prunerep_jax.data.load_texts` (by default the English Wikipedia sample
that gensim ships; any local text source it reads works too). Each document is tokenized
(without special tokens) and cut into consecutive, non-overlapping passages of exactly
`passage_tokens` tokens (the shorter tail of a document is dropped). A passage's query is its
first half, its key its second half: the texts are cut at a token boundary, never re-tokenized.

Embedding: the final-normed hidden states (`forward(..., logits=False, capture=False)
.final_hidden`, what the LM head reads) averaged over the real tokens of a row (padding
excluded), in float32.

Scores (`score`): cosine similarity between every query and every key; the rank of a query's own
key is 1 + the number of *other* keys scoring at least as high (ties count against it, so a model
whose embeddings collapse to one vector gets rank P, not 1). recall@1 is the fraction with rank
1, MRR the mean of 1 / rank.

Against the dense model (`compare`): the cosine between each pruned embedding and the dense
embedding of the same text (queries and keys), and how often both models retrieve the same key
first.

Shape letters: P passages, N passage tokens, B batch, T positions, D hidden.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prunerep_jax import progress as progress_lib
from prunerep_jax import batching, parallel
from prunerep_jax import data, validate
from prunerep_jax.config import Config
from prunerep_jax.model import forward
from prunerep_jax.tasks import _suite


class Passages(NamedTuple):
  """ids: P strings "<document index>:<first token offset>"; tokens: int32 [P, N]."""

  ids: tuple[str, ...]
  tokens: np.ndarray

  @property
  def queries(self) -> np.ndarray:  # [P, N // 2]
    return self.tokens[:, :self.tokens.shape[1] // 2]

  @property
  def keys(self) -> np.ndarray:  # [P, N - N // 2]
    return self.tokens[:, self.tokens.shape[1] // 2:]


class Embeddings(NamedTuple):
  """queries, keys: float32 [P, D], mean-pooled final hidden states of each half."""

  queries: np.ndarray
  keys: np.ndarray


def load(tokenizer, source: str = "wikipedia", *, passage_tokens: int = 128,
         n: Optional[int] = None, seed: int = 0, text_field: str = "text") -> Passages:
  """Fixed-length passages of a text source, all or a deterministic subsample.

  Args:
    tokenizer: the model's tokenizer.
    source: any source `prunerep_jax.data.load_texts` reads ("wikipedia", "news", a local
      .txt / .jsonl / .json / .parquet / .arrow file, a MediaWiki dump, a local Hugging Face
      datasets directory).
    passage_tokens: N, tokens per passage (even, >= 2: query and key get N / 2 each).
    n: keep this many passages (None: all). Retrieval is harder the more passages compete.
    seed: the subsample's seed.
    text_field: the text field of JSON / Parquet / Arrow records.

  Raises:
    ValueError: bad arguments, or a source with no document of at least `passage_tokens` tokens.
  """
  fn = "retrieval.load"
  passage_tokens = validate.integer(fn, "passage_tokens", passage_tokens, minimum=2)
  if passage_tokens % 2:
    raise validate.fail(fn, "passage_tokens", passage_tokens, "an even integer >= 2 (query and "
                        "key are its two halves)")
  seed = validate.seed(fn, seed)
  docs = data.load_texts(source, text_field)
  ids, rows = [], []
  for d, doc_ids in enumerate(tokenizer(docs, add_special_tokens=False, verbose=False)[
      "input_ids"]):
    for start in range(0, len(doc_ids) - passage_tokens + 1, passage_tokens):
      ids.append(f"{d}:{start}")
      rows.append(doc_ids[start:start + passage_tokens])
  if not rows:
    raise ValueError(f"{fn}: source={source!r} has no document of at least passage_tokens="
                     f"{passage_tokens} tokens; use shorter passages")
  keep = _suite.subsample(range(len(rows)), n, seed, fn)
  return Passages(tuple(ids[i] for i in keep), np.asarray([rows[i] for i in keep], np.int32))


@functools.partial(jax.jit, static_argnums=(1,))
def _mean_pool(params, config: Config, tokens, mask):
  """tokens, mask [B, T] -> [B, D] mean of the final hidden states over real tokens."""
  hidden = forward(params, config, tokens, mask, capture=False, logits=False).final_hidden
  weights = mask.astype(jnp.float32)[..., None]  # [B, T, 1]
  return jnp.sum(hidden.astype(jnp.float32) * weights, axis=1) / jnp.sum(weights, axis=1)


def embed(params, config: Config, rows: Sequence[Sequence[int]], *, batch_size: int = 8,
          progress: progress_lib.Progress = None, mesh=None) -> np.ndarray:
  """Mean-pooled final hidden states of token rows (any lengths), float32 [R, D].

  Rows are batched left-padded (`batching.token_batches`); padding is masked out of the attention
  and of the mean, so a row's embedding does not depend on its batch. With a mesh (a
  `prunerep_jax.parallel` mesh or spec) the params are placed on it and each batch split over its
  data axis.
  """
  fn = "retrieval.embed"
  validate.params(fn, params, config)
  batch_size = validate.integer(fn, "batch_size", batch_size, minimum=1)
  progress_lib.check_progress(fn, progress)
  rows = _check_rows(fn, rows, config)
  mesh = parallel.as_mesh(fn, mesh)
  if mesh is not None:
    params = parallel.shard_params(params, config, mesh)
  report = progress_lib.Reporter("retrieval", len(rows), "texts", progress)
  out = np.zeros((len(rows), config.hidden_size), np.float32)
  done = 0
  for batch in batching.token_batches(rows, batch_size, 0, config.max_position_embeddings,
                                      multiple_of=parallel.padded_size(1, mesh)):
    pooled = _mean_pool(params, config, parallel.put_batch(batch.tokens, mesh),
                        parallel.put_batch(batch.mask, mesh))
    out[batch.rows] = parallel.fetch(pooled)[:len(batch.rows)]
    done += len(batch.rows)
    report(done)
  return out


def _check_rows(fn: str, rows: Any, config: Config) -> list[np.ndarray]:
  if isinstance(rows, np.ndarray) and rows.ndim == 2:
    rows = list(rows)
  if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence) or not len(rows):
    raise validate.fail(fn, "rows", rows, "a non-empty sequence of token id rows",
                        error=TypeError)
  out = []
  for i, r in enumerate(rows):
    r = np.asarray(r)
    if r.ndim != 1 or r.size == 0 or r.dtype == np.bool_ or not np.issubdtype(r.dtype,
                                                                               np.integer):
      raise validate.fail(fn, f"rows[{i}]", r, "a non-empty 1-D sequence of integer token ids")
    if r.min() < 0 or r.max() >= config.vocab_size:
      raise validate.fail(fn, f"rows[{i}]", r, f"token ids in [0, {config.vocab_size}); they "
                          f"span [{r.min()}, {r.max()}]")
    if r.size > config.max_position_embeddings:
      raise validate.fail(fn, f"rows[{i}]", r, f"at most {config.max_position_embeddings} "
                          f"tokens (the model's context); it has {r.size}")
    out.append(r.astype(np.int32))
  return out


def encode(params, config: Config, passages: Passages, *, batch_size: int = 8,
           progress: progress_lib.Progress = None, mesh=None) -> Embeddings:
  """Embeddings of every passage's query and key half (2P texts, one progress count)."""
  if not isinstance(passages, Passages):
    raise validate.fail("retrieval.encode", "passages", passages, "Passages (from "
                        "retrieval.load)", error=TypeError)
  P = len(passages.ids)
  emb = embed(params, config, list(passages.queries) + list(passages.keys),
              batch_size=batch_size, progress=progress, mesh=mesh)
  return Embeddings(emb[:P], emb[P:])


def _unit(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-30)


def _similarity(emb: Embeddings) -> np.ndarray:
  """[P, P] cosine similarity of query i (rows) and key j (columns)."""
  return _unit(emb.queries) @ _unit(emb.keys).T


def score(emb: Embeddings) -> dict:
  """recall@1 and MRR of retrieving each query's own key among all P keys (see the module
  docstring for the tie rule); JSON-serialisable, with per-item ranks and top-1 keys."""
  _check_embeddings("retrieval.score", "emb", emb)
  sim = _similarity(emb)
  own = np.diag(sim)
  rank = np.sum(sim >= own[:, None], axis=1)  # own key + every other key at least as close
  return {
      "suite": "retrieval",
      "n": int(sim.shape[0]),
      "recall_at_1": float(np.mean(rank == 1)),
      "mrr": float(np.mean(1.0 / rank)),
      "chance_recall_at_1": 1.0 / sim.shape[0],
      "per_item": {"rank": rank.tolist(), "top1": np.argmax(sim, axis=1).tolist()},
  }


def compare(dense: Embeddings, pruned: Embeddings) -> dict:
  """How far a pruned model's embeddings moved from the dense model's, on the same passages.

  Returns:
    {"cosine_to_dense_query": mean cosine between pruned and dense query embeddings,
    "cosine_to_dense_key": likewise for keys, "cosine_to_dense": mean of both,
    "top1_agreement": fraction of queries whose first retrieved key is the same for both,
    "recall_at_1_dense", "recall_at_1_pruned", "mrr_dense", "mrr_pruned"}.
  """
  fn = "retrieval.compare"
  _check_embeddings(fn, "dense", dense)
  _check_embeddings(fn, "pruned", pruned)
  if dense.queries.shape[0] != pruned.queries.shape[0]:
    raise validate.fail(fn, "pruned", pruned, f"embeddings of the same {dense.queries.shape[0]} "
                        f"passages as dense; it has {pruned.queries.shape[0]}")
  cos_q = np.sum(_unit(dense.queries) * _unit(pruned.queries), axis=1)
  cos_k = np.sum(_unit(dense.keys) * _unit(pruned.keys), axis=1)
  s_d, s_p = score(dense), score(pruned)
  agree = np.asarray(s_d["per_item"]["top1"]) == np.asarray(s_p["per_item"]["top1"])
  return {
      "suite": "retrieval",
      "n": s_d["n"],
      "cosine_to_dense_query": float(cos_q.mean()),
      "cosine_to_dense_key": float(cos_k.mean()),
      "cosine_to_dense": float((cos_q.mean() + cos_k.mean()) / 2),
      "top1_agreement": float(agree.mean()),
      "recall_at_1_dense": s_d["recall_at_1"],
      "recall_at_1_pruned": s_p["recall_at_1"],
      "mrr_dense": s_d["mrr"],
      "mrr_pruned": s_p["mrr"],
  }


def _check_embeddings(fn: str, name: str, emb: Any) -> None:
  if not isinstance(emb, Embeddings):
    raise validate.fail(fn, name, emb, "Embeddings (from retrieval.encode)", error=TypeError)
  q, k = np.asarray(emb.queries), np.asarray(emb.keys)
  if q.ndim != 2 or q.shape != k.shape or q.shape[0] == 0:
    raise validate.fail(fn, name, emb, "queries and keys of the same shape [P, D], P >= 1; got "
                        f"{q.shape} and {k.shape}")


def evaluate(params, config: Config, passages: Passages, *, batch_size: int = 8,
             dense: Optional[Embeddings] = None,
             progress: progress_lib.Progress = None, mesh=None) -> tuple[dict, Embeddings]:
  """`encode` then `score`, plus `compare` against the dense embeddings when given.

  Returns:
    (result, embeddings): the JSON-serialisable `score` dict, extended with the `compare` keys
    when `dense` is given, and this model's embeddings (pass them as `dense` when evaluating
    pruned models against this one).
  """
  emb = encode(params, config, passages, batch_size=batch_size, progress=progress, mesh=mesh)
  result = score(emb)
  if dense is not None:
    result.update({k: v for k, v in compare(dense, emb).items() if k not in result})
  return result, emb
