"""`load(name_or_path) -> Model`: the embedded default, a local HF directory or a local GGUF file.

No path touches the network: HF_HUB_OFFLINE is set before transformers is imported anywhere
below this package.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from prunerep_jax.config import Config  # noqa: E402

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclasses.dataclass
class Model:
  """A loaded model: static config, params pytree (see `prunerep_jax.layout`), tokenizer."""

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
