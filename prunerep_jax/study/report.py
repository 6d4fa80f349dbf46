"""The report: each claim of the paper, the number we measured, and whether it held.

Every claim is checked by an explicit rule on the results (`CLAIMS`; the rules are printed in the
report). Two summaries carry most rules, both fidelity to the dense model on the same items, in
[0, 1], because a 135M model is near chance on MMLU and near zero on GSM8K, so its task scores
cannot show a collapse:

  non-generative fidelity = mean of (MMLU: fraction of questions where the pruned model picks the
                            dense model's option; retrieval: fraction of queries whose first key
                            is the dense model's first key)
  generative fidelity     = mean of (GSM8K, HumanEval: token agreement, the fraction of the dense
                            greedy output's positions where the pruned output has the same token)

The paper's "pruning keeps multiple choice but breaks generation" becomes "non-generative fidelity
stays high while generative fidelity falls". A claim whose inputs the profile did not measure is
"n/a", never "held".
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

import numpy as np

NONGEN_MIN = 0.7          # claim 1: non-generative fidelity that counts as "close to dense"
GEN_MAX = 0.5             # claim 2: generative fidelity that counts as "collapsed"
GAP_MIN = 0.1             # claims 3, 5: margin of non-generative over generative fidelity
GAP_SHARE = 0.75          # claim 3: share of pruned cells that must show the margin
COS_H_MIN = 0.9           # claim 6: "h barely moves"
MAJORITY = 0.5            # claims 7, 8: "usually"
KL_PEARSON, KL_RATIO = 0.9, (0.8, 1.25)        # claim 9 (paper: 0.996, ~1.00)
COSP_PEARSON, COSP_RATIO = 0.8, (0.8, 1.6)     # claim 10 (paper: 0.91, ~1.26)
DRIFT_FACTOR, DRIFT_COS_P = 2.0, 0.5           # claim 11
TAIL_LOGP = -5.0          # claim 13: option letters "in the tail" of p
SMALL_DZ = 1.0            # claims 9, 10: the small-change regime (RMS of dz over the vocabulary)


# --------------------------------------------------------------------------- accessors

def cell(results: dict, cell_id: str) -> Optional[dict]:
  return next((c for c in results["cells"] if c["id"] == cell_id), None)


def value(c: Optional[dict], suite: str, key: str) -> Optional[float]:
  if c is None:
    return None
  return c["metrics"][suite].get(key)


def _mean(values) -> Optional[float]:
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def nongen_fidelity(c: dict) -> Optional[float]:
  return _mean([value(c, "mmlu", "agreement"), value(c, "retrieval", "top1_agreement")])


def gen_fidelity(c: dict) -> Optional[float]:
  return _mean([value(c, "gsm8k", "token_agreement"), value(c, "humaneval", "token_agreement")])


def _at_most(results: dict, method: str, limit: float) -> Optional[dict]:
  """The cell of `method` with the largest point <= limit (unstructured only for sparsity)."""
  found = [c for c in results["cells"] if c["method"] == method
           and not isinstance(c["point"], str) and c["x"] <= limit]
  return max(found, key=lambda c: c["x"]) if found else None


def _f(x: Optional[float], digits: int = 2) -> str:
  return "-" if x is None else f"{x:.{digits}f}"


# ------------------------------------------------------------------------------- claims

@dataclasses.dataclass(frozen=True)
class Claim:
  """claim: what the paper says; paper: its numbers; rule: when we say it held; check: results
  -> (what we measured, held: True / False / None for not measured)."""

  key: str
  claim: str
  paper: str
  rule: str
  check: Callable[[dict], tuple[str, Optional[bool]]]


def _nongen_close(r):
  c, dense = _at_most(r, "drop_attn", 8), cell(r, "dense")
  if c is None or dense is None:
    return "attention drop not measured", None
  ng = nongen_fidelity(c)
  return (f"{c['label']}: non-generative fidelity {_f(ng)} (MMLU agreement "
          f"{_f(value(c, 'mmlu', 'agreement'))}, retrieval agreement "
          f"{_f(value(c, 'retrieval', 'top1_agreement'))}); scores: MMLU accuracy "
          f"{_f(value(dense, 'mmlu', 'accuracy'))} -> {_f(value(c, 'mmlu', 'accuracy'))}, "
          f"retrieval recall@1 {_f(value(dense, 'retrieval', 'recall_at_1'))} -> "
          f"{_f(value(c, 'retrieval', 'recall_at_1'))}"), ng >= NONGEN_MIN


def _gen_collapses(r):
  found = [c for m in ("drop_attn", "drop_mlp") for c in [_at_most(r, m, 8)] if c]
  if not found:
    return "drops not measured", None
  parts = [f"{c['label']}: {_f(gen_fidelity(c))} (GSM8K identical outputs "
           f"{_f(value(c, 'gsm8k', 'exact_match'))})" for c in found]
  return "generative fidelity " + "; ".join(parts), min(gen_fidelity(c) for c in found) <= GEN_MAX


def _gap(r):
  pruned = [c for c in r["cells"] if c["method"] != "dense"]
  if not pruned:
    return "no pruned model measured", None
  gaps = np.asarray([nongen_fidelity(c) - gen_fidelity(c) for c in pruned])
  share = float(np.mean(gaps >= GAP_MIN))
  return (f"non-generative minus generative fidelity: median {np.median(gaps):+.2f}; margin >= "
          f"{GAP_MIN} in {share:.0%} of {len(pruned)} pruned models"), share >= GAP_SHARE


def _mlp_worse(r):
  for n in (8, 4, 2):
    a, m = cell(r, f"drop_attn-{n}"), cell(r, f"drop_mlp-{n}")
    if a and m:
      text = (f"n={n}: attention vs MLP non-generative {_f(nongen_fidelity(a))} vs "
              f"{_f(nongen_fidelity(m))}, generative {_f(gen_fidelity(a))} vs "
              f"{_f(gen_fidelity(m))}, next-token KL {_f(value(a, 'perplexity', 'kl'))} vs "
              f"{_f(value(m, 'perplexity', 'kl'))}")
      return text, (nongen_fidelity(m) <= nongen_fidelity(a)
                    and gen_fidelity(m) <= gen_fidelity(a))
  return "attention and MLP drops at the same n not measured", None


def _wanda(r):
  found = sorted((c for c in r["cells"] if c["method"] == "wanda"), key=lambda c: c["x"])
  if not found:
    return "Wanda not measured", None
  parts = [f"{c['label']}: {_f(nongen_fidelity(c))} vs {_f(gen_fidelity(c))}" for c in found]
  held = all(nongen_fidelity(c) - gen_fidelity(c) >= GAP_MIN for c in found)
  return "non-generative vs generative fidelity, " + "; ".join(parts), held


def _layers(r):
  return r["analyses"].get("layerwise-drop-final_norm", {}).get("layerwise")


def _cos_h(r):
  lw = _layers(r)
  if lw is None:
    return "layerwise analysis not run", None
  L = len(lw["attn"]["cos_h"])
  middle = slice(L // 4, max(L // 4 + 1, (3 * L) // 4))
  med = {s: float(np.median(lw[s]["cos_h"][middle])) for s in ("attn", "mlp")}
  lo = {s: float(np.min(lw[s]["cos_h"][middle])) for s in ("attn", "mlp")}
  return (f"middle layers, one sublayer removed: cos(h) median attention {med['attn']:.3f} "
          f"(min {lo['attn']:.3f}), MLP {med['mlp']:.3f} (min {lo['mlp']:.3f})"), (
              med["attn"] >= COS_H_MIN)


def _share(lw, better: Callable[[float, float, float], bool]) -> float:
  flags = []
  for s in ("attn", "mlp"):
    for h, z, p in zip(lw[s]["one_minus_cos_h"], lw[s]["one_minus_cos_z"],
                       lw[s]["one_minus_cos_p"]):
      if None not in (h, z, p):
        flags.append(better(h, z, p))
  return float(np.mean(flags)) if flags else float("nan")


def _z_vs_h(r):
  lw = _layers(r)
  if lw is None:
    return "layerwise analysis not run", None
  share = _share(lw, lambda h, z, p: z <= h)
  raw = r["analyses"].get("layerwise-drop-raw", {}).get("layerwise")
  extra = f" (raw lens: {_share(raw, lambda h, z, p: z <= h):.0%})" if raw else ""
  return f"cos(z) >= cos(h) for {share:.0%} of the sublayers{extra}", share >= MAJORITY


def _p_amplifies(r):
  lw = _layers(r)
  if lw is None:
    return "layerwise analysis not run", None
  share = _share(lw, lambda h, z, p: p > z)
  worst = {s: min(v for v in lw[s]["cos_p"] if v is not None) for s in ("attn", "mlp")}
  last = {s: lw[s]["cos_p"][-1] for s in ("attn", "mlp")}
  return (f"1 - cos(p) > 1 - cos(z) for {share:.0%} of the sublayers; worst cos(p) attention "
          f"{worst['attn']:.3f}, MLP {worst['mlp']:.3f}; last layer {_f(last['attn'], 3)} / "
          f"{_f(last['mlp'], 3)}"), share >= MAJORITY


def _theorem(quantity: str, pearson_min: float, ratio: tuple[float, float]):
  def check(r):
    th = r["analyses"].get("layerwise-drop-final_norm", {}).get("theorem", {})
    stats = th.get("all", {}).get(quantity)
    if not stats or "small" not in stats:
      return "layerwise analysis not run", None
    small = stats["small"]
    text = (f"{small['n']} sublayer x position pairs with RMS(dz) < {SMALL_DZ:g}: Pearson "
            f"{_f(small['pearson'], 3)}, median ratio estimate/real {_f(small['ratio_median'])}; "
            f"all {stats['n']} pairs: Pearson {_f(stats['pearson'], 3)} (log-log "
            f"{_f(stats['pearson_log'], 3)}), median ratio {_f(stats['ratio_median'])}")
    if small["pearson"] is None or small["ratio_median"] is None:
      return text, None
    held = small["pearson"] >= pearson_min and ratio[0] <= small["ratio_median"] <= ratio[1]
    return text, held
  return check


def _drift_name(r) -> Optional[str]:
  return next((n for n in sorted(r["analyses"]) if n.startswith("drift-drop_attn")), None) or \
      next((n for n in sorted(r["analyses"]) if n.startswith("drift-")), None)


def _drift(r):
  name = _drift_name(r)
  if name is None:
    return "drift analysis not run", None
  steps = r["analyses"][name]["steps"]
  free, teacher = steps["free"], steps["teacher"]
  S = len(free["kl"])
  last = slice(S - max(1, S // 4), S)

  def m(track, key):
    return _mean(track[key][last])

  div = [d for d in r["analyses"][name]["first_divergence"]["free"]]
  text = (f"{name.removeprefix('drift-')}, last {S - last.start} of {S} steps: free-running KL "
          f"{_f(m(free, 'kl'))} vs teacher-forced {_f(m(teacher, 'kl'))} nats, free cos(p) "
          f"{_f(m(free, 'cos_p'))}; first divergence steps {div}")
  held = (m(free, "kl") >= DRIFT_FACTOR * m(teacher, "kl")
          and m(free, "cos_p") <= DRIFT_COS_P)
  return text, held


def _subspace_name(r) -> Optional[str]:
  return next((n for n in sorted(r["analyses"]) if n.startswith("option_subspace-drop_attn")),
              None) or next((n for n in sorted(r["analyses"])
                             if n.startswith("option_subspace-")), None)


def _options_survive(r):
  name = _subspace_name(r)
  if name is None:
    return "option-subspace analysis not run", None
  s = r["analyses"][name]["summary"]
  flip, keep = s["global_top1_flip_rate"], s["option_argmax_survival_rate"]
  when = s["option_survival_when_global_flips"]
  text = (f"{name.removeprefix('option_subspace-')}: global top-1 survives on {1 - flip:.0%} of "
          f"{s['items']} items, option argmax on {keep:.0%}; when the top-1 flips the option "
          f"survives on {'-' if when is None else f'{when:.0%}'}")
  return text, keep > 1 - flip and (when is None or when >= 0.5)


def _options_tail(r):
  name = _subspace_name(r)
  if name is None:
    return "option-subspace analysis not run", None
  s = r["analyses"][name]["summary"]
  logp = s["option_logp_dense"]
  rank = s["best_option_rank_dense"]
  return (f"dense log p of the option letters: mean {logp['mean']:.1f} (min {logp['min']:.1f}, max "
          f"{logp['max']:.1f}); best option's rank in the vocabulary: median "
          f"{rank['median']:.0f}"), logp["mean"] <= TAIL_LOGP


CLAIMS = (
    Claim("nongen_close",
          "Non-generative scores stay close to the dense model when sublayers are dropped",
          "Mistral-7B drop 8 attention: multiple choice 69.8 (dense 69.3), retrieval 53.4 (58.9)",
          f"at the largest attention drop <= 8, non-generative fidelity >= {NONGEN_MIN}",
          _nongen_close),
    Claim("gen_collapses",
          "Generation collapses under the same pruning",
          "GSM8K 48.4 dense, 36.2 drop 8 attention, 0.0 drop 8 MLP; generative tasks hit 0 after "
          "5-9 dropped layers",
          f"generative fidelity <= {GEN_MAX} at the largest attention or MLP drop <= 8",
          _gen_collapses),
    Claim("gap",
          "Pruning hurts generation more than non-generative tasks",
          "drop 8 attention keeps 101% of the multiple-choice average but 59% of the generative "
          "one; drop 8 MLP 93% vs 4%",
          f"non-generative fidelity exceeds generative fidelity by >= {GAP_MIN} in >= "
          f"{GAP_SHARE:.0%} of the pruned models",
          _gap),
    Claim("mlp_worse",
          "Dropping MLP sublayers hurts more than dropping attention",
          "drop 8: multiple choice 69.8 (attention) vs 64.3 (MLP); generative 13.2 vs 0.8",
          "at the largest n measured for both (8, 4 or 2), MLP drop has lower non-generative and "
          "lower generative fidelity than attention drop",
          _mlp_worse),
    Claim("wanda",
          "Under Wanda sparsity non-generative scores stay flat while generation collapses",
          "HellaSwag flat, GSM8K collapses as sparsity grows (Wanda sweep figure)",
          f"at every Wanda point measured, non-generative fidelity exceeds generative by >= "
          f"{GAP_MIN}",
          _wanda),
    Claim("h_stable",
          "Hidden states barely move when one sublayer is removed",
          "Qwen2.5-7B attention: cos(h) 0.94-0.99 per sublayer in the middle layers",
          f"median cos(h) over the middle half of the layers, attention removed, >= {COS_H_MIN} "
          "(final-norm lens)",
          _cos_h),
    Claim("z_vs_h",
          "The LM head shrinks the relative change: cos(z) >= cos(h) usually",
          "attention: cos(z) 0.987-0.9998 vs cos(h) 0.94-0.99",
          f"cos(z) >= cos(h) for >= {MAJORITY:.0%} of the sublayers (removed one at a time, "
          "final-norm lens)",
          _z_vs_h),
    Claim("p_amplifies",
          "Softmax amplifies the change: p moves more than z",
          "attention: cos(p) mean 0.88-0.996 with worst cases near 0 in the last layers; MLP "
          "0.62 at the last layer",
          f"1 - cos(p) > 1 - cos(z) for >= {MAJORITY:.0%} of the sublayers (T = 1)",
          _p_amplifies),
    Claim("theorem3",
          "KL(p || p') ~= Var_p(dz) / 2T^2 (Theorem 3)",
          "correlation 0.996, ratio ~1.00",
          f"over the (sublayer removed, position) pairs with RMS(dz) < {SMALL_DZ:g}, where a "
          f"second-order expansion applies: Pearson >= {KL_PEARSON} and median ratio "
          f"estimate/real in [{KL_RATIO[0]}, {KL_RATIO[1]}]",
          _theorem("kl", KL_PEARSON, KL_RATIO)),
    Claim("theorem2",
          "1 - cos(p, p') ~= Var_r(dz) / 2T^2 (Theorem 2)",
          "correlation 0.91, estimate ~26% high",
          f"over the same pairs: Pearson >= {COSP_PEARSON} and median ratio in "
          f"[{COSP_RATIO[0]}, {COSP_RATIO[1]}]",
          _theorem("one_minus_cos_p", COSP_PEARSON, COSP_RATIO)),
    Claim("drift",
          "In free-running generation the errors compound",
          "free-running KL ~10-30 nats after a few dozen steps; cos(p) ~0 within a few steps",
          f"over the last quarter of the steps, free-running KL >= {DRIFT_FACTOR:g}x the "
          f"teacher-forced KL and free-running cos(p) <= {DRIFT_COS_P}",
          _drift),
    Claim("options_survive",
          "Multiple choice survives: the global top-1 flips but the argmax over the options stays",
          "Fig. 7: the global argmax flips under pruning, the argmax over {A, B, C, D} does not",
          "the option argmax survives on more items than the global top-1, and on >= 50% of the "
          "items where the global top-1 flips",
          _options_survive),
    Claim("options_tail",
          "The option tokens sit deep in the tail of p",
          "option log-likelihoods -10 to -14.5",
          f"mean dense log p of the option letters <= {TAIL_LOGP:g} nats",
          _options_tail),
)


def claims(results: dict) -> list[dict]:
  """Every claim with what we measured and whether it held ("yes", "no", "n/a")."""
  out = []
  for c in CLAIMS:
    try:
      ours, held = c.check(results)
    except (KeyError, TypeError, ValueError, IndexError) as e:
      ours, held = f"could not be measured ({type(e).__name__}: {e})", None
    out.append({"key": c.key, "claim": c.claim, "paper": c.paper, "ours": ours,
                "held": {True: "yes", False: "no", None: "n/a"}[None if held is None
                                                               else bool(held)],
                "rule": c.rule})
  return out


# ------------------------------------------------------------------------------ tables

CELL_COLUMNS = (  # (suite, key, header)
    ("mmlu", "accuracy", "MMLU acc"), ("mmlu", "agreement", "MMLU agree"),
    ("mmlu", "option_kl", "option KL"),
    ("retrieval", "recall_at_1", "R@1"), ("retrieval", "top1_agreement", "retr agree"),
    ("retrieval", "cosine_to_dense", "emb cos"),
    ("perplexity", "ppl", "ppl"), ("perplexity", "kl", "next-token KL"),
    ("gsm8k", "accuracy", "GSM8K acc"), ("gsm8k", "token_agreement", "GSM8K tokens"),
    ("gsm8k", "exact_match", "GSM8K exact"), ("gsm8k", "first_divergence", "GSM8K 1st div"),
    ("humaneval", "token_agreement", "HumanEval tokens"),
    ("humaneval", "exact_match", "HumanEval exact"),
)


def cell_rows(results: dict) -> list[dict]:
  """One flat row per cell: id, method, point, label, time, every metric as suite.key."""
  rows = []
  for c in results["cells"]:
    row = {"id": c["id"], "method": c["method"], "point": c["point"], "label": c["label"],
           "nongen_fidelity": nongen_fidelity(c), "gen_fidelity": gen_fidelity(c)}
    for suite, values in c["metrics"].items():
      for k, v in values.items():
        row[f"{suite}.{k}"] = v
    row["prune_s"] = c["prune"].get("time_s")
    row["eval_s"] = sum(c["timings"].values())
    rows.append(row)
  return rows


MAIN_CELLS = ("dense", "drop_attn-4", "drop_attn-8", "drop_mlp-4", "drop_mlp-8")
MAIN_COLUMNS = (  # the paper's Table 1 groups: retrieval, multiple choice, generation
    ("retrieval", "recall_at_1", "retrieval R@1"), ("retrieval", "cosine_to_dense", "emb cos"),
    ("mmlu", "accuracy", "MMLU acc"), ("mmlu", "agreement", "MMLU agree"),
    ("gsm8k", "accuracy", "GSM8K acc"), ("gsm8k", "token_agreement", "GSM8K tokens"),
    ("humaneval", "token_agreement", "HumanEval tokens"),
)


def main_table(results: dict) -> list[dict]:
  """The paper's Table 1 layout: dense vs drop-4/8 attention and MLP (those measured)."""
  rows = []
  for cid in MAIN_CELLS:
    c = cell(results, cid)
    if c is None:
      continue
    row = {"model": c["label"]}
    for suite, key, header in MAIN_COLUMNS:
      row[header] = value(c, suite, key)
    row["non-generative fidelity"] = nongen_fidelity(c)
    row["generative fidelity"] = gen_fidelity(c)
    rows.append(row)
  return rows


