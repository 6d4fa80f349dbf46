"""The reproduction study's grid: which pruned models are evaluated, on how much data, per profile.

A cell is one pruned model: a method and its point,
  dense                   the unpruned model (n = 0 of every sweep, sparsity 0 of every method);
  drop_attn / drop_mlp    the n attention / MLP sublayers that change the residual stream least
                          (LLM-Drop's score, computed once per kind: cell n takes the top n);
  drop_block              the n whole blocks of highest Block Influence (ShortGPT, scored once);
  magnitude / wanda / sparsegpt   unstructured sparsity (a float in (0, 1)) or an N:M pattern.
Every cell is evaluated on both task kinds (`prunerep_jax.study.suites`).

A profile fixes the cells, the evaluation sizes, the calibration and the analyses, so that the
whole study fits a time budget on a 2-core CPU with the 135M default model (`budget_s`). The
budgets were met on such a machine (see the README); a larger model just takes longer with the
same cells.
"""

from __future__ import annotations

import dataclasses
from typing import Union

DROP_METHODS = ("drop_attn", "drop_mlp", "drop_block")
SPARSITY_METHODS = ("magnitude", "wanda", "sparsegpt")
METHODS = ("dense",) + DROP_METHODS + SPARSITY_METHODS
_NAMES = {"dense": "dense", "drop_attn": "drop attention", "drop_mlp": "drop MLP",
          "drop_block": "drop block", "magnitude": "magnitude", "wanda": "Wanda",
          "sparsegpt": "SparseGPT"}
Point = Union[None, int, float, str]


@dataclasses.dataclass(frozen=True)
class Cell:
  """One pruned model of the grid.

  Attributes:
    method: one of METHODS.
    point: None for dense; for a drop, the number of sublayers or blocks dropped (>= 1); for a
      sparsity method, the unstructured sparsity (a float in (0, 1)) or an "n:m" pattern.
  """

  method: str
  point: Point = None

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"Cell(method={self.method!r}): expected one of {METHODS}")
    if self.method == "dense":
      ok = self.point is None
    elif self.method in DROP_METHODS:
      ok = isinstance(self.point, int) and not isinstance(self.point, bool) and self.point >= 1
    else:
      ok = (isinstance(self.point, float) and 0.0 < self.point < 1.0) or _is_nm(self.point)
    if not ok:
      raise ValueError(f"Cell(method={self.method!r}, point={self.point!r}): expected "
                       + ("no point" if self.method == "dense" else "an integer >= 1"
                          if self.method in DROP_METHODS else "a sparsity in (0, 1) or 'n:m'"))

  @property
  def id(self) -> str:
    """File-name-safe identifier: "dense", "drop_attn-4", "wanda-0.5", "wanda-2of4"."""
    if self.point is None:
      return self.method
    return f"{self.method}-{str(self.point).replace(':', 'of')}"

  @property
  def label(self) -> str:
    """For people: "drop attention 4", "Wanda 50%", "Wanda 2:4"."""
    name = _NAMES[self.method]
    if self.point is None:
      return name
    if isinstance(self.point, float):
      return f"{name} {100 * self.point:g}%"
    return f"{name} {self.point}"

  @property
  def x(self) -> float:
    """Position on a sweep's x axis: n dropped, or the sparsity (n/m for an N:M pattern)."""
    if self.point is None:
      return 0.0
    if isinstance(self.point, str):
      n, m = self.point.split(":")
      return int(n) / int(m)
    return float(self.point)


def _is_nm(point: Point) -> bool:
  if not isinstance(point, str) or point.count(":") != 1:
    return False
  n, m = point.split(":")
  return n.isdigit() and m.isdigit() and 0 < int(n) < int(m)


