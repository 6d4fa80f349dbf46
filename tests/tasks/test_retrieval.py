"""Retrieval: passages of text sources, mean-pooled embeddings, recall@1 / MRR, cosine to dense."""

import json

import numpy as np
import pytest

import prunerep_jax as pj
from prunerep_jax import validate
from prunerep_jax.tasks import retrieval

import _tiny_model as tiny

DOCS = [
    "The river flows through the old town, past the mill and the church, and on to the sea. "
    "Fishermen mend their nets on its banks every morning before the tide comes in again.",
    "A compiler translates source code into machine code. It parses the program, checks its "
    "types, optimises the intermediate form and finally emits instructions for the target.",
    "Bees collect nectar from flowers and turn it into honey inside the hive, where workers fan "
    "their wings to evaporate the water until the honey is thick enough to store.",
]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  path = tmp_path_factory.mktemp("texts") / "docs.txt"
  path.write_text("\n\n".join(DOCS), encoding="utf-8")
  return str(path)


@pytest.fixture(scope="module")
def passages(source):
  return retrieval.load(tiny.tokenizer(), source, passage_tokens=32)


@pytest.fixture(scope="module")
def dense(passages):
  return retrieval.evaluate(tiny.params(0), tiny.config(), passages, batch_size=4,
                            progress=lambda line: None)


def test_passages_are_consecutive_token_windows(source, passages):
  tok = tiny.tokenizer()
  expected_ids, expected_rows = [], []
  for d, doc in enumerate(DOCS):
    ids = tok.encode(doc, add_special_tokens=False)
    for start in range(0, len(ids) - 31, 32):
      expected_ids.append(f"{d}:{start}")
      expected_rows.append(ids[start:start + 32])
  assert passages.ids == tuple(expected_ids)
  assert passages.tokens.tolist() == expected_rows
  assert passages.tokens.dtype == np.int32
  np.testing.assert_array_equal(np.concatenate([passages.queries, passages.keys], axis=1),
                                passages.tokens)
  assert passages.queries.shape == passages.keys.shape == (len(expected_ids), 16)


def test_subsample_of_passages_is_deterministic(source, passages):
  a = retrieval.load(tiny.tokenizer(), source, passage_tokens=32, n=5, seed=2)
  b = retrieval.load(tiny.tokenizer(), source, passage_tokens=32, n=5, seed=2)
  assert a.ids == b.ids and len(a.ids) == 5 and set(a.ids) <= set(passages.ids)
  np.testing.assert_array_equal(a.tokens, b.tokens)


@pytest.mark.parametrize("kwargs, message", [
    ({"passage_tokens": 31}, r"retrieval.load\(passage_tokens=31\): expected an even integer"),
    ({"passage_tokens": 0}, r"retrieval.load\(passage_tokens=0\): expected an integer >= 2"),
    ({"passage_tokens": 100000}, r"retrieval.load: source=.* has no document of at least "
     r"passage_tokens=100000 tokens"),
    ({"n": 0}, r"retrieval.load\(n=0\): expected an integer >= 1"),
])
def test_load_argument_errors(source, kwargs, message):
  with pytest.raises(ValueError, match=message):
    retrieval.load(tiny.tokenizer(), source, **kwargs)


def test_embeddings_are_padding_free_means_of_the_final_hidden_states():
  """Ragged rows, batched left-padded, against one right-padded forward without a mask (right
  padding follows every real token, which a causal model never attends to)."""
  params, config = tiny.params(0), tiny.config()
  rng = np.random.default_rng(0)
  rows = [rng.integers(0, config.vocab_size, n).astype(np.int32) for n in (9, 16, 3, 12, 16)]
  emb = retrieval.embed(params, config, rows, batch_size=4, progress=lambda line: None)
  padded = np.full((len(rows), 16), 5, np.int32)
  for i, r in enumerate(rows):
    padded[i, :len(r)] = r
  hidden = np.asarray(pj.forward(params, config, padded, capture=False,
                                 logits=False).final_hidden, np.float64)
  ref = np.stack([hidden[i, :len(r)].mean(axis=0) for i, r in enumerate(rows)])
  assert emb.shape == (5, config.hidden_size) and emb.dtype == np.float32
  np.testing.assert_allclose(emb, ref, rtol=0, atol=2e-5)


