"""Figures of the analyses, drawn from the files `Result.save` writes and from nothing else.

  layerwise(directory, name)        per layer, attention and MLP pruned alone: cos and 1 - cos in
                                    h, z and p (mean, min..max bar over positions), KL and
                                    its estimate, lens top-1 survival, parallel vs orthogonal change
  drift(directory, name)            per decoding step, free-running vs teacher-forced: cos in h, z,
                                    p, KL, 1 - cos p with its estimate, token agreement (mean over
                                    prompts, min..max band)
  theorem(directory, name)          second-order estimate vs exact value (log-log scatter, y = x)
                                    for KL and 1 - cos p, and estimate / real by size of dz
  option_subspace(directory, name)  one item's option log-likelihoods and both models' top tokens,
                                    then over all items: mean option log-likelihoods, flip and
                                    survival rates, global vs option-subspace KL
  plot_all(directory)               every figure for every result saved in `directory`

Each function reads NAME.json / NAME.npz with `Result.load`, writes a PNG atomically (default
DIRECTORY/NAME.png) and returns its path. Figures are built with matplotlib's object API on an Agg
canvas: no pyplot, no backend switch and no rcParams change, so importing this module leaves the
caller's matplotlib state alone and it works with no display.
"""

from __future__ import annotations

import io
import json
import os
import textwrap
from typing import Any, Callable, Optional

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from prunerep_jax import atomic, validate
from prunerep_jax.analysis.results import Result

DPI = 100
_TINY = 1e-12  # values at or below this cannot sit on a log axis (exact zeros: unchanged)
SUBLAYER_COLORS = {"attn": "tab:blue", "mlp": "tab:orange", "all": "tab:gray"}
TRACK_COLORS = {"free": "tab:red", "teacher": "tab:green"}
MODEL_COLORS = {"dense": "tab:gray", "pruned": "tab:purple"}
SPACES = (("h", "hidden state h"), ("z", "logits z"), ("p", "probabilities p"))
OFFSETS = {"attn": -0.12, "mlp": 0.12}  # attention and MLP of one layer side by side


# ----------------------------------------------------------------------------- files

def _load(fn: str, directory: Any, name: Any, kinds: tuple[str, ...]) -> Result:
  """The saved result NAME in `directory`, checked to be one of `kinds`."""
  if not isinstance(directory, (str, os.PathLike)) or not os.path.isdir(directory):
    raise validate.fail(fn, "directory", directory, "an existing directory holding saved "
                        "results", error=FileNotFoundError)
  if not isinstance(name, str) or not name:
    raise validate.fail(fn, "name", name, "the name a result was saved under (NAME.json)",
                        error=TypeError)
  for ext in ("json", "npz"):
    path = os.path.join(directory, f"{name}.{ext}")
    if not os.path.isfile(path):
      raise validate.fail(fn, "name", name, f"a result saved in {os.fspath(directory)} "
                          f"({name}.json and {name}.npz); {path} does not exist",
                          error=FileNotFoundError)
  result = Result.load(os.fspath(directory), name)
  if result.kind not in kinds:
    raise validate.fail(fn, "name", name, f"a saved {' or '.join(kinds)} result; "
                        f"{name}.json holds a {result.kind!r} result")
  return result


def _save(fn: str, fig: Figure, directory: Any, name: str, out_png: Optional[str],
          overwrite: bool) -> str:
  path = os.path.join(os.fspath(directory), f"{name}.png") if out_png is None else out_png
  buf = io.BytesIO()
  FigureCanvasAgg(fig).print_png(buf)
  return atomic.write_bytes(path, buf.getvalue(), overwrite=overwrite, caller=fn, name="out_png")


def _figure(rows: int, cols: int, width: float, height: float, *, wspace: float = 0.22):
  """A figure with a grid of axes and fixed margins (a layout engine would triple the drawing
  time for the same result at these fixed sizes); `_title` sets the top margin."""
  fig = Figure(figsize=(width, height), dpi=DPI)
  fig.subplots_adjust(left=0.06, right=0.985, bottom=0.06, wspace=wspace, hspace=0.38)
  return fig, fig.subplots(rows, cols, squeeze=False)


