"""Export params as a Hugging Face checkpoint directory: the inverse of `loading/hf.py`.

`export_hf` writes what `transformers.AutoModelForCausalLM.from_pretrained` loads as an ordinary
Llama / Mistral / Qwen2 model and what `prunerep_jax.load` reads back to an equal `Config` and
the same weights (bit-identical for float32 exports)::

  DIR/config.json                       transformers 5 style (rope_parameters, dtype)
  DIR/model.safetensors                 or, above max_shard_size, shards plus
  DIR/model-0000k-of-0000n.safetensors    model.safetensors.index.json
  DIR/tokenizer files                   when a tokenizer is given

The directory is written through `prunerep_jax.atomic.staged_directory`: every argument is checked
first (params against the config, finiteness in one jitted reduction, the destination writable),
then the files are written into a hidden sibling, given the usual umask modes (safetensors writes
0600 on its own), fsynced and swapped into place, so a crash never leaves a partial checkpoint
and an overwrite never loses the previous one.

Pruned models export as plain dense models: a dropped sublayer is a zeroed output projection, a
dropped block is simply absent (fewer layers), unstructured zeros are stored as zeros. What was
pruned can be recorded under an extra config.json key (``extra_config={"prunerep_jax": ...}``),
which transformers keeps as an attribute and our loader ignores.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterator, Optional, Union

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from prunerep_jax import atomic, validate
from prunerep_jax.config import Config
from prunerep_jax.loading import hf

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"}
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _dtype_name(dtype: Any) -> str:
  if isinstance(dtype, str):
    name = dtype
  else:
    try:
      name = np.dtype(dtype).name
    except TypeError:
      name = repr(dtype)
  if name not in DTYPES:
    raise ValueError(f"export_hf(dtype={dtype!r}): expected one of {sorted(DTYPES)}")
  return name


def parse_size(size: Union[int, str]) -> int:
  """Bytes in "2GB", "500MB", "1GiB" or an int; GB is 10**9 as transformers reads it."""
  if isinstance(size, int) and not isinstance(size, bool):
    value = size
  elif isinstance(size, str):
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
    unit = match.group(2).upper() if match else None
    if unit not in _SIZE_UNITS:
      raise ValueError(f"export_hf(max_shard_size={size!r}): expected bytes as an int or a "
                       "string like '2GB', '500MB', '1GiB'")
    value = int(float(match.group(1)) * _SIZE_UNITS[unit])
  else:
    raise ValueError(f"export_hf(max_shard_size={size!r}): expected an int or a string like '2GB'")
  if value <= 0:
    raise ValueError(f"export_hf(max_shard_size={size!r}): expected a positive size")
  return value


def _rope_parameters(config: Config) -> dict:
  rope = {"rope_type": "default", "rope_theta": float(config.rope_theta)}
  s = config.rope_scaling
  if s is not None:
    rope.update(rope_type="llama3", factor=float(s.factor),
                low_freq_factor=float(s.low_freq_factor),
                high_freq_factor=float(s.high_freq_factor),
                original_max_position_embeddings=int(s.original_max_position_embeddings))
  return rope


def _check_expressible(config: Config) -> None:
  """Refuses configs the family's transformers class cannot express (they would load wrong)."""
  c = config
  if c.family == "llama":
    if c.qkv_bias != c.o_bias:
      raise ValueError(
          f"export_hf(config): family 'llama' has qkv_bias={c.qkv_bias} but o_bias={c.o_bias}; "
          "transformers' Llama has one attention_bias flag for q/k/v/o, so expected them equal")
    if c.sliding_window is not None:
      raise ValueError(f"export_hf(config): family 'llama' with sliding_window="
                       f"{c.sliding_window}; transformers' Llama has no sliding window, "
                       "expected None")
  elif c.family == "mistral":
    if c.qkv_bias or c.o_bias or c.mlp_bias:
      raise ValueError(f"export_hf(config): family 'mistral' with qkv_bias={c.qkv_bias}, "
                       f"o_bias={c.o_bias}, mlp_bias={c.mlp_bias}; transformers' Mistral has "
                       "no biases, expected all False")
  elif c.family == "qwen2":
    if not c.qkv_bias or c.o_bias or c.mlp_bias:
      raise ValueError(f"export_hf(config): family 'qwen2' with qkv_bias={c.qkv_bias}, "
                       f"o_bias={c.o_bias}, mlp_bias={c.mlp_bias}; transformers' Qwen2 always "
                       "has q/k/v biases and no others, expected True, False, False")
    if c.sliding_window is not None:
      raise ValueError(f"export_hf(config): family 'qwen2' with sliding_window="
                       f"{c.sliding_window}; Qwen2 sliding-window export is not supported, "
                       "expected None")


