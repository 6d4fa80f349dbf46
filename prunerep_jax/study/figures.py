"""The study's figures (matplotlib, Agg backend: no display needed), drawn from the results dict.

  sweep-<drop method>.png      the paper's "performance vs dropped layers": fidelity to the dense
                               model per task (non-generative solid, generative dashed) and the
                               task scores, against the number of sublayers (blocks) dropped
  sweep-<sparsity method>.png  the paper's Wanda sparsity figure, the same panels against sparsity
                               (N:M patterns as separate markers at their sparsity)
  main-table.png               the paper's Table 1: dense vs drop-4/8 attention and MLP
  layerwise-drop.png           cos in h, z and p per layer with one sublayer removed (Fig. 2)
  drift-<cell>.png             KL and cos(p) per decoding step, free vs teacher-forced (Fig. 8)
  theorem-<source>.png         exact vs second-order estimate of KL and 1 - cos(p) (Fig. 6)
  option_subspace-<cell>.png   option letters' log-probability, dense vs pruned (Fig. 7)

These are the study's own minimal figures of the analyses; `prunerep_jax.plots` (in progress on
another branch) draws the analyses' Result files in full.
TODO(lead): once prunerep_jax.plots is on main, draw the layerwise / drift / theorem / option
figures with it and keep only the sweep and main-table figures here.
"""

from __future__ import annotations

import io
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib import ticker  # noqa: E402
import numpy as np  # noqa: E402

from prunerep_jax import atomic  # noqa: E402
from prunerep_jax.analysis import Result  # noqa: E402
from prunerep_jax.study import grid, report  # noqa: E402

FIDELITY = (  # (suite, key, label, generative?)
    ("mmlu", "agreement", "MMLU: same option as dense", False),
    ("retrieval", "top1_agreement", "retrieval: same top-1 key", False),
    ("perplexity", "top1_agreement", "next token: same top-1", False),
    ("gsm8k", "token_agreement", "GSM8K: token agreement", True),
    ("gsm8k", "exact_match", "GSM8K: identical output", True),
    ("humaneval", "token_agreement", "HumanEval: token agreement", True),
)
SCORES = (
    ("mmlu", "accuracy", "MMLU accuracy", False),
    ("retrieval", "recall_at_1", "retrieval recall@1", False),
    ("gsm8k", "accuracy", "GSM8K accuracy", True),
    ("humaneval", "pass_at_1", "HumanEval pass@1", True),
)
COLORS = {"mmlu": "tab:blue", "retrieval": "tab:green", "perplexity": "tab:gray",
          "gsm8k": "tab:red", "humaneval": "tab:orange"}
TITLES = {"drop_attn": "Dropping attention sublayers", "drop_mlp": "Dropping MLP sublayers",
          "drop_block": "Dropping whole blocks", "magnitude": "Magnitude sparsity",
          "wanda": "Wanda sparsity", "sparsegpt": "SparseGPT sparsity"}


def _save(fig, out: str, name: str) -> str:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
  plt.close(fig)
  relative = os.path.join("figures", f"{name}.png")
  atomic.write_bytes(os.path.join(out, relative), buf.getvalue(), overwrite=True,
                     caller="prunerep_jax.study", name="figure")
  return relative


def draw_all(results: dict, out: str) -> list[str]:
  """Every figure the results allow; returns their paths relative to `out`."""
  paths = []
  methods = {c["method"] for c in results["cells"]}
  for method in grid.DROP_METHODS + grid.SPARSITY_METHODS:
    if method in methods:
      paths.append(sweep(results, method, out))
  if any(report.cell(results, c) for c in report.MAIN_CELLS[1:]):
    paths.append(main_table(results, out))
  for name, summary in sorted(results["analyses"].items()):
    if name == "layerwise-drop-final_norm":
      paths.append(layerwise(summary, "layerwise-drop", out))
    elif name.startswith("layerwise-") and name.endswith("-final_norm"):
      paths.append(layerwise(summary, name.removesuffix("-final_norm"), out))
    if name.startswith("drift-"):
      paths.append(drift(summary, name, out))
    if name.startswith("option_subspace-"):
      paths.append(options(summary, name, out))
    if name.startswith(("layerwise-", "drift-")) and not name.endswith("-raw"):
      path = os.path.join(out, "analyses", f"theorem-{name}.json")
      if os.path.exists(path):
        paths.append(theorem(Result.load(os.path.join(out, "analyses"), f"theorem-{name}"),
                             f"theorem-{name}", out))
  return paths


