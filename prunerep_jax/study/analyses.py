"""The analyses of `prunerep_jax.analysis` at the profile's chosen settings, saved as Result files.

  layerwise-<what>-<lens>   every sublayer pruned alone in the dense context (paper Fig. 2), on
                            the first decoding positions of GSM8K prompts, lens final_norm and raw;
                            <what> is "drop" (each sublayer removed: the paper's dropped mode, one
                            run for attention and MLP) or a sparsity cell ("wanda-0.5": each
                            sublayer replaced by its pruned version)
  drift-<cell>              dense vs the cell's model decoding side by side, free-running and
                            teacher-forced (Fig. 8)
  option_subspace-<cell>    the MMLU items of the evaluation, option letters vs the vocabulary
                            (Fig. 7)
  theorem-<source>          Theorem 2/3 estimates vs exact values over a layerwise or drift result
                            (Fig. 6)

Each analysis saves NAME.json / .csv / .npz under `<out>/analyses/` and returns a compact summary
(the numbers the report and figures read), which the caller caches.
"""

from __future__ import annotations

import numpy as np

from prunerep_jax import analysis
from prunerep_jax.analysis import theory
from prunerep_jax.prune import drop
from prunerep_jax.study import suites
from prunerep_jax.tasks import _generation, gsm8k, mmlu
from prunerep_jax.tasks import _suite

LAYER_METRICS = ("cos_h", "cos_z", "cos_p", "one_minus_cos_h", "one_minus_cos_z",
                 "one_minus_cos_p", "kl", "kl_estimate", "top1_agree")
DRIFT_METRICS = ("cos_h", "cos_z", "cos_p", "kl", "kl_estimate", "agree")
SMALL_DZ = 1.0  # RMS over the vocabulary of the logit change, in nats: "a small change"


def drop_everything(params, config):
  """Params with every attention and MLP sublayer dropped: as the `pruned` of `layerwise`, each
  sublayer's counterfactual is its removal (the others stay dense)."""
  return drop.zero_sublayers(params, [(l, k) for l in range(config.num_layers)
                                      for k in ("attn", "mlp")])


def prompts(tokenizer, config, work: suites.Workload, count: int) -> tuple[np.ndarray, np.ndarray]:
  """The first `count` GSM8K prompts of the workload, left-padded: tokens, mask [B, T]."""
  rows = [gsm8k.prompt_tokens(tokenizer, it) for it in work.gsm8k[:count]]
  return suites.left_padded(rows, _suite.pad_id_of(tokenizer, config))


def layerwise(params, config, tokens, mask, pruned, lens: str, decode_steps: int,
              directory: str, name: str, mesh=None) -> dict:
  """Runs and saves one layerwise analysis; returns per sublayer kind the per-layer means."""
  result = analysis.layerwise(params, config, tokens, pruned, lens=lens,
                              decode_steps=decode_steps, attention_mask=mask, mesh=mesh)
  result.save(directory, name)
  theorem = analysis.theorem_check(result)
  theorem.save(directory, f"theorem-{name}")
  return {"layerwise": layer_means(result), "theorem": theorem_summary(theorem)}


def layer_means(result: analysis.Result) -> dict:
  """{"attn": {metric: [L] mean over valid positions}, "mlp": {...}}."""
  valid = np.asarray(result.arrays["valid"], bool)
  out = {}
  for s, sub in enumerate(("attn", "mlp")):
    out[sub] = {k: [_mean(result.arrays[k][l, s], valid) for l in range(result.arrays[k].shape[0])]
                for k in LAYER_METRICS}
  return out


def _mean(values: np.ndarray, valid: np.ndarray):
  v = np.asarray(values, np.float64)[valid]
  v = v[np.isfinite(v)]
  return float(v.mean()) if v.size else None


def theorem_summary(result: analysis.Result) -> dict:
  """{group: {quantity: {n, pearson, pearson_log, ratio_mean, ratio_median, small}}}: the
  statistics over every pair, and ("small") over the pairs with RMS(dz) < SMALL_DZ only, the
  regime where a second-order expansion in dz is meant to hold."""
  out: dict[str, dict] = {}
  for row in result.table():
    if "@" not in row["quantity"]:
      out.setdefault(row["group"], {})[row["quantity"]] = {
          k: row[k] for k in ("n", "pearson", "pearson_log", "ratio_mean", "ratio_median")}
  for key in result.arrays:
    group, quantity, part = key.split("/")
    if part == "real":
      a = result.arrays
      small = a[f"{group}/{quantity}/rms_dz"] < SMALL_DZ
      out[group][quantity]["small"] = theory.compare(a[key][small],
                                                     a[f"{group}/{quantity}/estimate"][small])
  return out


def drift(params, config, pruned_params, pruned_config, tokenizer, tokens, mask, steps: int,
          directory: str, name: str, mesh=None) -> dict:
  """Runs and saves one drift analysis (both modes) and its theorem check; returns per-step means
  per track, first divergence steps and the theorem statistics."""
  eos = _generation.eos_ids(tokenizer, config)
  result = analysis.drift(params, pruned_params, config, tokens, steps,
                          pruned_config=pruned_config, mode="both", prompt_mask=mask,
                          tokenizer=tokenizer, eos_token_ids=eos,
                          pad_id=_suite.pad_id_of(tokenizer, config), mesh=mesh)
  result.save(directory, name)
  theorem = analysis.theorem_check(result)
  theorem.save(directory, f"theorem-{name}")
  per_step: dict[str, dict] = {}
  for row in result.table("summary"):
    track = per_step.setdefault(row["track"], {k: [] for k in DRIFT_METRICS + ("prompts",)})
    for k in DRIFT_METRICS + ("prompts",):
      track[k].append(row[k])
  divergence = {}
  for row in result.table("prompts"):
    divergence.setdefault(row["track"], []).append(row["first_divergence"])
  return {"steps": per_step, "first_divergence": divergence, "theorem": theorem_summary(theorem)}


def option_subspace(params, config, pruned_params, pruned_config, tokenizer,
                    work: suites.Workload, batch_size: int, directory: str, name: str,
                    mesh=None) -> dict:
  """Runs and saves the option-subspace analysis on the evaluated MMLU items; returns its summary
  (rates and means over items) and each option's mean log-probability."""
  rows = [mmlu.prompt_tokens(tokenizer, it) for it in work.mmlu]
  tokens, mask = suites.left_padded(rows, _suite.pad_id_of(tokenizer, config))
  letters, _ = mmlu.letter_tokens(tokenizer)
  result = analysis.option_subspace(
      params, pruned_params, config, tokens, letters, answers=[it.answer for it in work.mmlu],
      prompt_mask=mask, pruned_config=pruned_config, batch_size=batch_size,
      option_labels=mmlu.LETTERS, tokenizer=tokenizer, mesh=mesh)
  result.save(directory, name)
  return {"summary": suites.jsonable(result.meta["summary"]),
          "options": suites.jsonable(result.table("options"))}

