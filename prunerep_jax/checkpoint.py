"""Save and restore a model's params and config with orbax; round trips are bit-identical.

Layout of a checkpoint directory::

  DIR/config.json   the `Config` (JSON), plus any `extra` metadata given to `save`
  DIR/params/       an orbax StandardCheckpointer checkpoint of the params pytree

`save_pruned` / `restore_pruned` store a whole `PruneResult` the same way, with the masks as a
sibling orbax item ``DIR/masks/``; `staged_directory` gives writers an atomic write.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from prunerep_jax import layout
from prunerep_jax.config import Config

_FORMAT = "prunerep_jax.checkpoint/1"


def save(directory: str, params: Any, config: Config, *, extra: Optional[dict] = None,
         overwrite: bool = False) -> str:
  """Writes params + config to `directory` (created; must not exist unless overwrite=True).

  Args:
    directory: destination path.
    params: params pytree in the layout of `prunerep_jax.layout` (checked against `config`).
    config: the model's `Config`.
    extra: JSON-serialisable metadata stored beside the config (e.g. a pruning report).
    overwrite: replace an existing checkpoint at `directory`.
  Returns the absolute directory path.
  """
  layout.check_params(params, config, source="save(params)")
  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory) and not overwrite:
    raise FileExistsError(f"save(directory={directory!r}): already exists; pass overwrite=True "
                          "to replace it")
  os.makedirs(directory, exist_ok=True)
  meta = {"format": _FORMAT, "config": config.to_dict(), "extra": extra or {}}
  try:
    text = json.dumps(meta, indent=2)
  except TypeError as e:
    raise ValueError(f"save(extra=...): metadata must be JSON-serialisable ({e})") from None
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, "params"), params, force=overwrite)
    ckptr.wait_until_finished()
  with open(os.path.join(directory, "config.json"), "w") as f:
    f.write(text)
  return directory


def restore(directory: str) -> tuple[Any, Config, dict]:
  """Reads a checkpoint written by `save`. Returns (params, config, extra)."""
  directory = os.path.abspath(os.fspath(directory))
  meta_path = os.path.join(directory, "config.json")
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(f"restore(directory={directory!r}): no config.json; not a "
                            "prunerep_jax checkpoint")
  with open(meta_path) as f:
    try:
      meta = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"restore: {meta_path} is not valid JSON ({e})") from None
  if meta.get("format") != _FORMAT:
    raise ValueError(f"restore: {meta_path} has format={meta.get('format')!r}, expected "
                     f"{_FORMAT!r}")
  config = Config.from_dict(meta["config"])
  params_dir = os.path.join(directory, "params")
  if not os.path.isdir(params_dir):
    raise FileNotFoundError(f"restore: {params_dir} is missing; the checkpoint is incomplete")
  with ocp.StandardCheckpointer() as ckptr:
    target = _target_from_metadata(ckptr.metadata(params_dir), config, params_dir)
    params = ckptr.restore(params_dir, target)
  return params, config, meta.get("extra", {})


def _target_from_metadata(meta, config: Config, params_dir: str):
  """Restore target with the stored dtypes (bf16 stays bf16), after checking every stored
  shape against the config, so a mismatch is reported before orbax reads anything."""
  stored = getattr(meta, "item_metadata", meta)
  stored = getattr(stored, "tree", stored)
  got = {layout.path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(stored)[0]}
  expected = layout.flat_shapes(config)
  if set(got) != set(expected):
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    raise ValueError(f"restore: {params_dir} does not match config.json: missing tensors "
                     f"{missing[:5]}, unexpected tensors {extra[:5]}")
  for path, shape in expected.items():
    if tuple(got[path].shape) != tuple(shape):
      raise ValueError(f"restore: tensor {path} in {params_dir} has shape "
                       f"{tuple(got[path].shape)}, but config.json implies {tuple(shape)}")
  return jax.tree_util.tree_map(
      lambda s, m: jax.ShapeDtypeStruct(s, m.dtype), layout.param_shapes(config), stored,
      is_leaf=lambda x: isinstance(x, tuple))


# ---------------------------------------------------------------------------------------------
# Atomic directory writes and pruned-model checkpoints.
#
# A pruned checkpoint is an ordinary `save` checkpoint (so `restore` still reads its params and
# config) whose extra metadata records the report, plus the keep-masks as a sibling orbax item:
#
#   DIR/config.json   Config + {"pruned": {"format": ..., "report": {...}, "has_masks": bool}}
#   DIR/params/       orbax checkpoint of the pruned params
#   DIR/masks/        orbax checkpoint of the bool masks pytree (absent when masks is None)

_PRUNED_FORMAT = "prunerep_jax.pruned/1"


@contextlib.contextmanager
def staged_directory(directory: str, *, overwrite: bool, caller: str):
  """Yields an empty directory to fill; on success it becomes `directory`, atomically.

  The staging directory is a hidden sibling of `directory` (same filesystem, so the final
  rename is atomic). A crash or exception while writing leaves `directory` untouched and the
  staging directory removed (or, after a hard crash, a hidden ``.NAME.tmp-*`` sibling), never a
  half-written checkpoint at `directory`. With overwrite=True an existing directory is moved
  aside, the new one renamed in, and the old one deleted.

  Args:
    directory: final path.
    overwrite: allow replacing an existing directory at `directory`.
    caller: how errors name the calling function, e.g. "export_hf".

  Raises:
    FileExistsError: `directory` exists and overwrite is False, or it is not a directory.
  """
  directory = os.path.abspath(os.fspath(directory))
  if os.path.lexists(directory):
    if not overwrite:
      raise FileExistsError(f"{caller}(directory={directory!r}): already exists; pass "
                            "overwrite=True to replace it")
    if not os.path.isdir(directory) or os.path.islink(directory):
      raise FileExistsError(f"{caller}(directory={directory!r}): exists and is not a directory; "
                            "refusing to replace it even with overwrite=True")
  parent, name = os.path.split(directory)
  os.makedirs(parent, exist_ok=True)
  # os.mkdir (not tempfile.mkdtemp) so the result gets the usual umask permissions, not 0700.
  stage = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
  os.mkdir(stage)
  try:
    yield stage
    if os.path.lexists(directory):
      old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:12]}")
      os.rename(directory, old)
      try:
        os.rename(stage, directory)
      except BaseException:
        os.rename(old, directory)  # put the previous checkpoint back
        raise
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(stage, directory)
  finally:
    if os.path.lexists(stage):
      shutil.rmtree(stage, ignore_errors=True)


def save_pruned(directory: str, result, *, overwrite: bool = False) -> str:
  """Writes a `PruneResult` (params, masks, report, config) to `directory`, atomically.

  Args:
    directory: destination path (must not exist unless overwrite=True).
    result: a `prunerep_jax.prune.PruneResult`; masks is None or a pytree of bool arrays, and
      report a JSON-serialisable dict.
    overwrite: replace an existing checkpoint at `directory`.

  Returns:
    The absolute directory path.

  Raises:
    TypeError: `result` lacks params/masks/report/config.
    ValueError: params do not match result.config, a mask leaf is not bool, or the report is
      not JSON-serialisable.
    FileExistsError: `directory` exists and overwrite is False.
  """
  for attr in ("params", "masks", "report", "config"):
    if not hasattr(result, attr):
      raise TypeError(f"save_pruned(result={type(result).__name__}): expected a PruneResult "
                      f"(with params, masks, report, config); it has no {attr!r}")
  if not isinstance(result.report, dict):
    raise ValueError(f"save_pruned(result.report={type(result.report).__name__}): expected a "
                     "JSON-serialisable dict")
  masks = result.masks
  if masks is not None:
    leaves = jax.tree_util.tree_flatten_with_path(masks)[0]
    if not leaves:
      raise ValueError("save_pruned(result.masks): an empty pytree; expected None or bool arrays")
    for path, leaf in leaves:
      if getattr(leaf, "dtype", None) != np.bool_:
        raise ValueError(f"save_pruned(result.masks): leaf {layout.path_str(path)} has dtype "
                         f"{getattr(leaf, 'dtype', type(leaf).__name__)}; expected bool")
  # Validate before staging, so bad input never creates even a temporary directory.
  layout.check_params(result.params, result.config, source="save_pruned(result.params)")
  extra = {"pruned": {"format": _PRUNED_FORMAT, "report": result.report,
                      "has_masks": masks is not None}}
  try:
    json.dumps(extra)
  except (TypeError, ValueError) as e:
    raise ValueError(f"save_pruned(result.report=...): must be JSON-serialisable ({e})") from None
  with staged_directory(directory, overwrite=overwrite, caller="save_pruned") as stage:
    save(stage, result.params, result.config, extra=extra, overwrite=True)
    if masks is not None:
      with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(stage, "masks"), masks)
        ckptr.wait_until_finished()
  return os.path.abspath(os.fspath(directory))


def restore_pruned(directory: str):
  """Reads a checkpoint written by `save_pruned`; returns the `PruneResult`, bit-identical.

  Raises:
    FileNotFoundError: the directory, its params or its masks item is missing.
    ValueError: the checkpoint was not written by `save_pruned` or does not match its config.
  """
  from prunerep_jax.prune.result import PruneResult  # prune imports model code; load lazily

  params, config, extra = restore(directory)
  meta = extra.get("pruned") if isinstance(extra, dict) else None
  if not isinstance(meta, dict) or meta.get("format") != _PRUNED_FORMAT:
    raise ValueError(f"restore_pruned(directory={os.fspath(directory)!r}): config.json has no "
                     f"'pruned' metadata of format {_PRUNED_FORMAT!r}; expected a checkpoint "
                     "written by save_pruned (use restore for plain checkpoints)")
  masks = None
  if meta.get("has_masks"):
    masks_dir = os.path.join(os.path.abspath(os.fspath(directory)), "masks")
    if not os.path.isdir(masks_dir):
      raise FileNotFoundError(f"restore_pruned: {masks_dir} is missing but config.json records "
                              "masks; the checkpoint is incomplete")
    with ocp.StandardCheckpointer() as ckptr:
      stored = ckptr.metadata(masks_dir)
      stored = getattr(stored, "item_metadata", stored)
      stored = getattr(stored, "tree", stored)
      target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), stored)
      masks = ckptr.restore(masks_dir, target)
  return PruneResult(params=params, masks=masks, report=meta.get("report", {}), config=config)
