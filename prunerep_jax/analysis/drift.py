"""Step-wise drift in generation: the dense and the pruned model decoding side by side.

Both models advance inside ONE jitted `jax.lax.scan`, each with its own KV cache, and every
per-step metric is computed inside the scan body, so a run keeps O(steps) scalars per prompt and
never a [steps, vocab] array:

  free     each model feeds back its own token; both sample with the same per-step key
           (`decode.step_key`), so with T > 0 they draw with the same randomness;
  teacher  the pruned model is fed the dense model's tokens (the contexts never diverge; what it
           would have chosen is recorded);
  both     free and teacher in the same scan (three model steps per decoding step; the dense one
           is shared).

Per step and prompt: cosine and 1 - cos of the final-normed hidden state (h), of the logits (z) and
of p = softmax(z / T_a) at the analysis temperature T_a; KL(p_dense || p_pruned) and its Theorem 3
estimate; 1 - cos(p) and its Theorem 2 estimate; whether the two tokens agree. Per prompt: the
first divergence step, token agreement, and (with a tokenizer) the decoded texts.

Shape letters: B prompts, T prompt positions, S steps, V vocab.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from prunerep_jax import decode, metrics, parallel, validate
from prunerep_jax.analysis.results import Result, summarize
from prunerep_jax.config import Config

MODES = ("free", "teacher", "both")
STEP_METRICS = ("cos_h", "one_minus_cos_h", "cos_z", "one_minus_cos_z", "rms_dz", "cos_p",
                "one_minus_cos_p", "cos_p_estimate", "kl", "kl_estimate", "agree")


def step_metrics(dense: decode.StepOutput, pruned: decode.StepOutput, tok_dense, tok_pruned,
                 temperature: float) -> dict:
  """Per-row metrics of one decoding step, dense vs pruned: dict of [B] float32."""
  return {
      "cos_h": metrics.cosine(dense.hidden, pruned.hidden),
      "one_minus_cos_h": metrics.one_minus_cosine(dense.hidden, pruned.hidden),
      **{k: v for k, v in metrics.compare_logits(dense.logits, pruned.logits, temperature).items()
         if k in STEP_METRICS},
      "agree": (tok_dense == tok_pruned).astype(jnp.float32),
  }


def _tracks(mode: str) -> tuple[str, ...]:
  return ("free", "teacher") if mode == "both" else (mode,)


@functools.partial(jax.jit, static_argnums=(2, 3, 7, 8, 9, 10))
def _drift(dense, pruned, config, pconfig, tokens, mask, seed, steps, mode, sampling, stopping,
           temperature):
  """Returns {"dense": {tokens, valid}, track: {tokens, valid, running, <STEP_METRICS>}}, leaves
  [B, S]; valid: both models of the comparison still run; running: the pruned model still runs
  (teacher: the dense one, whose tokens it is fed)."""
  tracks = _tracks(mode)
  key = jax.random.key(seed)
  cache_len = tokens.shape[1] + steps
  none_done = jnp.zeros(tokens.shape[0], bool)

  out_d, st_d = decode.prefill(dense, config, tokens, mask, cache_len)
  out_p, st_p = decode.prefill(pruned, pconfig, tokens, mask, cache_len)
  k0 = decode.step_key(key, 0)
  tok_d, val_d, done_d = decode.choose(out_d.logits, k0, none_done, sampling, stopping)
  tok_p, val_p, done_p = decode.choose(out_p.logits, k0, none_done, sampling, stopping)
  first = {"dense": {"tokens": tok_d, "valid": val_d}}
  carry = {"dense": (st_d, tok_d, done_d)}
  for t in tracks:  # both tracks start from the same prefill of the same prompt
    valid = val_d & val_p if t == "free" else val_d
    first[t] = {"tokens": tok_p, "valid": valid, "running": val_p if t == "free" else val_d,
                **step_metrics(out_d, out_p, tok_d, tok_p, temperature)}
    carry[t] = (st_p, tok_p, done_p)

  def body(carry, i):
    k = decode.step_key(key, i)
    st_d, prev_d, done_d = carry["dense"]
    out_d, st_d = decode.decode_step(dense, config, st_d, prev_d)
    tok_d, val_d, new_done_d = decode.choose(out_d.logits, k, done_d, sampling, stopping)
    new = {"dense": (st_d, tok_d, new_done_d)}
    ys = {"dense": {"tokens": tok_d, "valid": val_d}}
    for t in tracks:
      st_p, prev_p, done_p = carry[t]
      feed, done_in = (prev_p, done_p) if t == "free" else (prev_d, done_d)
      out_p, st_p = decode.decode_step(pruned, pconfig, st_p, feed)
      tok_p, val_p, new_done_p = decode.choose(out_p.logits, k, done_in, sampling, stopping)
      new[t] = (st_p, tok_p, new_done_p)
      valid = val_d & val_p if t == "free" else val_d
      ys[t] = {"tokens": tok_p, "valid": valid, "running": val_p if t == "free" else val_d,
               **step_metrics(out_d, out_p, tok_d, tok_p, temperature)}
    return new, ys

  _, rest = jax.lax.scan(body, carry, jnp.arange(1, steps, dtype=jnp.int32))
  return jax.tree_util.tree_map(
      lambda a, b: jnp.concatenate([a[None], b], axis=0).swapaxes(0, 1), first, rest)


def drift(dense_params, pruned_params, config: Config, prompt_tokens, steps: int, *,
          pruned_config: Optional[Config] = None, mode: str = "both", temperature: float = 0.0,
          analysis_temperature: float = 1.0, seed: int = 0, prompt_mask=None,
          tokenizer: Any = None, eos_token_ids=None, pad_id: Optional[int] = None,
          mesh=None) -> Result:
  """The paper's step-wise drift figure, free-running and teacher-forced, in one scan.

  Args:
    dense_params, config: the dense model.
    pruned_params: the pruned params (a PruneResult's .params); pruned_config its config when it
      differs (drop_blocks, neurons with removal).
    prompt_tokens: int [B, T], padding on either side described by prompt_mask [B, T].
    steps: S decoding steps.
    mode: "free", "teacher" or "both".
    temperature: sampling temperature of both models (0 = greedy); analysis_temperature: T_a of
      the probability space the metrics use (> 0; greedy decoding is analysed at T_a = 1).
    seed: step i of both models samples with fold_in(key(seed), i).
    tokenizer: optional; decodes the trajectories into tables["texts"].
    eos_token_ids, pad_id: as in `generate` (defaults from the config).
    mesh: None or a ("data", "model") mesh / spec (`prunerep_jax.parallel`): both models are
      placed on it and the prompts split over its data axis (padded to a multiple of it; the
      padding never reaches a result).

  Returns:
    Result(kind="drift"): arrays "<track>/<metric>" [B, S] for track in free/teacher,
    "<track>/tokens", "<track>/valid" (both running), "<track>/running", "dense/tokens",
    "dense/valid"; tables "summary" (per step
    and track, each metric's mean over the prompts still running), "prompts" (per prompt and
    track: first divergence step, token agreement, mean KL) and "texts".
  """
  fn = "drift"
  pconfig = config if pruned_config is None else pruned_config
  validate.params(fn, dense_params, config)
  validate.params(fn, pruned_params, pconfig)
  if pconfig.vocab_size != config.vocab_size:
    raise validate.fail(fn, "pruned_config", pconfig, f"vocab_size {config.vocab_size} like the "
                        "dense model's")
  mode = validate.choice(fn, "mode", mode, MODES)
  sampling = decode.Sampling(validate.temperature(fn, temperature, allow_zero=True))
  a_temp = validate.temperature(fn, analysis_temperature, allow_zero=False,
                                name="analysis_temperature")
  seed = validate.seed(fn, seed)
  tokens = validate.tokens(fn, prompt_tokens, config.vocab_size, name="prompt_tokens")
  mask = validate.mask(fn, "prompt_mask", prompt_mask, tokens.shape)
  B, T = tokens.shape
  context = min(config.max_position_embeddings, pconfig.max_position_embeddings)
  steps = validate.integer(fn, "steps", steps, minimum=1, maximum=context - T,
                           expected=f"an integer in [1, max_position_embeddings - T = "
                                    f"{context - T}]")
  eos = validate.token_ids(fn, "eos_token_ids",
                           config.eos_token_ids if eos_token_ids is None else eos_token_ids,
                           config.vocab_size)
  if pad_id is None:
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
  stopping = decode.Stopping(tuple(eos), validate.token_id(fn, "pad_id", pad_id,
                                                           config.vocab_size))
  mesh = parallel.as_mesh(fn, mesh)
  tokens, mask = decode.left_align(jnp.asarray(tokens), jnp.asarray(mask))
  if mesh is not None:
    dense_params = parallel.shard_params(dense_params, config, mesh)
    pruned_params = parallel.shard_params(pruned_params, pconfig, mesh)
    tokens, _ = parallel.shard_batch(tokens, mesh)
    mask, _ = parallel.shard_batch(mask, mesh)
  out = _drift(dense_params, pruned_params, config, pconfig, tokens, mask,
               jnp.asarray(seed, jnp.uint32), steps, mode, sampling, stopping, a_temp)
  out = parallel.fetch(parallel.unpad(out, B))
  return _result(out, mode, steps, sampling, a_temp, seed, tokenizer)


def _result(out: dict, mode: str, steps: int, sampling, a_temp: float, seed: int,
            tokenizer) -> Result:
  arrays = {}
  for group, values in out.items():
    for k, v in values.items():
      arrays[f"{group}/{k}"] = v
  summary, prompts, texts = [], [], []
  dense_tokens, dense_valid = out["dense"]["tokens"], out["dense"]["valid"]
  B = dense_tokens.shape[0]
  for t in _tracks(mode):
    o = out[t]
    for s in range(steps):
      row = {"step": s, "track": t, "prompts": int(o["valid"][:, s].sum())}
      for k in STEP_METRICS:
        row[k] = summarize(o[k][:, s], o["valid"][:, s])["mean"]
      summary.append(row)
    # Free running: tokens differ once one model emits EOS and the other does not, so the
    # comparison runs over the steps where either model still runs.
    either = dense_valid | o["running"]
    first = np.asarray(metrics.first_divergence(dense_tokens, o["tokens"], either))
    agree = np.asarray(metrics.token_agreement(dense_tokens, o["tokens"], o["valid"]))
    for b in range(B):
      prompts.append({"prompt": b, "track": t, "first_divergence": int(first[b]),
                      "diverged": bool(first[b] < steps), "token_agreement": float(agree[b]),
                      "mean_kl": summarize(o["kl"][b], o["valid"][b])["mean"],
                      "steps_compared": int(o["valid"][b].sum())})
  if tokenizer is not None:
    for b in range(B):
      n = int(dense_valid[b].sum())
      texts.append({"prompt": b, "track": "dense",
                    "text": tokenizer.decode(dense_tokens[b, :n].tolist())})
      for t in _tracks(mode):
        n_t = int(out[t]["running"][b].sum())
        texts.append({"prompt": b, "track": t,
                      "text": tokenizer.decode(out[t]["tokens"][b, :n_t].tolist())})
  meta = {"mode": mode, "steps": steps, "prompts": B, "temperature": sampling.temperature,
          "analysis_temperature": a_temp, "seed": seed}
  return Result("drift", meta, arrays, {"summary": summary, "prompts": prompts, "texts": texts})

