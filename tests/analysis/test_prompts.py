"""prunerep_jax.analysis.prompts: the built-in set, prompts from local files, padded batches."""

import json

import numpy as np
import pytest

from prunerep_jax import validate
from prunerep_jax.analysis import prompts


def test_builtin_set_and_first_n():
  assert prompts.load() == list(prompts.BUILTIN) and len(prompts.BUILTIN) == 8
  assert len(set(prompts.BUILTIN)) == 8
  assert prompts.load(n=3) == list(prompts.BUILTIN[:3])
  assert prompts.load(n=100) == list(prompts.BUILTIN)


def test_text_jsonl_and_json_files(tmp_path):
  (tmp_path / "p.txt").write_text("  first prompt \n\nsecond: with colon\n")
  assert prompts.load(str(tmp_path / "p.txt")) == ["first prompt", "second: with colon"]
  (tmp_path / "p.jsonl").write_text('"plain string"\n\n{"prompt": "a\\nb"}\n{"text": "t"}\n')
  assert prompts.load(str(tmp_path / "p.jsonl"), n=2) == ["plain string", "a\nb"]
  (tmp_path / "p.json").write_text(json.dumps([{"text": "x"}, "y"]))
  assert prompts.load(str(tmp_path / "p.json")) == ["x", "y"]


@pytest.mark.parametrize("name,content,error,message", [
    ("missing.txt", None, FileNotFoundError, "expected an existing .txt / .jsonl / .json file"),
    ("p.csv", "a,b\n", validate.ArgumentError, "expected a .txt / .jsonl / .json file"),
    ("empty.txt", "\n\n", ValueError, "empty.txt: holds no prompt"),
    ("bad.jsonl", '{"q": 1}\n', ValueError, "bad.jsonl line 1: the record has no field 'prompt' "
     "or 'text' (it has ['q'])"),
    ("bad2.jsonl", '"ok"\n{not json\n', ValueError, "bad2.jsonl line 2: not valid JSON"),
    ("blank.json", '[" "]', ValueError, "blank.json record 0: expected a non-empty prompt"),
    ("obj.json", '{"a": 1}', ValueError, "obj.json: expected a JSON list of prompts"),
])
def test_bad_files_are_refused_with_the_place(tmp_path, name, content, error, message):
  if content is not None:
    (tmp_path / name).write_text(content)
  with pytest.raises(error) as e:
    prompts.load(str(tmp_path / name))
  assert message in str(e.value) and str(e.value).startswith("prompts.load")


def test_left_pad_puts_every_prompt_at_the_right_edge():
  tokens, mask = prompts.left_pad([[5, 6, 7], [9]], pad_id=0)
  np.testing.assert_array_equal(tokens, [[5, 6, 7], [0, 0, 9]])
  np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
  assert tokens.dtype == np.int32 and mask.dtype == np.int32
  with pytest.raises(ValueError, match="each with at least one token"):
    prompts.left_pad([[1], []], pad_id=0)


def test_encode_uses_the_chat_template():
  class Tok:
    chat_template = "x"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
      return "<" + messages[0]["content"] + ">"

    def encode(self, text, add_special_tokens=True):
      return [ord(c) for c in text]

  tokens, mask = prompts.encode(Tok(), ["ab", "c"], pad_id=1)
  np.testing.assert_array_equal(tokens, [[60, 97, 98, 62], [1, 60, 99, 62]])
  np.testing.assert_array_equal(mask.sum(1), [4, 3])