def hf_config_dict(config: Config, dtype: Any = "float32",
                   extra_config: Optional[dict] = None) -> dict:
  """The config.json dict for `config` (transformers 5 field names), with `extra_config` merged.

  Raises:
    ValueError: the config cannot be expressed by its family's transformers class, an
      `extra_config` key collides with a generated field or is one our loader would refuse, or
      the result does not read back (through `loading.hf.config_from_hf`) to `config`.
  """
  c = config
  _check_expressible(c)
  eos = list(c.eos_token_ids)
  d = {
      "architectures": [ARCHITECTURES[c.family]],
      "model_type": c.family,
      "vocab_size": c.vocab_size,
      "hidden_size": c.hidden_size,
      "intermediate_size": c.intermediate_size,
      "num_hidden_layers": c.num_layers,
      "num_attention_heads": c.num_heads,
      "num_key_value_heads": c.num_kv_heads,
      # Always explicit: Qwen2/Mistral otherwise derive it as hidden_size // heads.
      "head_dim": c.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": float(c.rms_norm_eps),
      "rope_parameters": _rope_parameters(c),
      "max_position_embeddings": c.max_position_embeddings,
      "tie_word_embeddings": c.tie_word_embeddings,
      "attention_dropout": 0.0,
      "bos_token_id": c.bos_token_id,
      "eos_token_id": None if not eos else eos[0] if len(eos) == 1 else eos,
      "pad_token_id": c.pad_token_id,
      "dtype": _dtype_name(dtype),
      "use_cache": True,
  }
  if c.family == "llama":
    d.update(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias, pretraining_tp=1)
  elif c.family == "mistral":
    # Written even when None: a missing key means transformers' default window of 4096.
    d["sliding_window"] = c.sliding_window
  else:
    d.update(use_sliding_window=False, sliding_window=None,
             layer_types=["full_attention"] * c.num_layers)

  if extra_config is not None:
    if not isinstance(extra_config, dict):
      raise ValueError(f"export_hf(extra_config={type(extra_config).__name__}): expected a dict "
                       "or None")
    clash = sorted(k for k in extra_config if k in d)
    if clash:
      raise ValueError(f"export_hf(extra_config): keys {clash} would overwrite fields derived "
                       "from config; expected only new keys such as 'prunerep_jax'")
    d.update(extra_config)
  try:
    json.dumps(d)
  except (TypeError, ValueError) as e:
    raise ValueError(f"export_hf(extra_config): must be JSON-serialisable ({e})") from None
  # The written file must read back to this very config, or `prunerep_jax.load` of the export
  # would refuse it or (worse) build a different model.
  try:
    back = hf.config_from_hf(json.loads(json.dumps(d)), source="export_hf(config.json)")
  except ValueError as e:
    raise ValueError(f"export_hf: the generated config.json would not load back ({e}); "
                     "extra_config keys must be ones the loader ignores, e.g. 'prunerep_jax'"
                     ) from e
  if back != c:
    raise ValueError(f"export_hf: the generated config.json reads back as {back}, expected "
                     f"{c}; this config cannot be exported faithfully")
  return d


def _hf_tensors(params: Any, config: Config) -> Iterator[tuple[str, Any]]:
  """(HF name, HF-layout array) for every tensor of `hf.hf_table`, one layer slice at a time."""
  for name, t in hf.hf_table(config).items():
    leaf = params
    for k in t.path:
      leaf = leaf[k]
    array = leaf if t.layer is None else leaf[t.layer]
    yield name, np.asarray(array).T if t.transpose else array


