"""The figures of `study.beyond` (matplotlib, Agg backend), drawn from its results dict.

  ranking.png     per dropped kind: generative and non-generative fidelity (top) and next-token /
                  drift KL (bottom, log scale) against the number dropped, cosine ranking dashed,
                  KL ranking solid
  allocation.png  per Wanda point, the three allocations side by side (fidelity, next-token KL),
                  and the per-layer sparsities of OWL and the KL allocation
  recovery.png    the training loss of every recovered model, and its fidelity before vs after
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

from prunerep_jax.study import beyond_report as br  # noqa: E402
from prunerep_jax.study import figures, report  # noqa: E402

STYLE = {"cosine": "--", "kl": "-"}
ALLOC_COLORS = {"uniform": "tab:gray", "owl": "tab:purple", "kl": "tab:green"}
KIND_TITLES = {"drop_attn": "attention sublayers dropped", "drop_mlp": "MLP sublayers dropped"}


def draw_all(results: dict, out: str) -> list[str]:
  """Every figure the results allow; returns their paths relative to `out`."""
  cells = results["cells"]
  paths = []
  if any(c["method"].startswith("drop_") for c in cells):
    paths.append(ranking(results, out))
  if any(c["method"] == "wanda" and not c.get("recovered") for c in cells):
    paths.append(allocation(results, out))
  if any(c.get("recovered") for c in cells):
    paths.append(recovery(results, out))
  return paths


def ranking(results: dict, out: str) -> str:
  dense = report.cell(results, "dense")
  kinds = [k for k in KIND_TITLES if any(c["method"] == k for c in results["cells"])]
  fig, axes = plt.subplots(2, len(kinds), figsize=(5.5 * len(kinds), 7), squeeze=False)
  for j, kind in enumerate(kinds):
    top, bottom = axes[0, j], axes[1, j]
    for choice in ("cosine", "kl"):
      line = [dense] + sorted((c for c in results["cells"] if c["method"] == kind
                               and c["choice"] == choice and not c.get("recovered")),
                              key=lambda c: c["x"])
      xs = [c["x"] for c in line]
      name = "cosine (LLM-Drop)" if choice == "cosine" else "KL (Theorem 3)"
      top.plot(xs, [br.gen_fidelity(c) for c in line], STYLE[choice], marker="o",
               color="tab:red", label=f"generative, {name}")
      top.plot(xs, [br.nongen_fidelity(c) for c in line], STYLE[choice], marker="s",
               color="tab:blue", label=f"non-generative, {name}")
      bottom.plot(xs[1:], [br.next_token_kl(c) for c in line[1:]], STYLE[choice], marker="^",
                  color="tab:gray", label=f"next-token KL, {name}")
      bottom.plot(xs[1:], [br.drift_kl(c) for c in line[1:]], STYLE[choice], marker="o",
                  color="tab:orange", label=f"free-running drift KL, {name}")
    counts = sorted({c["x"] for c in results["cells"] if c["method"] == kind})
    for ax in (top, bottom):
      ax.set_xticks([0.0] + counts if ax is top else counts)
    top.set_ylim(-0.03, 1.03)
    top.set_ylabel("fidelity to the dense model")
    bottom.set_yscale("log")
    bottom.set_ylabel("KL(dense || pruned), nats")
    for ax in (top, bottom):
      ax.set_xlabel(KIND_TITLES[kind])
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
    top.set_title(f"{KIND_TITLES[kind]}: cosine (dashed) vs KL ranking (solid)", fontsize=9)
  fig.suptitle(f"Which sublayers to drop, on {results['model']}", fontsize=10)
  fig.tight_layout()
  return figures._save(fig, out, "ranking")


def allocation(results: dict, out: str) -> str:
  wanda = [c for c in results["cells"] if c["method"] == "wanda" and not c.get("recovered")]
  points = []
  for c in wanda:
    if c["point"] not in points:
      points.append(c["point"])
  fig, (left, mid, right) = plt.subplots(1, 3, figsize=(15, 4))
  metrics = (("gen fid.", br.gen_fidelity), ("non-gen fid.", br.nongen_fidelity),
             ("GSM8K tokens", lambda c: br.value(c, "gsm8k", "token_agreement")))
  groups = [(p, a) for p in points for a in ("uniform", "owl", "kl")
            if any(c["point"] == p and c["choice"] == a for c in wanda)]
  width = 0.8 / max(1, len(groups))
  for i, (p, a) in enumerate(groups):
    c = next(c for c in wanda if c["point"] == p and c["choice"] == a)
    offset = (i - (len(groups) - 1) / 2) * width
    left.bar(np.arange(len(metrics)) + offset, [f(c) or 0.0 for _, f in metrics], width,
             color=ALLOC_COLORS[a], alpha=0.5 + 0.5 * (points.index(p) == 0),
             label=c["label"])
    mid.bar([i], [br.next_token_kl(c) or 0.0], color=ALLOC_COLORS[a],
            alpha=0.5 + 0.5 * (points.index(p) == 0))
  left.set_xticks(np.arange(len(metrics)), [m for m, _ in metrics])
  left.set_ylim(0, 1.05)
  left.set_title("fidelity to the dense model", fontsize=9)
  left.legend(fontsize=7)
  mid.set_xticks(np.arange(len(groups)), [f"{p}\n{a}" for p, a in groups], fontsize=7)
  mid.set_title("next-token KL(dense || pruned), nats (lower is better)", fontsize=9)
  for c in wanda:
    per_layer = c["prune"].get("per_layer")
    if per_layer:
      right.plot(np.arange(len(per_layer)), per_layer, color=ALLOC_COLORS[c["choice"]],
                 marker=".", label=c["label"])
  for p in points:
    if not isinstance(p, str):
      right.axhline(p, color=ALLOC_COLORS["uniform"], linestyle="--", linewidth=1)
  right.set_xlabel("layer")
  right.set_ylabel("sparsity")
  right.set_title("per-layer sparsity (dashed: uniform)", fontsize=9)
  if right.get_legend_handles_labels()[0]:
    right.legend(fontsize=7)
  for ax in (left, mid, right):
    ax.grid(alpha=0.3)
  fig.suptitle(f"Wanda at equal global sparsity: uniform vs OWL vs KL-allocated, on "
               f"{results['model']}", fontsize=10)
  fig.tight_layout()
  return figures._save(fig, out, "allocation")


def recovery(results: dict, out: str) -> str:
  recovered = [c for c in results["cells"] if c.get("recovered")]
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  for c in recovered:
    losses = c["prune"]["recovery"]["losses"]
    left.plot(np.arange(1, len(losses) + 1), losses, label=c["label"])
  left.set_xlabel("step")
  left.set_ylabel("KL(dense || pruned) per token, training batch")
  left.set_yscale("log")
  left.set_title("recovery training loss", fontsize=9)
  left.legend(fontsize=7)
  metrics = (("gen fid.", br.gen_fidelity), ("non-gen fid.", br.nongen_fidelity),
             ("GSM8K tokens", lambda c: br.value(c, "gsm8k", "token_agreement")),
             ("MMLU agree", lambda c: br.value(c, "mmlu", "agreement")))
  bars = []
  for c in recovered:
    before = br._find(results, c["method"], c["point"], c["choice"])
    if before is not None:
      bars += [(before, "before"), (c, "after")]
  width = 0.8 / max(1, len(bars))
  for i, (c, when) in enumerate(bars):
    right.bar(np.arange(len(metrics)) + (i - (len(bars) - 1) / 2) * width,
              [f(c) or 0.0 for _, f in metrics], width, hatch="" if when == "after" else "//",
              color=f"C{i // 2}", alpha=1.0 if when == "after" else 0.45,
              label=f"{c['label'].removesuffix(' (recovered)')}: {when}")
  right.set_xticks(np.arange(len(metrics)), [m for m, _ in metrics])
  right.set_ylim(0, 1.05)
  right.set_title("fidelity before (hatched) and after recovery", fontsize=9)
  right.legend(fontsize=7)
  for ax in (left, right):
    ax.grid(alpha=0.3)
  fig.suptitle(f"Recovery by distillation to the dense model, on {results['model']}",
               fontsize=10)
  fig.tight_layout()
  return figures._save(fig, out, "recovery")
