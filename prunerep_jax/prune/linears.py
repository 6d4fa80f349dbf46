"""Which linear layers an intra-layer transform touches, and the masks and report it returns.

Intra-layer pruning acts on the seven linears inside every decoder block (attn q/k/v/o, mlp
gate/up/down), never on embeddings or the LM head. A path filter narrows that set: fnmatch
patterns over names like "attn/q_proj" or "mlp/down_proj" (e.g. include=("mlp/*",)).
"""

from __future__ import annotations

import fnmatch
import numbers
from typing import Optional, Sequence, Union

import numpy as np

from prunerep_jax import layout
from prunerep_jax import validate
from prunerep_jax.prune import patterns

Linear = tuple[str, str]  # (sublayer, name), e.g. ("attn", "q_proj")


def select(include: Optional[Sequence[str]] = None, method: str = "prune") -> list[Linear]:
  """The block linears matching the fnmatch patterns in `include` (default: all seven).

  Every pattern must match at least one linear: a typo in one of several patterns would otherwise
  prune less than asked, silently.
  """
  names = [f"{s}/{n}" for s, n in layout.BLOCK_LINEARS]
  if include is None:
    return list(layout.BLOCK_LINEARS)
  what = f"fnmatch patterns over {names}, e.g. ('mlp/*',)"
  pats = (include,) if isinstance(include, str) else include
  try:
    pats = tuple(pats)
  except TypeError:
    raise validate.fail(method, "include", include, what) from None
  if not pats or not all(isinstance(p, str) for p in pats):
    raise validate.fail(method, "include", include, f"a non-empty sequence of {what}")
  for pat in pats:
    if not any(fnmatch.fnmatchcase(name, pat) for name in names):
      raise validate.fail(method, "include", include,
                          f"{what}, each matching at least one; pattern {pat!r} matches none")
  return [lin for lin, name in zip(layout.BLOCK_LINEARS, names)
          if any(fnmatch.fnmatchcase(name, pat) for pat in pats)]


def as_pattern(pattern: Union[patterns.Pattern, str, float], method: str) -> patterns.Pattern:
  """Accepts Unstructured/NM, "2:4" / "0.5" strings, or a float sparsity."""
  expected = ("a sparsity in [0, 1), 'n:m' with 0 < n < m, or a patterns.Unstructured / "
              "patterns.NM value")
  if isinstance(pattern, (patterns.Unstructured, patterns.NM)):
    return pattern
  try:
    if isinstance(pattern, str):
      return patterns.parse_pattern(pattern)
    if isinstance(pattern, numbers.Real) and not isinstance(pattern, (bool, np.bool_)):
      return patterns.Unstructured(float(pattern))
  except ValueError as e:
    raise validate.fail(method, "pattern", pattern, f"{expected} ({e})") from None
  raise validate.fail(method, "pattern", pattern, expected)


def check_nm_divides(pattern, config, linears: list[Linear], method: str) -> None:
  if not isinstance(pattern, patterns.NM):
    return
  shapes = layout.param_shapes(config)["layers"]
  for sub, name in linears:
    d_in = shapes[sub][name]["kernel"][1]
    if d_in % pattern.m:
      raise validate.fail(method, "pattern", pattern,
                          f"an n:m pattern whose m divides the input dim of every pruned linear; "
                          f"{sub}/{name} has {d_in} inputs, not divisible by m={pattern.m}")


def masks_tree(stacked: dict, linears: list[Linear]) -> dict:
  """{(sub, name): [L, I, O] bool} -> {"layers": {sub: {name: {"kernel": [L, I, O]}}}}."""
  tree: dict = {}
  for sub, name in linears:
    tree.setdefault(sub, {})[name] = {"kernel": stacked[(sub, name)]}
  return {"layers": tree}


def sparsity_report(masks: dict, linears: list[Linear]) -> dict:
  """Per-matrix, per-layer and overall fraction of pruned weights, from stacked masks."""
  per_matrix, per_layer_pruned, per_layer_total = {}, None, None
  total_pruned = total = 0
  for sub, name in linears:
    m = np.asarray(masks["layers"][sub][name]["kernel"])
    pruned = (~m).reshape(m.shape[0], -1).sum(axis=1)
    size = m[0].size
    for l, p in enumerate(pruned):
      per_matrix[f"layers/{l}/{sub}/{name}"] = float(p / size)
    per_layer_pruned = pruned if per_layer_pruned is None else per_layer_pruned + pruned
    per_layer_total = size if per_layer_total is None else per_layer_total + size
    total_pruned += int(pruned.sum())
    total += size * m.shape[0]
  return {
      "per_matrix_sparsity": per_matrix,
      "per_layer_sparsity": [float(p / per_layer_total) for p in per_layer_pruned],
      "sparsity": total_pruned / total,
      "pruned_weights": int(total_pruned),
      "prunable_weights": int(total),
  }
