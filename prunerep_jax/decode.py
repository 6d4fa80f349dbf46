"""KV-cached decoding: prefill, one pure step function, and `generate` as a `jax.lax.scan`.

The decode state is a frozen pytree advanced by `decode_step`; `generate` only wires prefill,
sampling and the scan together, so analyses can drive the same steps themselves (e.g. feed a
pruned model the dense model's tokens).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from prunerep_jax import model as M
from prunerep_jax import validate
from prunerep_jax.config import Config

Array = jax.Array
CAPTURES = ("hidden", "logits", "logprobs")


@flax.struct.dataclass
class DecodeState:
  """cache_k/cache_v [L, B, S, K, H]; kv_valid [B, S] bool; index: next slot (scalar int32);
  next_pos [B] int32: RoPE position of the next token of each row."""

  cache_k: Array
  cache_v: Array
  kv_valid: Array
  index: Array
  next_pos: Array


def init_state(config: Config, batch: int, cache_len: int, dtype=jnp.float32) -> DecodeState:
  shape = (config.num_layers, batch, cache_len, config.num_kv_heads, config.head_dim)
  return DecodeState(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                     jnp.zeros((batch, cache_len), bool), jnp.zeros((), jnp.int32),
                     jnp.zeros((batch,), jnp.int32))


def prefill(params, config: Config, tokens: Array, mask: Array, cache_len: int):
  """Runs a left-aligned prompt (tokens, mask [B, T]) into a fresh cache of `cache_len` slots.

  Returns (logits [B, V] float32, hidden [B, D] final-normed, state) for the last position.
  """
  B, T = tokens.shape
  mask = mask.astype(bool)
  state = init_state(config, B, cache_len, M.compute_dtype(params))
  kv_valid = state.kv_valid.at[:, :T].set(mask)
  positions = M.positions_from_mask(mask)
  cos, sin = M.rope_tables(config, positions)
  attn = M.attention_mask_3d(kv_valid, jnp.arange(T, dtype=jnp.int32), config)
  h = M.embed(params, tokens).astype(M.compute_dtype(params))
  h, _, (ck, cv) = M.run_layers(params["layers"], config, h, cos, sin, attn,
                                kv=(state.cache_k, state.cache_v, jnp.zeros((), jnp.int32)),
                                capture=False)
  hidden = M.final_norm(params, config, h[:, -1])
  logits = M.lm_head(params, config, hidden)
  next_pos = jnp.sum(mask, axis=1).astype(jnp.int32)
  return logits, hidden, DecodeState(ck, cv, kv_valid, jnp.asarray(T, jnp.int32), next_pos)


def decode_step(params, config: Config, state: DecodeState, token: Array):
  """Feeds one token per row (token [B] int) and returns (logits [B, V], hidden [B, D], state)."""
  idx = state.index
  kv_valid = jax.lax.dynamic_update_slice(state.kv_valid, jnp.ones((token.shape[0], 1), bool),
                                          (jnp.zeros((), jnp.int32), idx))
  cos, sin = M.rope_tables(config, state.next_pos[:, None])
  attn = M.attention_mask_3d(kv_valid, idx[None], config)
  h = M.embed(params, token[:, None]).astype(M.compute_dtype(params))
  h, _, (ck, cv) = M.run_layers(params["layers"], config, h, cos, sin, attn,
                                kv=(state.cache_k, state.cache_v, idx), capture=False)
  hidden = M.final_norm(params, config, h[:, 0])
  logits = M.lm_head(params, config, hidden)
  return logits, hidden, DecodeState(ck, cv, kv_valid, idx + 1, state.next_pos + 1)


def sample(logits: Array, key: Array, temperature: float, top_k: Optional[int] = None,
           top_p: Optional[float] = None) -> Array:
  """Draws one token per row from logits [B, V]; temperature 0 is greedy (argmax)."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  z = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    kth = jax.lax.top_k(z, top_k)[0][..., -1:]
    z = jnp.where(z < kth, -jnp.inf, z)
  if top_p is not None:
    order = jnp.argsort(-z, axis=-1)
    z_sorted = jnp.take_along_axis(z, order, axis=-1)
    p_sorted = jax.nn.softmax(z_sorted, axis=-1)
    # keep the smallest prefix whose mass reaches top_p (always at least the top token)
    drop_sorted = (jnp.cumsum(p_sorted, axis=-1) - p_sorted) >= top_p
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(z.shape[0])[:, None], order].set(drop_sorted)
    z = jnp.where(drop, -jnp.inf, z)
  return jax.random.categorical(key, z, axis=-1).astype(jnp.int32)


class Generation(NamedTuple):
  """Output of `generate`. S = max_new_tokens.

  tokens:   [B, S] int32 new tokens; after a row's EOS, `pad_id`.
  valid:    [B, S] bool, True up to and including the row's EOS.
  lengths:  [B] int32 number of valid tokens.
  hidden:   [B, S, D] final-normed hidden state that produced each token (if captured).
  logits:   [B, S, V] float32 logits that produced each token (if captured).
  logprobs: [B, S, V] float32 log-softmax of logits / T (T = 1 for greedy) (if captured).
  prompt_tokens, prompt_mask: [B, T] the prompt, left-aligned as it was run.
  """

  tokens: Array
  valid: Array
  lengths: Array
  hidden: Optional[Array]
  logits: Optional[Array]
  logprobs: Optional[Array]
  prompt_tokens: Array
  prompt_mask: Array