def _title(fig: Figure, first: str, *details: str) -> None:
  """The figure's title: `first`, then the non-empty details wrapped to the figure's width, with
  the top margin sized to the lines."""
  width = int(fig.get_figwidth() * 11)  # characters of an 11 pt line across the figure
  lines = [first] + textwrap.wrap("; ".join(d for d in details if d), width)
  fig.suptitle("\n".join(lines), fontsize=11, y=1 - 0.12 / fig.get_figheight())
  fig.subplots_adjust(top=1 - (0.45 + 0.22 * len(lines)) / fig.get_figheight())


def _describe(meta: dict) -> str:
  """One line naming the model and the pruning, from a result's metadata."""
  parts = []
  if meta.get("model"):
    parts.append(str(meta["model"]))
  pruned = meta.get("pruned") or {}
  if pruned:
    method = str(pruned.get("method", "pruned"))
    keys = [k for k in ("kind", "n", "sparsity", "pattern") if pruned.get(k) is not None]
    text = method + "".join(f" {k}={pruned[k]}" for k in keys)
    dropped = pruned.get("dropped") or []
    if dropped:
      shown = ", ".join(f"{d['sublayer']} {d['layer']}" for d in dropped[:8])
      text += f" (dropped {shown}{', ...' if len(dropped) > 8 else ''})"
    parts.append(text)
  return "; ".join(parts)


def _positive(x: np.ndarray) -> np.ndarray:
  """x with values that a log axis cannot show (<= _TINY, non-finite) as NaN."""
  x = np.asarray(x, np.float64)
  return np.where(np.isfinite(x) & (x > _TINY), x, np.nan)


def _log_floor(mean, lo, hi) -> tuple[np.ndarray, ...]:
  """mean, lo, hi for a log axis: values <= _TINY are dropped, except a minimum at or below
  _TINY (cos = 1 to float32 precision at some position) whose range has a drawable mean or
  maximum: it is drawn down to _TINY, so the range is not cut at the mean."""
  mean, lo_pos, hi = _positive(mean), _positive(lo), _positive(hi)
  tiny_lo = np.isfinite(np.asarray(lo, np.float64)) & np.isnan(lo_pos) & np.isfinite(hi)
  return mean, np.where(tiny_lo, _TINY, lo_pos), hi


def _band(ax, x, mean, lo, hi, *, color: str, label: str, log: bool = False,
          linestyle: str = "-", marker: Optional[str] = "o") -> None:
  """A mean line with a shaded lo..hi band."""
  if log:
    mean, lo, hi = _log_floor(mean, lo, hi)
  ax.fill_between(x, lo, hi, color=color, alpha=0.18, linewidth=0)
  ax.plot(x, mean, color=color, linestyle=linestyle, marker=marker, markersize=3, label=label)
  if log and np.isfinite(mean).any():
    ax.set_yscale("log")


def _whiskers(ax, x, mean, lo, hi, *, color: str, label: str, log: bool = False,
              offset: float = 0.0) -> None:
  """Per-layer means joined by a line, each with a vertical min..max bar (a shaded band would
  interpolate between neighbouring layers, which are separate measurements)."""
  if log:
    mean, lo, hi = _log_floor(mean, lo, hi)
  x = np.asarray(x, np.float64) + offset
  ax.plot(x, mean, color=color, marker="o", markersize=3.5, linewidth=1.2, label=label)
  ok = np.isfinite(lo) & np.isfinite(hi)
  ax.vlines(x[ok], lo[ok], hi[ok], color=color, alpha=0.45, linewidth=2)
  if log and np.isfinite(mean).any():
    ax.set_yscale("log")


def _token_label(text: Any) -> str:
  """A token's text made safe to draw: quoted, cut to 14 characters, control and non-Latin
  characters escaped (the default font has no glyphs for most scripts)."""
  text = str(text)
  text = text if len(text) <= 14 else text[:13] + "~"
  safe = "".join(c if (c.isprintable() and ord(c) < 0x250) else c.encode(
      "unicode_escape").decode("ascii") for c in text)
  return f"'{safe}'"


# ----------------------------------------------------------------------------- layerwise

