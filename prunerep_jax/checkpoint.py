"""Save and restore a model's params and config with orbax; round trips are bit-identical.

Layout of a checkpoint directory::

  DIR/config.json   the `Config` (JSON), plus any `extra` metadata given to `save`
  DIR/params/       an orbax StandardCheckpointer checkpoint of the params pytree
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
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
