"""The option subspace: why multiple-choice scores survive pruning that breaks generation.

A multiple-choice item is scored by comparing the next-token likelihoods of a few option tokens
(" A", " B", ...) after an answer cue. Those tokens usually sit deep in the tail of p, and the
comparison reads only their order. For each item, the dense and the pruned next-token
distributions are compared twice:

  global  over the whole vocabulary: KL(p || p'), 1 - cos(p, p'), whether the top-1 token flips;
  subset  inside the option tokens, with p renormalised over them: KL, 1 - cos, whether the
          argmax over the options survives;

plus each option's log-likelihood under both models (global log p), the global rank of the best
option, both models' top tokens, and the accuracy of both when the answers are known.

Shape letters: B items, T prompt positions, K options, V vocab.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prunerep_jax import batching, metrics, parallel, validate
from prunerep_jax import progress as progress_lib
from prunerep_jax import model as M
from prunerep_jax.analysis.results import Result, summarize
from prunerep_jax.config import Config

TOP = 5  # top tokens recorded per item and model


@functools.partial(jax.jit, static_argnums=(2, 3, 7))
def _items(dense, pruned, config, pconfig, tokens, mask, option_ids, temperature):
  """Per-item metrics, every leaf [B] or [B, K] / [B, TOP]."""
  zd = M.forward(dense, config, tokens, mask, keep="last", capture=False).logits[:, 0]
  zp = M.forward(pruned, pconfig, tokens, mask, keep="last", capture=False).logits[:, 0]
  lpd = jax.nn.log_softmax(zd / temperature, axis=-1)
  lpp = jax.nn.log_softmax(zp / temperature, axis=-1)
  od, op = metrics.subset(zd, option_ids), metrics.subset(zp, option_ids)
  best_d = jnp.argmax(od, axis=-1)
  best_token = option_ids[best_d]
  rank = jnp.sum(zd > jnp.take_along_axis(zd, best_token[:, None], axis=-1), axis=-1)
  top_d, top_p = jax.lax.top_k(lpd, TOP), jax.lax.top_k(lpp, TOP)
  return {
      "kl": metrics.kl(zd, zp, temperature),
      "kl_estimate": metrics.kl_estimate(zd, zp, temperature),
      "one_minus_cos_p": metrics.one_minus_cos_p(zd, zp, temperature),
      "top1_dense": jnp.argmax(zd, -1), "top1_pruned": jnp.argmax(zp, -1),
      "subset_kl": metrics.kl(od, op, temperature),
      "subset_one_minus_cos_p": metrics.one_minus_cos_p(od, op, temperature),
      "option_dense": best_d, "option_pruned": jnp.argmax(op, axis=-1),
      "option_logp_dense": metrics.subset(lpd, option_ids),
      "option_logp_pruned": metrics.subset(lpp, option_ids),
      "best_option_rank_dense": rank,
      "top_ids_dense": top_d[1], "top_logp_dense": top_d[0],
      "top_ids_pruned": top_p[1], "top_logp_pruned": top_p[0],
  }


def option_subspace(dense_params, pruned_params, config: Config, prompt_tokens, option_ids, *,
                    answers=None, prompt_mask=None, pruned_config: Optional[Config] = None,
                    temperature: float = 1.0, batch_size: int = 8,
                    option_labels: Optional[Sequence[str]] = None,
                    tokenizer: Any = None, progress: Optional[Callable[[str], Any]] = None,
                    mesh=None) -> Result:
  """The paper's categorical-token figure, over many multiple-choice items.

  Args:
    dense_params, config: the dense model; pruned_params (pruned_config when it differs): the
      pruned one.
    prompt_tokens: int [B, T] prompts that end with the answer cue (e.g. "Answer:"), so the next
      token is an option; padding on either side described by prompt_mask [B, T].
    option_ids: int [K] token ids of the options (e.g. the ids of " A", " B", " C", " D").
    answers: optional int [B] index in [0, K) of each item's correct option.
    temperature: T of the probability spaces compared (> 0).
    batch_size: items per jitted forward (the last batch is padded).
    option_labels: names of the options for the tables (default "0", "1", ...).
    tokenizer: optional; records the top tokens as text.
    progress: optional callable receiving one line per batch (None: absl INFO logging).
    mesh: None or a ("data", "model") mesh / spec (`prunerep_jax.parallel`): both models are
      placed on it and each batch of items split over its data axis.

  Returns:
    Result(kind="option_subspace"): per-item arrays (see `_items`), tables "summary" (rates and
    means over items), "options" (mean log-likelihood of each option under both models) and
    "items" (one record per item).
  """
  fn = "option_subspace"
  pconfig = config if pruned_config is None else pruned_config
  validate.params(fn, dense_params, config)
  validate.params(fn, pruned_params, pconfig)
  temperature = validate.temperature(fn, temperature, allow_zero=False)
  tokens = validate.tokens(fn, prompt_tokens, config.vocab_size, name="prompt_tokens")
  mask = validate.mask(fn, "prompt_mask", prompt_mask, tokens.shape)
  ids = np.asarray(validate.token_ids(fn, "option_ids", option_ids, config.vocab_size), np.int32)
  K = ids.size
  if K < 2 or len(set(ids.tolist())) != K:
    raise validate.fail(fn, "option_ids", option_ids, "at least two distinct token ids")
  B = tokens.shape[0]
  if answers is not None:
    answers = np.asarray([validate.integer(fn, f"answers[{i}]", a, minimum=0, maximum=K - 1)
                          for i, a in enumerate(np.asarray(answers).reshape(-1).tolist())],
                         np.int32)
    if answers.size != B:
      raise validate.fail(fn, "answers", answers, f"{B} answers, one per prompt")
  batch_size = validate.integer(fn, "batch_size", batch_size, minimum=1)
  progress_lib.check_progress(fn, progress)
  labels = [str(i) for i in range(K)] if option_labels is None else [str(x) for x in option_labels]
  if len(labels) != K:
    raise validate.fail(fn, "option_labels", option_labels, f"{K} labels, one per option id")
  # Prompts of very different lengths (MMLU: 80 to 600 tokens) are batched by length bucket, so a
  # batch is padded only to its own longest prompt's bucket.
  rows = [tokens[i][mask[i] != 0] for i in range(B)]
  pad = int(tokens[0][0])
  parts, order = [], []
  report = progress_lib.Reporter("option_subspace", B, "items", progress)
  mesh = parallel.as_mesh(fn, mesh)
  if mesh is not None:
    dense_params = parallel.shard_params(dense_params, config, mesh)
    pruned_params = parallel.shard_params(pruned_params, pconfig, mesh)
  for b in batching.token_batches(rows, batch_size, pad, config.max_position_embeddings,
                                  multiple_of=parallel.padded_size(1, mesh)):
    out = _items(dense_params, pruned_params, config, pconfig, parallel.put_batch(b.tokens, mesh),
                 parallel.put_batch(b.mask, mesh), jnp.asarray(ids), temperature)
    parts.append({k: v[:len(b.rows)] for k, v in parallel.fetch(out).items()})
    order.append(b.rows)
    report(sum(len(o) for o in order))
  inverse = np.argsort(np.concatenate(order), kind="stable")
  arrays = {k: np.concatenate([p[k] for p in parts])[inverse] for k in parts[0]}
  arrays["option_ids"] = ids
  if answers is not None:
    arrays["answers"] = answers

  every = np.ones(B, bool)
  flips = arrays["top1_dense"] != arrays["top1_pruned"]
  survive = arrays["option_dense"] == arrays["option_pruned"]
  summary = {
      "items": B, "options": K, "temperature": temperature,
      "global_top1_flip_rate": float(flips.mean()),
      "option_argmax_survival_rate": float(survive.mean()),
      "option_survival_when_global_flips": float(survive[flips].mean()) if flips.any() else None,
      "kl": summarize(arrays["kl"], every), "subset_kl": summarize(arrays["subset_kl"], every),
      "one_minus_cos_p": summarize(arrays["one_minus_cos_p"], every),
      "subset_one_minus_cos_p": summarize(arrays["subset_one_minus_cos_p"], every),
      "best_option_rank_dense": summarize(arrays["best_option_rank_dense"], every),
      "option_logp_dense": summarize(arrays["option_logp_dense"], np.ones((B, K), bool)),
  }
  if answers is not None:
    summary["accuracy_dense"] = float((arrays["option_dense"] == answers).mean())
    summary["accuracy_pruned"] = float((arrays["option_pruned"] == answers).mean())
  options = [{"option": labels[k], "token_id": int(ids[k]),
              "logp_dense_mean": float(arrays["option_logp_dense"][:, k].mean()),
              "logp_pruned_mean": float(arrays["option_logp_pruned"][:, k].mean()),
              "chosen_dense": float((arrays["option_dense"] == k).mean()),
              "chosen_pruned": float((arrays["option_pruned"] == k).mean())} for k in range(K)]
  items = []
  for i in range(B):
    rec = {"item": i, "option_dense": labels[arrays["option_dense"][i]],
           "option_pruned": labels[arrays["option_pruned"][i]],
           "global_flip": bool(flips[i]), "option_survives": bool(survive[i]),
           "kl": float(arrays["kl"][i]), "subset_kl": float(arrays["subset_kl"][i]),
           "best_option_rank_dense": int(arrays["best_option_rank_dense"][i])}
    if answers is not None:
      rec["answer"] = labels[answers[i]]
    if tokenizer is not None:
      rec["top_dense"] = [tokenizer.decode([int(t)]) for t in arrays["top_ids_dense"][i]]
      rec["top_pruned"] = [tokenizer.decode([int(t)]) for t in arrays["top_ids_pruned"][i]]
    items.append(rec)
  return Result("option_subspace", {"labels": labels, "summary": summary}, arrays,
                {"summary": [_flat(summary)], "options": options, "items": items})


def _flat(d: dict, prefix: str = "") -> dict:
  """{"kl": {"mean": ..}} -> {"kl_mean": ..} for one CSV row."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}_"))
    else:
      out[f"{prefix}{k}"] = v
  return out

