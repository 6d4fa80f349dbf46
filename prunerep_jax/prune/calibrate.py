"""Calibration data and the sequential layer-by-layer driver shared by Wanda, SparseGPT and
structured neuron pruning.

Sequential, as in the published algorithms: layer l collects its statistics on the outputs of the
*already pruned* layers 0..l-1; after layer l is pruned its outputs are recomputed and feed layer
l+1. Only the current layer's statistics exist at any time; the residual stream of all
calibration samples ([N, T, D]) is the one large buffer.

Statistics are plain sums in float32 with HIGHEST matmul precision, accumulated over batches of
samples inside one jitted function per (shape, statistic kind):
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

from prunerep_jax import batching
from prunerep_jax import model as M
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


@functools.partial(jax.jit, static_argnums=(1, 5))
def _accumulate(layer_p, config, h, weight, stats, kind):
  """Adds this batch's statistics; rows with weight 0 (batch padding) add exactly zero."""
  _, inputs = _block_with_inputs(layer_p, config, h)
  new = {}
  for group, x in inputs.items():
    x = x.astype(jnp.float32) * weight[:, None, None]
    x = x.reshape(-1, x.shape[-1])
    if kind == "sq_sum":
      new[group] = stats[group] + jnp.sum(x * x, axis=0)
    else:
      new[group] = stats[group] + jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)
  return new


@functools.partial(jax.jit, static_argnums=(1,))
def _run_block(layer_p, config, h):
  ctx = M.prompt_context(config, jnp.ones(h.shape[:2], bool))
  return M.block(layer_p, config, h, ctx).h_out


def _group_dims(config: Config) -> dict[str, int]:
  return {"attn_in": config.hidden_size, "o_in": config.q_size, "mlp_in": config.hidden_size,
          "down_in": config.intermediate_size}


def layer_statistics(layer_p, config: Config, h: Array, kind: str, batch_size: int) -> dict:
  """Sums of the chosen statistic for each input group over all samples of h [N, T, D]."""
  dims = _group_dims(config)
  shape = (lambda d: (d,)) if kind == "sq_sum" else (lambda d: (d, d))
  stats = {g: jnp.zeros(shape(d), jnp.float32) for g, d in dims.items()}
  for b in batching.batches(h.shape[0], batch_size):
    stats = _accumulate(layer_p, config, h[b.rows], jnp.asarray(b.weight), stats, kind)
  return stats


def run_block(layer_p, config: Config, h: Array, batch_size: int) -> Array:
  """h [N, T, D] through one block, in batches."""
  return jnp.concatenate([_run_block(layer_p, config, h[b.rows])[:b.real]
                          for b in batching.batches(h.shape[0], batch_size)], axis=0)


def unstack_layers(layer_params) -> list:
  L = jax.tree_util.tree_leaves(layer_params)[0].shape[0]
  return [jax.tree_util.tree_map(lambda x, i=i: x[i], layer_params) for i in range(L)]


def stack_layers(layers: list):
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)


# --------------------------------------------------------------------------- the driver

LayerFn = Callable[[int, Any, dict, int], tuple[Any, dict, dict]]


def sequential(params, config: Config, calib: Calibration, kind: Optional[str],
               prune_layer: LayerFn, *, batch_size: int = 8, method: str = "prune"):
  """Prunes layer after layer on the outputs of the already pruned ones.

  Args:
    params, config: the dense model, already validated (layout and finiteness) by the calling
      transform at its entry.
    calib: calibration windows.
    kind: statistic to collect per layer ("sq_sum" or "hessian").
    prune_layer: (layer index, layer params, stats, ntokens) -> (new layer params,
      per-linear masks {(sub, name): [I, O] bool}, per-layer report dict).
    batch_size: calibration samples per jitted step.

  Returns:
    (new params, per-layer list of masks, per-layer list of reports, timings dict).
  """
  kind = validate.choice("sequential", "kind", kind, STAT_KINDS)
  batch_size = validate.integer(method, "batch_size", batch_size, minimum=1)
  if not isinstance(calib, Calibration):
    raise validate.fail("sequential", "calib", calib, "a Calibration (see as_calibration)",
                        error=TypeError)
  t_start = time.perf_counter()
  tokens = jnp.asarray(calib.tokens)
  ntokens = int(tokens.size)
  h = M.embed(params, tokens).astype(M.compute_dtype(params))
  layers = unstack_layers(params["layers"])
  masks, reports = [], []
  t_stats = t_prune = 0.0
  for l, layer_p in enumerate(layers):
    t0 = time.perf_counter()
    stats = layer_statistics(layer_p, config, h, kind, batch_size)
    bad = validate.first_nonfinite(stats)
    if bad is not None:
      raise ValueError(f"{method}: calibration statistics of layer {l} ({bad}, kind={kind}) "
                       "contain NaN or Inf; the activations overflowed or the weights of "
                       "earlier layers are not finite")
    t1 = time.perf_counter()
    layers[l], layer_masks, rep = prune_layer(l, layer_p, stats, ntokens)
    t2 = time.perf_counter()
    h = run_block(layers[l], config, h, batch_size)
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
