"""The report of `study.beyond`: where choosing by the probability-space cost, and recovery, helped.

Every comparison pairs a baseline with a prescription at the same compression:

  ranking      drop n sublayers: LLM-Drop's cosine ranking (baseline) vs the KL ranking
  allocation   Wanda at a sparsity: uniform vs OWL, uniform vs KL-allocated, OWL vs KL-allocated
  recovery     a pruned model before vs after recovery training

and gets a verdict from one rule (`verdict`), on fidelity to the dense model because a 135M model
is near chance on MMLU and near zero on GSM8K:

  1. the same sublayers dropped by both rankings: "same model";
  2. generative fidelity (mean GSM8K / HumanEval token agreement with the dense greedy output,
     `report.gen_fidelity`) up by >= GEN_MARGIN: "helped"; down by >= GEN_MARGIN: "hurt";
  3. otherwise the next-token KL(dense || pruned) on held-out text (many positions, so it
     separates models whose greedy outputs both left the dense one early) decides: at most
     1 / KL_FACTOR times the baseline's: "helped (next-token KL only)"; at least KL_FACTOR times:
     "hurt (next-token KL only)";
  4. otherwise "no clear difference".

The summary sentences count the verdicts per comparison and name the settings; nothing in the
report is written by hand.
"""

from __future__ import annotations

import os
from typing import Optional

from prunerep_jax.study import report

GEN_MARGIN = 0.05
KL_FACTOR = 1.25
HELPED, HURT = "helped", "hurt"
HELPED_KL, HURT_KL = "helped (next-token KL only)", "hurt (next-token KL only)"
SAME, TIE = "same model", "no clear difference"
VERDICTS = (HELPED, HELPED_KL, TIE, HURT_KL, HURT, SAME)

gen_fidelity = report.gen_fidelity
nongen_fidelity = report.nongen_fidelity
value = report.value


def fmt(x: Optional[float], digits: int = 2) -> str:
  return "-" if x is None else f"{x:.{digits}f}"


def next_token_kl(c: dict) -> Optional[float]:
  return value(c, "perplexity", "kl")


def drift_kl(c: dict) -> Optional[float]:
  return (c.get("drift") or {}).get("kl")


def verdict(base: dict, new: dict) -> str:
  """The rule of the module docstring on two model records (baseline, prescription)."""
  if base.get("method", "").startswith("drop_") and new.get("method") == base.get("method") \
      and not new.get("recovered") and not base.get("recovered") \
      and base["prune"].get("dropped") == new["prune"].get("dropped"):
    return SAME
  g0, g1 = gen_fidelity(base), gen_fidelity(new)
  if g0 is not None and g1 is not None:
    if g1 - g0 >= GEN_MARGIN - 1e-12:
      return HELPED
    if g0 - g1 >= GEN_MARGIN - 1e-12:
      return HURT
  k0, k1 = next_token_kl(base), next_token_kl(new)
  if k0 is not None and k1 is not None and k0 > 0:
    if k1 <= k0 / KL_FACTOR:
      return HELPED_KL
    if k1 >= k0 * KL_FACTOR:
      return HURT_KL
  return TIE


# --------------------------------------------------------------------------- comparisons

COMPARISONS = (  # (key, title, baseline choice, prescription choice)
    ("ranking", "KL ranking vs LLM-Drop's cosine ranking", "cosine", "kl"),
    ("owl", "OWL vs uniform sparsity (the published baseline)", "uniform", "owl"),
    ("kl_allocation", "KL-allocated vs uniform sparsity", "uniform", "kl"),
    ("kl_vs_owl", "KL-allocated vs OWL sparsity", "owl", "kl"),
    ("recovery", "after vs before recovery training", None, None),
)
TITLES = {k: t for k, t, _, _ in COMPARISONS}
# What one row of a comparison is called in the overall sentence.
SHORT = {"ranking": "KL ranking at {}", "owl": "OWL at {}",
         "kl_allocation": "KL allocation (vs uniform) at {}",
         "kl_vs_owl": "KL allocation (vs OWL) at {}", "recovery": "recovery of {}"}
# The comparisons that test the prescription (OWL vs uniform only places the baseline).
PRESCRIPTION = ("ranking", "kl_allocation", "kl_vs_owl", "recovery")


