"""`load(name_or_path, dtype=, mesh=) -> Model`: the embedded default, a local HF directory or
a local GGUF file, in the dtype asked for and, given a mesh, already placed on it.

No path touches the network: HF_HUB_OFFLINE is set before transformers is imported anywhere
below this package.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from prunerep_jax import hostmem  # noqa: E402
from prunerep_jax import parallel  # noqa: E402
from prunerep_jax import validate  # noqa: E402
from prunerep_jax.config import Config  # noqa: E402

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclasses.dataclass
class Model:
  """A loaded model: static config, params pytree (see `prunerep_jax.layout`), tokenizer.

  Every loader returns params as JAX arrays of the requested dtype (float32 unless asked
  otherwise), so transforms that use ``.at[]`` work on a model whatever file it came from;
  tokenizer is None when the source has none.
  """

  config: Config
  params: Any
  tokenizer: Any
  source: str = ""


def load(name_or_path: str = DEFAULT_MODEL, *, dtype=None, mesh=None) -> Model:
  """Loads a model by registered name, local HF directory or local ``.gguf`` file.

  Args:
    name_or_path: ``"smollm2-135m-instruct"`` (the embedded default), a directory holding
      config.json + *.safetensors (+ index) + tokenizer files, or a path to a ``.gguf`` file.
    dtype: the params' dtype: None or "float32" (default), "bfloat16", "float16", or one of
      those as a NumPy / JAX dtype (jnp.bfloat16). Safetensors weights are converted tensor by
      tensor straight into it (a bf16 file loaded as bf16 is bit-identical to the file); GGUF
      weights are dequantised to float32 first, then cast.
    mesh: None (the default device), a ("data", "model") `jax.sharding.Mesh` or a spec such as
      "model:4" (see `prunerep_jax.parallel`): every tensor goes straight to its sharding
      (`parallel.param_specs`), so no device ever holds more than its share.

  Host memory: safetensors are read with plain file reads at the header's offsets (never
  memory-mapped), into one [L, ...] buffer of the target dtype per params leaf, which is placed
  on the device(s) and released before the next leaf: the peak is the placed model plus about one
  leaf, never a float32 copy of the whole model.
  """
  from prunerep_jax.loading import default, gguf, hf

  if not isinstance(name_or_path, (str, os.PathLike)):
    raise TypeError(f"load(name_or_path={name_or_path!r}): expected a model name or a path")
  name = os.fspath(name_or_path)
  dtype = resolve_dtype("load", dtype)
  mesh = parallel.as_mesh("load", mesh)
  if name in default.REGISTRY:
    return gguf.load_gguf(default.resolve(name), source=name, dtype=dtype, mesh=mesh)
  if os.path.isdir(name):
    return hf.load_hf_dir(name, dtype=dtype, mesh=mesh)
  if os.path.isfile(name):
    if name.endswith(".gguf"):
      return gguf.load_gguf(name, dtype=dtype, mesh=mesh)
    raise ValueError(f"load(name_or_path={name!r}): a file must be a .gguf model; for Hugging "
                     "Face checkpoints pass the directory holding config.json")
  raise FileNotFoundError(
      f"load(name_or_path={name!r}): not a registered model ({sorted(default.REGISTRY)}), "
      "nor an existing local directory or .gguf file (no hub downloads: models load offline)")


# ------------------------------------------------------------------ shared by the loaders

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16),
          "float16": np.dtype(np.float16)}


def resolve_dtype(fn: str, dtype: Any) -> np.dtype:
  """The params dtype a loader produces: None -> float32; a name of DTYPES or such a dtype."""
  if dtype is None:
    return DTYPES["float32"]
  if isinstance(dtype, str):
    if dtype in DTYPES:
      return DTYPES[dtype]
  else:
    try:
      resolved = np.dtype(dtype)
    except (TypeError, ValueError):
      resolved = None
    if resolved in DTYPES.values():
      return resolved
  raise validate.fail(fn, "dtype", dtype, f"None or one of {tuple(DTYPES)} (as a name or a "
                      "NumPy / JAX dtype such as jnp.bfloat16)")


def host_buffer(shape: tuple[int, ...], dtype) -> np.ndarray:
  """An uninitialised array aligned to 64 bytes: on the CPU backend `jax.device_put` adopts such
  a buffer instead of copying it, so the loaded leaf is not held twice."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape)) * dtype.itemsize
  raw = np.empty(nbytes + 64, np.uint8)
  start = (-raw.ctypes.data) % 64
  return raw[start:start + nbytes].view(dtype).reshape(shape)


