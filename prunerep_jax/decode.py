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
  """Moves each row's padding to the left, keeping token order (works for any padding side)."""
  order = jnp.argsort(mask.astype(jnp.int32), axis=1, stable=True)
  return jnp.take_along_axis(tokens, order, axis=1), jnp.take_along_axis(mask, order, axis=1)


def generate(params, config: Config, prompt_tokens, max_new_tokens: int, *, prompt_mask=None,
             temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, seed: int = 0,
             eos_token_ids: Optional[Sequence[int]] = None, pad_id: Optional[int] = None,
             capture: Sequence[str] = ()) -> Generation:
  """Prefill, then a fixed-length `jax.lax.scan` over decoding steps with a KV cache.

  Args:
    params, config: the model.
    prompt_tokens: int [B, T]; rows of different lengths are padded (either side) and
      described by `prompt_mask` [B, T] (1 = real token).
    max_new_tokens: number of decoding steps S (static).
    temperature: 0 for greedy, > 0 to sample from softmax(logits / temperature).
    top_k, top_p: optional truncation of the sampling distribution.
    seed: step i samples with `fold_in(key(seed), i)`, so two models given the same seed draw
      with the same randomness.
    eos_token_ids: tokens that end a row (default: config.eos_token_ids; () disables).
    pad_id: token written after a row has ended (default: config.pad_token_id, else 0).
    capture: any of "hidden", "logits", "logprobs": per-step arrays to return.
  """
  prompt_tokens = jnp.asarray(prompt_tokens)
  M._check_tokens(prompt_tokens, config)
  B, T = prompt_tokens.shape
  mask = jnp.ones((B, T), jnp.int32) if prompt_mask is None else jnp.asarray(prompt_mask)
  if mask.shape != prompt_tokens.shape:
    raise ValueError(f"prompt_mask: shape {tuple(mask.shape)} does not match prompt_tokens "
                     f"{tuple(prompt_tokens.shape)}")
  lengths = np.asarray(mask).astype(bool).sum(axis=1)
  if (lengths == 0).any():
    raise ValueError(f"prompt_mask: rows {np.flatnonzero(lengths == 0).tolist()} have no real "
                     "token; every prompt needs at least one")
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected an integer >= 1")
  if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
          and temperature >= 0):
    raise ValueError(f"temperature={temperature!r}: expected a finite number >= 0 "
                     "(0 means greedy)")
  if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= config.vocab_size):
    raise ValueError(f"top_k={top_k!r}: expected None or an integer in [1, {config.vocab_size}]")
  if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
    raise ValueError(f"top_p={top_p!r}: expected None or a number in (0, 1]")
  unknown = sorted(set(capture) - set(CAPTURES))
  if unknown:
    raise ValueError(f"capture={tuple(capture)!r}: unknown entries {unknown}; expected a subset "
                     f"of {CAPTURES}")
  eos = tuple(config.eos_token_ids if eos_token_ids is None else (int(t) for t in eos_token_ids))
  if pad_id is None:
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
  if T + max_new_tokens > config.max_position_embeddings:
    # RoPE itself works past it, but the model was not trained there; warn rather than refuse.
    import warnings
    warnings.warn(f"prompt length {T} + max_new_tokens {max_new_tokens} exceeds "
                  f"max_position_embeddings={config.max_position_embeddings}", stacklevel=2)
  tokens, mask = left_align(prompt_tokens.astype(jnp.int32), mask.astype(jnp.int32))
  out = _generate(params, config, tokens, mask, jnp.asarray(seed, jnp.uint32), int(max_new_tokens),
                  float(temperature), top_k, None if top_p is None else float(top_p), eos,
                  int(pad_id), tuple(c for c in CAPTURES if c in capture))
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
