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
from prunerep_jax import parallel
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


def _row_sums(step, tokens: np.ndarray, batch_size: int, mesh) -> list[np.ndarray]:
  """step(tokens [B, T]) -> tuple of [B] per-row sums, over every batch of the windows.

  Returns each sum for the real windows only, [W] float64 on the host (on every host of a
  multi-host mesh). On a mesh every batch is a multiple of the data axis and split over it;
  the padding rows are dropped before anything is added.
  """
  launched = []  # every batch is dispatched before any result is read: the device never waits
  for b in parallel.batches(tokens.shape[0], batch_size, mesh):
    batch = jnp.asarray(tokens[b.rows]) if mesh is None else parallel.shard_batch(
        tokens[b.rows], mesh)[0]
    launched.append((step(batch), b.real))
  parts = [[np.asarray(x, np.float64)[:real] for x in parallel.fetch(sums)]
           for sums, real in launched]
  return [np.concatenate(sums) for sums in zip(*parts)]


def perplexity(params, config: Config, tokens, batch_size: int = 8, *, mesh=None) -> dict:
  """Perplexity of a model on token windows (each window scored on its own).

  Args:
    params: the model's params pytree.
    config: its `Config`.
    tokens: int [W, T] windows, e.g. from `prunerep_jax.data.heldout_tokens`; every position but
      the first of each window is predicted from the ones before it.
    batch_size: windows per forward pass.
    mesh: None, a ("data", "model") mesh or a spec such as "data:4" (`prunerep_jax.parallel`):
      params placed on it, each batch (rounded up to a multiple of the data axis) split over it.

  Returns:
    {"ppl": exp(nll), "nll": mean negative log-likelihood per predicted token (nats),
    "tokens": W * (T - 1) predicted tokens}.
  """
  fn = "perplexity"
  validate.params(fn, params, config)
  tokens = _check_tokens(fn, tokens, config.vocab_size, min_positions=2)
  batch_size = validate.integer(fn, "batch_size", batch_size, minimum=1)
  mesh = parallel.as_mesh(fn, mesh)
  if mesh is not None:
    params = parallel.shard_params(params, config, mesh)
  chunk = batching.chunk_size(_rows(tokens, batch_size, mesh), tokens.shape[1] - 1,
                              config.vocab_size)
  (nll_sums,) = _row_sums(lambda t: (_nll_row_sums(params, config, t, chunk),), tokens,
                          batch_size, mesh)
  count = tokens.shape[0] * (tokens.shape[1] - 1)
  nll = float(nll_sums.sum() / count)
  return {"ppl": float(np.exp(nll)), "nll": nll, "tokens": int(count)}


def next_token_kl(params_dense, params_pruned, config_dense: Config, config_pruned: Config,
                  tokens, batch_size: int = 8, *, mesh=None) -> dict:
  """How far the pruned model's next-token distributions are from the dense model's.

  Args:
    params_dense, params_pruned: the two params pytrees.
    config_dense, config_pruned: their configs (they may differ, e.g. after neuron pruning, but
      must share the vocabulary).
    tokens: int [W, T] windows; every position is compared.
    batch_size: windows per forward pass.
    mesh: as in `perplexity`; both models are placed on it.

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
  mesh = parallel.as_mesh(fn, mesh)
  if mesh is not None:
    params_dense = parallel.shard_params(params_dense, config_dense, mesh)
    params_pruned = parallel.shard_params(params_pruned, config_pruned, mesh)
  chunk = batching.chunk_size(_rows(tokens, batch_size, mesh), tokens.shape[1],
                              config_dense.vocab_size)
  kl_sums, agree_sums = _row_sums(
      lambda t: _kl_row_sums(params_dense, params_pruned, config_dense, config_pruned, t, chunk),
      tokens, batch_size, mesh)
  count = tokens.shape[0] * tokens.shape[1]
  return {"kl": float(kl_sums.sum() / count), "top1_agreement": float(agree_sums.sum() / count),
          "tokens": int(count)}


def _rows(tokens: np.ndarray, batch_size: int, mesh) -> int:
  """Rows of every batch `_row_sums` runs (what sizes the logit chunks)."""
  return parallel.padded_size(batching.batch_size_for(tokens.shape[0], batch_size), mesh)
