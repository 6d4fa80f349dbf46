"""Calibration data and the sequential layer-by-layer driver shared by Wanda, SparseGPT and
structured neuron pruning.

Sequential, as in the published algorithms: layer l collects its statistics on the outputs of the
*already pruned* layers 0..l-1; after layer l is pruned its outputs are recomputed and feed layer
l+1. Only the current layer's statistics exist at any time; the residual stream of all
calibration samples ([nb, B, T, D]: the N windows in nb batches of B) is the one large buffer,
updated in place layer after layer.

Statistics are plain sums in float32 with HIGHEST matmul precision, accumulated over batches of
samples inside one jitted call per layer (`layer_pass`, which also runs the previous, just pruned
block on each batch first; two compilations per run); on a mesh the batches are split over the
data axis and XLA sums the per-device parts:
  "sq_sum":  per input group, sum_t x_t^2 [I]        (Wanda's mean x^2 = sq_sum / n; neurons)
  "hessian": per input group, sum_t x_t x_t^T [I, I] (SparseGPT's H = 2 * hessian / n)
Inputs of the seven linears come in four groups, since q/k/v and gate/up read the same input.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from prunerep_jax import hostmem
from prunerep_jax import model as M
from prunerep_jax import parallel
from prunerep_jax import validate
from prunerep_jax.config import Config

Array = jax.Array

# Linear -> the input group it reads.
GROUP_OF = {
    ("attn", "q_proj"): "attn_in", ("attn", "k_proj"): "attn_in", ("attn", "v_proj"): "attn_in",
    ("attn", "o_proj"): "o_in",
    ("mlp", "gate_proj"): "mlp_in", ("mlp", "up_proj"): "mlp_in",
    ("mlp", "down_proj"): "down_in",
}
_GROUP_SOURCE = {"attn_in": "q_proj", "o_in": "o_proj", "mlp_in": "gate_proj",
                 "down_in": "down_proj"}
STAT_KINDS = ("sq_sum", "hessian")


# Calibration windows are stored as int32; ids are range-checked against this before the cast.
_INT32_LIMIT = 2**31


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Calibration token windows and where they came from.

  Attributes:
    tokens: int32 [N, T] windows (no padding). Given in any integer dtype; ids are checked to be
      in [0, 2**31) in that dtype before the cast, so an int64 id of 2**32 + 5 is refused rather
      than wrapped to 5. `as_calibration` checks them against a model's vocabulary.
    info: JSON-serialisable provenance: source, split, nsamples, seqlen, seed, ...
  """

  tokens: np.ndarray
  info: dict

  def __post_init__(self):
    tokens = validate.tokens("Calibration", self.tokens, _INT32_LIMIT)
    if not isinstance(self.info, dict):
      raise validate.fail("Calibration", "info", self.info,
                          "a dict of JSON-serialisable provenance (source, nsamples, ...)",
                          error=TypeError)
    object.__setattr__(self, "tokens", np.asarray(tokens))


def calibration(tokenizer, source: str = "wikipedia", nsamples: int = 128, seqlen: int = 512,
                seed: int = 0) -> Calibration:
  """Draws `nsamples` windows of `seqlen` tokens, reproducibly, from a text source.

  Args:
    tokenizer: the model's tokenizer. A model loaded without one (a Hugging Face directory with
      no tokenizer files) cannot use this; pass the pruning transform token ids [N, T] instead.
    source: "wikipedia" (the sample shipped in gensim, default), "news", or a local
      .txt / .jsonl file or Hugging Face dataset directory (see `prunerep_jax.data`).
    nsamples, seqlen: how many windows, of how many tokens.
    seed: sampling seed, an integer in [0, 2**32).
  """
  from prunerep_jax import data
  args = data.check_calibration_arguments("calibration", tokenizer, nsamples=nsamples,
                                          seqlen=seqlen, seed=seed)
  tokens, info = data.calibration_tokens(tokenizer, source=source, **args)
  return Calibration(tokens, dict(info))


