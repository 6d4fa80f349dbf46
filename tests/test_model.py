"""Model core: captures, padding, kept positions and the LM head on a tiny random model.

Decoding (caches, sampling, EOS, the rollout driver) is tested in test_decode.py; the shared
config and params come from conftest.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prunerep_jax as pj
from prunerep_jax import model as M


@pytest.fixture(scope="module")
def full(params, cfg, tokens):
  return pj.forward(params, cfg, tokens)


def test_forward_shapes(cfg, tokens, full):
  L, D = cfg.num_layers, cfg.hidden_size
  B, T = tokens.shape
  assert full.logits.shape == (B, T, cfg.vocab_size) and full.logits.dtype == jnp.float32
  assert full.residual.shape == (2 * L + 1, B, T, D)
  assert full.block_inputs.shape == full.after_attn.shape == full.after_mlp.shape == (L, B, T, D)


def test_residual_starts_at_embedding_and_ends_at_final_norm_input(params, cfg, tokens, full):
  np.testing.assert_array_equal(full.residual[0], params["embed"]["embedding"][tokens])
  np.testing.assert_allclose(M.final_norm(params, cfg, full.residual[-1]), full.final_hidden,
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(M.lm_head(params, cfg, full.final_hidden), full.logits, atol=1e-5)


def test_residual_matches_a_block_run_alone(params, cfg, tokens, full):
  # Run block 1 alone on the captured input and compare with the captured boundaries.
  B, T = tokens.shape
  p1 = jax.tree_util.tree_map(lambda x: x[1], params["layers"])
  run_block = jax.jit(lambda p, h: M.block(p, cfg, h, M.prompt_context(cfg, jnp.ones((B, T)))))
  h_out, h_attn, _, _ = run_block(p1, full.residual[2])
  np.testing.assert_allclose(h_attn, full.residual[3], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(h_out, full.residual[4], rtol=1e-5, atol=1e-5)


def test_causality_later_tokens_do_not_change_earlier_logits(params, cfg, tokens, full):
  changed = tokens.at[:, -1].set(1)
  out = pj.forward(params, cfg, changed)
  np.testing.assert_array_equal(out.logits[:, :-1], full.logits[:, :-1])


def test_keep_last_and_indices_select_the_same_values(params, cfg, tokens, full):
  last = pj.forward(params, cfg, tokens, keep="last")
  np.testing.assert_allclose(last.logits[:, 0], full.logits[:, -1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(last.residual[:, :, 0], full.residual[:, :, -1], atol=1e-4)
  idx = np.array([[0, 5], [3, 3], [11, 2]], np.int32)
  sel = pj.forward(params, cfg, tokens, keep=idx)
  expect = np.take_along_axis(np.asarray(full.logits), idx[:, :, None], axis=1)
  np.testing.assert_allclose(sel.logits, expect, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(sel.positions, idx)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_equal_the_unpadded_prefixes(params, cfg, tokens, full, side):
  # Causality makes the first n positions of an unpadded row the row of length n run alone.
  T = tokens.shape[1]
  lengths = [T, 7, 4]
  toks = np.zeros((3, T), np.int32)
  mask = np.zeros((3, T), np.int32)
  for b, n in enumerate(lengths):
    sl = slice(T - n, T) if side == "left" else slice(0, n)
    toks[b, sl] = np.asarray(tokens[b, :n])
    mask[b, sl] = 1
  out = pj.forward(params, cfg, toks, mask)
  last = pj.forward(params, cfg, toks, mask, keep="last")
  for b, n in enumerate(lengths):
    sl = slice(T - n, T) if side == "left" else slice(0, n)
    np.testing.assert_allclose(out.logits[b, sl], full.logits[b, :n], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out.residual[:, b, sl], full.residual[:, b, :n], rtol=1e-5,
                               atol=1e-4)
    np.testing.assert_allclose(last.logits[b, 0], full.logits[b, n - 1], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(last.positions[b], [T - 1 if side == "left" else n - 1])


def test_bf16_params_run_in_bf16_and_stay_close(params, cfg, tokens, full):
  out = pj.forward(pj.cast(params, jnp.bfloat16), cfg, tokens)
  assert out.residual.dtype == jnp.bfloat16 and out.logits.dtype == jnp.float32
  rel = np.abs(out.logits - full.logits).max() / np.abs(full.logits).max()
  assert rel < 0.05


def test_sliding_window_limits_what_a_query_sees(params, cfg, tokens):
  windowed = cfg.replace(sliding_window=3)
  base = pj.forward(params, windowed, tokens).logits
  # Windows compound over layers: with 3 layers a query reaches 3 x 2 = 6 positions back, so
  # token 0 cannot reach position 11 but does reach position 1.
  changed = pj.forward(params, windowed, tokens.at[0, 0].set(9)).logits
  np.testing.assert_array_equal(changed[0, -1], base[0, -1])
  assert np.abs(changed[0, 1] - base[0, 1]).max() > 0


def test_tied_head_reads_the_embedding_table(tied_params, tied_cfg, tokens):
  assert "lm_head" not in tied_params
  out = pj.forward(tied_params, tied_cfg, tokens, keep="last", capture=False)
  expect = np.asarray(out.final_hidden, np.float64) @ np.asarray(
      tied_params["embed"]["embedding"], np.float64).T
  np.testing.assert_allclose(out.logits, expect, rtol=1e-5, atol=1e-5)


def test_causal_chunked_attention_matches_the_full_attention(params, cfg, tokens, full):
  # Chunks of 5 over T=12 queries: the last chunk is short, and chunk c sees keys 0..5c+4 only.
  B, T = tokens.shape
  p1 = jax.tree_util.tree_map(lambda x: x[1], params["layers"])
  ctx = M.prompt_context(cfg, jnp.ones((B, T)))
  run = jax.jit(lambda p, h, chunk: M.block(p, cfg, h, ctx, inputs=True, causal_chunk=chunk),
                static_argnums=2)
  dense, chunked = run(p1, full.residual[2], None), run(p1, full.residual[2], 5)
  np.testing.assert_allclose(chunked.h_out, dense.h_out, rtol=1e-6, atol=1e-6)
  for group in ("attn_in", "o_in", "mlp_in", "down_in"):
    np.testing.assert_allclose(chunked.inputs[group], dense.inputs[group], rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="attention_sublayer: causal_chunk needs a pass without a "
                                       "cache .* got causal_chunk=4 with a cache"):
    cache = M.LayerCache(jnp.zeros((B, T, cfg.num_kv_heads, cfg.head_dim)),
                         jnp.zeros((B, T, cfg.num_kv_heads, cfg.head_dim)))
    M.attention_sublayer(p1, cfg, full.residual[2], ctx, cache=cache, index=jnp.int32(0),
                         causal_chunk=4)