def _find(results: dict, method: str, point, choice: str, recovered: bool = False):
  return next((c for c in results["cells"] if c["method"] == method and c["point"] == point
               and c["choice"] == choice and bool(c.get("recovered")) == recovered), None)


def pairs(results: dict) -> list[tuple[str, str, dict, dict]]:
  """(comparison key, setting, baseline record, prescription record) of every comparison the
  results allow, in report order."""
  out = []
  cells = [c for c in results["cells"] if c["method"] != "dense" and not c.get("recovered")]
  seen = []
  for c in cells:
    if (c["method"], c["point"]) not in seen:
      seen.append((c["method"], c["point"]))
  for key, _, base_choice, new_choice in COMPARISONS[:-1]:
    for method, point in seen:
      if (key == "ranking") != (method != "wanda"):
        continue
      base, new = _find(results, method, point, base_choice), _find(results, method, point,
                                                                    new_choice)
      if base is not None and new is not None:
        out.append((key, base["label"].split(",")[0], base, new))
  for c in results["cells"]:
    if c.get("recovered"):
      before = _find(results, c["method"], c["point"], c["choice"])
      if before is not None:
        out.append(("recovery", before["label"], before, c))
  return out


def verdicts(results: dict) -> list[dict]:
  """One row per comparison: what was compared, the numbers and the verdict."""
  rows = []
  for key, setting, base, new in pairs(results):
    rows.append({
        "comparison": key, "setting": setting, "baseline": base["id"], "prescription": new["id"],
        "gen_fidelity": [gen_fidelity(base), gen_fidelity(new)],
        "nongen_fidelity": [nongen_fidelity(base), nongen_fidelity(new)],
        "gsm8k_exact": [value(base, "gsm8k", "exact_match"), value(new, "gsm8k", "exact_match")],
        "next_token_kl": [next_token_kl(base), next_token_kl(new)],
        "drift_kl": [drift_kl(base), drift_kl(new)],
        "verdict": verdict(base, new)})
  return rows


# (header, record -> value, +1 when higher is better / -1 when lower is)
METRICS = (
    ("gen fid.", gen_fidelity, 1),
    ("GSM8K tokens", lambda c: value(c, "gsm8k", "token_agreement"), 1),
    ("HumanEval tokens", lambda c: value(c, "humaneval", "token_agreement"), 1),
    ("GSM8K 1st div", lambda c: value(c, "gsm8k", "first_divergence"), 1),
    ("drift KL", drift_kl, -1),
    ("next-token KL", next_token_kl, -1),
    ("non-gen fid.", nongen_fidelity, 1),
    ("MMLU agree", lambda c: value(c, "mmlu", "agreement"), 1),
    ("retr agree", lambda c: value(c, "retrieval", "top1_agreement"), 1),
)


def metric_wins(results: dict) -> list[dict]:
  """Per comparison, on how many of its settings the prescription is better on each metric
  ("k/m": better on k of the m settings where both values exist; equal values count for neither;
  settings where both sides are the same model are left out)."""
  by_id = {c["id"]: c for c in results["cells"]}
  rows = results.get("verdicts") or verdicts(results)
  out = []
  for key, _, _, _ in COMPARISONS:
    mine = [r for r in rows if r["comparison"] == key and r["verdict"] != SAME]
    if not mine:
      continue
    row = {"comparison": key, "settings": len(mine)}
    for header, f, sign in METRICS:
      pairs_ = [(f(by_id[r["baseline"]]), f(by_id[r["prescription"]])) for r in mine]
      pairs_ = [(a, b) for a, b in pairs_ if a is not None and b is not None]
      row[header] = f"{sum(sign * (b - a) > 0 for a, b in pairs_)}/{len(pairs_)}"
    out.append(row)
  return out


