"""The layerwise representation hierarchy: one sublayer pruned at a time, in the dense context.

For every layer l and each of its sublayers s (attention, MLP), the counterfactual residual state
"everything dense, only sublayer (l, s) replaced by its pruned version" is compared with the dense
state after that sublayer, at every analysed position:

  h  = x + F(x)          (dense: x the dense residual entering the sublayer, F the dense sublayer)
  h' = x + F'(x)         (counterfactual: the pruned sublayer F' on the same input)
  z  = lens(h), z' = lens(h')        logits through the final norm ("final_norm") or raw ("raw")
  p  = softmax(z / T), p' = softmax(z' / T)

and reduced on the device to per-position scalars: cosines and 1 - cos in h, z and p (1 - cos from
the exact change d = F'(x) - F(x), so float32 resolves cos = 1 - 1e-9), the parallel/orthogonal
split of the change in h and z, KL(p || p') and its Theorem 3 estimate Var_p(dz)/2T^2,
1 - cos(p, p') and its Theorem 2 estimate Var_r(dz)/2T^2, and whether the lens' top-1 survives.

It is one jitted `jax.lax.scan` over the layers: each step runs the dense and the pruned sublayers
on the same dense input and reduces the lens logits chunk by chunk over positions, so neither the
[2L + 1, B, T, D] residual stack nor any [layers, tokens, vocab] array is ever built.

With decode_steps > 0 the dense model first generates that many tokens greedily; the counterfactual
is then evaluated at every decoding position. A pruned attention sublayer there attends over the
keys and values that its own pruned projections make from the dense block inputs of every earlier
position (prompt and generated), which is what a causal pass over the dense sequence computes; the
reference implementation loses that context after the first step.

Shape letters: L layers, B batch, T positions, P analysed positions, D hidden, V vocab.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import numpy as np

from prunerep_jax import batching, metrics, parallel, validate
from prunerep_jax import progress as progress_lib
from prunerep_jax import model as M
from prunerep_jax.analysis.lens import LENSES, logit_lens
from prunerep_jax.analysis.results import Result, summarize
from prunerep_jax.config import Config

SUBLAYERS = ("attn", "mlp")
POSITION_METRICS = ("cos_h", "one_minus_cos_h", "alpha_h", "par_h", "perp_h",
                    "cos_z", "one_minus_cos_z", "par_z", "perp_z",
                    "rms_dz", "cos_p", "one_minus_cos_p", "cos_p_estimate", "kl", "kl_estimate",
                    "top1_agree")
assert set(POSITION_METRICS) >= set(metrics.LOGIT_COMPARISONS)


def pruned_params_of(pruned: Any, config: Config, fn: str) -> tuple[Any, Config]:
  """The params and config of `pruned` (a PruneResult or a params tree) after checking they keep
  the layer structure the counterfactuals need (same layers and attention shapes; MLP width may
  differ)."""
  from prunerep_jax.prune.result import PruneResult

  if isinstance(pruned, PruneResult):
    pconfig, pparams = pruned.config, pruned.params
    if pconfig.num_layers != config.num_layers:
      raise validate.ArgumentError(
          f"{fn}(pruned=PruneResult): the pruned model has {pconfig.num_layers} layers and the "
          f"dense one {config.num_layers}; a layerwise counterfactual needs the same layers. "
          "Supported: intra-layer methods (magnitude, wanda, sparsegpt), neurons and "
          "drop_sublayers; compare block-dropped models with analysis.drift")
    attn_fields = ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "qkv_bias", "o_bias")
    for f in attn_fields:
      if getattr(pconfig, f) != getattr(config, f):
        raise validate.ArgumentError(f"{fn}(pruned=PruneResult): config.{f} is "
                                     f"{getattr(pconfig, f)!r}, the dense model's is "
                                     f"{getattr(config, f)!r}; expected the same")
    validate.params(fn, pparams, pconfig)
    return pparams, pconfig
  if not isinstance(pruned, dict):
    raise validate.fail(fn, "pruned", pruned, "a PruneResult or a pruned params tree",
                        error=TypeError)
  try:
    validate.params(fn, pruned, config)
  except ValueError as e:
    raise validate.ArgumentError(
        f"{fn}(pruned=...): a params tree must have the dense model's layout ({e}); pass the "
        "PruneResult itself for models whose MLP width changed") from None
  return pruned, config


def _compare(params, config: Config, x, x_cf, d, lens: str, temperature: float,
             chunk: int) -> dict:
  """Per-position metrics of the dense state x vs the counterfactual x_cf = x + d, [B, P, D]."""
  out = {"cos_h": metrics.cosine(x, x_cf), "one_minus_cos_h": metrics.one_minus_cosine(x, x_cf, d)}
  po = metrics.parallel_orthogonal(x, x_cf, d)
  out.update(alpha_h=po["alpha"], par_h=po["par"], perp_h=po["perp"])

  def logit_metrics(a, b):  # [B, C, D] x2 -> dict of [B, C]
    z, z_cf = logit_lens(params, config, a, lens), logit_lens(params, config, b, lens)
    return metrics.compare_logits(z, z_cf, temperature)

  out.update(batching.map_chunks(logit_metrics, chunk, x, x_cf))
  return out


@functools.partial(jax.jit, static_argnums=(2, 6, 8))
def _layerwise(params, pruned, config, tokens, mask, eval_idx, lens, temperature, chunk):
  """Returns two dicts (attention, MLP) of [L, B, P] per-position metrics."""
  ctx = M.prompt_context(config, mask)
  h = M.embed(params, tokens).astype(M.compute_dtype(params))

  def at(x):
    return M.gather_positions(x, eval_idx)

  def body(h, layers):
    pd, pp = layers
    a, a_cf = M.attention_sublayer(pd, config, h, ctx), M.attention_sublayer(pp, config, h, ctx)
    h_attn = h + a.delta
    m, m_cf = M.mlp_sublayer(pd, config, h_attn), M.mlp_sublayer(pp, config, h_attn)
    h_out = h_attn + m.delta
    attn = _compare(params, config, at(h_attn), at(h + a_cf.delta), at(a_cf.delta - a.delta),
                    lens, temperature, chunk)
    mlp = _compare(params, config, at(h_out), at(h_attn + m_cf.delta), at(m_cf.delta - m.delta),
                   lens, temperature, chunk)
    return h_out, (attn, mlp)

  _, (attn, mlp) = jax.lax.scan(body, h, (params["layers"], pruned["layers"]))
  return attn, mlp


def layerwise(params, config: Config, tokens, pruned, *, lens: str = "final_norm",
              temperature: float = 1.0, decode_steps: int = 0, attention_mask=None,
              batch_size: Optional[int] = None,
              progress: progress_lib.Progress = None, mesh=None) -> Result:
  """The paper's layerwise figure: every sublayer pruned alone, in the dense context.

  Args:
    params, config: the dense model.
    tokens: int [B, T] prompts (padding on either side, described by attention_mask).
    pruned: a `PruneResult` or a pruned params tree with the same layers (intra-layer methods,
      neurons, sublayer drops); a block-dropped result is refused.
    lens: "final_norm" (LM head after the final norm) or "raw" (LM head on the raw residual, as
      the reference code does).
    temperature: T of the probability space (> 0).
    decode_steps: 0 to analyse every real prompt position; n > 0 to let the dense model generate n
      tokens greedily and analyse the n decoding positions (up to each row's EOS).
    attention_mask: [B, T] 0/1, 1 = real token (default all real).
    batch_size: rows per jitted pass (default: all B at once).
    progress: optional callable receiving one line per batch (None: absl INFO logging).
    mesh: None or a ("data", "model") mesh / spec (`prunerep_jax.parallel`): both models are
      placed on it and each batch of rows is split over its data axis.

  Returns:
    Result(kind="layerwise"): arrays[name] [L, 2, B, P] for every name of POSITION_METRICS (axis 1:
    attention, MLP), arrays["valid"] [B, P] and arrays["positions"] [B, P]; tables["summary"] one
    record per (layer, sublayer, metric) with mean, median, min, max over valid positions.
  """
  fn = "layerwise"
  validate.params(fn, params, config)
  lens = validate.choice(fn, "lens", lens, LENSES)
  temperature = validate.temperature(fn, temperature, allow_zero=False)
  decode_steps = validate.integer(fn, "decode_steps", decode_steps, minimum=0)
  progress_lib.check_progress(fn, progress)
  pparams, pconfig = pruned_params_of(pruned, config, fn)
  mesh = parallel.as_mesh(fn, mesh)
  if mesh is not None:
    params = parallel.shard_params(params, config, mesh)
    pparams = parallel.shard_params(pparams, pconfig, mesh)
  tokens = validate.tokens(fn, tokens, config.vocab_size)
  mask = validate.mask(fn, "attention_mask", attention_mask, tokens.shape)
  B, T = tokens.shape
  batch_size = B if batch_size is None else validate.integer(fn, "batch_size", batch_size,
                                                             minimum=1)
  if decode_steps:
    from prunerep_jax import decode
    gen = decode.generate(params, config, tokens, decode_steps, prompt_mask=mask, mesh=mesh)
    valid = np.asarray(gen.valid)
    tokens = np.concatenate([np.asarray(gen.prompt_tokens), np.asarray(gen.tokens)], axis=1)
    mask = np.concatenate([np.asarray(gen.prompt_mask), valid.astype(np.int32)], axis=1)
    # Decoding step i reads position T - 1 + i and produces generated token i; steps after a
    # row's EOS are not analysed.
    eval_idx = np.broadcast_to(np.arange(T - 1, T - 1 + decode_steps, dtype=np.int32),
                               (B, decode_steps))
  else:
    eval_idx = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    valid = mask.astype(bool)
  P = eval_idx.shape[1]
  chunk = batching.chunk_size(parallel.padded_size(batching.batch_size_for(B, batch_size), mesh),
                              P, config.vocab_size)
  parts = []
  report = progress_lib.Reporter("layerwise", B, "rows", progress)
  for b in parallel.batches(B, batch_size, mesh):
    attn, mlp = _layerwise(params, pparams, config, parallel.put_batch(tokens[b.rows], mesh),
                           parallel.put_batch(mask[b.rows], mesh),
                           parallel.put_batch(eval_idx[b.rows], mesh), lens, temperature, chunk)
    attn, mlp = parallel.fetch((attn, mlp))
    parts.append({k: np.stack([attn[k], mlp[k]], axis=1)[:, :, :b.real]
                  for k in POSITION_METRICS})
    report(int(b.rows[b.real - 1]) + 1)
  arrays = {k: np.concatenate([p[k] for p in parts], axis=2) for k in POSITION_METRICS}
  arrays["valid"] = valid
  arrays["positions"] = np.asarray(eval_idx)
  summary = []
  for l in range(config.num_layers):
    for s, sub in enumerate(SUBLAYERS):
      for k in POSITION_METRICS:
        summary.append({"layer": l, "sublayer": sub, "metric": k,
                        **summarize(arrays[k][l, s], valid)})
  meta = {"lens": lens, "temperature": temperature, "decode_steps": decode_steps,
          "batch": B, "positions": P, "num_layers": config.num_layers,
          "pruned": _describe(pruned)}
  return Result("layerwise", meta, arrays, {"summary": summary})


def _describe(pruned: Any) -> dict:
  """What was pruned, for the result's metadata (a PruneResult's report without big tables)."""
  report = getattr(pruned, "report", None)
  if not isinstance(report, dict):
    return {"method": "params"}
  keep = ("method", "pattern", "sparsity", "kind", "n", "dropped", "variant", "include")
  return {k: report[k] for k in keep if k in report}
