"""What every task suite shares: where its records come from, how items are subsampled, how
prompts are batched, how progress is reported, and the checks on its inputs and results.

Records come from a data file inside an installed PyPI package (located with
`importlib.util.find_spec`, which runs none of the package's code: the packages are carriers of
data files and are never imported) or from the user's local files:
  * ``.jsonl`` / ``.jsonl.gz`` (one JSON object per line);
  * ``.json``: a list of records, ``{"split": [records]}``, or a column dict ``{field: [values]}``;
  * ``.parquet`` / ``.arrow`` (needs pyarrow);
  * a local Hugging Face datasets directory (a hub snapshot or a ``save_to_disk`` output): data
    files are found recursively, Parquet/Arrow preferred over JSON, and only the requested split's
    files are read when the directory holds several splits.
`prunerep_jax.data` reads one text field per record; the suites need whole records, hence this
reader.

Batching: `prunerep_jax.batching.token_batches` (sorted longest first, so the first batch is
the most demanding one and memory problems show at once; fixed B, left-padded to length buckets).

Shape letters: B batch, T positions.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import numpy as np

from prunerep_jax import validate


_SUFFIX_KINDS = (  # in order of preference inside a dataset directory
    ("arrow", (".parquet", ".arrow")),
    ("json", (".jsonl", ".jsonl.gz", ".json")),
)
# JSON files that `save_to_disk` and hub snapshots keep next to the data: metadata, not records.
_METADATA_JSON = frozenset({"dataset_info.json", "dataset_infos.json", "state.json",
                            "dataset_dict.json"})
_SPLIT_NAMES = ("train", "validation", "valid", "dev", "test")


# ----------------------------------------------------------------------------- package data

def package_file(package: str, relative: str, pip: str, fn: str) -> str:
  """Path of `relative` inside the installed `package`, without importing it.

  Raises FileNotFoundError with the pip command that fixes it when the package or file is absent.
  """
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"{fn}: the built-in data ships in the Python package {package!r}, which is not "
        f"installed; install it with `{pip}` (--no-deps: only its data files are used)")
  for folder in spec.submodule_search_locations:
    path = os.path.join(folder, relative)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
      f"{fn}: package {package!r} is installed at {list(spec.submodule_search_locations)} but "
      f"holds no {relative}; reinstall it with `{pip} --force-reinstall`")


# ------------------------------------------------------------------------------ local records

def read_records(source: Any, fn: str, split: str = "test") -> list[tuple[str, dict]]:
  """Records of a local file or dataset directory, each with where it came from.

  Args:
    source: a path (see the module docstring for the formats).
    fn: the public function reading it (named in errors).
    split: which split to read from a dataset directory holding several.

  Returns:
    [(where, record)]: `where` names the file and line or row ("test.jsonl line 3"), for error
    messages about the record.
  """
  if not isinstance(source, (str, os.PathLike)) or not os.fspath(source):
    raise validate.fail(fn, "source", source, "None (the built-in data) or a path to a local "
                        ".jsonl / .json / .parquet / .arrow file or dataset directory",
                        error=TypeError)
  path = os.path.abspath(os.path.expanduser(os.fspath(source)))
  if os.path.isdir(path):
    files = _dataset_files(path, split, fn, source)
  elif os.path.isfile(path):
    files = [path]
  else:
    raise validate.fail(fn, "source", source, f"an existing file or directory; {path} does not "
                        "exist", error=FileNotFoundError)
  records = [r for f in files for r in _file_records(f, fn)]
  if not records:
    raise validate.fail(fn, "source", source, "a file or directory holding at least one record; "
                        "it holds none")
  return records


def _kind(name: str) -> Optional[str]:
  lower = name.lower()
  for kind, suffixes in _SUFFIX_KINDS:
    if lower.endswith(suffixes):
      return kind
  return None


def _dataset_files(root: str, split: str, fn: str, source: Any) -> list[str]:
  """The data files of one split under a dataset directory, sorted, in the best format present."""
  found: dict[str, list[str]] = {kind: [] for kind, _ in _SUFFIX_KINDS}
  for folder, subdirs, files in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))  # .cache, .git
    for f in files:
      kind = _kind(f)
      if kind and not f.startswith(".") and f not in _METADATA_JSON:
        found[kind].append(os.path.join(folder, f))
  files = next((sorted(v) for v in found.values() if v), [])
  if not files:
    raise validate.fail(fn, "source", source, "a dataset directory with *.parquet, *.arrow, "
                        "*.jsonl(.gz) or *.json files (searched recursively); it has none")
  by_split: dict[str, list[str]] = {}
  for f in files:
    name = _split_of(os.path.relpath(f, root))
    if name is not None:
      by_split.setdefault(name, []).append(f)
  if not by_split:
    return files  # no split names at all: the directory is one split
  if split not in by_split:
    raise validate.fail(fn, "split", split, f"one of the splits in {root}: {sorted(by_split)}")
  return by_split[split]


def _split_of(relative: str) -> Optional[str]:
  """The split a data file belongs to, from its folder names or its file name prefix
  (``test/...``, ``test-00000-of-00001.parquet``, ``test.jsonl``, ``data-test.arrow``)."""
  parts = relative.replace(os.sep, "/").split("/")
  for part in parts[:-1]:
    if part in _SPLIT_NAMES:
      return part
  stem = parts[-1].split(".", 1)[0]
  for token in stem.replace("_", "-").split("-"):
    if token in _SPLIT_NAMES:
      return token
  return None


def _file_records(path: str, fn: str) -> list[tuple[str, dict]]:
  kind = _kind(path)
  name = os.path.basename(path)
  if kind == "json":
    return _json_records(path, fn)
  if kind == "arrow":
    return [(f"{name} row {i}", r) for i, r in enumerate(_arrow_rows(path, fn))]
  raise validate.fail(fn, "source", path, "a .jsonl, .jsonl.gz, .json, .parquet or .arrow file; "
                      f"{name!r} is none of these")


def _json_records(path: str, fn: str) -> list[tuple[str, dict]]:
  """JSON lines, or one JSON value: a list of records, a column dict, or {split: [records]}."""
  name = os.path.basename(path)
  opener = gzip.open if path.lower().endswith(".gz") else open
  try:
    with opener(path, "rt", encoding="utf-8") as f:
      raw = f.read()
  except (UnicodeDecodeError, OSError) as e:
    raise validate.fail(fn, "source", path, f"a UTF-8 JSON file; reading it failed ({e})") from e
  try:
    value = json.loads(raw) if raw.strip() else []
  except json.JSONDecodeError:
    value = None  # JSON lines (also what `Dataset.to_json` writes under a .json name)
  if value is None or (".jsonl" in name.lower() and isinstance(value, dict)):
    out = []
    for i, line in enumerate(raw.splitlines(), 1):
      if not line.strip():
        continue
      where = f"{name} line {i}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{fn}: {where}: not valid JSON ({e.msg} at column {e.colno})") from e
      out.append((where, record))
    return out
  if isinstance(value, dict):
    lists = {k: v for k, v in value.items() if isinstance(v, list)}
    if lists and len(lists) == len(value) and len({len(v) for v in lists.values()}) == 1 and (
        len(lists) > 1 or not all(isinstance(r, dict) for r in next(iter(lists.values())))):
      # a column dict {field: [values]}
      keys = list(lists)
      n = len(lists[keys[0]])
      return [(f"{name} row {i}", {k: lists[k][i] for k in keys}) for i in range(n)]
    if len(lists) != 1:
      raise ValueError(f"{fn}: {name}: a JSON object must hold exactly one list of records or "
                       f"be a column dict of equal-length lists; got keys {sorted(value)}")
    value = next(iter(lists.values()))
  if not isinstance(value, list):
    raise ValueError(f"{fn}: {name}: expected JSON lines, a list of records or an object of "
                     f"lists; got a {type(value).__name__}")
  return [(f"{name} record {i}", r) for i, r in enumerate(value)]


def _arrow_rows(path: str, fn: str) -> list[dict]:
  try:
    import pyarrow as pa
    import pyarrow.parquet as pq
  except ImportError as e:
    raise ImportError(f"{fn}: reading {os.path.basename(path)!r} needs pyarrow, which is not "
                      "installed; install it with `pip install pyarrow`, or convert the data to "
                      "JSON lines") from e
  if path.lower().endswith(".parquet"):
    table = pq.read_table(path)
  else:
    # `save_to_disk` writes the Arrow IPC stream format; plain Arrow files use the file format.
    try:
      with pa.memory_map(path) as source:
        table = pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
      with pa.memory_map(path) as source:
        table = pa.ipc.open_file(source).read_all()
  return table.to_pylist()


def field(record: Any, where: str, fn: str, names: Sequence[str]) -> str:
  """The first of `names` present in `record`, checked to be a str."""
  if not isinstance(record, Mapping):
    raise ValueError(f"{fn}: {where}: expected a JSON object (a record), got "
                     f"{type(record).__name__}")
  for name in names:
    if name in record:
      value = record[name]
      if not isinstance(value, str):
        raise ValueError(f"{fn}: {where}: field {name!r} holds {_short(value)}, expected str")
      return value
  wanted = " or ".join(repr(n) for n in names)
  raise ValueError(f"{fn}: {where}: record has no field {wanted} (it has {sorted(record)})")


def _short(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


@functools.lru_cache(maxsize=8)
def cached(loader: Callable[[str], tuple], path: str, stamp: tuple[int, int]) -> tuple:
  """loader(path), cached in-process until the file's size or modification time changes."""
  del stamp  # part of the cache key only
  return loader(path)