def export_hf(directory: str, params: Any, config: Config, tokenizer: Any = None, *,
              dtype: Any = "float32", extra_config: Optional[dict] = None,
              overwrite: bool = False, max_shard_size: Union[int, str] = "2GB") -> str:
  """Writes `params` as a Hugging Face checkpoint directory, atomically.

  Args:
    directory: destination; must not exist unless overwrite=True. Everything is written to a
      hidden sibling first and swapped into place, so a crash never leaves a partial checkpoint.
    params: params pytree in the layout of `prunerep_jax.layout` (NumPy or JAX arrays, any float
      dtype), checked against `config`.
    config: the model's `Config` (for a block-dropped model, the one with fewer layers).
    tokenizer: optional transformers tokenizer, saved with its own ``save_pretrained``.
    dtype: storage dtype of the weights, "float32" or "bfloat16" (round to nearest even).
    extra_config: extra config.json keys, e.g. ``{"prunerep_jax": {"dropped_sublayers": [...]}}``;
      they may not overwrite derived fields and must be ones our loader ignores.
    overwrite: replace an existing directory.
    max_shard_size: largest safetensors file (int bytes or '2GB', '500MB', '1GiB'); larger
      models are sharded with a model.safetensors.index.json. A single tensor larger than it
      gets a shard of its own.

  Returns:
    The absolute path of the written directory.

  Raises:
    FileExistsError: `directory` exists and overwrite is False (or it is a file or symlink).
    NotADirectoryError, PermissionError: `directory` cannot be created (errors name it, never
      the hidden staging sibling).
    ValueError: params do not match `config` or hold NaN/Inf, the config is not expressible by
      its family's transformers class, or a bad dtype / extra_config / max_shard_size.
    TypeError: `tokenizer` has no save_pretrained.
  """
  if not isinstance(config, Config):
    raise TypeError(f"export_hf(config={type(config).__name__}): expected a prunerep_jax Config")
  np_dtype = DTYPES[_dtype_name(dtype)]
  shard_bytes = parse_size(max_shard_size)
  if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
    raise TypeError(f"export_hf(tokenizer={type(tokenizer).__name__}): expected a transformers "
                    "tokenizer with save_pretrained, or None")
  # Every check runs before the staging directory exists: bad input leaves no trace on disk.
  directory = atomic.check_destination(directory, overwrite=overwrite, caller="export_hf")
  hf_config = hf_config_dict(config, dtype, extra_config)
  validate.params("export_hf", params, config, finite=True)

  with atomic.staged_directory(directory, overwrite=overwrite, caller="export_hf") as stage:
    shards: list[tuple[str, list[str], int]] = []  # (temporary file, tensor names, bytes)
    pending: dict[str, np.ndarray] = {}
    pending_bytes = 0

    def flush():
      nonlocal pending, pending_bytes
      part = os.path.join(stage, f"shard-{len(shards):05d}.part")
      save_file(pending, part, metadata={"format": "pt"})
      shards.append((part, list(pending), pending_bytes))
      pending, pending_bytes = {}, 0

    for name, array in _hf_tensors(params, config):
      array = np.ascontiguousarray(np.asarray(array).astype(np_dtype, copy=False))
      if pending and pending_bytes + array.nbytes > shard_bytes:
        flush()
      pending[name] = array
      pending_bytes += array.nbytes
    flush()

    if len(shards) == 1:
      os.rename(shards[0][0], os.path.join(stage, hf.WEIGHTS_FILE))
    else:
      weight_map = {}
      for k, (part, names, _) in enumerate(shards, start=1):
        final = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        os.rename(part, os.path.join(stage, final))
        weight_map.update({n: final for n in names})
      index = {"metadata": {"total_size": sum(s[2] for s in shards)}, "weight_map": weight_map}
      with open(os.path.join(stage, hf.INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(stage, hf.CONFIG_FILE), "w") as f:
      json.dump(hf_config, f, indent=2)
      f.write("\n")
    if tokenizer is not None:
      tokenizer.save_pretrained(stage)
  return directory
