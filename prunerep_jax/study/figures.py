"""The study's figures (matplotlib, Agg backend: no display needed).

  sweep-<drop method>.png      the paper's "performance vs dropped layers": fidelity to the dense
                               model per task (non-generative solid, generative dashed) and the
                               task scores, against the number of sublayers (blocks) dropped
  sweep-<sparsity method>.png  the paper's Wanda sparsity figure, the same panels against sparsity
                               (N:M patterns as separate markers at their sparsity)
  main-table.png               the paper's Table 1: dense vs drop-4/8 attention and MLP
  <analysis>.png               every analysis saved under analyses/ (layerwise, drift, theorem
                               checks, option subspace), drawn by `prunerep_jax.plots` from its
                               Result files

The sweeps and the main table are drawn from the results dict; the analyses from their files.
"""

from __future__ import annotations

import io
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib import ticker  # noqa: E402
import numpy as np  # noqa: E402

from prunerep_jax import atomic, plots  # noqa: E402
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
  analyses_dir = os.path.join(out, "analyses")
  if os.path.isdir(analyses_dir):
    for name, kind in plots.saved_results(analyses_dir):
      png = os.path.join(out, "figures", f"{name}.png")
      plots.FIGURES[kind](analyses_dir, name, png, overwrite=True)
      paths.append(os.path.relpath(png, out))
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
