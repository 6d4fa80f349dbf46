"""The embedded default model equals transformers running the same GGUF (PyTorch CPU, float32,
eager attention): logits on a long real-text prompt, and greedy generations on chat prompts.

Both sides dequantise the same Q4_1 file to float32, so the only differences left are float32
summation order; a wrong q/k un-permutation, RoPE convention or norm would show as O(1) errors.
"""

import importlib.util
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import prunerep_jax as pj  # noqa: E402
from prunerep_jax.loading import default  # noqa: E402
from prunerep_jax.loading.tokenizer import chat_prompt, encode_batch  # noqa: E402

LOGITS_TOL = 5e-4
LONG_TOKENS = 520  # > 512: short prompts hide RoPE bugs
NEW_TOKENS = 64
CHATS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three fruits that are red.",
    "How do I reverse a list in Python?",
]


def _news_text() -> str:
  """Real English: the Lee news corpus that ships inside gensim (read, not imported)."""
  spec = importlib.util.find_spec("gensim")
  if spec is None:
    pytest.skip("gensim is not installed; it provides the real text this test reads")
  path = os.path.join(spec.submodule_search_locations[0], "test", "test_data",
                      "lee_background.cor")
  with open(path, encoding="utf-8") as f:
    return " ".join(line.strip() for line in f if line.strip())


@pytest.fixture(scope="module")
def ours():
  return pj.load(pj.DEFAULT_MODEL)


@pytest.fixture(scope="module")
def theirs():
  path = default.resolve(pj.DEFAULT_MODEL)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32,
      attn_implementation="eager")
  return model.eval()


def test_logits_match_transformers_on_a_long_real_text(ours, theirs):
  tokens, _ = encode_batch(ours.tokenizer, _news_text())
  assert tokens.shape[1] >= LONG_TOKENS
  tokens = tokens[:, :LONG_TOKENS]
  got = np.asarray(pj.forward(ours.params, ours.config, tokens, capture=False).logits)
  with torch.no_grad():
    want = theirs(torch.from_numpy(tokens).long()).logits.numpy()
  assert got.shape == want.shape == (1, LONG_TOKENS, ours.config.vocab_size)
  diff = np.abs(got - want)
  worst = np.unravel_index(diff.argmax(), diff.shape)[1]
  assert diff.max() <= LOGITS_TOL, f"max |logit diff| {diff.max():.2e} at position {worst}"
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_stop_tokens_agree_with_transformers(ours, theirs):
  eos = theirs.generation_config.eos_token_id
  eos = {eos} if isinstance(eos, int) else set(eos)
  assert set(ours.config.eos_token_ids) == eos


def _first_stop(row: list[int], eos: tuple[int, ...]) -> list[int]:
  """The row up to and including its first stop token."""
  for i, t in enumerate(row):
    if t in eos:
      return row[:i + 1]
  return row


def test_greedy_generation_matches_transformers(ours, theirs):
  prompts = [chat_prompt(ours.tokenizer, text) for text in CHATS]
  width = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), width), ours.config.pad_token_id, np.int32)
  mask = np.zeros_like(tokens)
  for b, p in enumerate(prompts):  # left padding: every prompt ends at the last column
    tokens[b, width - len(p):], mask[b, width - len(p):] = p, 1
  gen = pj.generate(ours.params, ours.config, tokens, NEW_TOKENS, prompt_mask=mask,
                    temperature=0.0)
  got_tokens, got_lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
  with torch.no_grad():
    out = theirs.generate(torch.from_numpy(tokens).long(),
                          attention_mask=torch.from_numpy(mask).long(), do_sample=False,
                          max_new_tokens=NEW_TOKENS, output_scores=True,
                          return_dict_in_generate=True)
  want_tokens = out.sequences[:, width:].tolist()

  for b in range(len(prompts)):
    want = _first_stop(want_tokens[b], ours.config.eos_token_ids)
    got = got_tokens[b, :got_lengths[b]].tolist()
    if got != want:
      step = next(i for i, (g, w) in enumerate(zip(got + [-1], want + [-1])) if g != w)
      top2 = torch.topk(out.scores[min(step, len(out.scores) - 1)][b], 2).values
      pytest.fail(f"prompt {b} ({CHATS[b]!r}): greedy tokens differ from step {step}; "
                  f"transformers' top-2 logit margin there is {float(top2[0] - top2[1]):.2e}\n"
                  f"ours:         {ours.tokenizer.decode(got)!r}\n"
                  f"transformers: {ours.tokenizer.decode(want)!r}")
