"""`load(name_or_path) -> Model`: the embedded default, a local HF directory or a local GGUF file.

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

from prunerep_jax import validate  # noqa: E402
from prunerep_jax.config import Config  # noqa: E402

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclasses.dataclass
class Model:
  """A loaded model: static config, params pytree (see `prunerep_jax.layout`), tokenizer.

  Every loader returns params as float32 JAX arrays, so transforms that use ``.at[]`` work on a
  model whatever file it came from; tokenizer is None when the source has none.
  """

  config: Config
  params: Any
  tokenizer: Any
  source: str = ""


def load(name_or_path: str = DEFAULT_MODEL) -> Model:
  """Loads a model by registered name, local HF directory or local ``.gguf`` file.

  Args:
    name_or_path: ``"smollm2-135m-instruct"`` (the embedded default), a directory holding
      config.json + *.safetensors (+ index) + tokenizer files, or a path to a ``.gguf`` file.
  """
  from prunerep_jax.loading import default, gguf, hf

  if not isinstance(name_or_path, (str, os.PathLike)):
    raise TypeError(f"load(name_or_path={name_or_path!r}): expected a model name or a path")
  name = os.fspath(name_or_path)
  if name in default.REGISTRY:
    return gguf.load_gguf(default.resolve(name), source=name)
  if os.path.isdir(name):
    return hf.load_hf_dir(name)
  if os.path.isfile(name):
    if name.endswith(".gguf"):
      return gguf.load_gguf(name)
    raise ValueError(f"load(name_or_path={name!r}): a file must be a .gguf model; for Hugging "
                     "Face checkpoints pass the directory holding config.json")
  raise FileNotFoundError(
      f"load(name_or_path={name!r}): not a registered model ({sorted(default.REGISTRY)}), "
      "nor an existing local directory or .gguf file (no hub downloads: models load offline)")


# ------------------------------------------------------------------ shared by the loaders

def to_jax(tree: dict) -> dict:
  """NumPy leaves -> JAX arrays, in place, one leaf at a time.

  Each NumPy buffer is released as soon as its JAX copy exists (the dict drops its reference), so
  peak host memory stays about one model plus one tensor, not two models.
  """
  for key, value in tree.items():
    tree[key] = to_jax(value) if isinstance(value, dict) else jnp.asarray(value)
    del value
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
      bad = ~np.isfinite(np.asarray(leaf))
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