def summary(results: dict) -> list[str]:
  """Plain sentences, one per comparison measured, computed from the verdicts."""
  out = []
  rows = results.get("verdicts") or verdicts(results)
  for key, title, _, _ in COMPARISONS:
    mine = [r for r in rows if r["comparison"] == key]
    if not mine:
      continue
    parts = []
    for v in VERDICTS:
      settings = [r["setting"] for r in mine if r["verdict"] == v]
      if settings:
        parts.append(f"{v} at {len(settings)} ({', '.join(settings)})")
    mean = ""
    for name, key in (("generative", "gen_fidelity"), ("non-generative", "nongen_fidelity")):
      deltas = [r[key][1] - r[key][0] for r in mine if None not in r[key]]
      if deltas:
        mean += (f"; {'mean change of ' if not mean else ''}{name} fidelity "
                 f"{sum(deltas) / len(deltas):+.3f}")
    out.append(f"**{title}** ({len(mine)} setting{'s' if len(mine) > 1 else ''}): "
               + "; ".join(parts) + mean + ".")
  tested = [r for r in rows if r["comparison"] in PRESCRIPTION]
  better = [r for r in tested if r["verdict"] in (HELPED, HELPED_KL)]
  worse = [r for r in tested if r["verdict"] in (HURT, HURT_KL)]
  if tested:
    out.append(f"**Overall**: of {len(tested)} comparisons of the prescription with its "
               f"baseline, it helped in {len(better)} ({_list(better) or 'none'}), hurt in "
               f"{len(worse)} ({_list(worse) or 'none'}); the rest showed no clear difference "
               "or the same model.")
  return out


def _list(rows: list[dict]) -> str:
  return ", ".join(SHORT[r["comparison"]].format(r["setting"]) for r in rows)


# -------------------------------------------------------------------------------- tables

COLUMNS = (  # (header, record -> value)
    ("gen fid.", gen_fidelity),
    ("non-gen fid.", nongen_fidelity),
    ("GSM8K tokens", lambda c: value(c, "gsm8k", "token_agreement")),
    ("GSM8K exact", lambda c: value(c, "gsm8k", "exact_match")),
    ("GSM8K 1st div", lambda c: value(c, "gsm8k", "first_divergence")),
    ("drift KL", drift_kl),
    ("MMLU agree", lambda c: value(c, "mmlu", "agreement")),
    ("R@1", lambda c: value(c, "retrieval", "recall_at_1")),
    ("retr agree", lambda c: value(c, "retrieval", "top1_agreement")),
    ("ppl", lambda c: value(c, "perplexity", "ppl")),
    ("next-token KL", next_token_kl),
)


def prune_s(c: dict) -> float:
  return float(c["prune"].get("time_s") or 0.0)


def recover_s(c: dict) -> float:
  return float((c["prune"].get("recovery") or {}).get("time_s") or 0.0)


def eval_s(c: dict) -> float:
  return float(sum(c["timings"].values()) + ((c.get("drift") or {}).get("time_s") or 0.0))


def compute_s(results: dict) -> float:
  """Seconds every model took when computed (cached ones included; a model equal to another is
  counted once)."""
  return sum(prune_s(c) + recover_s(c) + (0.0 if c.get("same_as") else eval_s(c))
             for c in results["cells"])


def rows(results: dict) -> list[dict]:
  """One flat row per model for results.csv."""
  out = []
  for c in results["cells"]:
    row = {"id": c["id"], "method": c["method"], "point": c["point"], "choice": c["choice"],
           "recovered": c.get("recovered", False), "label": c["label"],
           "same_as": c.get("same_as"), "dropped": c["prune"].get("dropped"),
           "sparsity": c["prune"].get("sparsity"),
           "gen_fidelity": gen_fidelity(c), "nongen_fidelity": nongen_fidelity(c),
           "drift_kl": drift_kl(c), "drift_kl_last": (c.get("drift") or {}).get("kl_last")}
    for suite, values in c["metrics"].items():
      for k, v in values.items():
        row[f"{suite}.{k}"] = v
    row.update(prune_s=prune_s(c), recover_s=recover_s(c), eval_s=eval_s(c))
    out.append(row)
  return out


def _text(v) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
  return str(v)


def _pair(values, digits=2) -> str:
  return f"{fmt(values[0], digits)} -> {fmt(values[1], digits)}"


def verdict_table(results: dict) -> str:
  headers = ["comparison", "setting", "gen fid.", "GSM8K exact", "next-token KL", "drift KL",
             "non-gen fid.", "verdict"]
  body = [[TITLES[r["comparison"]], r["setting"], _pair(r["gen_fidelity"]),
           _pair(r["gsm8k_exact"]), _pair(r["next_token_kl"], 3), _pair(r["drift_kl"]),
           _pair(r["nongen_fidelity"]), f"**{r['verdict']}**"] for r in results["verdicts"]]
  return report._table(headers, body)


def _wins_table(results: dict) -> str:
  rows = metric_wins(results)
  headers = ["comparison", "settings"] + [h for h, _, _ in METRICS]
  return report._table(headers, [[TITLES[r["comparison"]], r["settings"]]
                                 + [r[h] for h, _, _ in METRICS] for r in rows])