def _table(headers: list[str], rows: list[list[str]]) -> str:
  """A Markdown table; "|" inside a cell (KL(p || p')) is escaped so it does not split it."""
  def row(cells):
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
  lines = [row(headers), "|" + "|".join("---" for _ in headers) + "|"]
  return "\n".join(lines + [row(r) for r in rows])


def _cell_text(v) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
  return str(v)


def claim_table(results: dict) -> str:
  return _table(["claim", "paper", "ours", "held?"],
                [[c["claim"], c["paper"], c["ours"], c["held"]] for c in results["claims"]])


def markdown(results: dict) -> str:
  """report.md."""
  run = results["run"]
  held = [c["held"] for c in results["claims"]]
  sizes = results["sizes"]
  out = [
      "# When does pruning work? Reproduction report",
      "",
      f"Model `{results['model']}` ({results['num_layers']} layers, {results['dtype']}), profile "
      f"`{results['profile']}`: {len(results['cells'])} models (dense + pruned) evaluated on both "
      f"task kinds. This invocation: {run['wall_s'] / 60:.1f} min wall, {run['cpu_s'] / 60:.1f} "
      f"CPU-min, load average {run['load_average_start']} at the start and "
      f"{run['load_average_end']} at the end on {run['cpu_count']} CPUs; computing every model "
      f"and analysis took {run['compute_s'] / 60:.1f} min in all (across resumed runs; the "
      f"profile is sized for {run['budget_s'] / 60:.0f} min on 2 otherwise idle cores).",
      "",
      f"**{held.count('yes')} of {len(held)} claims held, {held.count('no')} did not, "
      f"{held.count('n/a')} not measured in this profile.** The question is the paper's: "
      "pruning keeps non-generative scores (multiple choice by option likelihood, retrieval by "
      "embeddings) close to the dense model, yet generation collapses; why?",
      "",
      "## Claims",
      "",
      claim_table(results),
      "",
      "### When a claim counts as held",
      "",
      "Fidelity to the dense model carries the comparison, because a 135M model is near chance "
      "on MMLU and near zero on GSM8K: *non-generative fidelity* is the mean of the MMLU option "
      "agreement with the dense model and the retrieval top-1 agreement; *generative fidelity* "
      "is the mean of the GSM8K and HumanEval token agreement (the fraction of the dense greedy "
      "output's positions where the pruned output has the same token). Rules:",
      "",
  ]
  out += [f"- **{c['claim']}**: {c['rule']}." for c in results["claims"]]
  out += ["", "A claim whose inputs this profile did not measure is n/a.", "",
          "## Reading these results", ""]
  out += [f"- {line}" for line in notes(results)]
  out += ["", "## Main table (the paper's Table 1 layout)", ""]
  rows = main_table(results)
  if rows:
    headers = list(rows[0])
    out.append(_table(headers, [[_cell_text(r[h]) for h in headers] for r in rows]))
  out += ["", "## Figures", ""]
  for path in results.get("figures", []):
    out.append(f"![{os.path.basename(path)}]({path})")
    out.append("")
  out += ["## Every model", "",
          _table(["model", "non-gen fid.", "gen fid."] + [h for _, _, h in CELL_COLUMNS]
                 + ["time s"],
                 [[c["label"], _cell_text(nongen_fidelity(c)), _cell_text(gen_fidelity(c))]
                  + [_cell_text(value(c, s, k)) for s, k, _ in CELL_COLUMNS]
                  + [f'{c["prune"].get("time_s", 0) + sum(c["timings"].values()):.0f}']
                  for c in results["cells"]]), ""]
  dense = cell(results, "dense")
  worst = min((c for c in results["cells"] if c["method"] != "dense"),
              key=gen_fidelity, default=None)
  if dense and worst:
    out += ["## What the generations look like", "",
            f"First GSM8K output of the dense model and of {worst['label']} (lowest generative "
            "fidelity), cut to 240 characters:", "",
            "```", f"dense: {dense['examples']['gsm8k'][0]!r}",
            f"{worst['label']}: {worst['examples']['gsm8k'][0]!r}", "```", ""]
  out += ["## Settings", "",
          f"- Evaluation per model: {len(results['workload']['mmlu'])} MMLU questions (prompts "
          f"<= {sizes['mmlu_max_tokens']} tokens), {len(results['workload']['retrieval'])} "
          f"Wikipedia passages of {sizes['passage_tokens']} tokens, {sizes['ppl_windows']} "
          f"held-out windows of {sizes['ppl_seqlen']} tokens, {len(results['workload']['gsm8k'])} "
          f"GSM8K and {len(results['workload']['humaneval'])} HumanEval prompts with "
          f"{sizes['max_new_tokens']} greedy tokens.",
          f"- Calibration (drop scoring, Wanda, SparseGPT): {results['calibration']['nsamples']} "
          f"windows of {results['calibration']['seqlen']} tokens from "
          f"{results['calibration']['source']}.",
          f"- Analyses at {', '.join(results['analysis_settings'])}: "
          f"{results['analysis_plan']['prompts']} GSM8K prompts, layerwise on the first "
          f"{results['analysis_plan']['decode_steps']} decoding positions, drift over "
          f"{results['analysis_plan']['drift_steps']} steps; Result files in `analyses/`.",
          f"- Skipped (model too shallow): {', '.join(results['skipped']) or 'none'}.", ""]
  return "\n".join(out)


