"""The reproduction study end to end: workload, dense evaluation, every cell of the grid, the
analyses at the chosen settings, then results, figures and the report in one output directory.

  <out>/results.json    everything: settings, workload, every cell's metrics, analysis summaries,
                        the claims, run times
  <out>/results.csv     one row per cell (flattened metrics)
  <out>/main_table.csv  the paper's Table 1 layout: dense vs drop-4/8 attention and MLP
  <out>/report.md       the claims of the paper, what we measured, whether they held
  <out>/figures/*.png   sweeps, main table, analyses
  <out>/analyses/       the analyses' Result files (json / csv / npz)
  <out>/cells/          the cache: one file per finished unit of work (see `cells`)

Resuming: every unit of work is looked up in the cache first, so rerunning the same command after
an interruption recomputes only what did not finish; a unit whose settings changed is recomputed.
The dense evaluation is computed once per run and every pruned model is compared with it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import time
from typing import Any, Optional

import jax.numpy as jnp

from prunerep_jax import atomic, validate
from prunerep_jax.model import cast
from prunerep_jax.study import analyses, cells, figures, grid, report, suites
from prunerep_jax.study.console import Console, Eta, Progress, clock

CALLER = "prunerep_jax.study"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Relative cost of a unit of work, for the ETA before a unit of that kind has finished (one
# evaluation of every suite = 1; pruning adds the method's own time).
WEIGHTS = {"cell:dense": 1.3, "cell:drop_attn": 1.0, "cell:drop_mlp": 1.0, "cell:drop_block": 1.0,
           "cell:magnitude": 2.0, "cell:wanda": 2.5, "cell:sparsegpt": 6.0, "analysis": 0.6,
           "scores": 0.2}
PRIOR_S = 25.0


@dataclasses.dataclass(frozen=True)
class Options:
  """Settings of a run besides the profile.

  Attributes:
    model_id: what the model was loaded from (recorded and part of every fingerprint).
    dtype: "float32" or "bfloat16": the dtype every model is evaluated in (pruning itself runs
      on the loaded params).
    batch_size: prompts per forward pass (MMLU, retrieval, perplexity, option subspace).
    gen_batch_size: prompts per generation batch (GSM8K, HumanEval).
    execute: run HumanEval completions in the sandbox for pass@1.
    sources: the data (see `suites.Sources`).
    seed: the workload's subsampling and calibration seed.
    mesh: None or a device mesh (`prunerep_jax.parallel`) everything runs on; results do not
      depend on it (up to float rounding), so it is not part of any fingerprint.
  """

  model_id: str
  dtype: str = "float32"
  batch_size: int = 8
  gen_batch_size: int = 8
  execute: bool = False
  sources: suites.Sources = suites.Sources()
  seed: int = 0
  mesh: Any = None


def run(model, profile: grid.Profile, out: str, options: Options,
        console: Optional[Console] = None, started: Optional[float] = None) -> dict:
  """Runs (or resumes) the study; returns the results dict also written to <out>/results.json.

  Args:
    model: a `prunerep_jax.Model` with a tokenizer that has a chat template.
    profile: the grid and sizes (`grid.PROFILES`).
    out: the output directory (created if missing; the caller checks that it may be written).
    options: see `Options`.
    console: where progress goes (default: stdout); its log, if any, is flushed to
      <out>/reproduce.log after every unit of work.
    started: time.perf_counter() when the caller started (model loading included in the run
      time); default now.
  """
  t_start = time.perf_counter() if started is None else started
  console = console or Console()
  load_before = _loadavg()
  fn = "study.run"
  if not isinstance(profile, grid.Profile):
    raise validate.fail(fn, "profile", profile, "a study Profile (study.profile(name))",
                        error=TypeError)
  if not isinstance(options, Options):
    raise validate.fail(fn, "options", options, "a study Options", error=TypeError)
  validate.choice(fn, "options.dtype", options.dtype, sorted(DTYPES))
  params, config, tokenizer = model.params, model.config, model.tokenizer
  validate.params(fn, params, config)
  if not getattr(tokenizer, "chat_template", None):
    raise validate.fail(fn, "model", model, "a model whose tokenizer has a chat template (the "
                        "MMLU and GSM8K prompts use it)")
  store = cells.Store(out)
  analyses_dir = os.path.join(out, "analyses")

  def flush_log():
    if console.log is not None:
      console.log.flush_to(os.path.join(out, "reproduce.log"))

  todo, skipped = grid.max_points(profile.cells, config.num_layers)
  for cell in skipped:
    console.line(f"skipping {cell.label}: the model has only {config.num_layers} layers")
  plan = dataclasses.replace(profile.analysis,
                             settings=tuple(c for c in profile.analysis.settings if c in todo))
  console.line(f"study '{profile.name}' on {options.model_id} ({config.num_layers} layers, "
               f"{options.dtype}): {len(todo)} models x 5 suites, analyses at "
               f"{', '.join(c.label for c in plan.settings) or 'no setting'}; sized for "
               f"{clock(profile.budget_s)} on 2 CPU cores with the default model")
  console.status("drawing the workload (tokenizing the data)")
  work = suites.build(tokenizer, profile.sizes, profile.calibration, options.sources,
                      options.seed)
  dtype = DTYPES[options.dtype]
  to_eval = (lambda p: p) if options.dtype == "float32" else (lambda p: cast(p, dtype))
  dense_params = to_eval(params)

  base = {"model": options.model_id, "config": repr(config), "dtype": options.dtype,
          "sizes": dataclasses.asdict(profile.sizes), "workload": work.info,
          "batch_size": options.batch_size, "gen_batch_size": options.gen_batch_size,
          "execute": options.execute}
  dense_fp = cells.fingerprint(base)
  calib_fp = {"calibration": work.calibration.info}

  def cell_fp(cell: grid.Cell) -> str:
    extra = calib_fp if grid.needs_calibration(cell) else {}
    return cells.fingerprint({**base, "dense": dense_fp, "cell": cell.id, **extra})

  analysis_names = _analysis_names(plan, todo)
  analysis_fp = {name: cells.fingerprint({**base, "dense": dense_fp, "analysis": name,
                                          "plan": dataclasses.asdict(plan), **calib_fp})
                 for name in analysis_names}
  cached = {c: store.read(c.id, cell_fp(c)) for c in todo}
  cached_analyses = {n: store.read(f"analysis-{n}", fp) for n, fp in analysis_fp.items()}
  eta = Eta(PRIOR_S, WEIGHTS)
  pending = [f"cell:{c.method}" for c in todo if cached[c] is None]
  pending += ["analysis"] * sum(v is None for v in cached_analyses.values())
  total = len(todo) + len(analysis_names)
  tracker = Progress(console, eta, pending, total, t_start, width=26, after=flush_log)
  finished, progress = tracker.finished, tracker.reporter

  # ------------------------------------------------------------------------------- dense
  dense_cell = todo[0]
  if cached[dense_cell] is not None:
    dense = suites.from_json(cached[dense_cell]["evaluation"], store.read_arrays(dense_cell.id))
    finished("cell:dense", dense_cell.label, None)
  else:
    t0 = time.perf_counter()
    dense = suites.evaluate(dense_params, config, tokenizer, work, profile.sizes,
                            batch_size=options.batch_size, gen_batch_size=options.gen_batch_size,
                            execute=options.execute, progress=progress(dense_cell.label),
                            mesh=options.mesh)
    record, arrays = suites.to_json(dense)
    cached[dense_cell] = {"evaluation": suites.jsonable(record),
                          **_cell_record(dense_cell, dense, {"time_s": 0.0})}
    store.write(dense_cell.id, cell_fp(dense_cell), cached[dense_cell], arrays)
    finished("cell:dense", dense_cell.label, time.perf_counter() - t0, _headline(dense.metrics))

  # ------------------------------------------------------------------------ drop scores
  orders = {}

  def order_of(method: str) -> dict:
    if method not in orders:
      n_max = max(grid.drop_points(todo, method))
      fp = cells.fingerprint({**base, **calib_fp, "scores": method, "n_max": n_max})
      orders[method] = store.read(f"scores-{method}", fp)
      if orders[method] is None:
        console.status(f"scoring {method} (one calibration pass)")
        orders[method] = cells.drop_order(method, params, config, work.calibration, n_max,
                                          mesh=options.mesh)
        store.write(f"scores-{method}", fp, orders[method])
    return orders[method]

  # ------------------------------------------------------------------ layerwise of drops
  tokens, mask = analyses.prompts(tokenizer, config, work, plan.prompts)
  summaries = {n: v for n, v in cached_analyses.items() if v is not None}

  def analysis(name: str, compute) -> None:
    if name in summaries:
      finished("analysis", name, None)
      return
    tracker.status(name)
    t0 = time.perf_counter()
    summaries[name] = suites.jsonable(compute())
    summaries[name]["seconds"] = time.perf_counter() - t0
    store.write(f"analysis-{name}", analysis_fp[name], summaries[name])
    finished("analysis", name, summaries[name]["seconds"])

  if any(c.method in grid.DROP_METHODS for c in plan.settings):
    everything = to_eval(analyses.drop_everything(params, config))
    for lens in plan.lenses:
      analysis(f"layerwise-drop-{lens}", lambda lens=lens: analyses.layerwise(
          dense_params, config, tokens, mask, everything, lens, plan.decode_steps, analyses_dir,
          f"layerwise-drop-{lens}", mesh=options.mesh))

  # ------------------------------------------------------------------------------- cells
  for cell in todo[1:]:
    names = [n for n in _setting_analyses(cell, plan) if n not in summaries]
    if cached[cell] is not None and not names:
      finished(f"cell:{cell.method}", cell.label, None)
      for name in _setting_analyses(cell, plan):
        finished("analysis", name, None)
      continue
    t0 = time.perf_counter()
    tracker.status(cell.label, "pruning")
    order = {cell.method: order_of(cell.method)} if cell.method in grid.DROP_METHODS else {}
    pruned = cells.prune_cell(cell, params, config, work.calibration, order, mesh=options.mesh)
    p_params = to_eval(pruned.params)
    if cached[cell] is None:
      evaluation = suites.evaluate(
          p_params, pruned.config, tokenizer, work, profile.sizes, batch_size=options.batch_size,
          gen_batch_size=options.gen_batch_size, execute=options.execute, dense=dense,
          dense_params=dense_params, dense_config=config, progress=progress(cell.label),
          mesh=options.mesh)
      cached[cell] = _cell_record(cell, evaluation, pruned.info)
      store.write(cell.id, cell_fp(cell), cached[cell])
      finished(f"cell:{cell.method}", cell.label, time.perf_counter() - t0,
               _headline(evaluation.metrics))
    else:
      finished(f"cell:{cell.method}", cell.label, None)
    for name in _setting_analyses(cell, plan):
      analysis(name, _setting_analysis(name, cell, dense_params, config, p_params, pruned.config,
                                       tokenizer, work, tokens, mask, plan, options,
                                       analyses_dir))
    del pruned, p_params

  # ----------------------------------------------------------------------------- outputs
  results = {
      "profile": profile.name, "model": options.model_id, "dtype": options.dtype,
      "num_layers": config.num_layers, "sizes": dataclasses.asdict(profile.sizes),
      "calibration": work.calibration.info, "analysis_plan": dataclasses.asdict(plan),
      "analysis_settings": [c.label for c in plan.settings],
      "options": {"batch_size": options.batch_size, "gen_batch_size": options.gen_batch_size,
                  "execute": options.execute, "seed": options.seed,
                  "sources": dataclasses.asdict(options.sources)},
      "workload": work.info,
      "cells": [{k: v for k, v in cached[c].items() if k != "evaluation"} for c in todo],
      "skipped": [c.id for c in skipped],
      "analyses": summaries,
  }
  results["claims"] = report.claims(results)
  results["run"] = {"wall_s": time.perf_counter() - t_start, "cpu_s": _cpu_s(),
                    "compute_s": _compute_s(results), "budget_s": profile.budget_s,
                    "load_average_start": load_before, "load_average_end": _loadavg(),
                    "cpu_count": os.cpu_count()}
  console.status("writing figures and the report")
  figure_files = figures.draw_all(results, out)
  results["figures"] = figure_files
  _write_outputs(results, out)
  console.line("")
  console.line(report.console_summary(results))
  console.line(f"\nwrote {out}/report.md, results.json, results.csv, main_table.csv and "
               f"{len(figure_files)} figures in {clock(results['run']['wall_s'])}")
  flush_log()
  return results


def _compute_s(results: dict) -> float:
  """Seconds every unit took when it was computed (cached ones included): what a run from scratch
  costs besides loading the model and drawing the workload."""
  cells_s = sum(c["prune"].get("time_s", 0.0) + sum(c["timings"].values())
                for c in results["cells"])
  return cells_s + sum(a.get("seconds") or 0.0 for a in results["analyses"].values())


def _cpu_s() -> float:
  """CPU seconds this process has used so far (user + system, every thread): unlike the wall
  time, it does not grow when other processes share the cores."""
  t = os.times()
  return t.user + t.system


def _loadavg() -> Optional[list[float]]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def _cell_record(cell: grid.Cell, evaluation: suites.Evaluation, info: dict) -> dict:
  return {"id": cell.id, "method": cell.method, "point": cell.point, "label": cell.label,
          "x": cell.x, "prune": suites.jsonable(info),
          "metrics": suites.jsonable(evaluation.metrics),
          "timings": suites.jsonable(evaluation.timings),
          "examples": suites.examples(evaluation.raw)}


def _headline(metrics: dict) -> str:
  def f(x):
    return "-" if x is None else f"{x:.2f}"
  return (f"MMLU agree {f(metrics['mmlu']['agreement'])}, retrieval agree "
          f"{f(metrics['retrieval']['top1_agreement'])}, GSM8K tokens "
          f"{f(metrics['gsm8k']['token_agreement'])}, HumanEval tokens "
          f"{f(metrics['humaneval']['token_agreement'])}")


def _setting_analyses(cell: grid.Cell, plan: grid.AnalysisPlan) -> list[str]:
  if cell not in plan.settings:
    return []
  names = []
  if cell.method in grid.SPARSITY_METHODS:
    names += [f"layerwise-{cell.id}-{lens}" for lens in plan.lenses]
  return names + [f"drift-{cell.id}", f"option_subspace-{cell.id}"]


def _analysis_names(plan: grid.AnalysisPlan, todo) -> list[str]:
  names = []
  if any(c.method in grid.DROP_METHODS for c in plan.settings):
    names += [f"layerwise-drop-{lens}" for lens in plan.lenses]
  for cell in todo:
    names += _setting_analyses(cell, plan)
  return names


def _setting_analysis(name, cell, dense_params, config, p_params, p_config, tokenizer, work,
                      tokens, mask, plan, options, directory):
  """The function computing analysis `name` of `cell`'s pruned model."""
  kind = name.split("-", 1)[0]
  if kind == "layerwise":
    lens = name.rsplit("-", 1)[1]
    return lambda: analyses.layerwise(dense_params, config, tokens, mask, p_params, lens,
                                      plan.decode_steps, directory, name, mesh=options.mesh)
  if kind == "drift":
    return lambda: analyses.drift(dense_params, config, p_params, p_config, tokenizer, tokens,
                                  mask, plan.drift_steps, directory, name, mesh=options.mesh)
  return lambda: analyses.option_subspace(dense_params, config, p_params, p_config, tokenizer,
                                          work, options.batch_size, directory, name,
                                          mesh=options.mesh)


def _write_outputs(results: dict, out: str) -> None:
  atomic.write_json(os.path.join(out, "results.json"), suites.jsonable(results), overwrite=True,
                    caller=CALLER, name="out")
  atomic.write_text(os.path.join(out, "results.csv"), _csv(report.cell_rows(results)),
                    overwrite=True, caller=CALLER, name="out")
  atomic.write_text(os.path.join(out, "main_table.csv"), _csv(report.main_table(results)),
                    overwrite=True, caller=CALLER, name="out")
  atomic.write_text(os.path.join(out, "report.md"), report.markdown(results), overwrite=True,
                    caller=CALLER, name="out")


def _csv(rows: list[dict]) -> str:
  buf = io.StringIO()
  if rows:
    fields = list(rows[0])
    for r in rows[1:]:
      fields += [k for k in r if k not in fields]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
  return buf.getvalue()