def _series(cells: list[dict], suite: str, key: str):
  xs = [c["x"] for c in cells if c["metrics"][suite].get(key) is not None]
  ys = [c["metrics"][suite][key] for c in cells if c["metrics"][suite].get(key) is not None]
  return xs, ys


def sweep(results: dict, method: str, out: str) -> str:
  """Fidelity (left) and task scores (right) along one method's sweep, dense at x = 0."""
  dense = report.cell(results, "dense")
  points = sorted((c for c in results["cells"] if c["method"] == method), key=lambda c: c["x"])
  line = [dense] + [c for c in points if not isinstance(c["point"], str)]
  nm = [c for c in points if isinstance(c["point"], str)]
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  for ax, series, title in ((left, FIDELITY, "fidelity to the dense model"),
                            (right, SCORES, "task scores")):
    for suite, key, label, generative in series:
      xs, ys = _series(line, suite, key)
      if not xs:
        continue
      style = "--" if generative else "-"
      marker = "s" if key == "exact_match" else "o"
      ax.plot(xs, ys, style, marker=marker, color=COLORS[suite], label=label,
              alpha=0.6 if key == "exact_match" else 1.0)
      for c in nm:
        v = c["metrics"][suite].get(key)
        if v is not None:
          ax.plot([c["x"]], [v], marker="*", markersize=11, color=COLORS[suite], linestyle="")
          ax.annotate(c["point"], (c["x"], v), textcoords="offset points", xytext=(5, 3),
                      fontsize=7)
    ax.set_title(title)
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.set_xlabel("sublayers dropped" if method in ("drop_attn", "drop_mlp") else
                  "blocks dropped" if method == "drop_block" else "sparsity")
  ppl = right.twinx()
  xs, ys = _series(line, "perplexity", "ppl")
  ppl.plot(xs, ys, ":", marker="^", color=COLORS["perplexity"], label="perplexity (right axis)")
  ppl.set_yscale("log")
  for set_formatter in (ppl.yaxis.set_major_formatter, ppl.yaxis.set_minor_formatter):
    set_formatter(ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.4)))
  ppl.set_ylabel("held-out perplexity")
  below = {"fontsize": 7, "loc": "upper center", "bbox_to_anchor": (0.5, -0.16), "ncol": 2}
  left.legend(**below)
  h1, l1 = right.get_legend_handles_labels()
  h2, l2 = ppl.get_legend_handles_labels()
  right.legend(h1 + h2, l1 + l2, **below)
  fig.suptitle(f"{TITLES[method]}: non-generative (solid) vs generative (dashed) on "
               f"{results['model']}" + ("  (stars: N:M patterns)" if nm else ""), fontsize=10)
  return _save(fig, out, f"sweep-{method}")


def main_table(results: dict, out: str) -> str:
  """Grouped bars: per model, retrieval / multiple choice / generation fidelity and scores."""
  rows = [report.cell(results, c) for c in report.MAIN_CELLS]
  rows = [r for r in rows if r is not None]
  groups = (("retrieval", "top1_agreement", "retrieval\nsame top-1"),
            ("retrieval", "recall_at_1", "retrieval\nrecall@1"),
            ("mmlu", "agreement", "multiple choice\nsame option"),
            ("mmlu", "accuracy", "multiple choice\naccuracy"),
            ("gsm8k", "token_agreement", "generation\nGSM8K tokens"),
            ("humaneval", "token_agreement", "generation\nHumanEval tokens"))
  fig, ax = plt.subplots(figsize=(11, 4))
  width = 0.8 / len(rows)
  for i, c in enumerate(rows):
    vals = [report.value(c, s, k) or 0.0 for s, k, _ in groups]
    ax.bar(np.arange(len(groups)) + (i - (len(rows) - 1) / 2) * width, vals, width,
           label=c["label"])
  ax.set_xticks(np.arange(len(groups)), [g[2] for g in groups], fontsize=8)
  ax.set_ylim(0, 1.05)
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=8, ncol=len(rows), loc="upper center", bbox_to_anchor=(0.5, -0.2))
  ax.set_title("Dense vs dropped sublayers across retrieval, multiple choice and generation")
  return _save(fig, out, "main-table")