def place_leaf(array: np.ndarray, sharding=None) -> jax.Array:
  """One params leaf on the device(s): the default device, or `sharding` (a NamedSharding)."""
  return jax.device_put(array) if sharding is None else jax.device_put(array, sharding)


def place(tree: dict, config: Config, dtype: np.dtype, mesh=None) -> dict:
  """NumPy leaves -> JAX arrays of `dtype` (on `mesh`'s shardings if given), in place, one leaf
  at a time: each host buffer (and its cast) is released as soon as the leaf is placed, so host
  memory holds at most one extra leaf."""
  shardings = None if mesh is None else parallel.param_shardings(config, mesh)

  def walk(node: dict, shard: Optional[dict]) -> None:
    for key in list(node):
      value = node[key]
      if isinstance(value, dict):
        walk(value, None if shard is None else shard[key])
        continue
      if value.dtype != dtype:
        cast = host_buffer(value.shape, dtype)
        cast[...] = value
        node[key] = value = cast  # the source leaf is released here
      # device_put is asynchronous: without waiting, the host buffers of every leaf would stay
      # alive beside their device copies until the first computation (+450 MB of peak RSS for
      # the default model on the CPU).
      node[key] = jax.block_until_ready(place_leaf(value, None if shard is None else shard[key]))
      del value

  walk(tree, shardings)
  hostmem.release_free_memory()  # the host copies and dequantisation temporaries just freed
  return tree


def check_finite(fn: str, params: dict,
                 file_tensor: Callable[[tuple[str, ...], Optional[int]], str]) -> None:
  """Refuses params holding NaN or Inf, naming the tensor the way the file names it.

  The check is `validate.check_finite`'s one jitted reduction over the tree; only when it fails
  are values fetched, to find the layer of the bad entry in a stacked [L, ...] tensor.

  Args:
    fn: the loader, for the message.
    params: the loaded layout pytree.
    file_tensor: (layout path keys, layer index or None) -> "FILE: tensor NAME".
  """
  try:
    validate.check_finite(fn, params)
  except validate.ArgumentError as e:
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
      bad = ~np.isfinite(np.asarray(parallel.fetch(leaf), np.float32))
      if bad.any():
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        layer = int(np.argwhere(bad)[0][0]) if keys[0] == "layers" else None
        raise ValueError(f"{file_tensor(keys, layer)} contains NaN or Inf values; expected "
                         "finite weights") from e
    raise


def check_tokenizer(tokenizer: Any, config: Config, source: str) -> None:
  """Refuses a tokenizer that can emit ids the model's embedding has no row for.

  A tokenizer smaller than the vocabulary is fine (checkpoints often pad vocab_size); a larger one
  would hand `forward` ids >= vocab_size, which index past the embedding.
  """
  if tokenizer is None:
    return
  vocab = config.vocab_size
  special = sorted({int(i) for i in getattr(tokenizer, "all_special_ids", ()) if i is not None
                    and int(i) >= vocab})
  if special:
    raise ValueError(f"{source}: the tokenizer's special token ids {special} are >= the model's "
                     f"vocab_size {vocab}; expected every id in [0, {vocab})")
  size = len(tokenizer)
  get_vocab = getattr(tokenizer, "get_vocab", None)
  top = max(get_vocab().values(), default=-1) if callable(get_vocab) else size - 1
  if size > vocab or top >= vocab:
    raise ValueError(f"{source}: the tokenizer has {size} tokens (ids up to {top}) but the "
                     f"model's vocab_size is {vocab}; expected every id in [0, {vocab}) (an id "
                     f">= {vocab} has no embedding row)")