def left_align(tokens: Array, mask: Array) -> tuple[Array, Array]:
  """Moves each row's padding to the left, keeping token order (works for any padding side).

  tokens [B, T]; mask [B, T] 0/1 (1 = real token; `generate` has validated it). Rows are sorted
  on `mask != 0` alone, so the mask's values can never reorder the tokens.
  Returns (tokens [B, T], mask [B, T] int32 0/1).
  """
  real = (mask != 0).astype(jnp.int32)
  order = jnp.argsort(real, axis=1, stable=True)
  return jnp.take_along_axis(tokens, order, axis=1), jnp.take_along_axis(real, order, axis=1)


def generate(params, config: Config, prompt_tokens, max_new_tokens: int, *, prompt_mask=None,
             temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, seed: int = 0,
             eos_token_ids: Optional[Sequence[int]] = None, pad_id: Optional[int] = None,
             capture: Sequence[str] = ()) -> Generation:
  """Prefill, then a fixed-length `jax.lax.scan` over decoding steps with a KV cache.

  Every argument is checked once on the host before anything is traced (see
  `prunerep_jax.validate`); scalars may be Python or NumPy numbers.

  Args:
    params, config: the model; params must match config's layout (shapes only).
    prompt_tokens: integer ids [B, T] in [0, V); rows of different lengths are padded (either
      side) and described by `prompt_mask` [B, T] (bool or integer 0/1, 1 = real token, at
      least one per row).
    max_new_tokens: number of decoding steps S (static), an integer >= 1 with
      T + S <= config.max_position_embeddings.
    temperature: 0 for greedy, > 0 to sample from softmax(logits / temperature).
    top_k, top_p: optional truncation of the sampling distribution (top_k in [1, V], top_p in
      (0, 1]).
    seed: an integer in [0, 2**32); step i samples with `fold_in(key(seed), i)`, so two models
      given the same seed draw with the same randomness.
    eos_token_ids: token ids that end a row (default: config.eos_token_ids; () disables).
    pad_id: token id written after a row has ended (default: config.pad_token_id, else 0).
    capture: a tuple of any of "hidden", "logits", "logprobs": per-step arrays to return.

  Raises:
    ArgumentError (a ValueError) naming the argument, the value and what was expected.
  """
  fn = "generate"
  validate.params(fn, params, config)
  V = config.vocab_size
  prompt_tokens = validate.tokens(fn, prompt_tokens, V, name="prompt_tokens")
  B, T = prompt_tokens.shape
  mask = validate.mask(fn, "prompt_mask", prompt_mask, (B, T))
  steps = validate.integer(fn, "max_new_tokens", max_new_tokens, minimum=1)
  limit = config.max_position_embeddings
  if T + steps > limit:
    raise validate.fail(
        fn, "max_new_tokens", max_new_tokens,
        f"at most {limit - T}: prompt length {T} + max_new_tokens must not exceed "
        f"config.max_position_embeddings={limit}")
  if validate.is_traced(temperature):
    raise validate.fail(fn, "temperature", temperature,
                        "a concrete number (it is static in generate's compiled scan)")
  temperature = validate.temperature(fn, temperature, allow_zero=True)
  if top_k is not None:
    top_k = validate.integer(fn, "top_k", top_k, minimum=1, maximum=V,
                             expected=f"None or an integer in [1, {V}]")
  if top_p is not None:
    top_p = validate.number(fn, "top_p", top_p, minimum=0.0, maximum=1.0, min_open=True,
                            expected="None or a number in (0, 1]")
  seed = validate.seed(fn, seed)
  capture = validate.names(fn, "capture", capture, CAPTURES)
  if eos_token_ids is None:
    eos = config.eos_token_ids
  else:
    eos = validate.token_ids(fn, "eos_token_ids", eos_token_ids, V)
  if pad_id is None:
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
  else:
    pad_id = validate.token_id(fn, "pad_id", pad_id, V)
  tokens, mask = left_align(prompt_tokens, mask)
  out = _generate(params, config, tokens, mask, jnp.asarray(seed, jnp.uint32), steps,
                  temperature, top_k, top_p, eos, pad_id,
                  tuple(c for c in CAPTURES if c in capture))
  return out._replace(prompt_tokens=tokens, prompt_mask=mask)


@functools.partial(jax.jit, static_argnums=(1, 5, 6, 7, 8, 9, 10, 11))
def _generate(params, config, tokens, mask, seed, steps, temperature, top_k, top_p, eos, pad_id,
              capture):
  key = jax.random.key(seed)
  eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)

  def emit(logits, hidden, i, done):
    tok = sample(logits, jax.random.fold_in(key, i), temperature, top_k, top_p)
    tok = jnp.where(done, pad_id, tok)
    ys = {"tokens": tok, "valid": ~done}
    if "hidden" in capture:
      ys["hidden"] = hidden
    if "logits" in capture:
      ys["logits"] = logits
    if "logprobs" in capture:
      ys["logprobs"] = jax.nn.log_softmax(logits / (temperature or 1.0), axis=-1)
    done = done | (jnp.isin(tok, eos_arr) if eos else jnp.zeros_like(done))
    return tok, done, ys

  logits, hidden, state = prefill(params, config, tokens, mask, tokens.shape[1] + steps)
  tok, done, ys0 = emit(logits, hidden, 0, jnp.zeros((tokens.shape[0],), bool))

  def body(carry, i):
    state, tok, done = carry
    logits, hidden, state = decode_step(params, config, state, tok)
    tok, done, ys = emit(logits, hidden, i, done)
    return (state, tok, done), ys

  _, ys = jax.lax.scan(body, (state, tok, done), jnp.arange(1, steps, dtype=jnp.int32))
  ys = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b], axis=0).swapaxes(0, 1),
                              ys0, ys)
  return Generation(ys["tokens"], ys["valid"], ys["valid"].sum(axis=1).astype(jnp.int32),
                    ys.get("hidden"), ys.get("logits"), ys.get("logprobs"), tokens, mask)