def model_table(results: dict, cells: list[dict]) -> str:
  headers = ["model", "prune s", "recover s"] + [h for h, _ in COLUMNS]
  body = []
  for c in cells:
    body.append([c["label"] + (" (= " + c["same_as"] + ")" if c.get("same_as") else ""),
                 f"{prune_s(c):.1f}", f"{recover_s(c):.1f}" if c.get("recovered") else "-"]
                + [_text(f(c)) for _, f in COLUMNS])
  return report._table(headers, body)


def _group(results: dict, test) -> list[dict]:
  dense = report.cell(results, "dense")
  return ([dense] if dense else []) + [c for c in results["cells"] if test(c)]


def markdown(results: dict) -> str:
  """report.md."""
  run = results["run"]
  rec = results["recovery"]
  out = [
      "# Beyond the paper: choosing what to prune by its probability-space cost, and recovery",
      "",
      f"Model `{results['model']}` ({results['num_layers']} layers, {results['dtype']}), profile "
      f"`{results['profile']}`: {len(results['cells'])} models, each on both task kinds and "
      f"free-running drift. This invocation: {run['wall_s'] / 60:.1f} min wall, "
      f"{run['cpu_s'] / 60:.1f} CPU-min, load average {run['load_average_start']} at the start "
      f"and {run['load_average_end']} at the end on {run['cpu_count']} CPUs; computing every "
      f"model took {run['compute_s'] / 60:.1f} min in all (across resumed runs).",
      "",
      "The paper diagnoses (pruning that barely moves hidden states is amplified in probability "
      "space and compounds over decoding steps) but prescribes nothing. Here the prescription is "
      "tested at equal compression: choose what to drop by the probability-space cost of "
      "removing it (the Theorem 3 estimate through the final-norm lens) instead of LLM-Drop's "
      "cosine; allocate Wanda's sparsity per layer by KL sensitivity (against uniform and OWL); "
      "and recover the pruned model by distillation to the dense one.",
      "",
      "## Where the prescription helped and where it did not",
      "",
  ]
  out += [f"- {line}" for line in results["summary"]]
  out += ["", verdict_table(results), "",
          "Each cell reads baseline -> prescription. Rule for the verdict (the same for every "
          "row):", "",
          "1. both rankings dropped the same sublayers: **same model**;",
          f"2. generative fidelity up by >= {GEN_MARGIN}: **helped**; down by >= {GEN_MARGIN}: "
          "**hurt**;",
          f"3. otherwise the next-token KL(dense || pruned) on held-out text decides: <= 1/"
          f"{KL_FACTOR:g} of the baseline's: **helped (next-token KL only)**; >= {KL_FACTOR:g}x: "
          "**hurt (next-token KL only)**;",
          "4. otherwise **no clear difference**.", "",
          "### Metric by metric", "",
          "On how many settings of each comparison the prescription is better on each metric "
          "(higher fidelity, agreement and first-divergence step; lower KL); *k/m*: better on k of "
          "m settings, equal values counting for neither, same-model settings left out. A metric "
          "that moves one way in every setting is a pattern even where the verdict, which needs "
          "a margin, says no clear difference.", "",
          _wins_table(results), "",
          "*Generative fidelity* is the mean of the GSM8K and HumanEval token agreement with the "
          "dense greedy output; *non-generative fidelity* the mean of the MMLU option agreement "
          "and the retrieval top-1 agreement; *drift KL* the free-running KL(dense || pruned) per "
          "decoding step, averaged over the steps, each model on its own greedy tokens. With "
          f"{len(results['workload']['gsm8k'])} GSM8K and {len(results['workload']['humaneval'])}"
          " HumanEval prompts a difference of a few hundredths is within the noise, hence the "
          "margin.", ""]
  out += ["## Figures", ""]
  for path in results.get("figures", []):
    out += [f"![{os.path.basename(path)}]({path})", ""]
  drops = _group(results, lambda c: c["method"].startswith("drop_") and not c.get("recovered"))
  wanda = _group(results, lambda c: c["method"] == "wanda" and not c.get("recovered"))
  recovered = [c for c in results["cells"] if c.get("recovered")]
  if len(drops) > 1:
    out += ["## Ranking: which sublayers to drop", "",
            model_table(results, drops), "", "Dropped layers per ranking (cheapest first):", ""]
    for name, order in results.get("orders", {}).items():
      out.append(f"- {name}: {order['order']} (scoring {order['time_s']:.1f} s)")
    out.append("")
  if len(wanda) > 1:
    out += ["## Allocation: Wanda's per-layer sparsity", "", model_table(results, wanda), ""]
    for c in wanda:
      if c["prune"].get("per_layer"):
        out.append(f"- {c['label']}: realised sparsity {c['prune']['sparsity']:.4f}, per layer "
                   f"{min(c['prune']['per_layer']):.3f}-{max(c['prune']['per_layer']):.3f} "
                   f"(allocation {c['prune']['allocation_s']:.1f} s of the prune time)")
    out.append("")
  if recovered:
    before = [b for c in recovered for b in [_find(results, c["method"], c["point"],
                                                   c["choice"])] if b]
    out += ["## Recovery", "",
            f"`pj.recover` with loss `kl_to_dense`, {rec['steps']} AdamW steps (warmup-cosine, "
            f"peak learning rate {rec['learning_rate']:g}) of {rec['batch_size']} windows x "
            f"{rec['seqlen']} tokens from {rec['windows']} Wikipedia training windows, "
            + ("full kernels" if rec["lora_rank"] is None else f"LoRA rank {rec['lora_rank']}")
            + "; the pruning structure is kept exactly (masked weights stay zero, dropped "
            "sublayers stay dropped).", "",
            model_table(results, before + recovered), ""]
    for c in recovered:
      losses = c["prune"]["recovery"]["losses"]
      out.append(f"- {c['label']}: training loss {losses[0]:.4f} -> {losses[-1]:.4f} over "
                 f"{len(losses)} steps in {recover_s(c):.0f} s")
    out.append("")
  out += ["## Settings", "",
          f"- Evaluation per model: {len(results['workload']['mmlu'])} MMLU questions, "
          f"{len(results['workload']['retrieval'])} retrieval passages, "
          f"{results['sizes']['ppl_windows']} held-out windows of "
          f"{results['sizes']['ppl_seqlen']} tokens, {len(results['workload']['gsm8k'])} GSM8K "
          f"and {len(results['workload']['humaneval'])} HumanEval prompts with "
          f"{results['sizes']['max_new_tokens']} greedy tokens; drift on "
          f"{results['drift']['prompts']} GSM8K prompts over {results['drift']['steps']} steps.",
          f"- Calibration (drop scores, Wanda, allocations): {results['calibration']['nsamples']} "
          f"windows of {results['calibration']['seqlen']} tokens from "
          f"{results['calibration']['source']}.",
          f"- KL allocation: {_kl_text(results.get('kl_allocation') or {})}.",
          "- Prune seconds of a drop are its ranking's scoring pass (shared by every count) plus "
          "zeroing; of Wanda, the whole transform including the allocation. Evaluation seconds "
          "are in results.csv.", ""]
  return "\n".join(out)


