"""Perplexity on token windows, and next-token fidelity of a pruned model to the dense one.

Both reduce inside one jitted function per batch shape to per-row sums, so only [B] numbers
reach the host; the vocabulary-sized logits exist one chunk of positions at a time on the device.
The last batch is padded (`prunerep_jax.batching`) to the same shape instead of compiling a new one.

Shape letters: W windows, B batch, T positions per window, C positions per chunk, D hidden,
V vocab.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prunerep_jax import batching
from prunerep_jax import metrics
from prunerep_jax import validate
from prunerep_jax.config import Config
from prunerep_jax.model import forward, lm_head


@functools.partial(jax.jit, static_argnums=(1, 3))
def _nll_row_sums(params, config: Config, tokens: jax.Array, chunk: int) -> jax.Array:
  """tokens [B, T] -> [B] summed NLL of tokens[:, 1:] given their prefixes, in float32."""
  hidden = forward(params, config, tokens, capture=False, logits=False).final_hidden  # [B, T, D]

  def nll(h, target):  # [B, C, D], [B, C] -> ([B, C],)
    logp = jax.nn.log_softmax(lm_head(params, config, h), axis=-1)  # [B, C, V] float32
    return (-jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0],)

  (per_position,) = batching.map_chunks(nll, chunk, hidden[:, :-1], tokens[:, 1:])
  return jnp.sum(per_position, axis=1)


@functools.partial(jax.jit, static_argnums=(2, 3, 5))
def _kl_row_sums(params_dense, params_pruned, config_dense: Config, config_pruned: Config,
                 tokens: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
  """tokens [B, T] -> ([B] summed KL(dense || pruned), [B] count of equal argmaxes)."""
  h_dense = forward(params_dense, config_dense, tokens, capture=False, logits=False).final_hidden
  h_pruned = forward(params_pruned, config_pruned, tokens, capture=False,
                     logits=False).final_hidden

  def compare(a, b):  # [B, C, D] x2 -> ([B, C], [B, C])
    z_dense = lm_head(params_dense, config_dense, a)
    z_pruned = lm_head(params_pruned, config_pruned, b)
    agree = jnp.argmax(z_dense, axis=-1) == jnp.argmax(z_pruned, axis=-1)
    return metrics.kl(z_dense, z_pruned), agree.astype(jnp.float32)

  kl, agree = batching.map_chunks(compare, chunk, h_dense, h_pruned)
  return jnp.sum(kl, axis=1), jnp.sum(agree, axis=1)


def _check_tokens(fn: str, tokens: Any, vocab_size: int, min_positions: int) -> np.ndarray:
  """Token windows [W, T] as int32, ids range-checked before the cast, T >= min_positions."""
  tokens = validate.tokens(fn, tokens, vocab_size)
  if tokens.shape[1] < min_positions:
    raise validate.fail(fn, "tokens", tokens, f"token windows [W, T] with T >= {min_positions}; "
                        f"got shape {tokens.shape}")
  return tokens


def perplexity(params, config: Config, tokens, batch_size: int = 8) -> dict:
  """Perplexity of a model on token windows (each window scored on its own).

  Args:
    params: the model's params pytree.
    config: its `Config`.
    tokens: int [W, T] windows, e.g. from `prunerep_jax.data.heldout_tokens`; every position but
      the first of each window is predicted from the ones before it.
    batch_size: windows per forward pass.

  Returns:
    {"ppl": exp(nll), "nll": mean negative log-likelihood per predicted token (nats),
    "tokens": W * (T - 1) predicted tokens}.
  """
  fn = "perplexity"
  validate.params(fn, params, config)
  tokens = _check_tokens(fn, tokens, config.vocab_size, min_positions=2)
  batch_size = validate.integer(fn, "batch_size", batch_size, minimum=1)
  sums = []
  chunk = batching.chunk_size(batching.batch_size_for(tokens.shape[0], batch_size),
                              tokens.shape[1] - 1, config.vocab_size)
  for b in batching.batches(tokens.shape[0], batch_size):
    sums.append((_nll_row_sums(params, config, jnp.asarray(tokens[b.rows]), chunk), b.real))
  total = sum(np.asarray(s, np.float64)[:real].sum() for s, real in sums)
  count = tokens.shape[0] * (tokens.shape[1] - 1)
  nll = float(total / count)
  return {"ppl": float(np.exp(nll)), "nll": nll, "tokens": int(count)}


def next_token_kl(params_dense, params_pruned, config_dense: Config, config_pruned: Config,
                  tokens, batch_size: int = 8) -> dict:
  """How far the pruned model's next-token distributions are from the dense model's.

  Args:
    params_dense, params_pruned: the two params pytrees.
    config_dense, config_pruned: their configs (they may differ, e.g. after neuron pruning, but
      must share the vocabulary).
    tokens: int [W, T] windows; every position is compared.
    batch_size: windows per forward pass.

  Returns:
    {"kl": mean KL(p_dense || p_pruned) per position (nats), "top1_agreement": fraction of
    positions where the two argmax tokens agree, "tokens": W * T positions}.
  """
  fn = "next_token_kl"
  validate.params(fn, params_dense, config_dense)
  # Checked before the pruned params: a params/config mismatch there would hide the real cause.
  if isinstance(config_pruned, Config) and config_pruned.vocab_size != config_dense.vocab_size:
    raise ValueError(f"{fn}: config_pruned.vocab_size={config_pruned.vocab_size} differs from "
                     f"config_dense.vocab_size={config_dense.vocab_size}; next-token "
                     "distributions can only be compared over the same vocabulary")
  validate.params(fn, params_pruned, config_pruned)
  tokens = _check_tokens(fn, tokens, config_dense.vocab_size, min_positions=1)
  batch_size = validate.integer(fn, "batch_size", batch_size, minimum=1)
  sums = []
  chunk = batching.chunk_size(batching.batch_size_for(tokens.shape[0], batch_size),
                              tokens.shape[1], config_dense.vocab_size)
  for b in batching.batches(tokens.shape[0], batch_size):
    kl, agree = _kl_row_sums(params_dense, params_pruned, config_dense, config_pruned,
                             jnp.asarray(tokens[b.rows]), chunk)
    sums.append((kl, agree, b.real))
  kl_total = sum(np.asarray(k, np.float64)[:real].sum() for k, _, real in sums)
  agree_total = sum(np.asarray(a, np.float64)[:real].sum() for _, a, real in sums)
  count = tokens.shape[0] * tokens.shape[1]
  return {"kl": float(kl_total / count), "top1_agreement": float(agree_total / count),
          "tokens": int(count)}