def layerwise(directory: str, name: str = "layerwise", out_png: Optional[str] = None, *,
              overwrite: bool = True) -> str:
  """The layerwise hierarchy figure of a saved `analysis.layerwise` result.

  Rows: cos in h, z, p; 1 - cos on a log scale (cosines near 1 are unreadable otherwise; exact
  zeros, i.e. sublayers the pruning left unchanged, are not drawn); KL(p || p') with its Theorem 3
  estimate, the lens top-1 survival, and the parallel / orthogonal parts of the change in h. Each
  point is the mean over the analysed positions with a min..max bar; attention and MLP side by
  side. On log axes a minimum at or below 1e-12 (1 - cos = 0 to float32 precision at some
  position) is drawn down to 1e-12.

  Returns:
    The path of the PNG written (default DIRECTORY/NAME.png).
  """
  fn = "plots.layerwise"
  result = _load(fn, directory, name, ("layerwise",))
  meta = result.meta
  L = int(meta["num_layers"])
  stats: dict = {}
  for rec in result.table("summary"):
    stats.setdefault((rec["metric"], rec["sublayer"]), {})[rec["layer"]] = rec

  def curve(metric: str, sub: str, field: str) -> np.ndarray:
    recs = stats.get((metric, sub), {})
    return np.asarray([np.nan if recs.get(l, {}).get(field) is None else recs[l][field]
                       for l in range(L)], np.float64)

  layers = np.arange(L)
  fig, axes = _figure(3, 3, 15, 11.5)
  unchanged = 0
  for col, (space, title) in enumerate(SPACES):
    for sub in ("attn", "mlp"):
      c = SUBLAYER_COLORS[sub]
      off = OFFSETS[sub]
      _whiskers(axes[0, col], layers, curve(f"cos_{space}", sub, "mean"),
                curve(f"cos_{space}", sub, "min"), curve(f"cos_{space}", sub, "max"), color=c,
                label=sub, offset=off)
      one_minus = [curve(f"one_minus_cos_{space}", sub, f) for f in ("mean", "min", "max")]
      unchanged += int(np.sum(one_minus[2] == 0)) if space == "h" else 0
      _whiskers(axes[1, col], layers, *one_minus, color=c, label=sub, log=True, offset=off)
    axes[0, col].set_title(f"cos({title}): mean, bar min..max")
    axes[1, col].set_title(f"1 - cos({title})")
  for sub in ("attn", "mlp"):
    c = SUBLAYER_COLORS[sub]
    off = OFFSETS[sub]
    _whiskers(axes[2, 0], layers, curve("kl", sub, "mean"), curve("kl", sub, "min"),
              curve("kl", sub, "max"), color=c, label=f"{sub} KL", log=True, offset=off)
    axes[2, 0].plot(layers + off, _positive(curve("kl_estimate", sub, "mean")), color=c,
                    linestyle="none", marker="x", markersize=6, label=f"{sub} estimate")
    axes[2, 1].plot(layers, curve("top1_agree", sub, "mean"), color=c, marker="o",
                    markersize=3.5, label=sub)
    for metric, style, mark in (("par_h", "-", "o"), ("perp_h", ":", "s")):
      axes[2, 2].plot(layers, _positive(curve(metric, sub, "mean")), color=c, linestyle=style,
                      marker=mark, markersize=3.5,
                      label=f"{sub} {'|d_par|' if metric == 'par_h' else '|d_perp|'} / |x|")
  if np.isfinite(_positive(np.concatenate([curve(m, s, "mean") for m in ("par_h", "perp_h")
                                           for s in ("attn", "mlp")]))).any():
    axes[2, 2].set_yscale("log")
  axes[2, 0].set_title("KL(p || p'); x: estimate Var_p(dz)/2T^2")
  axes[2, 1].set_title("lens top-1 token kept (fraction of positions)")
  axes[2, 1].set_ylim(-0.03, 1.03)
  axes[2, 2].set_title("change of h: parallel / orthogonal part")
  for ax in axes.flat:
    ax.set_xlabel("layer")
    ax.set_xlim(-0.6, L - 0.4)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
  where = (f"{meta['decode_steps']} decoding steps" if meta.get("decode_steps")
           else "prompt positions")
  note = f"; {unchanged} sublayers unchanged (1 - cos = 0, not drawn)" if unchanged else ""
  _title(fig, "Layerwise counterfactual: one sublayer pruned at a time in the dense context",
         _describe(meta), f"lens={meta['lens']}, T={meta['temperature']}, {where}, "
         f"{meta['batch']} prompts{note}")
  return _save(fn, fig, directory, name, out_png, overwrite)


