"""Our forward equals Hugging Face transformers (PyTorch CPU, fp32, eager attention) to 1e-5.

Each case is a tiny randomly initialised HF model, saved with save_pretrained and loaded back
through `prunerep_jax.load`, so the test covers config mapping, weight mapping and the model
together. Weights, biases and norm scales are all re-drawn at sizes that make logits O(1):
HF initialises biases to 0 and norms to 1, which would hide a swapped or dropped tensor.
"""

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import prunerep_jax as pj  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer files")

TOL = 1e-5
SHORT, LONG = 64, 520  # LONG > 512: short prompts hide RoPE bugs
BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


@dataclasses.dataclass(frozen=True)
class Case:
  config_cls: type
  kwargs: dict
  prompt_len: int = SHORT
  max_shard_size: str = ""  # non-empty: save in shards with an index


CASES = {
    "llama_mha": Case(transformers.LlamaConfig, dict(BASE, num_key_value_heads=4)),
    "llama_gqa_tied_long": Case(
        transformers.LlamaConfig,
        dict(BASE, tie_word_embeddings=True, max_position_embeddings=1024,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        prompt_len=LONG),
    # head_dim * heads != hidden_size checks the o_proj and q_proj mappings.
    "llama_mqa_sharded": Case(
        transformers.LlamaConfig,
        dict(BASE, num_key_value_heads=1, head_dim=32, num_hidden_layers=3),
        max_shard_size="40KB"),
    "llama3_rope_long": Case(
        transformers.LlamaConfig,
        dict(BASE, max_position_embeddings=1024,
             rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 128}),
        prompt_len=LONG),
    "llama_bias": Case(transformers.LlamaConfig,
                       dict(BASE, attention_bias=True, mlp_bias=True)),
    "mistral_sliding": Case(transformers.MistralConfig, dict(BASE, sliding_window=16)),
    "qwen2_tied": Case(transformers.Qwen2Config, dict(BASE, tie_word_embeddings=True)),
}


def _randomise(model):
  """Re-draws every parameter so each one visibly moves the logits."""
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
      elif name.endswith("bias"):
        p.copy_(0.3 * torch.randn(p.shape, generator=gen))
      else:
        # Std 1/sqrt(last dim) for embeddings too: tied logits then stay O(1), where an
        # absolute 1e-5 is a few float32 ulps rather than below rounding noise.
        p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


def _hf_logits(hf_model, tokens, attention_mask=None, position_ids=None) -> np.ndarray:
  kwargs = {}
  if attention_mask is not None:
    kwargs["attention_mask"] = torch.from_numpy(np.asarray(attention_mask, np.int64))
  if position_ids is not None:
    kwargs["position_ids"] = torch.from_numpy(np.asarray(position_ids, np.int64))
  with torch.no_grad():
    out = hf_model(input_ids=torch.from_numpy(np.asarray(tokens, np.int64)), **kwargs)
  return out.logits.float().numpy()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """name -> (our loaded Model, HF model), built once per module."""
  cache = {}

  def build(name):
    if name not in cache:
      case = CASES[name]
      torch.manual_seed(0)
      hf_config = case.config_cls(**case.kwargs)
      hf_model = transformers.AutoModelForCausalLM.from_config(
          hf_config, attn_implementation="eager", dtype=torch.float32).eval()
      _randomise(hf_model)
      path = tmp_path_factory.mktemp(name)
      if case.max_shard_size:
        hf_model.save_pretrained(path, max_shard_size=case.max_shard_size)
        assert (path / "model.safetensors.index.json").is_file()
      else:
        hf_model.save_pretrained(path)
      cache[name] = (pj.load(str(path)), hf_model)
    return cache[name]

  return build


def _tokens(vocab_size, shape, seed=0):
  return np.random.default_rng(seed).integers(0, vocab_size, size=shape, dtype=np.int32)


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(name, built):
  model, hf_model = built(name)
  tokens = _tokens(model.config.vocab_size, (2, CASES[name].prompt_len))
  expected = _hf_logits(hf_model, tokens)
  got = np.asarray(pj.forward(model.params, model.config, tokens).logits)
  assert got.shape == expected.shape and got.dtype == np.float32
  assert expected.std() > 0.5, "logits too flat for the tolerance to mean anything"
  diff = np.abs(got - expected).max()
  assert diff <= TOL, f"{name}: max |logits - HF logits| = {diff:.3g} > {TOL}"


def test_cases_load_the_config_they_were_saved_with(built):
  assert built("llama3_rope_long")[0].config.rope_scaling == pj.RopeScaling(8.0, 1.0, 4.0, 128)
  assert built("mistral_sliding")[0].config.sliding_window == 16
  qwen = built("qwen2_tied")[0].config
  assert (qwen.qkv_bias, qwen.o_bias, qwen.tie_word_embeddings) == (True, False, True)
  assert "lm_head" not in built("qwen2_tied")[0].params


@pytest.mark.parametrize("name", ["llama_mha", "mistral_sliding"])
def test_left_padded_batch_equals_rows_alone(name, built):
  model, hf_model = built(name)
  lengths = [SHORT, 40, 17]
  tokens = _tokens(model.config.vocab_size, (len(lengths), SHORT), seed=1)
  mask = np.zeros_like(tokens)
  for row, n in enumerate(lengths):
    mask[row, SHORT - n:] = 1
  tokens = np.where(mask == 1, tokens, 0)
  got = np.asarray(pj.forward(model.params, model.config, tokens, attention_mask=mask).logits)
  # HF numbers positions by slot unless told otherwise; generate() passes mask-derived ids.
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  expected = _hf_logits(hf_model, tokens, attention_mask=mask, position_ids=positions)
  for row, n in enumerate(lengths):
    alone = np.asarray(pj.forward(model.params, model.config, tokens[row:row + 1, SHORT - n:])
                       .logits)[0]
    real = got[row, SHORT - n:]
    assert np.abs(real - alone).max() <= TOL, f"{name}: row {row} batched != alone"
    assert np.abs(real - expected[row, SHORT - n:]).max() <= TOL, f"{name}: row {row} != HF"