def layerwise(summary: dict, name: str, out: str) -> str:
  """cos(h), cos(z), cos(p) per layer, one panel per sublayer kind."""
  lw = summary["layerwise"]
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
  for ax, sub in zip(axes, ("attn", "mlp")):
    for key, color in (("cos_h", "tab:blue"), ("cos_z", "tab:green"), ("cos_p", "tab:red")):
      ys = [np.nan if v is None else v for v in lw[sub][key]]
      ax.plot(np.arange(len(ys)), ys, marker=".", color=color, label=key.replace("cos_", "cos "))
    ax.set_title(f"{'attention' if sub == 'attn' else 'MLP'} sublayer pruned alone")
    ax.set_xlabel("layer")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("cosine to dense (final-norm lens, T = 1)")
  axes[0].legend(fontsize=8)
  fig.suptitle(f"{name}: hidden states (h) and logits (z) barely move, probabilities (p) do",
               fontsize=10)
  return _save(fig, out, name)


def drift(summary: dict, name: str, out: str) -> str:
  """KL(dense || pruned) and cos(p) per step, free-running vs teacher-forced."""
  fig, (kl, cos) = plt.subplots(1, 2, figsize=(11, 3.6))
  for track, style in (("free", "-"), ("teacher", "--")):
    steps = summary["steps"].get(track)
    if steps is None:
      continue
    x = np.arange(len(steps["kl"]))
    kl.plot(x, [np.nan if v is None else v for v in steps["kl"]], style, label=track)
    cos.plot(x, [np.nan if v is None else v for v in steps["cos_p"]], style, label=track)
  kl.set_yscale("symlog", linthresh=1e-3)
  kl.set_title("KL(dense || pruned), nats")
  cos.set_title("cos(p_dense, p_pruned)")
  for ax in (kl, cos):
    ax.set_xlabel("decoding step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f"{name}: errors compound once the pruned model feeds on its own tokens",
               fontsize=10)
  return _save(fig, out, name)


def theorem(result: Result, name: str, out: str) -> str:
  """Exact value vs its second-order estimate, log-log, per group."""
  groups = sorted({k.split("/")[0] for k in result.arrays})
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, (quantity, title) in zip(axes, (("kl", "KL vs Var_p(dz) / 2T^2"),
                                          ("one_minus_cos_p", "1 - cos(p) vs Var_r(dz) / 2T^2"))):
    lo, hi = np.inf, -np.inf
    for group in groups:
      if group == "all":
        continue
      real = result.arrays.get(f"{group}/{quantity}/real")
      est = result.arrays.get(f"{group}/{quantity}/estimate")
      if real is None or real.size == 0:
        continue
      ok = (real > 1e-12) & (est > 1e-12)
      if ok.any():
        ax.scatter(real[ok], est[ok], s=4, alpha=0.4, label=group)
        lo = min(lo, real[ok].min(), est[ok].min())
        hi = max(hi, real[ok].max(), est[ok].max())
    if np.isfinite(lo):
      ax.plot([lo, hi], [lo, hi], "k:", linewidth=1, label="estimate = exact")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("exact")
    ax.set_ylabel("estimate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
  fig.suptitle(f"{name}: second-order estimates vs exact values", fontsize=10)
  return _save(fig, out, name)


def options(summary: dict, name: str, out: str) -> str:
  """Mean log-probability of each option letter, dense vs pruned, with the survival rates."""
  opts = summary["options"]
  s = summary["summary"]
  fig, ax = plt.subplots(figsize=(6, 3.6))
  x = np.arange(len(opts))
  ax.bar(x - 0.2, [o["logp_dense_mean"] for o in opts], 0.4, label="dense")
  ax.bar(x + 0.2, [o["logp_pruned_mean"] for o in opts], 0.4, label="pruned")
  ax.set_xticks(x, [o["option"] for o in opts])
  ax.set_ylabel("mean log p of the letter (whole vocabulary)")
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(f"{name}\nglobal top-1 flips on {s['global_top1_flip_rate']:.0%} of items, the "
               f"option argmax changes on {1 - s['option_argmax_survival_rate']:.0%}", fontsize=9)
  return _save(fig, out, name)