# ----------------------------------------------------------------------------- drift

def _per_step(values: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, ...]:
  """Mean, min and max over prompts of [B, S] values at each step, over valid entries only."""
  v = np.where(valid & np.isfinite(values), values.astype(np.float64), np.nan)
  any_valid = np.isfinite(v).any(axis=0)
  safe = np.where(any_valid[None], v, 0.0)
  with np.errstate(invalid="ignore"):
    out = [np.nanmean(safe, 0), np.nanmin(safe, 0), np.nanmax(safe, 0)]
  return tuple(np.where(any_valid, o, np.nan) for o in out)


def drift(directory: str, name: str = "drift", out_png: Optional[str] = None, *,
          overwrite: bool = True) -> str:
  """The step-wise drift figure of a saved `analysis.drift` result.

  Free-running (each model feeds back its own tokens) vs teacher-forced (the pruned model fed the
  dense tokens): per step, the mean over the prompts still running with its min..max band of cos
  in h, z, p, of KL and of 1 - cos p (its Theorem 2 estimate dashed), and the fraction of prompts
  whose two tokens agree (free running: also the fraction not yet diverged).

  Returns:
    The path of the PNG written (default DIRECTORY/NAME.png).
  """
  fn = "plots.drift"
  result = _load(fn, directory, name, ("drift",))
  a, meta = result.arrays, result.meta
  tracks = [t for t in ("free", "teacher") if f"{t}/kl" in a]
  fig, axes = _figure(2, 3, 15, 8.5)
  panels = [(axes[0, 0], "cos_h", "cos(final hidden state h)", False),
            (axes[0, 1], "cos_z", "cos(logits z)", False),
            (axes[0, 2], "cos_p", f"cos(p), T_a={meta.get('analysis_temperature')}", False),
            (axes[1, 0], "kl", "KL(p_dense || p_pruned)", True),
            (axes[1, 1], "one_minus_cos_p", "1 - cos(p) (estimate dashed)", True)]
  steps = None
  for t in tracks:
    valid = np.asarray(a[f"{t}/valid"], bool)
    steps = np.arange(valid.shape[1])
    c = TRACK_COLORS[t]
    for ax, metric, _, log in panels:
      _band(ax, steps, *_per_step(np.asarray(a[f"{t}/{metric}"]), valid), color=c, label=t,
            log=log, marker=None)
    est = _per_step(np.asarray(a[f"{t}/cos_p_estimate"]), valid)[0]
    axes[1, 1].plot(steps, _positive(est), color=c, linestyle="--", label=f"{t} estimate")
    agree = _per_step(np.asarray(a[f"{t}/agree"]), valid)[0]
    axes[1, 2].plot(steps, agree, color=c, label=f"{t}: tokens agree")
    if t == "free":
      first = np.asarray([r["first_divergence"] for r in result.table("prompts")
                          if r["track"] == "free"])
      if first.size:
        axes[1, 2].plot(steps, (first[:, None] > steps[None]).mean(0), color=c, linestyle=":",
                        label="free: not yet diverged")
  for ax, _, title, _ in panels:
    ax.set_title(title)
  axes[1, 2].set_title("token agreement (fraction of prompts)")
  axes[1, 2].set_ylim(-0.03, 1.03)
  for ax in axes.flat:
    ax.set_xlabel("decoding step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
  sampling = "greedy" if not meta.get("temperature") else f"T={meta['temperature']}"
  _title(fig, "Drift in generation, dense vs pruned, free-running vs teacher-forced",
         _describe(meta), f"{meta.get('prompts')} prompts, {meta.get('steps')} steps, "
         f"{sampling}", "mean over running prompts, band min..max")
  return _save(fn, fig, directory, name, out_png, overwrite)


# ----------------------------------------------------------------------------- theorem check

def theorem(directory: str, name: str = "theorem_check", out_png: Optional[str] = None, *,
            overwrite: bool = True) -> str:
  """Estimate vs real of a saved `analysis.theorem_check` result.

  Top: log-log scatter of the second-order estimate against the exact value, for KL (Theorem 3)
  and 1 - cos p (Theorem 2), one colour per group (attention / MLP sublayers, or free /
  teacher-forced tracks), with y = x. Bottom: the ratio estimate / real against the RMS of dz,
  each pair as a dot and the median per decade of RMS dz as a line: where the line leaves 1, the
  expansion breaks down.

  Returns:
    The path of the PNG written (default DIRECTORY/NAME.png).
  """
  fn = "plots.theorem"
  result = _load(fn, directory, name, ("theorem_check",))
  a = result.arrays
  groups = sorted({k.split("/")[0] for k in a})
  if len(groups) > 1 and "all" in groups:
    groups.remove("all")  # the union of the others, drawn twice otherwise
  rows = result.table("summary")
  fig, axes = _figure(2, 2, 12.5, 10)
  for col, (quantity, title) in enumerate((("kl", "KL(p || p')"),
                                           ("one_minus_cos_p", "1 - cos(p, p')"))):
    scatter, ratio = axes[0, col], axes[1, col]
    lo, hi = np.inf, -np.inf
    for g in groups:
      c = SUBLAYER_COLORS.get(g) or TRACK_COLORS.get(g, "tab:gray")
      real = _positive(a[f"{g}/{quantity}/real"])
      est = _positive(a[f"{g}/{quantity}/estimate"])
      size = _positive(a[f"{g}/{quantity}/rms_dz"])
      ok = np.isfinite(real) & np.isfinite(est)
      if not ok.any():  # e.g. MLP sublayers a drop of attention sublayers left unchanged
        continue
      stat = next((r for r in rows if r["group"] == g and r["quantity"] == quantity), {})
      label = (f"{g}: r(log) {_fmt(stat.get('pearson_log'))}, median ratio "
               f"{_fmt(stat.get('ratio_median'))}, {int(ok.sum())} pairs > 1e-12")
      few = ok.sum() < 300  # few points: bigger and darker, many: small and light
      scatter.scatter(real[ok], est[ok], s=14 if few else 5, alpha=0.7 if few else 0.3, color=c,
                      label=label, linewidths=0)
      if ok.any():
        lo, hi = min(lo, real[ok].min(), est[ok].min()), max(hi, real[ok].max(), est[ok].max())
      ok_r = ok & np.isfinite(size)
      ratio.scatter(size[ok_r], est[ok_r] / real[ok_r], s=10 if few else 4,
                    alpha=0.5 if few else 0.2, color=c, linewidths=0)
      bins = sorted((r for r in rows if r["group"] == g and r["quantity"] == f"{quantity}@rms_dz"
                     and r.get("ratio_median") is not None), key=lambda r: r["rms_dz_from"])
      if bins:
        ratio.plot([np.sqrt(r["rms_dz_from"] * r["rms_dz_to"]) for r in bins],
                   [r["ratio_median"] for r in bins], color=c, marker="o",
                   label=f"{g}: median per decade")
    if np.isfinite(lo):
      scatter.plot([lo, hi], [lo, hi], color="k", linewidth=1, label="y = x")
      scatter.set_xscale("log")
      scatter.set_yscale("log")
      ratio.set_xscale("log")
      ratio.set_yscale("log")
    else:
      scatter.text(0.5, 0.5, "no pair above 1e-12", ha="center", transform=scatter.transAxes)
    ratio.axhline(1.0, color="k", linewidth=1)
    scatter.set_title(f"{title}: second-order estimate vs exact")
    scatter.set_xlabel("exact")
    scatter.set_ylabel("estimate")
    ratio.set_title(f"{title}: estimate / exact by size of the change")
    ratio.set_xlabel("RMS of dz over the vocabulary")
    ratio.set_ylabel("estimate / exact")
  for ax in axes.flat:
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  source = result.meta.get("source", "?")
  sm = result.meta.get("source_meta") or {}
  if source == "layerwise":
    where = (f"lens={sm.get('lens')}, T={sm.get('temperature')}, "
             + (f"{sm['decode_steps']} decoding steps" if sm.get("decode_steps")
                else "prompt positions"))
  else:
    where = f"{sm.get('steps')} steps, T_a={sm.get('analysis_temperature')}"
  _title(fig, f"Theorem check on a {source} result: KL ~ Var_p(dz)/2T^2, "
         "1 - cos p ~ Var_r(dz)/2T^2", _describe(sm), where)
  return _save(fn, fig, directory, name, out_png, overwrite)


def _fmt(x: Any) -> str:
  return "n/a" if x is None else f"{x:.3g}"


# ----------------------------------------------------------------------------- option subspace

def default_item(result: Result) -> int:
  """The item the option-subspace figure shows by default: the first whose global top-1 token
  flips while the argmax over the options survives (the paper's case), else the first whose
  global top-1 flips, else item 0."""
  items = result.table("items")
  for test in (lambda r: r["global_flip"] and r["option_survives"], lambda r: r["global_flip"]):
    hit = next((r["item"] for r in items if test(r)), None)
    if hit is not None:
      return int(hit)
  return 0


def option_subspace(directory: str, name: str = "option_subspace",
                    out_png: Optional[str] = None, *, item: Optional[int] = None,
                    overwrite: bool = True) -> str:
  """The option-subspace figure of a saved `analysis.option_subspace` result.

  Top, for one item: the log-likelihood of each option under both models, and each model's top
  tokens with their probabilities. Bottom, over all items: each option's mean log-likelihood
  (with how often it is chosen), the global top-1 flip rate next to the option-argmax survival
  rate (and accuracies when the answers are known), and global vs option-subspace KL per item.

  Args:
    item: index of the item shown on top (default: `default_item`).

  Returns:
    The path of the PNG written (default DIRECTORY/NAME.png).
  """
  fn = "plots.option_subspace"
  result = _load(fn, directory, name, ("option_subspace",))
  a, meta = result.arrays, result.meta
  labels = list(meta["labels"])
  B = int(np.asarray(a["kl"]).shape[0])
  item = default_item(result) if item is None else validate.integer(
      fn, "item", item, minimum=0, maximum=B - 1, expected=f"an item index in [0, {B})")
  rec = result.table("items")[item]
  fig, axes = _figure(2, 3, 16, 9.5)
  K, x, w = len(labels), np.arange(len(labels)), 0.38

  ax = axes[0, 0]
  for off, model in ((-w / 2, "dense"), (w / 2, "pruned")):
    ax.bar(x + off, a[f"option_logp_{model}"][item], w, color=MODEL_COLORS[model], label=model)
  ax.set_xticks(x, labels)
  title = (f"item {item}: option log p (dense picks {rec['option_dense']}, pruned "
           f"{rec['option_pruned']}")
  if "answer" in rec:
    title += f", answer {rec['answer']}"
  ax.set_title(title + ")")
  ax.set_ylabel("log p (whole vocabulary)")
  for col, model in ((1, "dense"), (2, "pruned")):
    ax = axes[0, col]
    names = rec.get(f"top_{model}") or [str(int(t)) for t in a[f"top_ids_{model}"][item]]
    probs = np.exp(np.asarray(a[f"top_logp_{model}"][item], np.float64))
    y = np.arange(len(probs))[::-1]
    ax.barh(y, probs, color=MODEL_COLORS[model])
    ax.set_yticks(y, [_token_label(n) for n in names])
    ax.set_xlabel("p")
    flip = "flips" if rec["global_flip"] else "unchanged"
    ax.set_title(f"item {item}: {model} top tokens (global top-1 {flip})")

  ax = axes[1, 0]
  options = result.table("options")
  for off, model in ((-w / 2, "dense"), (w / 2, "pruned")):
    vals = [o[f"logp_{model}_mean"] for o in options]
    bars = ax.bar(x + off, vals, w, color=MODEL_COLORS[model], label=model)
    for bar, o in zip(bars, options):
      ax.annotate(f"{100 * o[f'chosen_{model}']:.0f}%", (bar.get_x() + bar.get_width() / 2,
                  bar.get_height()), ha="center", va="top", fontsize=7, xytext=(0, -2),
                  textcoords="offset points")
  ax.set_xticks(x, labels)
  ax.set_ylabel("mean log p over items")
  ax.set_title(f"{B} items: mean option log p (label: how often chosen)")

  ax = axes[1, 1]
  s = meta["summary"]
  rates = [("top-1\nflips", s.get("global_top1_flip_rate")),
           ("option\nsurvives", s.get("option_argmax_survival_rate")),
           ("survives\nif flips", s.get("option_survival_when_global_flips"))]
  if "accuracy_dense" in s:
    rates += [("accuracy\ndense", s["accuracy_dense"]), ("accuracy\npruned", s["accuracy_pruned"])]
  vals = [np.nan if v is None else v for _, v in rates]
  bars = ax.bar(np.arange(len(rates)), vals, color=["tab:red", "tab:green", "tab:olive",
                                                    "tab:gray", "tab:purple"][:len(rates)])
  for bar, v in zip(bars, vals):
    ax.annotate("n/a" if np.isnan(v) else f"{v:.2f}", (bar.get_x() + bar.get_width() / 2,
                0 if np.isnan(v) else v), ha="center", va="bottom", fontsize=8)
  ax.set_xticks(np.arange(len(rates)), [r for r, _ in rates], fontsize=8)
  ax.set_ylim(0, 1.08)
  ax.set_title(f"rates over {B} items")

  ax = axes[1, 2]
  g, sub = _positive(a["kl"]), _positive(a["subset_kl"])
  ok = np.isfinite(g) & np.isfinite(sub)
  ax.scatter(g[ok], sub[ok], s=12, alpha=0.6, color="tab:purple", linewidths=0)
  if ok.any():
    lo, hi = min(g[ok].min(), sub[ok].min()), max(g[ok].max(), sub[ok].max())
    ax.plot([lo, hi], [lo, hi], color="k", linewidth=1, label="y = x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
  ax.set_xlabel("KL over the whole vocabulary")
  ax.set_ylabel(f"KL inside the {K} options")
  ax.set_title("per item: global vs option-subspace KL")
  for ax in axes.flat:
    ax.grid(True, alpha=0.3)
  axes[0, 0].legend(fontsize=8)
  axes[1, 0].legend(fontsize=8)
  _title(fig, f"Option subspace: {B} multiple-choice items, T={s.get('temperature')}",
         _describe(meta))
  return _save(fn, fig, directory, name, out_png, overwrite)


# ----------------------------------------------------------------------------- every figure

FIGURES: dict[str, Callable[..., str]] = {
    "layerwise": layerwise,
    "drift": drift,
    "theorem_check": theorem,
    "option_subspace": option_subspace,
}


def saved_results(directory: str) -> list[tuple[str, str]]:
  """(name, kind) of every result saved in `directory` (NAME.json with a known kind next to
  NAME.npz), sorted by name; other JSON files (a launcher's run.json, ...) are skipped."""
  found = []
  for entry in sorted(os.listdir(directory)):
    name, ext = os.path.splitext(entry)
    if ext != ".json" or not os.path.isfile(os.path.join(directory, f"{name}.npz")):
      continue
    try:
      with open(os.path.join(directory, entry), encoding="utf-8") as f:
        kind = json.load(f).get("kind")
    except (OSError, ValueError, AttributeError):
      continue
    if kind in FIGURES:
      found.append((name, kind))
  return found


def plot_all(directory: str, *, overwrite: bool = True) -> list[str]:
  """Draws the figure of every result saved in `directory` as DIRECTORY/NAME.png.

  Returns:
    The PNG paths, in the order of the result names.
  """
  fn = "plots.plot_all"
  if not isinstance(directory, (str, os.PathLike)) or not os.path.isdir(directory):
    raise validate.fail(fn, "directory", directory, "an existing directory holding saved results",
                        error=FileNotFoundError)
  return [FIGURES[kind](directory, name, overwrite=overwrite)
          for name, kind in saved_results(os.fspath(directory))]
