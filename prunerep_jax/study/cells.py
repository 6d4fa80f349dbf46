"""One cell of the grid: pruning it, and its result cached on disk so a run can resume.

Cache. Every finished unit of work (a cell, the drop scores of a kind, an analysis) is one JSON
file under `<out>/cells/`, written atomically (`prunerep_jax.atomic`: a temporary sibling,
fsync, rename) only after the work is complete, so a killed run leaves either the whole file or
none. Each file holds the fingerprint of every setting its numbers depend on (model, dtype,
evaluation sizes, the items drawn, calibration, batch sizes, the schema of this module); a read
returns None, and the unit is recomputed, when the file is missing, unreadable, of another schema
or of another fingerprint. Arrays (the dense embeddings) live in a `.npz` next to the JSON,
written first; the JSON records its SHA-256, so a damaged or foreign npz is not trusted either.

Pruning a cell (`prune`): drops use one scoring per kind (`drop_order`, the n_max most redundant
sublayers or blocks in drop order, by `prunerep_jax.prune.drop_sublayers` / `drop_blocks`), and
the cell with n dropped takes the first n: exactly what `drop_sublayers(n)` / `drop_blocks(n)`
return, without scoring again. Sparsity methods call `prunerep_jax.prune.<method>`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from typing import Any, NamedTuple, Optional

import numpy as np

from prunerep_jax import atomic, prune
from prunerep_jax.prune import drop
from prunerep_jax.study import grid

SCHEMA = 2  # bump when what a cell file holds, or how it is computed, changes
CALLER = "prunerep_jax.study"

log = logging.getLogger(__name__)


def fingerprint(settings: Any) -> str:
  """A short stable hash of JSON-able settings (key order does not matter)."""
  text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
  return hashlib.sha256(f"{SCHEMA}\0{text}".encode()).hexdigest()[:20]


class Store:
  """The cache directory `<out>/cells`: one JSON (and optional npz) per finished unit."""

  def __init__(self, out: str):
    self.directory = os.path.join(out, "cells")

  def path(self, name: str, ext: str = "json") -> str:
    return os.path.join(self.directory, f"{name}.{ext}")

  def read(self, name: str, fp: str) -> Optional[dict]:
    """The cached record of `name` if it is complete and was computed with fingerprint `fp`."""
    path = self.path(name)
    if not os.path.exists(path):
      return None
    try:
      with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      log.warning("cache: %s is unreadable (%s); recomputing it", path, e)
      return None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or "record" not in doc:
      log.warning("cache: %s is not a complete cell file of schema %d; recomputing it", path,
                  SCHEMA)
      return None
    if doc.get("fingerprint") != fp:
      log.info("cache: %s was computed with other settings; recomputing it", path)
      return None
    if "npz_sha256" in doc and doc["npz_sha256"] != _sha256_file(self.path(name, "npz")):
      log.warning("cache: the arrays of %s are missing or damaged; recomputing it", path)
      return None
    return doc["record"]

  def read_arrays(self, name: str) -> dict:
    with np.load(self.path(name, "npz")) as z:
      return {k: z[k] for k in z.files}

  def write(self, name: str, fp: str, record: dict, arrays: Optional[dict] = None) -> None:
    """Writes the unit's arrays (if any), then its JSON, each atomically."""
    doc = {"schema": SCHEMA, "fingerprint": fp, "name": name, "record": record}
    if arrays is not None:
      buf = io.BytesIO()
      np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
      data = buf.getvalue()
      atomic.write_bytes(self.path(name, "npz"), data, overwrite=True, caller=CALLER,
                         name="cache")
      doc["npz_sha256"] = hashlib.sha256(data).hexdigest()
    atomic.write_json(self.path(name), doc, overwrite=True, caller=CALLER, name="cache")


def _sha256_file(path: str) -> Optional[str]:
  try:
    with open(path, "rb") as f:
      return hashlib.sha256(f.read()).hexdigest()
  except OSError:
    return None


# ------------------------------------------------------------------------------- pruning

def drop_order(method: str, params, config, calibration, n_max: int, mesh=None) -> dict:
  """The n_max sublayers (or blocks) of one kind in drop order, from one scoring pass.

  Returns:
    {"order": [layer, ...] (most redundant first), "importance": [per-layer score]}.
  """
  if method == "drop_block":
    result = prune.drop_blocks(params, config, n_max, calibration=calibration, mesh=mesh)
    importance = result.report["importance"]["block"]
    # drop_blocks(n) drops the n highest Block Influence scores, ties to the lower layer
    order = sorted(range(config.num_layers), key=lambda l: (-importance[l], l))[:n_max]
  else:
    kind = {"drop_attn": "attn", "drop_mlp": "mlp"}[method]
    result = prune.drop_sublayers(params, config, n_max, kind=kind, calibration=calibration,
                                  mesh=mesh)
    importance = result.report["importance"][kind]
    order = [d["layer"] for d in result.report["dropped"]]
  return {"order": [int(l) for l in order], "importance": [float(s) for s in importance]}


class Pruned(NamedTuple):
  """params, config: the pruned model; info: JSON (what was dropped, sparsity, time)."""

  params: Any
  config: Any
  info: dict


def prune_cell(cell: grid.Cell, params, config, calibration, orders: dict,
               mesh=None) -> Pruned:
  """The pruned model of `cell` (dense params are never modified).

  Args:
    orders: method -> `drop_order` result, for the drop methods.
    mesh: None or a device mesh (`prunerep_jax.parallel`) the intra-layer methods run on.
  """
  t0 = time.perf_counter()
  if cell.method == "dense":
    return Pruned(params, config, {"time_s": 0.0})
  if cell.method in grid.DROP_METHODS:
    chosen = orders[cell.method]["order"][:cell.point]
    if cell.method == "drop_block":
      new_params, new_config = drop.remove_blocks(params, config, sorted(chosen))
    else:
      kind = cell.method.removeprefix("drop_")
      new_params, new_config = drop.zero_sublayers(params, [(l, kind) for l in chosen]), config
    return Pruned(new_params, new_config, {"dropped": sorted(chosen),
                                           "time_s": time.perf_counter() - t0})
  kwargs = {} if cell.method == "magnitude" else {"calibration": calibration}
  if mesh is not None:
    kwargs["mesh"] = mesh
  result = prune.get(cell.method)(params, config, cell.point, **kwargs)
  return Pruned(result.params, result.config,
                {"sparsity": float(result.report["sparsity"]),
                 "time_s": time.perf_counter() - t0})