def test_scores_of_hand_made_embeddings():
  keys = np.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  queries = np.asarray([[2.0, 0.1], [1.0, 1.1], [0.0, 3.0]])  # query 1 is closest to key 2
  out = retrieval.score(retrieval.Embeddings(queries, keys))
  # query 0: own key best (rank 1); query 1: key 2 beats key 1 (rank 2); query 2: key 1 beats
  # key 2 (rank 2).
  assert out["per_item"] == {"rank": [1, 2, 2], "top1": [0, 2, 1]}
  assert out["recall_at_1"] == pytest.approx(1 / 3)
  assert out["mrr"] == pytest.approx((1 + 0.5 + 0.5) / 3)
  assert out["chance_recall_at_1"] == pytest.approx(1 / 3)


def test_ties_count_against_the_query():
  same = np.ones((4, 3))
  out = retrieval.score(retrieval.Embeddings(same, same))
  assert out["per_item"]["rank"] == [4, 4, 4, 4]
  assert out["recall_at_1"] == 0.0


def test_a_model_compared_with_itself(passages, dense):
  result, emb = dense
  again, _ = retrieval.evaluate(tiny.params(0), tiny.config(), passages, batch_size=4,
                                dense=emb, progress=lambda line: None)
  assert again["cosine_to_dense"] == pytest.approx(1.0, abs=1e-6)
  assert again["cosine_to_dense_query"] == pytest.approx(1.0, abs=1e-6)
  assert again["top1_agreement"] == 1.0
  assert again["recall_at_1"] == result["recall_at_1"] == again["recall_at_1_dense"]
  assert again["mrr"] == result["mrr"]
  json.dumps(again, allow_nan=False)


def test_compare_against_another_model(passages, dense):
  _, emb = dense
  other = retrieval.encode(tiny.params(1), tiny.config(), passages, batch_size=4,
                           progress=lambda line: None)
  out = retrieval.compare(emb, other)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  cos_q = np.sum(unit(emb.queries) * unit(other.queries), axis=1)
  cos_k = np.sum(unit(emb.keys) * unit(other.keys), axis=1)
  assert out["cosine_to_dense_query"] == pytest.approx(cos_q.mean(), abs=1e-6)
  assert out["cosine_to_dense_key"] == pytest.approx(cos_k.mean(), abs=1e-6)
  assert out["cosine_to_dense"] < 0.999
  assert out["recall_at_1_pruned"] == retrieval.score(other)["recall_at_1"]


def test_argument_errors(passages, dense):
  params, config = tiny.params(0), tiny.config()
  with pytest.raises(validate.ArgumentError, match=r"retrieval.embed\(rows\[1\]=.*token ids in "
                     r"\[0, 300\); they span \[0, 300\]"):
    retrieval.embed(params, config, [[1, 2], [0, 300]])
  with pytest.raises(validate.ArgumentError, match=r"retrieval.embed\(rows\[0\]=.*non-empty 1-D"):
    retrieval.embed(params, config, [[]])
  with pytest.raises(TypeError, match=r"retrieval.encode\(passages=.*expected Passages"):
    retrieval.encode(params, config, passages.tokens)
  _, emb = dense
  half = retrieval.Embeddings(emb.queries[:2], emb.keys[:2])
  with pytest.raises(validate.ArgumentError, match=r"retrieval.compare\(pruned=.*embeddings of "
                     r"the same \d+ passages as dense; it has 2"):
    retrieval.compare(emb, half)
