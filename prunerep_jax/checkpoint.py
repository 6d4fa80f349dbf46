"""Save and restore a model's params and config with orbax; round trips are bit-identical.

Layout of a checkpoint directory::

  DIR/config.json   {"format": "prunerep_jax.checkpoint/2", "config": the `Config`,
                     "extra": metadata given to `save`,
                     "checksums": {"params": {PATH: {"sha256", "dtype", "shape"}, ...},
                                   "masks": {...}}}            (masks: `save_pruned` only)
  DIR/params/       an orbax StandardCheckpointer checkpoint of the params pytree
  DIR/masks/        the keep-masks pytree, same format (`save_pruned` with masks only)

Writing: every argument is validated (params against the config layout, finiteness in one jitted
reduction, metadata JSON-serialisable, the destination writable) before anything touches the
disk; then the whole directory is written into a hidden staging sibling and swapped into place
(`prunerep_jax.atomic.staged_directory`). A process killed mid-save leaves the previous
checkpoint intact; the next write to the same place removes what the killed one left.

Reading: the tree, dtypes and shapes to restore come from config.json, not from orbax's own
metadata. Every array read back is checked against the sha256 of its bytes recorded at save, so
a flipped bit is refused rather than restored as silently changed weights. A damaged or
incomplete directory raises `CorruptCheckpointError` (a ValueError) naming it, and a malformed
config.json a ValueError naming the file and the field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from prunerep_jax import atomic, layout, validate
from prunerep_jax.config import Config, RopeScaling

FORMAT = "prunerep_jax.checkpoint/2"
CONFIG_FILE = "config.json"
# Params are stored in the dtypes JAX holds without x64, so they restore to the same dtype.
PARAM_DTYPES = ("float32", "bfloat16", "float16")

_FORMAT_FAMILY = "prunerep_jax.checkpoint/"
_META_KEYS = ("format", "config", "extra", "checksums")
_CHECKSUM_KEYS = ("sha256", "dtype", "shape")
_PRUNED_FORMAT = "prunerep_jax.pruned/1"


class CorruptCheckpointError(ValueError):
  """A checkpoint directory whose data is damaged, incomplete or does not match its checksums."""


# ------------------------------------------------------------------------------------ writing

def save(directory: str, params: Any, config: Config, *, extra: Optional[dict] = None,
         overwrite: bool = False) -> str:
  """Writes params + config to `directory`, atomically.

  Args:
    directory: destination path; must not exist unless overwrite=True.
    params: params pytree in the layout of `prunerep_jax.layout`, checked against `config`,
      finite, in float32, bfloat16 or float16.
    config: the model's `Config`.
    extra: JSON-serialisable dict stored beside the config (e.g. a pruning report).
    overwrite: replace an existing checkpoint at `directory`; the replacement is atomic.

  Returns:
    The absolute directory path.

  Raises:
    FileExistsError: `directory` exists and overwrite is False (or it is a file or symlink).
    NotADirectoryError, PermissionError: `directory` cannot be created.
    ValueError: params do not match `config`, hold NaN/Inf or have another dtype, or `extra` is
      not a JSON-serialisable dict. Nothing is written when any check fails.
  """
  directory = atomic.check_destination(directory, overwrite=overwrite, caller="save")
  _check_params("save", params, config)
  if extra is not None and not isinstance(extra, dict):
    raise validate.fail("save", "extra", extra, "a JSON-serialisable dict or None")
  _write("save", directory, config, extra or {}, {"params": params}, overwrite)
  return directory


def save_pruned(directory: str, result, *, overwrite: bool = False) -> str:
  """Writes a `PruneResult` (params, masks, report, config) to `directory`, atomically.

  The result is an ordinary checkpoint (`restore` reads its params and config) whose extra
  metadata is ``{"pruned": {"format": ..., "report": {...}}}``, plus ``DIR/masks/`` when masks
  is not None.

  Args:
    directory: destination path (must not exist unless overwrite=True).
    result: a `prunerep_jax.prune.PruneResult`; masks is None or a nested dict (string keys) of
      bool arrays, and report a JSON-serialisable dict.
    overwrite: replace an existing checkpoint at `directory` (masks of the old one included).

  Returns:
    The absolute directory path.

  Raises:
    TypeError: `result` lacks params/masks/report/config.
    ValueError: params do not match result.config or are not finite, a mask leaf is not bool,
      or the report is not JSON-serialisable. Nothing is written when any check fails.
    FileExistsError: `directory` exists and overwrite is False.
  """
  for attr in ("params", "masks", "report", "config"):
    if not hasattr(result, attr):
      raise TypeError(f"save_pruned(result={type(result).__name__}): expected a PruneResult "
                      f"(with params, masks, report, config); it has no {attr!r}")
  directory = atomic.check_destination(directory, overwrite=overwrite, caller="save_pruned")
  if not isinstance(result.report, dict):
    raise validate.fail("save_pruned", "result.report", result.report,
                        "a JSON-serialisable dict")
  _check_params("save_pruned", result.params, result.config)
  items = {"params": result.params}
  if result.masks is not None:
    _check_masks(result.masks)
    items["masks"] = result.masks
  extra = {"pruned": {"format": _PRUNED_FORMAT, "report": result.report}}
  _write("save_pruned", directory, result.config, extra, items, overwrite)
  return directory


def _check_params(fn: str, params: Any, config: Config) -> None:
  validate.params(fn, params, config, finite=True)
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if np.dtype(leaf.dtype).name not in PARAM_DTYPES:
      raise validate.ArgumentError(
          f"{fn}(params): tensor {layout.path_str(path)} has dtype {np.dtype(leaf.dtype).name}; "
          f"expected one of {PARAM_DTYPES}")


def _check_masks(masks: Any) -> None:
  """masks: a non-empty nested dict with string keys (no '/') and bool array leaves."""
  what = "expected None or a nested dict (string keys) of bool arrays"
  leaves = jax.tree_util.tree_flatten_with_path(masks)[0]
  if not isinstance(masks, dict) or not leaves:
    raise validate.ArgumentError(f"save_pruned(result.masks={type(masks).__name__}): {what}, "
                                 "not an empty or non-dict tree")
  for path, leaf in leaves:
    if not all(isinstance(k, jax.tree_util.DictKey) and isinstance(k.key, str) and k.key
               and "/" not in k.key for k in path):
      raise validate.ArgumentError(f"save_pruned(result.masks): leaf "
                                   f"{jax.tree_util.keystr(path)} is not under string keys "
                                   f"without '/'; {what}")
    if getattr(leaf, "dtype", None) != np.bool_:
      raise validate.ArgumentError(f"save_pruned(result.masks): leaf {layout.path_str(path)} "
                                   f"has dtype {getattr(leaf, 'dtype', type(leaf).__name__)}; "
                                   "expected bool (True = kept)")


def _checksums(tree: Any) -> dict[str, dict]:
  """{path: {"sha256", "dtype", "shape"}} of every leaf, hashing the raw bytes of one host copy
  at a time (so a model on an accelerator is never copied to the host whole)."""
  sums = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    array = np.ascontiguousarray(np.asarray(leaf))
    sums[layout.path_str(path)] = {
        "sha256": hashlib.sha256(array.reshape(-1).view(np.uint8)).hexdigest(),
        "dtype": np.dtype(array.dtype).name, "shape": list(array.shape)}
  return sums


def _write(fn: str, directory: str, config: Config, extra: dict, items: dict[str, Any],
           overwrite: bool) -> None:
  """Builds config.json (checksums included) in memory, then writes everything staged."""
  atomic.json_text(extra, caller=fn, name="result.report" if fn == "save_pruned" else "extra")
  checksums = {name: _checksums(tree) for name, tree in items.items()}
  meta = {"format": FORMAT, "config": config.to_dict(), "extra": extra, "checksums": checksums}
  text = json.dumps(meta, indent=2) + "\n"
  with atomic.staged_directory(directory, overwrite=overwrite, caller=fn) as stage:
    for name, tree in items.items():
      with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(stage, name), tree)
        ckptr.wait_until_finished()
    with open(os.path.join(stage, CONFIG_FILE), "x") as f:
      f.write(text)


# ------------------------------------------------------------------------------------ reading

def restore(directory: str, *, mesh=None) -> tuple[Any, Config, dict]:
  """Reads a checkpoint written by `save` (or `save_pruned`). Returns (params, config, extra).

  The arrays come back on the default device, or with mesh (a `prunerep_jax.parallel` mesh or
  spec) straight into its sharding, whatever devices saved them.

  Raises:
    FileNotFoundError: `directory` or its config.json does not exist.
    ValueError: config.json is malformed (the message names the file and the field) or of an
      older format.
    CorruptCheckpointError: the params data is missing, damaged or fails its checksum.
  """
  directory, meta = _read_meta("restore", directory)
  placement = _placement("restore", meta["config"], mesh)
  params = _read_item("restore", directory, "params", meta["checksums"]["params"], placement)
  return params, meta["config"], meta["extra"]


def restore_pruned(directory: str, *, mesh=None):
  """Reads a checkpoint written by `save_pruned`; returns the `PruneResult`, bit-identical
  (placed as `restore` places it).

  Raises:
    FileNotFoundError, ValueError, CorruptCheckpointError: as `restore`, for params and masks;
      ValueError also when the checkpoint was not written by `save_pruned`.
  """
  from prunerep_jax.prune.result import PruneResult  # prune imports model code; load lazily

  directory, meta = _read_meta("restore_pruned", directory)
  pruned = meta["extra"].get("pruned")
  if (not isinstance(pruned, dict) or pruned.get("format") != _PRUNED_FORMAT
      or not isinstance(pruned.get("report"), dict)):
    raise ValueError(f"restore_pruned(directory={directory!r}): config.json has no 'pruned' "
                     f"metadata of format {_PRUNED_FORMAT!r}; expected a checkpoint written by "
                     "save_pruned (use restore for plain checkpoints)")
  placement = _placement("restore_pruned", meta["config"], mesh)
  params = _read_item("restore_pruned", directory, "params", meta["checksums"]["params"],
                      placement)
  masks = None
  if "masks" in meta["checksums"]:
    masks = _read_item("restore_pruned", directory, "masks", meta["checksums"]["masks"],
                       placement)
  return PruneResult(params=params, masks=masks, report=pruned["report"], config=meta["config"])


def _read_meta(fn: str, directory: str) -> tuple[str, dict]:
  """(absolute directory, checked config.json with "config" as a `Config`)."""
  if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
    raise validate.fail(fn, "directory", directory, "a non-empty path", error=TypeError)
  directory = os.path.abspath(os.path.expanduser(os.fspath(directory)))
  with contextlib.suppress(OSError):  # a read-only location is still readable
    atomic.recover(directory)  # a replacement interrupted between its two renames
  meta_path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(f"{fn}(directory={directory!r}): no {CONFIG_FILE}; not a "
                            "prunerep_jax checkpoint")
  try:
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{fn}: {meta_path} is not valid JSON ({e})") from None

  def bad(field: str, expected: str) -> ValueError:
    return ValueError(f"{fn}: {meta_path}: field {field!r} is malformed; expected {expected}")

  if not isinstance(meta, dict):
    raise ValueError(f"{fn}: {meta_path} holds a JSON {type(meta).__name__}; expected an object "
                     f"with keys {list(_META_KEYS)}")
  fmt = meta.get("format")
  if fmt != FORMAT:
    if isinstance(fmt, str) and fmt.startswith(_FORMAT_FAMILY):
      raise ValueError(f"{fn}: {meta_path} has format={fmt!r}, written by another version of "
                       f"prunerep_jax; this version reads only {FORMAT!r} (with checksums); "
                       "save the model again with this version")
    raise ValueError(f"{fn}: {meta_path} has format={fmt!r}; expected {FORMAT!r}, not a "
                     "prunerep_jax checkpoint")
  unknown = sorted(set(meta) - set(_META_KEYS))
  missing = [k for k in _META_KEYS if k not in meta]
  if unknown or missing:
    raise ValueError(f"{fn}: {meta_path}: unknown fields {unknown}, missing fields {missing}; "
                     f"expected exactly {list(_META_KEYS)}")
  config = _config_from_dict(meta["config"], bad)
  if not isinstance(meta["extra"], dict):
    raise bad("extra", "a JSON object")
  sums = meta["checksums"]
  if not isinstance(sums, dict) or "params" not in sums or not set(sums) <= {"params", "masks"}:
    raise bad("checksums", "an object with keys 'params' and optionally 'masks'")
  for item, entries in sums.items():
    _check_checksums(entries, f"checksums.{item}", PARAM_DTYPES if item == "params" else ("bool",),
                     bad)
  implied = layout.flat_shapes(config)
  recorded = {p: tuple(e["shape"]) for p, e in sums["params"].items()}
  for path in sorted(set(implied) | set(recorded)):
    if recorded.get(path) != implied.get(path):
      raise bad("checksums.params", f"the tensors its config implies; tensor {path} is recorded "
                f"with {_shape_text(recorded.get(path))}, but the config implies "
                f"{_shape_text(implied.get(path))}")
  return directory, {**meta, "config": config}


def _shape_text(shape: Optional[tuple[int, ...]]) -> str:
  return "no such tensor" if shape is None else f"shape {shape}"


def _config_from_dict(d: Any, bad) -> Config:
  """`Config` from config.json's "config" field; errors name the offending field."""
  if not isinstance(d, dict):
    raise bad("config", "an object with the fields of prunerep_jax.Config")
  fields = {f.name: f for f in dataclasses.fields(Config)}
  unknown = sorted(set(d) - set(fields))
  if unknown:
    raise bad(f"config.{unknown[0]}", f"only fields of prunerep_jax.Config {sorted(fields)}")
  required = [n for n, f in fields.items()
              if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
  absent = [n for n in required if n not in d]
  if absent:
    raise bad(f"config.{absent[0]}", "present (required fields: " + ", ".join(required) + ")")
  rope = d.get("rope_scaling")
  if rope is not None:
    rope_fields = [f.name for f in dataclasses.fields(RopeScaling)]
    if not isinstance(rope, dict) or sorted(rope) != sorted(rope_fields):
      raise bad("config.rope_scaling", f"null or an object with exactly the keys {rope_fields}")
  eos = d.get("eos_token_ids", [])
  if not isinstance(eos, list):
    raise bad("config.eos_token_ids", "a list of token ids")
  try:
    return Config.from_dict(d)
  except (TypeError, ValueError) as e:
    raise bad("config", f"a valid prunerep_jax.Config ({e})") from None


def _check_checksums(entries: Any, field: str, dtypes: tuple[str, ...], bad) -> None:
  if not isinstance(entries, dict) or not entries:
    raise bad(field, "a non-empty object mapping tensor paths to checksums")
  for path, e in entries.items():
    if not isinstance(e, dict) or sorted(e) != sorted(_CHECKSUM_KEYS):
      raise bad(f"{field}.{path}", f"an object with keys {list(_CHECKSUM_KEYS)}")
    digest, dtype, shape = e["sha256"], e["dtype"], e["shape"]
    if (not isinstance(digest, str) or len(digest) != 64
        or any(c not in "0123456789abcdef" for c in digest)):
      raise bad(f"{field}.{path}.sha256", "64 lowercase hex digits")
    if dtype not in dtypes:
      raise bad(f"{field}.{path}.dtype", f"one of {dtypes}")
    if not isinstance(shape, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
      raise bad(f"{field}.{path}.shape", "a list of non-negative integers")
    if not path or any(not k for k in path.split("/")):
      raise bad(f"{field}.{path}", "tensor paths like 'layers/attn/q_proj/kernel'")


def _placement(fn: str, config: Config, mesh) -> Callable[[str], Any]:
  """path -> the sharding a restored array gets: the default device, or its place on the mesh
  (masks share the paths, and so the placement, of the kernels they mask)."""
  from prunerep_jax import parallel

  mesh = parallel.as_mesh(fn, mesh)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return lambda path: device
  flat = jax.tree_util.tree_flatten_with_path(parallel.param_shardings(config, mesh))[0]
  by_path = {layout.path_str(p): sh for p, sh in flat}
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return lambda path: by_path.get(path, replicated)


def _target(entries: dict, placement: Callable[[str], Any]) -> dict:
  """The nested-dict restore target of ShapeDtypeStructs that config.json records, each with
  its sharding (the saving devices need not exist here)."""
  tree: dict = {}
  for path, e in entries.items():
    *parents, leaf = path.split("/")
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
      if not isinstance(node, dict):
        raise ValueError(f"tensor path {path!r} runs through another tensor")
    if leaf in node:
      raise ValueError(f"tensor path {path!r} is also a prefix of other tensors")
    node[leaf] = jax.ShapeDtypeStruct(tuple(e["shape"]), jnp.dtype(e["dtype"]),
                                      sharding=placement(path))
  return tree


def _read_item(fn: str, directory: str, name: str, entries: dict,
               placement: Callable[[str], Any]) -> Any:
  """Restores the orbax item `directory/name` and verifies every array against `entries`."""
  item_dir = os.path.join(directory, name)

  def corrupt(why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{fn}(directory={directory!r}): corrupt or incomplete "
                                  f"checkpoint: {why}")

  if not os.path.isdir(item_dir):
    raise corrupt(f"{name}/ is missing but {CONFIG_FILE} records it")
  try:
    target = _target(entries, placement)
  except ValueError as e:
    raise corrupt(f"{CONFIG_FILE} records an impossible tree for {name}/ ({e})") from None
  try:
    with ocp.StandardCheckpointer() as ckptr:
      tree = ckptr.restore(item_dir, target)
  except MemoryError:
    raise
  except Exception as e:  # noqa: BLE001 -- tensorstore/orbax raise many types for bad data
    # tensorstore appends a whole spec dump; the first sentence says what failed.
    first = (str(e).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0]
    raise corrupt(f"orbax cannot read {name}/ ({type(e).__name__}: {first[:300]})") from e
  got = _checksums(tree)
  if set(got) != set(entries):
    raise corrupt(f"{name}/ holds tensors {sorted(got)[:5]}..., {CONFIG_FILE} records "
                  f"{sorted(entries)[:5]}...")
  for path, e in entries.items():
    actual = got[path]
    if actual != e:
      raise CorruptCheckpointError(
          f"{fn}(directory={directory!r}): the checkpoint data is corrupt: tensor {path} read "
          f"from {item_dir} has sha256 {actual['sha256'][:16]}... ({actual['dtype']}"
          f"{actual['shape']}), but {CONFIG_FILE} records {e['sha256'][:16]}... "
          f"({e['dtype']}{e['shape']})")
  return tree
