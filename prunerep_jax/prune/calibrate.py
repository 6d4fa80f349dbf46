"""Calibration data and the sequential layer-by-layer driver shared by Wanda, SparseGPT and
structured neuron pruning.

Sequential, as in the published algorithms: layer l collects its statistics on the outputs of the
*already pruned* layers 0..l-1; after layer l is pruned its outputs are recomputed and feed layer
l+1. Only the current layer's statistics exist at any time; the residual stream of all
calibration samples ([nb, B, T, D]: the N windows in nb batches of B) is the one large buffer,
updated in place layer after layer.

Statistics are plain sums in float32 with HIGHEST matmul precision, accumulated over batches of
samples inside one jitted call per layer (one compilation per shape and statistic kind); on a
mesh the batches are split over the data axis and XLA sums the per-device parts:
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

def _block_with_inputs(layer_p, config: Config, h: Array):
  """Runs one block on h [B, T, D] (no padding); returns (h_out, {group: input [B, T, I]})."""
  ctx = M.prompt_context(config, jnp.ones(h.shape[:2], bool))
  out = M.block(layer_p, config, h, ctx, inputs=True)
  return out.h_out, out.inputs


def _group_dims(config: Config) -> dict[str, int]:
  return {"attn_in": config.hidden_size, "o_in": config.q_size, "mlp_in": config.hidden_size,
          "down_in": config.intermediate_size}


@functools.partial(jax.jit, static_argnums=(1, 4))
def layer_statistics(layer_p, config: Config, h: Array, weight: Array, kind: str) -> dict:
  """Sums of the chosen statistic for each input group over every calibration row.

  Args:
    layer_p: one layer's params (no L axis).
    h: [nb, B, T, D] the residual stream entering the layer, in nb batches of B rows.
    weight: [nb, B] float32, 1 for real rows and 0 for padding (which adds exactly zero).
    kind: "sq_sum" ({group: [I]}) or "hessian" ({group: [I, I]}).

  One call runs every batch (a `fori_loop`), so a layer costs one dispatch. With h split over
  the data axis of a mesh, each device sums its rows and XLA adds the partial sums (all-reduce).
  """
  dims = _group_dims(config)
  shape = (lambda d: (d,)) if kind == "sq_sum" else (lambda d: (d, d))
  stats = {g: jnp.zeros(shape(d), jnp.float32) for g, d in dims.items()}

  def body(i, stats):
    _, inputs = _block_with_inputs(layer_p, config, h[i])
    new = {}
    for group, x in inputs.items():
      x = x.astype(jnp.float32) * weight[i][:, None, None]
      x = x.reshape(-1, x.shape[-1])
      if kind == "sq_sum":
        new[group] = stats[group] + jnp.sum(x * x, axis=0)
      else:
        new[group] = stats[group] + jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)
    return new

  return jax.lax.fori_loop(0, h.shape[0], body, stats)


@functools.partial(jax.jit, static_argnums=(1,), donate_argnums=(2,))
def run_block(layer_p, config: Config, h: Array) -> Array:
  """h [nb, B, T, D] through one block, batch by batch, in place (h is donated: the caller's
  array is consumed and the result reuses its memory)."""
  ctx = M.prompt_context(config, jnp.ones(h.shape[1:3], bool))
  return jax.lax.fori_loop(0, h.shape[0],
                           lambda i, h: h.at[i].set(M.block(layer_p, config, h[i], ctx).h_out), h)


@functools.partial(jax.jit, static_argnums=(2,))
def _embed_batches(params, tokens: Array, dtype) -> Array:
  """tokens [nb, B, T] -> the residual stream entering layer 0, [nb, B, T, D]."""
  return M.embed(params, tokens).astype(dtype)


def unstack_layers(layer_params) -> list:
  L = jax.tree_util.tree_leaves(layer_params)[0].shape[0]
  return [jax.tree_util.tree_map(lambda x, i=i: x[i], layer_params) for i in range(L)]


def stack_layers(layers: list):
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)


# --------------------------------------------------------------------------- the driver

LayerFn = Callable[[int, Any, dict, int], tuple[Any, dict, dict]]


def sequential(params, config: Config, calib: Calibration, kind: Optional[str],
               prune_layer: LayerFn, *, batch_size: int = 8, method: str = "prune",
               mesh=None):
  """Prunes layer after layer on the outputs of the already pruned ones.

  Args:
    params, config: the dense model, already validated (layout and finiteness) by the calling
      transform at its entry.
    calib: calibration windows.
    kind: statistic to collect per layer ("sq_sum" or "hessian").
    prune_layer: (layer index, layer params, stats, ntokens) -> (new layer params,
      per-linear masks {(sub, name): [I, O] bool}, per-layer report dict).
    batch_size: calibration samples per batch (rounded up to a multiple of the data axis).
    mesh: None, or a ("data", "model") mesh (or spec, see `prunerep_jax.parallel`): params are
      placed by `parallel.shard_params`, the calibration rows are split over the data axis and
      their statistics summed across it; the returned params stay placed on the mesh.

  The residual stream of every calibration row is kept as [nb, B, T, D] (nb batches of B rows,
  the last padded with copies of a real row at weight 0), split over the data axis along B.

  Returns:
    (new params, per-layer list of masks, per-layer list of reports, timings dict).
  """
  kind = validate.choice("sequential", "kind", kind, STAT_KINDS)
  batch_size = validate.integer(method, "batch_size", batch_size, minimum=1)
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
  layers = unstack_layers(params["layers"])
  masks, reports = [], []
  t_stats = t_prune = 0.0
  for l, layer_p in enumerate(layers):
    t0 = time.perf_counter()
    stats = layer_statistics(layer_p, config, h, weight, kind)
    bad = validate.first_nonfinite(stats)
    if bad is not None:
      raise ValueError(f"{method}: calibration statistics of layer {l} ({bad}, kind={kind}) "
                       "contain NaN or Inf; the activations overflowed or the weights of "
                       "earlier layers are not finite")
    t1 = time.perf_counter()
    layers[l], layer_masks, rep = prune_layer(l, layer_p, stats, ntokens)
    t2 = time.perf_counter()
    if l + 1 < len(layers):  # the last layer's outputs feed nothing
      h = run_block(layers[l], config, h)
    t_stats += t1 - t0 + (time.perf_counter() - t2)
    t_prune += t2 - t1
    masks.append(layer_masks)
    reports.append(rep)
    logging.info("%s: layer %d/%d done (stats+forward %.1fs, prune %.1fs)", method, l + 1,
                 len(layers), t1 - t0 + time.perf_counter() - t2, t2 - t1)
  new_params = dict(params)
  new_params["layers"] = stack_layers(layers)
  timings = {"calibration_forward_s": t_stats, "prune_s": t_prune,
             "total_s": time.perf_counter() - t_start}
  return new_params, masks, reports, timings
