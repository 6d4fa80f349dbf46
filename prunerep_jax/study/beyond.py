"""Beyond the paper: does choosing what to prune by its probability-space cost, or recovery
training, keep generation closer to the dense model at equal compression?

Three comparisons, each at the same compression, on the study's workload (`suites`):

  ranking     drop n attention (MLP) sublayers chosen by LLM-Drop's cosine score ("cosine":
              `drop_sublayers(score="residual")`) vs by the cost of removing each alone in
              probability space ("kl": `drop_sublayers(score="kl")`, Theorem 3 through the
              final-norm lens); one scoring per kind and score, cell n takes the first n.
  allocation  Wanda at a global sparsity with every layer at the target ("uniform"), with OWL's
              outlier-weighted per-layer sparsities ("owl") and with the KL-allocated ones ("kl",
              `prune.allocate`); the global sparsity is the same for all three. N:M patterns
              admit no per-layer allocation: they are measured uniform only.
  recovery    a pruned model before and after `pj.recover` (KL to the dense model on Wikipedia
              windows, a CPU-sized budget), its pruning structure kept exactly.

Every model is evaluated on both task kinds (`suites.evaluate`: MMLU agreement, retrieval recall,
perplexity and next-token KL, GSM8K / HumanEval token agreement, exact match, first divergence)
and by free-running drift against the dense model (`analyses.drift`: KL(dense || pruned) per
decoding step, each model on its own greedy tokens), with the seconds pruning and recovery took.
Two drop rankings that choose the same sublayers give the same model: it is evaluated once.

  <out>/results.json   settings, every model's metrics and compute, the verdicts, run times
  <out>/results.csv    one row per model
  <out>/report.md      the verdicts (rules in `beyond_report`), comparison tables, figures
  <out>/figures/*.png  ranking, allocation, recovery
  <out>/analyses/      the drift Result files
  <out>/cells/         the cache (`cells.Store`): an interrupted run resumes
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional, Union

import numpy as np

from prunerep_jax import atomic, prune, validate
from prunerep_jax.model import cast
from prunerep_jax.prune import allocate, calibrate, drop
from prunerep_jax.prune.result import PruneResult
from prunerep_jax.recover import default_optimizer, recover
from prunerep_jax.study import analyses, beyond_figures, beyond_report, cells, grid, suites
from prunerep_jax.study.run import (CALLER, DTYPES, Options, _cpu_s, _csv, _headline,
                                    _loadavg)
from prunerep_jax.study.console import Console, Eta, Progress, clock

DROP_CHOICES = ("cosine", "kl")
ALLOCATIONS = ("uniform", "owl", "kl")
METHODS = ("dense", "drop_attn", "drop_mlp", "wanda")
_DROP_SCORE = {"cosine": "residual", "kl": "kl"}
_CHOICE_NAMES = {"cosine": "cosine ranking", "kl": "KL ranking", "uniform": "uniform",
                 "owl": "OWL", "kl-alloc": "KL-allocated"}
# Relative cost of a model of each kind, for the ETA before one of that kind has finished.
WEIGHTS = {"dense": 1.3, "drop": 1.0, "wanda": 2.5, "recovered": 4.0}
PRIOR_S = 30.0
RUN_LOG = "beyond.log"  # the launcher's log file


@dataclasses.dataclass(frozen=True)
class Variant:
  """One model of the comparison.

  Attributes:
    method: "dense", "drop_attn", "drop_mlp" or "wanda".
    point: None (dense), the number of sublayers dropped, or Wanda's sparsity / "n:m" pattern.
    choice: None (dense); "cosine" or "kl" (which sublayers a drop removes); "uniform", "owl" or
      "kl" (Wanda's per-layer sparsities).
    recovered: after recovery training.
  """

  method: str
  point: grid.Point = None
  choice: Optional[str] = None
  recovered: bool = False

  def __post_init__(self):
    fn = "beyond.Variant"
    validate.choice(fn, "method", self.method, METHODS)
    if self.method == "dense":
      if self.point is not None or self.choice is not None or self.recovered:
        raise validate.fail(fn, "method", self.method, "no point, choice or recovery for dense")
      return
    grid.Cell(self.method, self.point)  # refuses a point the method cannot take
    options = ALLOCATIONS if self.method == "wanda" else DROP_CHOICES
    validate.choice(fn, "choice", self.choice, options)
    if self.method == "wanda" and isinstance(self.point, str) and self.choice != "uniform":
      raise validate.fail(fn, "choice", self.choice, f"'uniform' for the N:M pattern "
                          f"{self.point} (a pattern fixes every layer's sparsity)")

  @property
  def cell(self) -> grid.Cell:
    return grid.Cell(self.method, self.point)

  @property
  def base(self) -> "Variant":
    """The same model before recovery."""
    return dataclasses.replace(self, recovered=False)

  @property
  def id(self) -> str:
    """File-name-safe: "dense", "drop_attn-4-kl", "wanda-0.5-owl", "wanda-0.5-uniform-recovered"."""
    if self.method == "dense":
      return "dense"
    return f"{self.cell.id}-{self.choice}" + ("-recovered" if self.recovered else "")

  @property
  def label(self) -> str:
    """For people: "drop attention 4, KL ranking", "Wanda 50%, OWL (recovered)"."""
    if self.method == "dense":
      return "dense"
    key = "kl-alloc" if self.method == "wanda" and self.choice == "kl" else self.choice
    return f"{self.cell.label}, {_CHOICE_NAMES[key]}" + (" (recovered)" if self.recovered else "")


@dataclasses.dataclass(frozen=True)
class Recovery:
  """The recovery budget: `steps` optimizer steps of `batch_size` windows of `seqlen` tokens,
  drawn from `windows` Wikipedia windows (the training split, not the held-out one), loss
  KL(dense || pruned), AdamW at `learning_rate` on a warmup-cosine schedule; lora_rank None
  trains the kernels themselves."""

  steps: int
  windows: int
  seqlen: int
  batch_size: int = 4
  learning_rate: float = 1e-4
  lora_rank: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Profile:
  """The comparison's size.

  Attributes:
    name, budget_s: the profile's name and the wall time it is sized for on 2 CPU cores with the
      default model.
    drops: (method, counts) pairs: each count dropped by both rankings.
    sparsities: Wanda points; unstructured ones under each of `allocations`, N:M ones uniform.
    recover: the models recovered (each must be one of the others).
    recovery: the recovery budget.
    sizes: evaluation sizes (`grid.EvalSizes`).
    calibration: (nsamples, seqlen) of the calibration windows (drop scores, Wanda, allocation).
    drift_prompts, drift_steps: GSM8K prompts and greedy steps of the drift measurement.
    allocations: the per-layer sparsities compared at every unstructured Wanda point.
    kl_allocation: the KL allocation's settings (calibration windows and grid of its curves).
  """

  name: str
  budget_s: float
  drops: tuple[tuple[str, tuple[int, ...]], ...]
  sparsities: tuple[Union[float, str], ...]
  recover: tuple[Variant, ...]
  recovery: Recovery
  sizes: grid.EvalSizes
  calibration: tuple[int, int]
  drift_prompts: int
  drift_steps: int
  allocations: tuple[str, ...] = ALLOCATIONS
  kl_allocation: allocate.KL = allocate.KL()

  @property
  def variants(self) -> tuple[Variant, ...]:
    """Dense, the drops (each count by both rankings), Wanda, then the recovered models."""
    out = [Variant("dense")]
    for method, counts in self.drops:
      out += [Variant(method, n, c) for n in counts for c in DROP_CHOICES]
    for s in self.sparsities:
      out += [Variant("wanda", s, a) for a in (("uniform",) if isinstance(s, str)
                                               else self.allocations)]
    for v in self.recover:
      if v not in out:
        raise validate.fail(f"beyond.Profile({self.name!r})", "recover", v.id,
                            "models of the profile's own drops or sparsities")
    return tuple(out) + tuple(dataclasses.replace(v, recovered=True) for v in self.recover)


_STUDY_SIZES = dict(  # as in the study's quick and readme profiles
    mmlu_max_tokens=192, passage_tokens=64, ppl_seqlen=128)

PROFILES = {
    # Sized on the 2-core machine under load from other jobs (load average 5-7): an evaluation
    # with drift costs ~30-40 s, KL scoring of a kind ~30 s, Wanda ~45 s; the KL allocation's
    # curves 315 s on 8 windows x 5 grid points and ~120 s on 2 x 3, a recovery step at
    # 4 x 64 tokens ~4 s. Measured: quick 9.5 min at load 6, readme 29.5 min at load 5-10.
    "quick": Profile(
        name="quick", budget_s=300,
        drops=(("drop_attn", (4,)),), sparsities=(0.5,),
        recover=(Variant("drop_attn", 4, "cosine"),),
        recovery=Recovery(steps=20, windows=32, seqlen=64),
        sizes=grid.EvalSizes(mmlu_items=12, retrieval_passages=24, ppl_windows=2, gsm8k_items=6,
                             humaneval_items=4, max_new_tokens=32, **_STUDY_SIZES),
        calibration=(8, 128), drift_prompts=4, drift_steps=24, allocations=("uniform", "kl"),
        kl_allocation=allocate.KL(samples=2, points=3)),
    "readme": Profile(
        name="readme", budget_s=1800,
        drops=(("drop_attn", (2, 4, 6, 8)), ("drop_mlp", (2, 4))), sparsities=(0.5, "2:4"),
        recover=(Variant("drop_attn", 4, "cosine"), Variant("wanda", 0.5, "uniform")),
        recovery=Recovery(steps=60, windows=96, seqlen=64),
        sizes=grid.EvalSizes(mmlu_items=24, retrieval_passages=48, ppl_windows=4, gsm8k_items=8,
                             humaneval_items=8, max_new_tokens=40, **_STUDY_SIZES),
        calibration=(8, 128), drift_prompts=4, drift_steps=32,
        kl_allocation=allocate.KL(samples=4, points=4)),
    "full": Profile(
        name="full", budget_s=5400,
        drops=(("drop_attn", (2, 4, 6, 8, 10, 12)), ("drop_mlp", (2, 4, 6, 8))),
        sparsities=(0.3, 0.5, 0.7, "2:4"),
        recover=(Variant("drop_attn", 4, "cosine"), Variant("drop_attn", 4, "kl"),
                 Variant("wanda", 0.5, "uniform"), Variant("wanda", 0.5, "kl")),
        recovery=Recovery(steps=300, windows=256, seqlen=128),
        sizes=grid.EvalSizes(mmlu_items=48, mmlu_max_tokens=256, retrieval_passages=64,
                             passage_tokens=64, ppl_windows=4, ppl_seqlen=256, gsm8k_items=16,
                             humaneval_items=8, max_new_tokens=48),
        calibration=(16, 128), drift_prompts=8, drift_steps=48),
    # The tiny random model of the tests: every code path once, in seconds.
    "test": Profile(
        name="test", budget_s=60,
        drops=(("drop_attn", (1,)),), sparsities=(0.5, "2:4"),
        recover=(Variant("drop_attn", 1, "cosine"), Variant("wanda", 0.5, "uniform")),
        recovery=Recovery(steps=3, windows=4, seqlen=16, batch_size=2, learning_rate=1e-2),
        sizes=grid.EvalSizes(mmlu_items=4, mmlu_max_tokens=512, retrieval_passages=6,
                             passage_tokens=16, ppl_windows=2, ppl_seqlen=16, gsm8k_items=3,
                             humaneval_items=2, max_new_tokens=6),
        calibration=(2, 16), drift_prompts=2, drift_steps=4),
}


def profile(name: str) -> Profile:
  if name not in PROFILES:
    raise validate.fail("beyond.profile", "name", name, f"one of {sorted(PROFILES)}")
  return PROFILES[name]


# ------------------------------------------------------------------------------- pruning

def drop_order(method: str, choice: str, params, config, calibration, n_max: int,
               mesh=None) -> dict:
  """The n_max sublayers of one kind in drop order under one ranking, from one scoring pass.

  Returns:
    {"order": [layer, ...] (cheapest removal first), "importance": [per-layer score],
     "time_s": seconds the scoring took}.
  """
  t0 = time.perf_counter()
  kind = method.removeprefix("drop_")
  result = prune.drop_sublayers(params, config, n_max, kind=kind, calibration=calibration,
                                score=_DROP_SCORE[choice], mesh=mesh)
  return {"order": [int(d["layer"]) for d in result.report["dropped"]],
          "importance": [float(s) for s in result.report["importance"][kind]],
          "time_s": time.perf_counter() - t0}


def prune_variant(variant: Variant, params, config, calibration, orders: dict,
                  kl_allocation: allocate.KL = allocate.KL(),
                  mesh=None) -> tuple[PruneResult, dict]:
  """The pruned model of a variant before recovery, and its JSON info (what was dropped or the
  per-layer sparsities, the realised sparsity, and prune seconds: for a drop, its ranking's scoring
  plus zeroing, i.e. what pruning this model alone costs)."""
  t0 = time.perf_counter()
  if variant.method == "dense":
    return PruneResult(params, None, {"method": "dense"}, config), {"time_s": 0.0}
  if variant.method in ("drop_attn", "drop_mlp"):
    order = orders[(variant.method, variant.choice)]
    kind = variant.method.removeprefix("drop_")
    chosen = sorted(order["order"][:variant.point])
    result = drop.drop_listed(params, config, [(l, kind) for l in chosen])
    return result, {"dropped": chosen,
                    "time_s": order["time_s"] + time.perf_counter() - t0}
  allocation = {"uniform": None, "owl": "owl", "kl": kl_allocation}[variant.choice]
  kwargs = {"mesh": mesh} if mesh is not None else {}
  result = prune.wanda(params, config, variant.point, calibration=calibration,
                       allocation=allocation, **kwargs)
  info = {"sparsity": float(result.report["sparsity"]), "time_s": time.perf_counter() - t0}
  alloc = result.report.get("allocation")
  if alloc:
    info["per_layer"] = alloc["per_layer"]
    info["allocation_s"] = alloc["time_s"]
  return result, info


# ------------------------------------------------------------------------------- the run

def run_beyond(model, prof: Profile, out: str, options: Options, *,
               console: Optional[Console] = None, started: Optional[float] = None,
               fresh: bool = False) -> dict:
  """Runs (or resumes) the comparison; returns the results also written to <out>/results.json.

  Args:
    model: a `prunerep_jax.Model` whose tokenizer has a chat template.
    prof: the profile (`profile(name)`).
    out: the output directory (created if missing; the caller checks it may be written).
    options: model id, dtype, batch sizes, data sources, seed, mesh (`study.Options`).
    console: where progress goes (default stdout); its log is flushed to <out>/beyond.log after
      every unit.
    started: time.perf_counter() when the caller started (default now).
    fresh: recompute every unit, ignoring the cache.
  """
  t_start = time.perf_counter() if started is None else started
  console = console or Console()
  fn = "study.beyond"
  if not isinstance(prof, Profile):
    raise validate.fail(fn, "profile", prof, "a beyond Profile (beyond.profile(name))",
                        error=TypeError)
  if not isinstance(options, Options):
    raise validate.fail(fn, "options", options, "a study Options", error=TypeError)
  validate.choice(fn, "options.dtype", options.dtype, sorted(DTYPES))
  fresh = validate.boolean(fn, "fresh", fresh)
  params, config, tokenizer = model.params, model.config, model.tokenizer
  validate.params(fn, params, config)
  if not getattr(tokenizer, "chat_template", None):
    raise validate.fail(fn, "model", model, "a model whose tokenizer has a chat template (the "
                        "MMLU and GSM8K prompts use it)")
  variants = prof.variants
  too_deep = [v for v in variants if v.method in ("drop_attn", "drop_mlp")
              and v.point > config.num_layers]
  if too_deep:
    raise validate.fail(fn, "profile", prof.name, f"drop counts of at most the model's "
                        f"{config.num_layers} layers; {too_deep[0].id} drops more")
  load_before = _loadavg()
  store = cells.Store(out)
  analyses_dir = os.path.join(out, "analyses")

  def flush_log():
    if console.log is not None:
      console.log.flush_to(os.path.join(out, RUN_LOG))

  console.line(f"beyond the paper '{prof.name}' on {options.model_id} ({config.num_layers} "
               f"layers, {options.dtype}): {len(variants)} models x 5 suites + drift; sized for "
               f"{clock(prof.budget_s)} on 2 CPU cores with the default model")
  console.status("drawing the workload (tokenizing the data)")
  work = suites.build(tokenizer, prof.sizes, prof.calibration, options.sources, options.seed)
  to_eval = ((lambda p: p) if options.dtype == "float32"
             else (lambda p: cast(p, DTYPES[options.dtype])))
  dense_params = to_eval(params)
  tokens, mask = analyses.prompts(tokenizer, config, work, prof.drift_prompts)

  base = {"model": options.model_id, "config": repr(config), "dtype": options.dtype,
          "sizes": dataclasses.asdict(prof.sizes), "workload": work.info,
          "batch_size": options.batch_size, "gen_batch_size": options.gen_batch_size,
          "drift": [prof.drift_prompts, prof.drift_steps], "calibration": work.calibration.info,
          "beyond": 1}

  def fp(name: str, **extra) -> str:
    return cells.fingerprint({**base, "unit": name, **extra})

  recovery = dataclasses.asdict(prof.recovery)

  def variant_fp(v: Variant) -> str:
    kl = v.method == "wanda" and v.choice == "kl"
    return fp(v.id, recovery=recovery if v.recovered else None,
              kl_allocation=dataclasses.asdict(prof.kl_allocation) if kl else None)

  def read(name: str, fingerprint: str) -> Optional[dict]:
    return None if fresh else store.read(name, fingerprint)

  cached = {v: read(v.id, variant_fp(v)) for v in variants}
  eta = Eta(PRIOR_S, WEIGHTS)
  pending = [_kind(v) for v in variants if cached[v] is None]
  total = len(variants)
  tracker = Progress(console, eta, pending, total, t_start, width=42, after=flush_log)
  finished, progress = tracker.finished, tracker.reporter

  def drift(p_params, p_config, v: Variant) -> dict:
    summary = analyses.drift(dense_params, config, p_params, p_config, tokenizer, tokens, mask,
                             prof.drift_steps, analyses_dir, f"drift-{v.id}", mesh=options.mesh)
    return drift_summary(summary)

  # --------------------------------------------------------------------------------- dense
  dense_v = variants[0]
  if cached[dense_v] is not None:
    dense = suites.from_json(cached[dense_v]["evaluation"], store.read_arrays(dense_v.id))
    finished("dense", dense_v.label, None)
  else:
    t0 = time.perf_counter()
    dense = suites.evaluate(dense_params, config, tokenizer, work, prof.sizes,
                            batch_size=options.batch_size, gen_batch_size=options.gen_batch_size,
                            progress=progress(dense_v.label), mesh=options.mesh)
    record, arrays = suites.to_json(dense)
    cached[dense_v] = {"evaluation": suites.jsonable(record),
                       **_record(dense_v, dense, {"time_s": 0.0}, _no_drift(prof.drift_steps))}
    store.write(dense_v.id, variant_fp(dense_v), cached[dense_v], arrays)
    finished("dense", dense_v.label, time.perf_counter() - t0, _headline(dense.metrics))

  # ----------------------------------------------------------------------- drop rankings
  orders: dict = {}

  def order_of(method: str, choice: str) -> dict:
    key = (method, choice)
    if key not in orders:
      n_max = max(v.point for v in variants if v.method == method)
      name = f"order-{method}-{choice}"
      fingerprint = fp(name, n_max=n_max)
      orders[key] = read(name, fingerprint)
      if orders[key] is None:
        console.status(f"scoring {method} by the {choice} ranking (one calibration pass)")
        orders[key] = drop_order(method, choice, params, config, work.calibration, n_max,
                                 mesh=options.mesh)
        store.write(name, fingerprint, orders[key])
    return orders[key]

  def pruned_model(v: Variant) -> tuple[PruneResult, dict]:
    if v.method in ("drop_attn", "drop_mlp"):
      order_of(v.method, v.choice)
    return prune_variant(v, params, config, work.calibration, orders, prof.kl_allocation,
                         mesh=options.mesh)

  def recovery_data():
    r = prof.recovery
    return calibrate.calibration(tokenizer, options.sources.text, nsamples=r.windows,
                                 seqlen=r.seqlen, seed=(options.seed + 1) % 2**32)

  # ---------------------------------------------------------------------------- variants
  for v in variants[1:]:
    if cached[v] is not None:
      finished(_kind(v), v.label, None)
      continue
    t0 = time.perf_counter()
    tracker.status(v.label, "pruning")
    result, info = pruned_model(v.base)
    twin = _same_model(v, variants, cached, info)
    if twin is not None:
      cached[v] = {**cached[twin], **_identity(v), "prune": suites.jsonable(info),
                   "same_as": twin.id}
      store.write(v.id, variant_fp(v), cached[v])
      finished(_kind(v), v.label, time.perf_counter() - t0, f"the same model as {twin.label}")
      continue
    if v.recovered:
      tracker.status(v.label, "recovery training")
      r = prof.recovery
      result = recover(
          params, result, config, recovery_data().tokens, steps=r.steps,
          optimizer=default_optimizer(r.steps, r.learning_rate), loss="kl_to_dense",
          lora_rank=r.lora_rank, batch_size=r.batch_size, seed=options.seed)
      rec = result.report["recovery"]
      info = {**info, "recovery": {"time_s": rec["time_s"], "steps": rec["steps"],
                                   "losses": rec["losses"], "lora_rank": rec["lora_rank"],
                                   "tokens_per_step": rec["tokens_per_step"]}}
    p_params = to_eval(result.params)
    evaluation = suites.evaluate(
        p_params, result.config, tokenizer, work, prof.sizes, batch_size=options.batch_size,
        gen_batch_size=options.gen_batch_size, dense=dense, dense_params=dense_params,
        dense_config=config, progress=progress(v.label), mesh=options.mesh)
    tracker.status(v.label, f"drift over {prof.drift_steps} steps")
    t_drift = time.perf_counter()
    drift_record = drift(p_params, result.config, v)
    drift_record["time_s"] = time.perf_counter() - t_drift
    cached[v] = _record(v, evaluation, info, drift_record)
    store.write(v.id, variant_fp(v), cached[v])
    finished(_kind(v), v.label, time.perf_counter() - t0,
             f"gen fid {beyond_report.fmt(beyond_report.gen_fidelity(cached[v]))}, drift KL "
             f"{beyond_report.fmt(drift_record['kl'])}")
    del result, p_params

  # ------------------------------------------------------------------------------- outputs
  for v in variants:  # every ranking in the report, also when all its models were cached
    if v.method in ("drop_attn", "drop_mlp"):
      order_of(v.method, v.choice)
  results = {
      "profile": prof.name, "model": options.model_id, "dtype": options.dtype,
      "num_layers": config.num_layers, "sizes": dataclasses.asdict(prof.sizes),
      "calibration": work.calibration.info, "recovery": recovery,
      "kl_allocation": dataclasses.asdict(prof.kl_allocation),
      "drift": {"prompts": prof.drift_prompts, "steps": prof.drift_steps},
      "options": {"batch_size": options.batch_size, "gen_batch_size": options.gen_batch_size,
                  "seed": options.seed, "sources": dataclasses.asdict(options.sources)},
      "workload": work.info,
      "orders": {f"{m}-{c}": o for (m, c), o in orders.items()},
      "cells": [{k: val for k, val in cached[v].items() if k != "evaluation"} for v in variants],
  }
  results["verdicts"] = beyond_report.verdicts(results)
  results["summary"] = beyond_report.summary(results)
  results["run"] = {"wall_s": time.perf_counter() - t_start, "cpu_s": _cpu_s(),
                    "compute_s": beyond_report.compute_s(results), "budget_s": prof.budget_s,
                    "load_average_start": load_before, "load_average_end": _loadavg(),
                    "cpu_count": os.cpu_count()}
  console.status("writing figures and the report")
  results["figures"] = beyond_figures.draw_all(results, out)
  write_outputs(results, out)
  console.line("")
  console.line(beyond_report.console_summary(results))
  console.line(f"\nwrote {out}/report.md, results.json, results.csv and "
               f"{len(results['figures'])} figures in {clock(results['run']['wall_s'])}")
  flush_log()
  return results


def _kind(v: Variant) -> str:
  if v.recovered:
    return "recovered"
  return {"dense": "dense", "drop_attn": "drop", "drop_mlp": "drop", "wanda": "wanda"}[v.method]


def _identity(v: Variant) -> dict:
  return {"id": v.id, "method": v.method, "point": v.point, "choice": v.choice,
          "recovered": v.recovered, "label": v.label, "x": v.cell.x}


def _record(v: Variant, evaluation: suites.Evaluation, info: dict, drift_record: dict) -> dict:
  return {**_identity(v), "prune": suites.jsonable(info),
          "metrics": suites.jsonable(evaluation.metrics),
          "timings": suites.jsonable(evaluation.timings),
          "drift": suites.jsonable(drift_record),
          "examples": suites.examples(evaluation.raw)}


def _same_model(v: Variant, variants, cached, info: dict) -> Optional[Variant]:
  """An already evaluated drop of the same kind that removed exactly the same sublayers."""
  if v.method not in ("drop_attn", "drop_mlp") or v.recovered:
    return None
  for other in variants:
    if (other != v and other.method == v.method and not other.recovered
        and cached.get(other) is not None and "same_as" not in cached[other]
        and cached[other]["prune"].get("dropped") == info["dropped"]):
      return other
  return None


def _no_drift(steps: int) -> dict:
  """The dense model against itself: no drift."""
  return {"kl": 0.0, "kl_last": 0.0, "kl_teacher": 0.0, "per_step": [0.0] * steps,
          "first_divergence": [], "time_s": 0.0}


def drift_summary(summary: dict) -> dict:
  """The numbers of one drift analysis the comparison uses: free-running KL(dense || pruned)
  averaged over the steps ("kl") and over the last quarter ("kl_last"), the teacher-forced mean,
  the free-running per-step curve and each prompt's first divergence step."""
  free, teacher = summary["steps"]["free"]["kl"], summary["steps"]["teacher"]["kl"]
  S = len(free)
  last = free[S - max(1, S // 4):]

  def mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None

  return {"kl": mean(free), "kl_last": mean(last), "kl_teacher": mean(teacher),
          "per_step": free, "first_divergence": summary["first_divergence"].get("free", [])}


def write_outputs(results: dict, out: str) -> None:
  caller = CALLER
  atomic.write_json(os.path.join(out, "results.json"), suites.jsonable(results), overwrite=True,
                    caller=caller, name="out")
  atomic.write_text(os.path.join(out, "results.csv"), _csv(beyond_report.rows(results)),
                    overwrite=True, caller=caller, name="out")
  atomic.write_text(os.path.join(out, "report.md"), beyond_report.markdown(results),
                    overwrite=True, caller=caller, name="out")
