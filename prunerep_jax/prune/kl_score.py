"""KL-guided drop scoring: the probability-space cost of removing a sublayer, a block or a window.

A candidate is a contiguous span [a, b) of sublayers in the 2L numbering (sublayer 2l is block l's
attention, 2l + 1 its MLP): one sublayer is (k, k + 1), block l is (2l, 2l + 2), the window of n
blocks starting at i is (2i, 2i + 2n). Its cost is the mean over calibration tokens of
KL(p || p'), p the distribution of the model as it is and p' the one with the span removed alone
(its residual deltas replaced by exact zeros, what `drop.zero_sublayers` / `drop.remove_blocks`
do), measured by

  score "kl":        the Theorem 3 estimate Var_p(dz) / 2T^2 (metrics.kl_estimate)
  score "kl_exact":  the exact KL (metrics.kl)

at one of two places (`at`):

  "boundary"  through the final-norm lens at the span's own output, in the model's context: the
              state after the span h_b = h_a + (what the span adds) against h_a, the state the
              stream carries there once the span is removed; z = lens(h_b), z' = lens(h_a). This
              is the paper's layerwise counterfactual with the sublayer pruned to nothing. Cost: one
              forward, plus one lens per distinct boundary state.
  "output"    at the model's output: the remaining layers run on the stream without the span, as
              the pruned model does; z = the model's logits, z' = the logits without the span.
              Cost: one forward per candidate; up to OUTPUT_STREAMS candidates and the reference
              ride one vmapped layer scan, so activation memory is bounded whatever their number.

Both are computed for all candidates in one jitted pass per calibration batch. Logits exist only
for one chunk of positions at a time ([B, C, S, V] with S lens'd states, C sized by
`batching.chunk_size`), reduced to per-position scalars at once: never a [candidates, tokens,
vocab] array.

Shape letters: L layers, B batch, T positions, C positions per chunk, S states, P pairs,
D hidden, V vocab.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prunerep_jax import batching, metrics, parallel, validate
from prunerep_jax import model as M
from prunerep_jax.config import Config
from prunerep_jax.prune import calibrate

SCORES = ("kl", "kl_exact")
PLACES = ("boundary", "output")
_METRIC = {"kl": metrics.kl_estimate, "kl_exact": metrics.kl}
# Candidates per pass of the "output" place (each pass also reruns the unmodified model).
OUTPUT_STREAMS = 16

Span = tuple[int, int]


# ------------------------------------------------------------------------------ candidates

def sublayer_spans(num_layers: int, kinds: Sequence[str] = ("attn", "mlp")) -> list[Span]:
  """The spans of single sublayers, kind-major: all attention sublayers, then all MLPs."""
  offset = {"attn": 0, "mlp": 1}
  return [(2 * l + offset[k], 2 * l + offset[k] + 1) for k in kinds for l in range(num_layers)]


def block_spans(num_layers: int) -> list[Span]:
  """The span of every block l: (2l, 2l + 2)."""
  return [(2 * l, 2 * l + 2) for l in range(num_layers)]


def window_spans(num_layers: int, n: int) -> list[Span]:
  """The spans of every window of n consecutive blocks, by start block 0 .. L - n."""
  return [(2 * i, 2 * i + 2 * n) for i in range(num_layers - n + 1)]


# ------------------------------------------------------------------------- jitted kernels

def lens_pair_sums(params, config: Config, states, weight, dense_pos, pruned_pos, metric: str,
                   temperature, chunk: int):
  """Weighted sums over batch and positions of metric(lens(dense state), lens(pruned state)).

  Traceable (call inside jit). The final-norm lens of all S states is formed one position chunk
  at a time, [B, C, S, V]; each pair reads two of them and reduces to [B, C] before the next.

  Args:
    params, config: the model whose final norm and LM head form the lens.
    states: [B, T, S, D] residual states.
    weight: [B] row weights (0 for batch padding).
    dense_pos, pruned_pos: [P] int32 indices into S: pair p compares state dense_pos[p] (p, the
      reference distribution) with state pruned_pos[p] (p').
    metric: "kl" (Theorem 3 estimate) or "kl_exact".
    temperature: scalar T > 0 (traced).
    chunk: positions per chunk (static).

  Returns:
    [P] float32 sums over the B x T positions, each row weighted.
  """
  fn = _METRIC[metric]

  def chunk_fn(x):  # [B, C, S, D] -> [B, C, P]
    z = M.lm_head(params, config, M.final_norm(params, config, x))  # [B, C, S, V]

    def one(pair):
      d, p = pair
      return fn(jnp.take(z, d, axis=2), jnp.take(z, p, axis=2), temperature)  # [B, C]

    return jnp.moveaxis(jax.lax.map(one, (dense_pos, pruned_pos)), 0, -1)

  per_position = batching.map_chunks(chunk_fn, chunk, states)  # [B, T, P]
  return jnp.einsum("BTP,B->P", per_position, weight.astype(jnp.float32))


def _embed(params, config: Config, tokens):
  ctx = M.prompt_context(config, jnp.ones(tokens.shape, bool))
  return M.embed(params, tokens).astype(M.compute_dtype(params)), ctx


@functools.partial(jax.jit, static_argnums=(1, 7, 9))
def _boundary_sums(params, config, tokens, weight, state_idx, dense_pos, pruned_pos, metric,
                   temperature, chunk):
  """One forward; the residual states state_idx [S] of the 2L + 1 boundaries; their pair sums."""
  h, ctx = _embed(params, config, tokens)
  h_last, residual, _ = M.run_layers(params["layers"], config, h, ctx)
  residual = jnp.concatenate([residual, h_last[None]], axis=0)  # [2L + 1, B, T, D]
  states = jnp.moveaxis(jnp.take(residual, state_idx, axis=0), 0, 2)  # [B, T, S, D]
  return lens_pair_sums(params, config, states, weight, dense_pos, pruned_pos, metric,
                        temperature, chunk)


@functools.partial(jax.jit, static_argnums=(1, 5, 7))
def _output_sums(params, config, tokens, weight, keep, metric, temperature, chunk):
  """keep [S, 2L] bool: stream s adds sublayer k's delta iff keep[s, k]; stream 0 keeps all.

  The S streams run through one layer scan (vmapped over streams); pair s compares the final
  state of stream 0 with that of stream s, s = 1 .. S - 1.
  """
  h, ctx = _embed(params, config, tokens)
  S, L = keep.shape[0], config.num_layers
  gates = jnp.transpose(keep.reshape(S, L, 2), (1, 0, 2))  # [L, S, 2]

  def body(hs, xs):
    p, g = xs

    def stream(h, g):
      # where, not a product: a removed sublayer adds an exact +0.0, as a zeroed projection does
      a = M.attention_sublayer(p, config, h, ctx).delta
      h = h + jnp.where(g[0], a, jnp.zeros((), a.dtype))
      m = M.mlp_sublayer(p, config, h).delta
      return h + jnp.where(g[1], m, jnp.zeros((), m.dtype))

    return jax.vmap(stream)(hs, g), None

  hs, _ = jax.lax.scan(body, jnp.broadcast_to(h, (S,) + h.shape), (params["layers"], gates))
  states = jnp.moveaxis(hs, 0, 2)  # [B, T, S, D]
  pruned_pos = jnp.arange(1, S, dtype=jnp.int32)
  return lens_pair_sums(params, config, states, weight, jnp.zeros_like(pruned_pos), pruned_pos,
                        metric, temperature, chunk)


# ------------------------------------------------------------------------------ public API

def check_spans(fn: str, spans, num_layers: int) -> list[Span]:
  """spans as a non-empty list of (a, b) int pairs with 0 <= a < b <= 2L."""
  depth = 2 * num_layers
  expected = f"a non-empty sequence of sublayer spans (a, b) with 0 <= a < b <= {depth}"
  try:
    items = list(spans)
  except TypeError:
    raise validate.fail(fn, "spans", spans, expected) from None
  if not items:
    raise validate.fail(fn, "spans", spans, expected)
  out = []
  for i, s in enumerate(items):
    ok = (isinstance(s, (tuple, list)) and len(s) == 2
          and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in s)
          and 0 <= s[0] < s[1] <= depth)
    if not ok:
      raise validate.fail(fn, f"spans[{i}]", s, expected)
    out.append((int(s[0]), int(s[1])))
  return out


def span_costs(params, config: Config, calibration, spans, *, score: str = "kl",
               at: str = "boundary", temperature: float = 1.0, batch_size: int = 4,
               method: Optional[str] = None, mesh=None) -> np.ndarray:
  """Mean over calibration tokens of the cost of removing each span alone (module docstring).

  Args:
    params, config: the model as it is (a pruned one for iterative re-scoring).
    calibration: a `Calibration` or int tokens [N, T].
    spans: (a, b) sublayer spans, 0 <= a < b <= 2L (see `sublayer_spans`, `block_spans`,
      `window_spans`).
    score: "kl" (Theorem 3 estimate) or "kl_exact".
    at: "boundary" (final-norm lens at the span's output) or "output" (the model's logits).
    temperature: T > 0 of the probability space.
    batch_size: calibration windows per jitted pass.
    method: the public function to name in errors (default "span_costs").
    mesh: None or a ("data", "model") mesh / spec (`prunerep_jax.parallel`): the params are placed
      on it and each batch of windows is split over its data axis.

  Returns:
    [C] float64 costs in nats, one per span, >= 0.
  """
  fn = method or "span_costs"
  validate.params(fn, params, config)  # layout only: callers check finiteness once at their entry
  score = validate.choice(fn, "score", score, SCORES)
  at = validate.choice(fn, "at", at, PLACES)
  temperature = validate.temperature(fn, temperature, allow_zero=False)
  batch_size = validate.integer(fn, "batch_size", batch_size, minimum=1)
  spans = check_spans(fn, spans, config.num_layers)
  tokens = np.asarray(calibrate.as_calibration(calibration, config, fn).tokens)
  mesh = parallel.as_mesh(fn, mesh)
  if mesh is not None:
    params = parallel.shard_params(params, config, mesh)
  N, T = tokens.shape
  B = parallel.padded_size(batching.batch_size_for(N, batch_size), mesh)
  temp = jnp.float32(temperature)
  total = np.zeros(len(spans))
  if at == "boundary":
    state_idx = sorted({a for a, _ in spans} | {b for _, b in spans})
    where = {s: i for i, s in enumerate(state_idx)}
    dense_pos = jnp.asarray([where[b] for _, b in spans], jnp.int32)
    pruned_pos = jnp.asarray([where[a] for a, _ in spans], jnp.int32)
    chunk = batching.chunk_size(B * len(state_idx), T, config.vocab_size)
    for b in parallel.batches(N, batch_size, mesh):
      total += parallel.fetch(_boundary_sums(
          params, config, parallel.put_batch(tokens[b.rows], mesh),
          parallel.put_batch(b.weight, mesh), jnp.asarray(state_idx, jnp.int32), dense_pos,
          pruned_pos, score, temp, chunk))
  else:
    k = np.arange(2 * config.num_layers)
    cut = np.stack([(k < a) | (k >= b) for a, b in spans])  # [C, 2L]: False = removed
    G = min(OUTPUT_STREAMS, len(spans))
    cut = np.concatenate([cut, np.repeat(cut[-1:], -len(spans) % G, axis=0)])  # G divides C
    chunk = batching.chunk_size(B * (G + 1), T, config.vocab_size)
    total = np.zeros(cut.shape[0])
    for b in parallel.batches(N, batch_size, mesh):
      for g in range(0, cut.shape[0], G):
        keep = np.concatenate([np.ones((1, k.size), bool), cut[g:g + G]])
        total[g:g + G] += parallel.fetch(_output_sums(
            params, config, parallel.put_batch(tokens[b.rows], mesh),
            parallel.put_batch(b.weight, mesh),
            jnp.asarray(keep), score, temp, chunk))
    total = total[:len(spans)]
  return total / tokens.size


def sublayer_costs(params, config: Config, calibration, *, kinds: Sequence[str] = ("attn", "mlp"),
                   method: Optional[str] = None, **kwargs) -> dict[str, np.ndarray]:
  """Cost of removing each single sublayer: {"attn": [L], "mlp": [L]} (the kinds asked for).

  kwargs: score, at, temperature, batch_size, mesh, as `span_costs`.
  """
  method = method or "sublayer_costs"
  kinds = validate.names(method, "kinds", kinds, ("attn", "mlp"))
  L = config.num_layers
  costs = span_costs(params, config, calibration, sublayer_spans(L, kinds), method=method,
                     **kwargs)
  return {k: costs[i * L:(i + 1) * L] for i, k in enumerate(kinds)}


def block_costs(params, config: Config, calibration, *, method: Optional[str] = None,
                **kwargs) -> np.ndarray:
  """Cost of removing each single block, [L] (kwargs as `span_costs`)."""
  return span_costs(params, config, calibration, block_spans(config.num_layers),
                    method=method or "block_costs", **kwargs)


def window_costs(params, config: Config, calibration, n: int, *, method: Optional[str] = None,
                 **kwargs) -> np.ndarray:
  """Cost of removing each window of n consecutive blocks, [L - n + 1] by start block."""
  L = config.num_layers
  method = method or "window_costs"
  n = validate.integer(method, "n", n, minimum=1, maximum=L)
  return span_costs(params, config, calibration, window_spans(L, n), method=method, **kwargs)