def _kl_text(spec: dict) -> str:
  bounds = spec.get("bounds")
  return (f"sensitivity curves on {spec.get('samples') or 'all'} calibration windows at "
          f"{spec.get('points')} sparsities in "
          + (f"[{bounds[0]}, {bounds[1]}]" if bounds else "the target +- 0.1")
          + ", greedy fill of the lower convex hulls")


def console_summary(results: dict) -> str:
  """The per-model table and the verdicts, for the terminal."""
  headers = ["model", "prune s", "gen fid", "GSM8K exact", "drift KL", "next-tok KL", "non-gen"]
  body = [[c["label"], f"{prune_s(c) + recover_s(c):.0f}", _text(gen_fidelity(c)),
           _text(value(c, "gsm8k", "exact_match")), _text(drift_kl(c)),
           _text(next_token_kl(c)), _text(nongen_fidelity(c))] for c in results["cells"]]
  widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]

  def line(r):
    return "  ".join(x.ljust(w) if i == 0 else x.rjust(w)
                     for i, (x, w) in enumerate(zip(r, widths)))

  lines = ["Fidelity to the dense model (1 = identical; KL 0 = identical):", line(headers),
           line(["-" * w for w in widths])] + [line(r) for r in body]
  lines += ["", "Verdicts:"] + [f"  {s.replace('**', '')}" for s in results["summary"]]
  return "\n".join(lines)