def notes(results: dict) -> list[str]:
  """What a reader needs to interpret the numbers on this model and profile, from the results."""
  out = []
  dense = cell(results, "dense")
  n_mmlu = len(results["workload"]["mmlu"])
  if dense is not None:
    out.append(
        f"Sample sizes: {n_mmlu} MMLU questions, {len(results['workload']['retrieval'])} "
        f"retrieval passages, {len(results['workload']['gsm8k'])} GSM8K and "
        f"{len(results['workload']['humaneval'])} HumanEval prompts; a rate over {n_mmlu} items "
        f"moves in steps of {1 / n_mmlu:.2f}, so differences of one or two steps are noise.")
    out.append(
        f"The dense model answers MMLU with accuracy {_f(value(dense, 'mmlu', 'accuracy'))} "
        f"(chance 0.25) and picks its most frequent letter on "
        f"{_f(value(dense, 'mmlu', 'majority_option'))} of the questions: its choices are mostly "
        "a letter preference, so MMLU agreement measures whether pruning keeps that preference. "
        f"The probability it puts on the four letters after the cue is "
        f"{_f(value(dense, 'mmlu', 'letter_mass'))}; pruning lowers it (see the letter mass in "
        "results.csv), i.e. pruned models stop answering with a letter at all.")
    out.append(
        f"GSM8K accuracy of the dense model is {_f(value(dense, 'gsm8k', 'accuracy'))} with "
        f"{results['sizes']['max_new_tokens']} greedy tokens (a 135M model rarely reaches a "
        "final answer), so generation is judged by fidelity to the dense output: token "
        "agreement, identical outputs and the first divergence step.")
  tail = next((c for c in results["claims"] if c["key"] == "options_tail"), None)
  if tail is not None and tail["held"] == "no":
    out.append(
        "Option tokens in the tail: not reproduced by design. Our MMLU prompt ends with the cue "
        "'Answer:', so the letters are the model's top next tokens; the paper's Fig. 7 used a "
        "toy prompt without a cue, where they sit in the tail. With the letters at the top, a "
        "flip of the global top-1 *is* a flip of the chosen option, which is also why the "
        "option-survival claim can fail here.")
  theorem = next((c for c in results["claims"] if c["key"] == "theorem3"), None)
  if theorem is not None and theorem["held"] != "n/a":
    out.append(
        "Theorems 2 and 3 are second-order expansions in dz: they are tested where dz is small "
        f"(RMS < {SMALL_DZ:g} nats); removing a sublayer that the model cannot do without "
        "(e.g. an early MLP) gives RMS(dz) > 10, where no second-order estimate applies, and "
        "those pairs dominate a Pearson correlation over all pairs.")
  return out


def console_summary(results: dict) -> str:
  """The per-model table and the claim verdicts, for the terminal."""
  headers = ["model", "MMLU agree", "retr agree", "next-tok KL", "GSM8K tok", "HumanEval tok",
             "non-gen", "gen"]
  rows = []
  for c in results["cells"]:
    rows.append([c["label"], _cell_text(value(c, "mmlu", "agreement")),
                 _cell_text(value(c, "retrieval", "top1_agreement")),
                 _cell_text(value(c, "perplexity", "kl")),
                 _cell_text(value(c, "gsm8k", "token_agreement")),
                 _cell_text(value(c, "humaneval", "token_agreement")),
                 _cell_text(nongen_fidelity(c)), _cell_text(gen_fidelity(c))])
  widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

  def fmt(r):
    return "  ".join(x.ljust(w) if i == 0 else x.rjust(w)
                     for i, (x, w) in enumerate(zip(r, widths)))

  lines = ["Fidelity to the dense model (1 = identical):", fmt(headers),
           fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
  lines += ["", "Claims of the paper:"]
  for c in results["claims"]:
    lines.append(f"  [{c['held']:>3}] {c['claim']}")
    lines.append(f"        ours: {c['ours']}")
  return "\n".join(lines)

