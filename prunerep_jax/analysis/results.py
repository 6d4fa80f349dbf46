"""Typed analysis results that serialise to files, and read back from them alone.

Every analysis result is a `Result`: a kind, JSON metadata (model, pruning, lens, temperature,
...), named NumPy arrays (per layer, position, step, item) and summary tables (lists of flat
records). `save(directory, name)` writes, each atomically:

  NAME.json   {"kind", "meta", "tables"}: everything a figure or a report needs
  NAME.csv    the main summary table, one record per row
  NAME.npz    the arrays (per-position or per-step values, for scatter plots and re-analysis)

and `load(directory, name)` returns the same `Result`. `prunerep_jax.plots` draws every figure
from these files.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from typing import Any, Optional

import numpy as np

from prunerep_jax import atomic


@dataclasses.dataclass
class Result:
  """kind: which analysis ("layerwise", "drift", "option_subspace", "theorem_check");
  meta: JSON-serialisable settings; arrays: name -> np.ndarray; tables: name -> list of flat
  records (dicts of str/int/float/bool/None); main_table: the table written as CSV."""

  kind: str
  meta: dict
  arrays: dict
  tables: dict
  main_table: str = "summary"

  def table(self, name: Optional[str] = None) -> list[dict]:
    return self.tables[name or self.main_table]

  def save(self, directory: str, name: Optional[str] = None, *, overwrite: bool = True) -> dict:
    """Writes NAME.json, NAME.csv and NAME.npz into `directory`; returns their paths.

    All three are serialised and their destinations checked before the first one is written, so
    an unserialisable value or a refused overwrite leaves nothing behind.
    """
    name = name or self.kind
    doc = {"kind": self.kind, "meta": self.meta, "tables": self.tables,
           "main_table": self.main_table}
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: np.asarray(v) for k, v in self.arrays.items()})
    text = atomic.json_text(_jsonable(doc), caller="Result.save", name="self")
    payloads = {"json": text.encode(), "csv": _csv(self.table()).encode(), "npz": buf.getvalue()}
    paths = {ext: os.path.join(directory, f"{name}.{ext}") for ext in payloads}
    for path in paths.values():
      atomic.check_destination(path, overwrite=overwrite, caller="Result.save", name="directory",
                               want_dir=False)
    for ext, data in payloads.items():
      atomic.write_bytes(paths[ext], data, overwrite=overwrite, caller="Result.save",
                         name="directory")
    return paths

  @classmethod
  def load(cls, directory: str, name: str) -> "Result":
    with open(os.path.join(directory, f"{name}.json")) as f:
      doc = json.load(f)
    with np.load(os.path.join(directory, f"{name}.npz")) as z:
      arrays = {k: z[k] for k in z.files}
    return cls(doc["kind"], doc["meta"], arrays, doc["tables"], doc.get("main_table", "summary"))


def _jsonable(x: Any) -> Any:
  """NumPy scalars/arrays -> Python; NaN and inf -> None (strict JSON)."""
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, float) and not np.isfinite(x):
    return None
  return x


def _csv(records: list[dict]) -> str:
  out = io.StringIO()
  if records:
    fields = list(records[0])
    for r in records[1:]:
      fields += [k for k in r if k not in fields]
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in records:
      writer.writerow(_jsonable(r))
  return out.getvalue()


def summarize(values: np.ndarray, valid: np.ndarray) -> dict:
  """mean, median, min, max, count of values over the entries where valid is True."""
  v = np.asarray(values, np.float64)[np.asarray(valid, bool)]
  v = v[np.isfinite(v)]
  if v.size == 0:
    return {"mean": None, "median": None, "min": None, "max": None, "count": 0}
  return {"mean": float(v.mean()), "median": float(np.median(v)), "min": float(v.min()),
          "max": float(v.max()), "count": int(v.size)}