def parse_cell(text: str) -> Cell:
  """A cell from its id ("drop_attn-4", "wanda-0.5", "wanda-2of4", "dense")."""
  method, _, point = text.partition("-")
  if not point:
    return Cell(method)
  if method in DROP_METHODS:
    return Cell(method, int(point) if point.isdigit() else point)
  if "of" in point:
    return Cell(method, point.replace("of", ":"))
  try:
    return Cell(method, float(point))
  except ValueError:
    raise ValueError(f"parse_cell({text!r}): expected METHOD-POINT such as drop_attn-4, "
                     "wanda-0.5 or wanda-2of4") from None


@dataclasses.dataclass(frozen=True)
class EvalSizes:
  """How much of each suite every cell sees (the same items for every cell).

  Attributes:
    mmlu_items: MMLU questions (stratified by topic), among those whose prompt has at most
      mmlu_max_tokens tokens (long outliers would set the padded length of a whole batch).
    retrieval_passages, passage_tokens: P passages of N tokens (query and key N / 2 each).
    ppl_windows, ppl_seqlen: held-out windows for perplexity and next-token KL.
    gsm8k_items, humaneval_items, max_new_tokens: greedy generations per suite and their length.
  """

  mmlu_items: int
  mmlu_max_tokens: int
  retrieval_passages: int
  passage_tokens: int
  ppl_windows: int
  ppl_seqlen: int
  gsm8k_items: int
  humaneval_items: int
  max_new_tokens: int


@dataclasses.dataclass(frozen=True)
class AnalysisPlan:
  """The analyses of `prunerep_jax.analysis` at chosen settings.

  Attributes:
    settings: cells analysed with drift and option_subspace (each must be in the grid); layerwise
      runs once for the drops (every sublayer removed alone, the paper's "dropped" mode) and once
      per sparsity setting, in both lenses.
    prompts: GSM8K prompts (of the evaluated ones) fed to layerwise and drift.
    decode_steps: layerwise analyses the first this many greedy decoding positions.
    drift_steps: decoding steps of the drift analysis.
    lenses: the logit lenses of layerwise ("final_norm": the model's own path; "raw": the
      reference code's).
  """

  settings: tuple[Cell, ...]
  prompts: int
  decode_steps: int
  drift_steps: int
  lenses: tuple[str, ...] = ("final_norm", "raw")


@dataclasses.dataclass(frozen=True)
class Profile:
  """A complete study: cells, evaluation sizes, calibration windows and analyses.

  Attributes:
    name: the profile's name.
    budget_s: the wall time it is sized for on a 2-core CPU with the default model.
    cells: the pruned models, dense first.
    sizes: evaluation sizes (see EvalSizes).
    calibration: (nsamples, seqlen) of the calibration windows for drop scoring, Wanda and
      SparseGPT.
    analysis: the analyses (see AnalysisPlan).
  """

  name: str
  budget_s: float
  cells: tuple[Cell, ...]
  sizes: EvalSizes
  calibration: tuple[int, int]
  analysis: AnalysisPlan

  def __post_init__(self):
    if not self.cells or self.cells[0] != Cell("dense"):
      raise ValueError(f"Profile({self.name!r}): the first cell must be Cell('dense')")
    if len(set(self.cells)) != len(self.cells):
      raise ValueError(f"Profile({self.name!r}): cells repeat")
    for cell in self.analysis.settings:
      if cell not in self.cells:
        raise ValueError(f"Profile({self.name!r}): analysis setting {cell.id} is not a cell")


def sweep(method: str, points) -> tuple[Cell, ...]:
  return tuple(Cell(method, p) for p in points)


def needs_calibration(cell: Cell) -> bool:
  return cell.method in DROP_METHODS or cell.method in ("wanda", "sparsegpt")


def max_points(cells, num_layers: int) -> tuple[tuple[Cell, ...], tuple[Cell, ...]]:
  """(feasible, skipped): drops need n <= num_layers sublayers, blocks n <= num_layers - 1."""
  feasible, skipped = [], []
  for cell in cells:
    limit = {"drop_attn": num_layers, "drop_mlp": num_layers,
             "drop_block": num_layers - 1}.get(cell.method)
    (skipped if limit is not None and cell.point > limit else feasible).append(cell)
  return tuple(feasible), tuple(skipped)


