"""Model core: captures, padding, kept positions, caching and sampling on a tiny random model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prunerep_jax as pj
from prunerep_jax import model as M

CFG = pj.Config(family="llama", vocab_size=101, hidden_size=32, intermediate_size=48, num_layers=3,
                num_heads=4, num_kv_heads=2, head_dim=8, eos_token_ids=(7,), pad_token_id=0)
T = 12


@pytest.fixture(scope="module")
def params():
  return pj.init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def tokens():
  return jnp.asarray(np.random.RandomState(0).randint(8, CFG.vocab_size, (3, T)), jnp.int32)


@pytest.fixture(scope="module")
def full(params, tokens):
  return pj.forward(params, CFG, tokens)


def test_forward_shapes(full):
  L, D = CFG.num_layers, CFG.hidden_size
  assert full.logits.shape == (3, T, CFG.vocab_size) and full.logits.dtype == jnp.float32
  assert full.residual.shape == (2 * L + 1, 3, T, D)
  assert full.block_inputs.shape == full.after_attn.shape == full.after_mlp.shape == (L, 3, T, D)


def test_residual_starts_at_embedding_and_ends_at_final_norm_input(params, tokens, full):
  np.testing.assert_array_equal(full.residual[0], params["embed"]["embedding"][tokens])
  np.testing.assert_allclose(M.final_norm(params, CFG, full.residual[-1]), full.final_hidden,
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(M.lm_head(params, CFG, full.final_hidden), full.logits, atol=1e-6)


def test_residual_matches_a_block_by_block_numpy_free_recomputation(params, tokens, full):
  # Run block 1 alone on the captured input and compare with the captured boundaries.
  p1 = jax.tree_util.tree_map(lambda x: x[1], params["layers"])
  ctx = M.prompt_context(CFG, jnp.ones((3, T), bool))
  h_out, h_attn, _, _ = M.block(p1, CFG, full.residual[2], ctx)
  np.testing.assert_allclose(h_attn, full.residual[3], atol=1e-5)
  np.testing.assert_allclose(h_out, full.residual[4], atol=1e-5)


def test_causality_later_tokens_do_not_change_earlier_logits(params, tokens, full):
  changed = tokens.at[:, -1].set(1)
  out = pj.forward(params, CFG, changed)
  np.testing.assert_array_equal(out.logits[:, :-1], full.logits[:, :-1])


def test_keep_last_and_indices_select_the_same_values(params, tokens, full):
  last = pj.forward(params, CFG, tokens, keep="last")
  np.testing.assert_allclose(last.logits[:, 0], full.logits[:, -1], atol=1e-5)
  np.testing.assert_allclose(last.residual[:, :, 0], full.residual[:, :, -1], atol=1e-4)
  idx = np.array([[0, 5], [3, 3], [11, 2]], np.int32)
  sel = pj.forward(params, CFG, tokens, keep=idx)
  expect = np.take_along_axis(np.asarray(full.logits), idx[:, :, None], axis=1)
  np.testing.assert_allclose(sel.logits, expect, atol=1e-5)
  np.testing.assert_array_equal(sel.positions, idx)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_rows_run_alone(params, tokens, side):
  lengths = [T, 7, 4]
  toks = np.zeros((3, T), np.int32)
  mask = np.zeros((3, T), np.int32)
  for b, n in enumerate(lengths):
    sl = slice(T - n, T) if side == "left" else slice(0, n)
    toks[b, sl] = np.asarray(tokens[b, :n])
    mask[b, sl] = 1
  out = pj.forward(params, CFG, toks, mask)
  for b, n in enumerate(lengths):
    alone = pj.forward(params, CFG, tokens[b:b + 1, :n])
    sl = slice(T - n, T) if side == "left" else slice(0, n)
    np.testing.assert_allclose(out.logits[b, sl], alone.logits[0], atol=2e-5)
  last = pj.forward(params, CFG, toks, mask, keep="last")
  for b, n in enumerate(lengths):
    alone = pj.forward(params, CFG, tokens[b:b + 1, :n], keep="last")
    np.testing.assert_allclose(last.logits[b], alone.logits[0], atol=2e-5)


def test_bf16_params_run_in_bf16_and_stay_close(params, tokens, full):
  out = pj.forward(pj.cast(params, jnp.bfloat16), CFG, tokens)
  assert out.residual.dtype == jnp.bfloat16 and out.logits.dtype == jnp.float32
  rel = np.abs(out.logits - full.logits).max() / np.abs(full.logits).max()
  assert rel < 0.05


def test_sliding_window_limits_what_a_query_sees(params):
  cfg = CFG.replace(sliding_window=3)
  toks = jnp.asarray(np.random.RandomState(1).randint(8, 101, (1, T)), jnp.int32)
  base = pj.forward(params, cfg, toks).logits
  # token 0 is outside the window of the last query in every layer? No: windows compound over
  # layers (3 layers x 2 back = 6). Token 0 cannot reach position 11 (> 6 away).
  changed = pj.forward(params, cfg, toks.at[0, 0].set(9)).logits
  np.testing.assert_array_equal(changed[0, -1], base[0, -1])
  assert np.abs(changed[0, 1] - base[0, 1]).max() > 0


# ------------------------------------------------------------------------------- decoding

@pytest.fixture(scope="module")
def greedy(params, tokens):
  return pj.generate(params, CFG, tokens, 6, eos_token_ids=(), capture=("logits", "hidden",
                                                                        "logprobs"))


def test_cached_decoding_equals_full_recompute(params, tokens, greedy):
  full = pj.forward(params, CFG, jnp.concatenate([tokens, greedy.tokens], axis=1))
  np.testing.assert_allclose(greedy.logits, full.logits[:, T - 1:T + 5], atol=2e-5)
  np.testing.assert_allclose(greedy.hidden, full.final_hidden[:, T - 1:T + 5], atol=2e-5)
  np.testing.assert_array_equal(greedy.tokens, np.argmax(greedy.logits, -1))
  np.testing.assert_allclose(np.exp(greedy.logprobs).sum(-1), 1.0, atol=1e-5)


def test_batched_generation_with_padding_equals_rows_alone(params, tokens):
  lengths = [T, 5, 9]
  toks = np.zeros((3, T), np.int32)
  mask = np.zeros((3, T), np.int32)
  for b, n in enumerate(lengths):  # right padding: generate left-aligns internally
    toks[b, :n] = np.asarray(tokens[b, :n])
    mask[b, :n] = 1
  batch = pj.generate(params, CFG, toks, 5, prompt_mask=mask, eos_token_ids=(), capture=("logits",))
  for b, n in enumerate(lengths):
    alone = pj.generate(params, CFG, tokens[b:b + 1, :n], 5, eos_token_ids=(), capture=("logits",))
    np.testing.assert_array_equal(batch.tokens[b], alone.tokens[0])
    np.testing.assert_allclose(batch.logits[b], alone.logits[0], atol=3e-5)


def test_eos_ends_a_row_and_pads_the_rest(params, tokens, greedy):
  eos = int(greedy.tokens[0, 2])
  gen = pj.generate(params, CFG, tokens, 6, eos_token_ids=(eos,), pad_id=0)
  first = int(np.argmax(np.asarray(greedy.tokens[0]) == eos))
  assert int(gen.lengths[0]) == first + 1
  np.testing.assert_array_equal(gen.tokens[0, :first + 1], greedy.tokens[0, :first + 1])
  assert (np.asarray(gen.tokens[0, first + 1:]) == 0).all()
  assert not np.asarray(gen.valid[0, first + 1:]).any()


def test_sampling_is_reproducible_and_seed_dependent(params, tokens):
  a = pj.generate(params, CFG, tokens, 8, temperature=1.5, seed=3, eos_token_ids=())
  b = pj.generate(params, CFG, tokens, 8, temperature=1.5, seed=3, eos_token_ids=())
  c = pj.generate(params, CFG, tokens, 8, temperature=1.5, seed=4, eos_token_ids=())
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()


def test_top_k_one_and_tiny_top_p_are_greedy(params, tokens, greedy):
  k1 = pj.generate(params, CFG, tokens, 6, temperature=1.0, top_k=1, eos_token_ids=())
  p0 = pj.generate(params, CFG, tokens, 6, temperature=1.0, top_p=1e-6, eos_token_ids=())
  np.testing.assert_array_equal(k1.tokens, greedy.tokens)
  np.testing.assert_array_equal(p0.tokens, greedy.tokens)


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 400)
  draws = np.asarray(jax.vmap(lambda k: pj.decode.sample(logits, k, pj.decode.Sampling(1.0, top_p=0.75)))(keys))
  assert set(np.unique(draws)) == {0, 1}