def as_calibration(calib, config: Config, method: str) -> Calibration:
  """A Calibration from a Calibration or raw integer token ids [N, T], ids checked against the
  vocabulary [0, config.vocab_size) in their own dtype (before any cast)."""
  if calib is None:
    raise validate.fail(method, "calibration", calib,
                        "a Calibration (pj.prune.calibration(tokenizer, ...)) or integer token "
                        "ids [N, T]; this method needs calibration data")
  if isinstance(calib, Calibration):
    validate.tokens(method, calib.tokens, config.vocab_size, name="calibration.tokens")
    return calib
  tokens = validate.tokens(method, calib, config.vocab_size, name="calibration")
  return Calibration(tokens, {"source": "array", "nsamples": int(tokens.shape[0]),
                              "seqlen": int(tokens.shape[1])})


# ------------------------------------------------------------------------- layer functions

# Windows per block step: on XLA:CPU `layer_pass` over 16 windows of 512 tokens took 0.67 CPU-s
# with 2 windows per step against 0.90 with 8 (2-core machine; the activations of a small step
# stay in cache), and 1, 2 or 4 windows run alike.
_WINDOWS_PER_STEP = 2

# Query chunk of the calibration attention (`M.attention_sublayer(causal_chunk=)`): the windows
# have no padding, so the masked upper triangle of the scores can be skipped; on XLA:CPU at
# T=512 this runs the attention 2-3x faster (smaller score tiles, 10/16 of the work).
_QUERY_CHUNK = 128


def _group_dims(config: Config) -> dict[str, int]:
  return {"attn_in": config.hidden_size, "o_in": config.q_size, "mlp_in": config.hidden_size,
          "down_in": config.intermediate_size}


def _add_statistics(stats: dict, inputs: dict, weight: Array, kind: str) -> dict:
  """stats + the chosen statistic of inputs {group: [B, T, I]} with row weights [B] (0 or 1)."""
  new = {}
  for group, x in inputs.items():
    x = x.astype(jnp.float32) * weight[:, None, None]
    x = x.reshape(-1, x.shape[-1])  # [B*T, I]: one large matmul / leading-axis reduction
    if kind == "sq_sum":
      new[group] = stats[group] + jnp.sum(x * x, axis=0)
    else:
      new[group] = stats[group] + jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)
  return new


def _sub_batches(batch: int, split: bool) -> int:
  """Windows per block step inside a batch of `batch`: `_WINDOWS_PER_STEP` when it divides the
  batch and the rows are not split over a mesh, else the whole batch."""
  return _WINDOWS_PER_STEP if split and batch % _WINDOWS_PER_STEP == 0 else batch