def stamp(path: str) -> tuple[int, int]:
  st = os.stat(path)
  return st.st_size, st.st_mtime_ns


# -------------------------------------------------------------------------------- subsample

def subsample(items: Sequence[Any], n: Optional[int], seed: int, fn: str,
              strata: Optional[Sequence[str]] = None) -> list[Any]:
  """A deterministic subset of `n` items, in their original order.

  Args:
    items: the full list.
    n: how many to keep (None, or n >= len(items): all of them).
    seed: seeds `numpy.random.default_rng`; the same seed gives the same subset.
    fn: the public function (named in errors).
    strata: optional group label per item (e.g. the MMLU topic): each group keeps a share of `n`
      proportional to its size (largest remainders get the rounding), so small groups stay
      represented.
  """
  seed = validate.seed(fn, seed)
  if n is None:
    return list(items)
  n = validate.integer(fn, "n", n, minimum=1)
  if n >= len(items):
    return list(items)
  rng = np.random.default_rng(seed)
  if strata is None:
    keep = np.sort(rng.choice(len(items), size=n, replace=False))
    return [items[i] for i in keep]
  if len(strata) != len(items):
    raise ValueError(f"{fn}: strata has {len(strata)} labels for {len(items)} items")
  groups: dict[str, list[int]] = {}
  for i, label in enumerate(strata):
    groups.setdefault(label, []).append(i)
  names = sorted(groups)
  exact = np.asarray([n * len(groups[g]) / len(items) for g in names])
  quota = np.floor(exact).astype(int)
  for j in np.argsort(-(exact - quota), kind="stable")[:n - quota.sum()]:
    quota[j] += 1
  keep = []
  for g, q in zip(names, quota):
    keep.extend(np.asarray(groups[g])[rng.choice(len(groups[g]), size=q, replace=False)])
  return [items[i] for i in sorted(keep)]


