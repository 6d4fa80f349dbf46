"""KV-cached decoding: caches against full recomputes, padding, EOS, sampling, and the public
driver (`Sampling`, `Stopping`, `choose`, `rollout`, `decode_step(capture=True)`, `observe`).

Every generation here has the same shapes ([3, 12] prompts, 6 steps), so `generate` compiles
once per sampling/stopping/capture combination.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prunerep_jax as pj
from prunerep_jax import decode

STEPS = 6
ALL = ("logits", "hidden", "logprobs")


def _entropy(logits):
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def observe_entropy(out, tok, valid):
  """A per-step `observe` for generate: a nested pytree of [B] values."""
  return {"entropy": _entropy(out.logits), "top": {"id": jnp.argmax(out.logits, -1)},
          "running": valid}


@pytest.fixture(scope="module")
def greedy(params, cfg, tokens):
  return pj.generate(params, cfg, tokens, STEPS, eos_token_ids=(), capture=ALL,
                     observe=observe_entropy)


@pytest.fixture(scope="module")
def sampled(params, cfg, tokens):
  return pj.generate(params, cfg, tokens, STEPS, temperature=1.5, seed=3, eos_token_ids=(),
                     capture=ALL)


@pytest.fixture(scope="module")
def full(params, cfg, tokens, greedy):
  """The forward pass over prompt + greedy continuation, [3, 18]."""
  return pj.forward(params, cfg, jnp.concatenate([tokens, greedy.tokens], axis=1))


def test_cached_decoding_equals_full_recompute(tokens, greedy, full):
  T = tokens.shape[1]
  np.testing.assert_allclose(greedy.logits, full.logits[:, T - 1:T + STEPS - 1], rtol=1e-5,
                             atol=1e-4)
  np.testing.assert_allclose(greedy.hidden, full.final_hidden[:, T - 1:T + STEPS - 1],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(greedy.tokens, np.argmax(greedy.logits, -1))
  np.testing.assert_allclose(greedy.logprobs, jax.nn.log_softmax(greedy.logits, -1), atol=1e-5)
  np.testing.assert_array_equal(greedy.lengths, [STEPS] * tokens.shape[0])
  assert np.asarray(greedy.valid).all()


@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_generation_with_padding_equals_a_full_recompute_of_each_row(params, cfg, tokens,
                                                                             side):
  B, T = tokens.shape
  lengths = [T, 5, 9]
  toks, mask = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
  for b, n in enumerate(lengths):
    sl = slice(0, n) if side == "right" else slice(T - n, T)
    toks[b, sl], mask[b, sl] = np.asarray(tokens[b, :n]), 1
  gen = pj.generate(params, cfg, toks, STEPS, prompt_mask=mask, eos_token_ids=(), capture=ALL,
                    observe=observe_entropy)
  # generate left-aligns the prompts it runs
  for b, n in enumerate(lengths):
    np.testing.assert_array_equal(gen.prompt_tokens[b, T - n:], tokens[b, :n])
    np.testing.assert_array_equal(gen.prompt_mask[b], [0] * (T - n) + [1] * n)
  # reference: each row's real prompt and its continuation, right-padded, one uncached pass
  seq, seq_mask = np.zeros((B, T + STEPS), np.int32), np.zeros((B, T + STEPS), np.int32)
  for b, n in enumerate(lengths):
    seq[b, :n], seq[b, n:n + STEPS] = np.asarray(tokens[b, :n]), np.asarray(gen.tokens[b])
    seq_mask[b, :n + STEPS] = 1
  ref = pj.forward(params, cfg, seq, seq_mask)
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(gen.logits[b], ref.logits[b, n - 1:n - 1 + STEPS], rtol=1e-5,
                               atol=1e-4)
  np.testing.assert_array_equal(gen.tokens, np.argmax(gen.logits, -1))


def test_eos_ends_a_row_and_pads_the_rest(params, cfg, tokens, greedy):
  eos = int(greedy.tokens[0, 2])
  gen = pj.generate(params, cfg, tokens, STEPS, eos_token_ids=(eos,), pad_id=5)
  for b in range(tokens.shape[0]):
    row = np.asarray(greedy.tokens[b])
    n = int(np.argmax(row == eos)) + 1 if (row == eos).any() else STEPS
    assert int(gen.lengths[b]) == n
    np.testing.assert_array_equal(gen.tokens[b, :n], row[:n])  # the EOS itself is kept
    np.testing.assert_array_equal(gen.tokens[b, n:], 5)
    np.testing.assert_array_equal(gen.valid[b], np.arange(STEPS) < n)
  assert int(gen.lengths[0]) <= 3


def test_sampling_is_reproducible_and_seed_dependent(params, cfg, tokens, sampled):
  again = pj.generate(params, cfg, tokens, STEPS, temperature=1.5, seed=3, eos_token_ids=(),
                      capture=ALL)
  other = pj.generate(params, cfg, tokens, STEPS, temperature=1.5, seed=4, eos_token_ids=(),
                      capture=ALL)
  np.testing.assert_array_equal(sampled.tokens, again.tokens)
  np.testing.assert_array_equal(sampled.logits, again.logits)
  assert (np.asarray(sampled.tokens) != np.asarray(other.tokens)).any()
  # log-probabilities are taken at the sampling temperature
  np.testing.assert_allclose(sampled.logprobs, jax.nn.log_softmax(sampled.logits / 1.5, -1),
                             atol=1e-5)


def test_each_step_draws_with_its_own_fold_in_key(sampled):
  @jax.jit
  def redraw(logits):  # [B, S, V] -> [S, B]: step i samples with fold_in(key(3), i)
    keys = jax.vmap(lambda i: decode.step_key(jax.random.key(3), i))(jnp.arange(STEPS))
    return jax.vmap(lambda z, k: decode.sample(z, k, decode.Sampling(1.5)), in_axes=(1, 0))(
        logits, keys)

  np.testing.assert_array_equal(sampled.tokens, np.asarray(redraw(sampled.logits)).T)


# ------------------------------------------------------------------ sampling and stopping

LOGITS = jnp.asarray(np.random.RandomState(1).randn(4, 101) * 2.0, jnp.float32)
KEYS = jax.random.split(jax.random.key(0), 300)


@functools.partial(jax.jit, static_argnums=(2,))
def _draws_jit(logits, keys, sampling):
  return jax.vmap(lambda k: decode.sample(logits, k, sampling))(keys)


def _draws(sampling, logits=LOGITS):
  return np.asarray(_draws_jit(logits, KEYS, sampling))  # [300, B]


def test_greedy_top_k_one_and_tiny_top_p_all_take_the_argmax():
  top = np.argmax(np.asarray(LOGITS), -1)
  np.testing.assert_array_equal(decode.sample(LOGITS, KEYS[0]), top)
  for s in (decode.Sampling(1.0, top_k=1), decode.Sampling(1.0, top_p=1e-6)):
    np.testing.assert_array_equal(_draws(s), np.broadcast_to(top, (300, 4)))


def test_top_k_draws_only_from_the_k_largest_logits():
  draws = _draws(decode.Sampling(3.0, top_k=3))
  top3 = np.argsort(-np.asarray(LOGITS), -1)[:, :3]
  for b in range(4):
    assert set(np.unique(draws[:, b])) == set(top3[b])  # each of the three, nothing else


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  draws = _draws(decode.Sampling(1.0, top_p=0.75), logits)
  assert set(np.unique(draws)) == {0, 1}
  # the kept tokens are drawn in proportion to their renormalised probabilities (5:3)
  assert abs((draws == 0).mean() - 0.625) < 0.1


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -1.0}, "Sampling(temperature=-1.0)"),
    ({"temperature": 1.0, "top_k": 0}, "Sampling(top_k=0)"),
    ({"temperature": 1.0, "top_p": 0.0}, "Sampling(top_p=0.0)"),
    ({"temperature": 1.0, "top_p": 1.5}, "Sampling(top_p=1.5)"),
])
def test_sampling_refuses_bad_values(kwargs, match):
  with pytest.raises(ValueError) as e:
    decode.Sampling(**kwargs)
  assert str(e.value).startswith(match)


def test_choose_pads_finished_rows_and_ends_rows_on_eos():
  logits = jnp.full((4, 10), -5.0).at[jnp.arange(4), jnp.asarray([3, 7, 3, 9])].set(5.0)
  done = jnp.asarray([False, False, True, False])
  tok, valid, new_done = decode.choose(logits, KEYS[0], done, decode.Sampling(),
                                       decode.Stopping(eos_ids=(7, 9), pad_id=1))
  np.testing.assert_array_equal(tok, [3, 7, 1, 9])
  np.testing.assert_array_equal(valid, [True, True, False, True])
  np.testing.assert_array_equal(new_done, [False, True, True, True])
  # without EOS ids nothing ends
  _, _, never = decode.choose(logits, KEYS[0], done, decode.Sampling(), decode.Stopping())
  np.testing.assert_array_equal(never, done)


# ----------------------------------------------------------------------- the scan driver

def test_rollout_observe_returns_per_step_values_equal_to_generate_captures(params, cfg, tokens,
                                                                            sampled):
  def observe(out, tok, valid):
    return {"logits": out.logits, "hidden": out.hidden, "token": tok, "valid": valid,
            "entropy": _entropy(out.logits)}

  @jax.jit
  def run(p, toks, mask):
    return decode.rollout(p, cfg, toks, mask, STEPS, sampling=decode.Sampling(1.5),
                          stopping=decode.Stopping((), 0), seed_key=jax.random.key(3),
                          observe=observe)

  r = run(params, tokens, jnp.ones(tokens.shape, jnp.int32))
  B = tokens.shape[0]
  shapes = {"logits": (B, STEPS, cfg.vocab_size), "hidden": (B, STEPS, cfg.hidden_size),
                 "token": (B, STEPS), "valid": (B, STEPS), "entropy": (B, STEPS)}
  assert {k: v.shape for k, v in r.observed.items()} == shapes
  np.testing.assert_array_equal(r.tokens, sampled.tokens)
  np.testing.assert_array_equal(r.observed["token"], sampled.tokens)
  np.testing.assert_array_equal(r.valid, sampled.valid)
  np.testing.assert_allclose(r.observed["logits"], sampled.logits, rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(r.observed["hidden"], sampled.hidden, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(r.observed["entropy"], _entropy(sampled.logits), rtol=1e-5)
  assert int(r.state.index) == tokens.shape[1] + STEPS - 1  # the last token is never fed back


def test_decode_step_capture_equals_the_forward_residual_at_that_position(params, cfg, tokens,
                                                                          greedy, full):
  B, T = tokens.shape

  @jax.jit
  def two_steps(p, toks, nxt):
    out0, state = decode.prefill(p, cfg, toks, jnp.ones(toks.shape, bool), T + 2, capture=True)
    out1, _ = decode.decode_step(p, cfg, state, nxt, capture=True)
    return out0, out1

  out0, out1 = two_steps(params, tokens, greedy.tokens[:, 0])
  L = cfg.num_layers
  for out, t in ((out0, T - 1), (out1, T)):
    assert out.residual.shape == (2 * L + 1, B, cfg.hidden_size)
    np.testing.assert_allclose(out.residual, full.residual[:, :, t], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out.hidden, full.final_hidden[:, t], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.logits, full.logits[:, t], rtol=1e-5, atol=1e-4)


def test_generate_observe_returns_step_leaves(tokens, greedy):
  B = tokens.shape[0]
  assert jax.tree_util.tree_map(np.shape, greedy.observed) == {
      "entropy": (B, STEPS), "top": {"id": (B, STEPS)}, "running": (B, STEPS)}
  np.testing.assert_allclose(greedy.observed["entropy"], _entropy(greedy.logits), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(greedy.observed["top"]["id"], greedy.tokens)
  np.testing.assert_array_equal(greedy.observed["running"], greedy.valid)


def test_generate_without_observe_or_captures_returns_none(params, cfg, tokens, greedy):
  gen = pj.generate(params, cfg, tokens, STEPS, eos_token_ids=(int(greedy.tokens[0, 2]),),
                    pad_id=5)
  assert gen.observed is None and gen.logits is None and gen.hidden is None
  assert gen.logprobs is None


def test_generate_refuses_an_observe_that_is_not_a_function(params, cfg, tokens):
  with pytest.raises(TypeError, match=r"generate\(observe='entropy'\)"):
    pj.generate(params, cfg, tokens, STEPS, observe="entropy")
