"""Perplexity and next-token KL against float64 NumPy references on tiny random models."""

import jax
import numpy as np
import pytest

import prunerep_jax as pj
from prunerep_jax import batching
from prunerep_jax.tasks.perplexity import next_token_kl, perplexity

CFG = pj.Config(family="llama", vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=8)
W, T = 5, 11


def sharpened(params, scale=60.0):
  """The random init's logits are nearly uniform; a larger head gives peaked distributions."""
  return {**params, "lm_head": {"kernel": params["lm_head"]["kernel"] * scale}}


@pytest.fixture(scope="module")
def params():
  return sharpened(pj.init_params(CFG, jax.random.key(0)))


@pytest.fixture(scope="module")
def other_params():
  return sharpened(pj.init_params(CFG, jax.random.key(1)))


@pytest.fixture(scope="module")
def tokens():
  return np.random.default_rng(0).integers(0, CFG.vocab_size, (W, T)).astype(np.int32)


def log_softmax64(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def ref_nll(params, tokens):
  """Mean NLL per predicted token, float64, from the logits `forward` returns."""
  logp = log_softmax64(pj.forward(params, CFG, tokens, capture=False).logits)  # [W, T, V]
  picked = np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
  return -picked.mean()


def test_perplexity_matches_a_float64_reference(params, tokens):
  out = perplexity(params, CFG, tokens, batch_size=W)
  nll = ref_nll(params, tokens)
  np.testing.assert_allclose(out["nll"], nll, rtol=1e-5)
  np.testing.assert_allclose(out["ppl"], np.exp(nll), rtol=1e-5)
  assert out["tokens"] == W * (T - 1)


@pytest.mark.parametrize("batch_size", [2, 3, 8])
def test_padding_the_last_batch_does_not_change_perplexity(params, tokens, batch_size):
  np.testing.assert_allclose(perplexity(params, CFG, tokens, batch_size=batch_size)["nll"],
                             perplexity(params, CFG, tokens, batch_size=W)["nll"], rtol=1e-6)


def test_position_chunks_do_not_change_perplexity(params, tokens, monkeypatch):
  whole = perplexity(params, CFG, tokens, batch_size=2)["nll"]
  monkeypatch.setattr(batching, "LOGIT_ELEMENTS", 2 * 3 * CFG.vocab_size)  # C = 3
  np.testing.assert_allclose(perplexity(params, CFG, tokens, batch_size=2)["nll"], whole,
                             rtol=1e-6)


def test_a_model_agrees_with_itself(params, tokens):
  out = next_token_kl(params, params, CFG, CFG, tokens, batch_size=2)
  assert out == {"kl": 0.0, "top1_agreement": 1.0, "tokens": W * T}


def test_next_token_kl_matches_a_float64_reference(params, other_params, tokens, monkeypatch):
  monkeypatch.setattr(batching, "LOGIT_ELEMENTS", 2 * 4 * CFG.vocab_size)  # C = 4
  out = next_token_kl(params, other_params, CFG, CFG, tokens, batch_size=2)
  lp = log_softmax64(pj.forward(params, CFG, tokens, capture=False).logits)
  lq = log_softmax64(pj.forward(other_params, CFG, tokens, capture=False).logits)
  kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
  agree = lp.argmax(axis=-1) == lq.argmax(axis=-1)
  np.testing.assert_allclose(out["kl"], kl.mean(), rtol=1e-4)
  np.testing.assert_allclose(out["top1_agreement"], agree.mean())
  assert out["kl"] > 0.1 and out["top1_agreement"] < 1.0


def test_next_token_kl_compares_models_of_different_shapes(params, tokens):
  narrow = pj.Config(**{**CFG.__dict__, "intermediate_size": 16})
  narrow_params = sharpened(pj.init_params(narrow, jax.random.key(2)))
  out = next_token_kl(params, narrow_params, CFG, narrow, tokens)
  assert out["kl"] > 0 and 0 <= out["top1_agreement"] <= 1


def test_next_token_kl_needs_one_vocabulary(params, tokens):
  bigger = pj.Config(**{**CFG.__dict__, "vocab_size": 98})
  with pytest.raises(ValueError, match=r"config_pruned.vocab_size=98 differs from.*=97"):
    next_token_kl(params, params, CFG, bigger, tokens)