# --------------------------------------------------------------------------------- batching

def pad_id_of(tokenizer, config) -> int:
  """The id used on padding: the tokenizer's pad, else its EOS, else the config's, else 0."""
  for candidate in (getattr(tokenizer, "pad_token_id", None),
                    getattr(tokenizer, "eos_token_id", None), config.pad_token_id,
                    *config.eos_token_ids):
    if candidate is not None and 0 <= candidate < config.vocab_size:
      return int(candidate)
  return 0


def check_items(fn: str, items: Any, kind: type) -> list:
  """`items` as a non-empty list of `kind` (what the suite's `load` returns)."""
  if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Sequence):
    raise validate.fail(fn, "items", items, f"a non-empty list of {kind.__name__} (from load())",
                        error=TypeError)
  items = list(items)
  if not items:
    raise validate.fail(fn, "items", items, f"a non-empty list of {kind.__name__}")
  for i, item in enumerate(items):
    if not isinstance(item, kind):
      raise validate.fail(fn, f"items[{i}]", item, f"a {kind.__name__} (from load())",
                          error=TypeError)
  ids = [item.id for item in items]
  if len(set(ids)) != len(ids):
    dup = next(i for i in ids if ids.count(i) > 1)
    raise validate.fail(fn, "items", items, f"items with distinct ids; {dup!r} repeats")
  return items


def check_comparable(fn: str, dense: Any, pruned: Any, suite: str) -> None:
  """Both results come from the same suite's `evaluate`, on the same items in the same order."""
  for name, value in (("dense", dense), ("pruned", pruned)):
    if not isinstance(value, dict) or value.get("suite") != suite or "items" not in value:
      raise validate.fail(fn, name, value, f"a result dict of {suite}.evaluate", error=TypeError)
  ids_d = [it["id"] for it in dense["items"]]
  ids_p = [it["id"] for it in pruned["items"]]
  if ids_d != ids_p:
    raise validate.ArgumentError(
        f"{fn}(dense, pruned): expected results on the same items in the same order; dense has "
        f"{len(ids_d)} items (first ids {ids_d[:3]}), pruned has {len(ids_p)} (first ids "
        f"{ids_p[:3]})")
  for key in ("max_new_tokens", "prompt"):
    if dense.get(key) != pruned.get(key):
      raise validate.ArgumentError(
          f"{fn}(dense, pruned): expected results with the same {key}; dense has "
          f"{dense.get(key)!r}, pruned has {pruned.get(key)!r}")


def mean(values: Sequence[float]) -> Optional[float]:
  """The mean as a float, or None for no values (JSON has no NaN)."""
  return float(np.mean(values)) if len(values) else None