def drop_points(cells, method: str) -> list[int]:
  return sorted(c.point for c in cells if c.method == method)


_DENSE = (Cell("dense"),)

PROFILES = {
    # Sized by measurement on the 2-core machine (README "Run times"): a cell costs about
    # 20 s of evaluation here; Wanda adds ~30-60 s of pruning, magnitude ~30 s, SparseGPT ~120 s.
    "quick": Profile(
        name="quick", budget_s=300,
        cells=_DENSE + sweep("drop_attn", (4, 8)) + sweep("drop_mlp", (4, 8))
        + sweep("wanda", (0.5,)),
        sizes=EvalSizes(mmlu_items=16, mmlu_max_tokens=192, retrieval_passages=32,
                        passage_tokens=64, ppl_windows=2, ppl_seqlen=128, gsm8k_items=8,
                        humaneval_items=6, max_new_tokens=32),
        calibration=(8, 128),
        analysis=AnalysisPlan(settings=(Cell("drop_attn", 4),), prompts=4, decode_steps=8,
                              drift_steps=24, lenses=("final_norm",))),
    "readme": Profile(
        name="readme", budget_s=900,
        cells=_DENSE + sweep("drop_attn", (2, 4, 6, 8, 12)) + sweep("drop_mlp", (2, 4, 6, 8, 12))
        + sweep("drop_block", (2, 4, 8)) + sweep("wanda", (0.3, 0.5, 0.7, "2:4")),
        sizes=EvalSizes(mmlu_items=24, mmlu_max_tokens=192, retrieval_passages=48,
                        passage_tokens=64, ppl_windows=4, ppl_seqlen=128, gsm8k_items=8,
                        humaneval_items=8, max_new_tokens=40),
        calibration=(8, 128),
        analysis=AnalysisPlan(settings=(Cell("drop_attn", 4), Cell("drop_mlp", 4),
                                        Cell("wanda", 0.5)),
                              prompts=4, decode_steps=16, drift_steps=48)),
    "full": Profile(
        name="full", budget_s=3600,
        cells=_DENSE + sweep("drop_attn", range(1, 13)) + sweep("drop_mlp", range(1, 13))
        + sweep("drop_block", (1, 2, 3, 4, 6, 8, 10, 12))
        + sweep("magnitude", (0.3, 0.5, 0.7, "2:4"))
        + sweep("wanda", (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, "2:4", "4:8"))
        + sweep("sparsegpt", (0.5, "2:4")),
        sizes=EvalSizes(mmlu_items=48, mmlu_max_tokens=256, retrieval_passages=64,
                        passage_tokens=64, ppl_windows=4, ppl_seqlen=256, gsm8k_items=16,
                        humaneval_items=8, max_new_tokens=48),
        calibration=(16, 128),
        analysis=AnalysisPlan(settings=(Cell("drop_attn", 4), Cell("drop_mlp", 4),
                                        Cell("wanda", 0.5)),
                              prompts=8, decode_steps=32, drift_steps=64)),
    # The tiny random model of the tests: every code path once, in seconds.
    "test": Profile(
        name="test", budget_s=60,
        cells=_DENSE + sweep("drop_attn", (1,)) + sweep("drop_mlp", (1,))
        + sweep("magnitude", (0.5,)),
        sizes=EvalSizes(mmlu_items=4, mmlu_max_tokens=512, retrieval_passages=6,
                        passage_tokens=16, ppl_windows=2, ppl_seqlen=16, gsm8k_items=3,
                        humaneval_items=2, max_new_tokens=6),
        calibration=(2, 16),
        analysis=AnalysisPlan(settings=(Cell("drop_attn", 1),), prompts=2, decode_steps=0,
                              drift_steps=4, lenses=("final_norm",))),
}


def profile(name: str) -> Profile:
  if name not in PROFILES:
    raise ValueError(f"profile(name={name!r}): expected one of {sorted(PROFILES)}")
  return PROFILES[name]