@functools.partial(jax.jit, static_argnums=(2, 5, 6), donate_argnums=(3,))
def layer_pass(prev_p, layer_p, config: Config, h: Array, weight: Array, kind: str,
               step: int):
  """One pass over the calibration rows: the pruned previous block, then this block's statistics.

  Args:
    prev_p: the already pruned params of the previous layer, or None for layer 0 (h is then
      the embedding output, used as it is).
    layer_p: this layer's params (no L axis), whose linear inputs are summed.
    h: [nb, B, T, D] the residual stream entering prev_p's block (or layer 0), in nb batches of
      B rows; donated: it is overwritten in place with the stream entering layer_p's block.
    weight: [nb, B] float32, 1 for real rows and 0 for padding (which adds exactly zero).
    kind: "sq_sum" ({group: [I]}) or "hessian" ({group: [I, I]}).
    step: windows per block step (a divisor of B): the blocks run on `step` windows at a time,
      whose activations stay in cache, and each step's statistics are added as soon as its
      inputs exist (one [step*T, I] reduction or matmul per group), so the linear inputs of a
      whole batch are never held at once (the pass's XLA temporaries: 45 instead of 97 MB for
      the default model's hessians at B=8, T=512, at the same speed).

  Returns:
    (h [nb, B, T, D] entering layer_p's block, {group: statistic}).

  One call runs every batch (a `fori_loop`), so a layer costs one dispatch and the two block
  passes over a batch share its rows while they are in cache; the block output of layer_p itself
  is not computed (the statistics need only its linears' inputs, so XLA drops its down_proj).
  All layers share shapes: this compiles twice per run (layer 0, and every later layer). With h
  split over the data axis of a mesh, each device sums its rows and XLA adds the partial sums.
  """
  dims = _group_dims(config)
  shape = (lambda d: (d,)) if kind == "sq_sum" else (lambda d: (d, d))
  stats = {g: jnp.zeros(shape(d), jnp.float32) for g, d in dims.items()}
  _, B, T, D = h.shape
  ctx = M.prompt_context(config, jnp.ones((step, T), bool))

  def blocks(x):  # [step, T, D] -> (stream entering layer_p [step, T, D], its linear inputs)
    if prev_p is not None:
      x = M.block(prev_p, config, x, ctx, causal_chunk=_QUERY_CHUNK).h_out
    return x, M.block(layer_p, config, x, ctx, inputs=True, causal_chunk=_QUERY_CHUNK).inputs

  def add_step(stats, xw):  # one step of `step` windows: its blocks, then its statistics
    x, w = xw
    x, inputs = blocks(x)
    return _add_statistics(stats, inputs, w, kind), x

  def body(i, carry):
    h, stats = carry
    stats, x = jax.lax.scan(add_step, stats, (h[i].reshape(B // step, step, T, D),
                                              weight[i].reshape(B // step, step)))
    if prev_p is not None:
      h = h.at[i].set(x.reshape(B, T, D))
    return h, stats

  return jax.lax.fori_loop(0, h.shape[0], body, (h, stats))


@functools.partial(jax.jit, static_argnums=(2,))
def _embed_batches(params, tokens: Array, dtype) -> Array:
  """tokens [nb, B, T] -> the residual stream entering layer 0, [nb, B, T, D]."""
  return M.embed(params, tokens).astype(dtype)


def layer_of(layer_params, l: int):
  """Layer l's params (no L axis) from the stacked params["layers"]."""
  return jax.tree_util.tree_map(lambda x: x[l], layer_params)


@functools.partial(jax.jit, donate_argnums=(0,))
def _set_layer(layer_params, l: Array, layer_p):
  """layer_params (stacked, donated: updated in place) with layer l replaced by layer_p."""
  return jax.tree_util.tree_map(lambda x, y: x.at[l].set(y.astype(x.dtype)), layer_params,
                                layer_p)


def _stacked_zeros(tree, num_layers: int):
  """Zeros [L, ...] for every leaf of one layer's `tree`."""
  return jax.tree_util.tree_map(lambda x: jnp.zeros((num_layers,) + x.shape, x.dtype), tree)


# --------------------------------------------------------------------------- the driver

LayerFn = Callable[[int, Any, dict, int], tuple[Any, dict, dict]]


def sequential(params, config: Config, calib: Calibration, kind: Optional[str],
               prune_layer: LayerFn, *, batch_size: int = 8, method: str = "prune",
               mesh=None, donate: bool = False):
  """Prunes layer after layer on the outputs of the already pruned ones.

  Args:
    params, config: the dense model, already validated (layout and finiteness) by the calling
      transform at its entry.
    calib: calibration windows.
    kind: statistic to collect per layer ("sq_sum" or "hessian").
    prune_layer: (layer index, layer params, stats, ntokens) -> (new layer params, this
      layer's outputs (a pytree of arrays with the same shapes for every layer, e.g. per-linear
      masks {(sub, name): [I, O] bool}), per-layer report dict).
    batch_size: calibration samples per batch (rounded up to a multiple of the data axis).
    mesh: None, or a ("data", "model") mesh (or spec, see `prunerep_jax.parallel`): params are
      placed by `parallel.shard_params`, the calibration rows are split over the data axis and
      their statistics summed across it; the returned params stay placed on the mesh.
    donate: False (default): `params` is left as it was and the pruned layers go into one copy
      of the stacked layer params. True: the caller gives `params["layers"]` up and the pruned
      layers are written into its buffers in place (JAX buffer donation; the given arrays are
      deleted, and reading them afterwards raises), which saves one copy of the block weights
      (425 MB for the default model in float32). The other leaves (embedding, final norm) are
      shared with the result either way.

  Memory: besides the params, one residual stream of every calibration row ([nb, B, T, D], nb
  batches of B rows, the last padded with copies of a real row at weight 0, split over the data
  axis along B) updated in place, the stacked layer params that receive each pruned layer in
  place (a copy unless `donate`), the stacked per-layer outputs (masks, filled in place), and one
  batch's activations.

  Returns:
    (new params, the per-layer outputs stacked along a leading L axis (None when they are an
    empty pytree), per-layer list of reports, timings dict).
  """
  kind = validate.choice("sequential", "kind", kind, STAT_KINDS)
  batch_size = validate.integer(method, "batch_size", batch_size, minimum=1)
  donate = validate.boolean(method, "donate", donate)
  if not isinstance(calib, Calibration):
    raise validate.fail("sequential", "calib", calib, "a Calibration (see as_calibration)",
                        error=TypeError)
  mesh = parallel.as_mesh(method, mesh)
  t_start = time.perf_counter()
  plan = list(parallel.batches(calib.tokens.shape[0], batch_size, mesh))
  rows = np.stack([b.rows for b in plan])  # [nb, B]
  weight = np.stack([b.weight for b in plan])  # [nb, B]
  tokens = calib.tokens[rows]  # [nb, B, T]
  if mesh is not None:  # rows of every batch split over the data axis: [nb, B/data, ...]
    params = parallel.shard_params(params, config, mesh)
    rows_split = parallel.batch_sharding(mesh, axis=1)
    tokens, weight = jax.device_put(tokens, rows_split), jax.device_put(weight, rows_split)
  ntokens = int(calib.tokens.size)
  h = _embed_batches(params, tokens, M.compute_dtype(params))
  if mesh is not None:
    h = jax.device_put(h, rows_split)
  # The pruned layers go into one stacked buffer in place (the caller's own with `donate`), so no
  # list of per-layer copies is ever held; the per-layer outputs likewise.
  new_layers = params["layers"]
  if not donate:
    new_layers = jax.tree_util.tree_map(jnp.copy, new_layers)
  outputs, reports = None, []
  t_stats = t_prune = 0.0
  prev = None
  step = _sub_batches(rows.shape[1], mesh is None)
  for l in range(config.num_layers):
    t0 = time.perf_counter()
    layer_p = layer_of(new_layers, l)  # layer l is still dense here (written below)
    h, stats = layer_pass(prev, layer_p, config, h, weight, kind, step)
    bad = validate.first_nonfinite(stats)
    if bad is not None:
      raise ValueError(f"{method}: calibration statistics of layer {l} ({bad}, kind={kind}) "
                       "contain NaN or Inf; the activations overflowed or the weights of "
                       "earlier layers are not finite")
    t1 = time.perf_counter()
    prev, layer_out, rep = prune_layer(l, layer_p, stats, ntokens)
    del layer_p, stats
    new_layers = _set_layer(new_layers, jnp.int32(l), prev)
    if jax.tree_util.tree_leaves(layer_out):
      if outputs is None:
        outputs = _stacked_zeros(layer_out, config.num_layers)
      outputs = _set_layer(outputs, jnp.int32(l), layer_out)
    del layer_out
    jax.block_until_ready((new_layers, outputs))
    hostmem.release_free_memory()  # this layer's freed temporaries, before the next allocates
    t2 = time.perf_counter()
    t_stats += t1 - t0
    t_prune += t2 - t1
    reports.append(rep)
    logging.info("%s: layer %d/%d done (forward+stats %.1fs, prune %.1fs)", method, l + 1,
                 config.num_layers, t1 - t0, t2 - t1)
  del h
  new_params = dict(params)
  new_params["layers"] = new_layers
  timings = {"calibration_forward_s": t_stats, "prune_s": t_prune,
             "total_s": time.perf_counter() - t_start}
  return new_params, outputs, reports, timings
