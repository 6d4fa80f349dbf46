"""Local Hugging Face checkpoints: config.json + *.safetensors (+ index) + tokenizer files.

Two steps, each refusing what it does not understand:

* `config_from_hf` maps a config.json dict onto `Config`. Every field is either mapped, checked
  to hold the one value we implement (``hidden_act == "silu"``, ``pretraining_tp == 1``, ...),
  or on an explicit allow-list of fields that cannot change the forward pass. Anything else is
  an error: an unhandled rope_scaling, sliding_window or bias flag silently changes the model.
* `load_hf_dir` reads the safetensors weights by an explicit name mapping, checks each tensor's
  shape against `layout.param_shapes`, transposes linear weights to Flax [in, out] kernels and
  stacks the L decoder blocks on a leading axis. Weights stream tensor by tensor into the
  requested dtype (float32 by default) and, given a mesh, straight into their sharding.

Missing optional fields take the default the transformers config class uses for that model
type (e.g. Mistral's sliding_window 4096), so a config.json means here what it means to
transformers; the core dimensions are required.
"""

from __future__ import annotations

import json
import math
import os
import struct
import warnings
from typing import Any, NamedTuple, Optional

import ml_dtypes
import numpy as np

from prunerep_jax import layout
from prunerep_jax import parallel
from prunerep_jax.config import Config, RopeScaling
from prunerep_jax import loading
from prunerep_jax.loading import Model

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")

# Fields that do not change the forward pass (bookkeeping, training-only or output switches).
_HARMLESS_FIELDS = frozenset({
    "_name_or_path",
    "architectures",
    "chunk_size_feed_forward",  # only used by models that chunk their MLP; these do not
    "dtype",  # storage dtype; weights are converted to the dtype `load` asks for
    "id2label",
    "initializer_range",
    "is_llama_config",  # nanotron export flag (SmolLM configs)
    "label2id",
    "model_type",
    "output_attentions",
    "output_hidden_states",
    "problem_type",
    "prunerep_jax",  # export_hf's record of how the model was pruned; the weights say the rest
    "return_dict",
    "tokenizer_class",
    "torch_dtype",
    "transformers_version",
    "use_cache",
})

# Fields every family maps or checks.
_COMMON_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
    "rope_parameters", "max_position_embeddings", "tie_word_embeddings", "hidden_act",
    "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id", "layer_types",
    "is_encoder_decoder", "add_cross_attention",
})

_FAMILY_FIELDS = {
    "llama": frozenset({"attention_bias", "mlp_bias", "pretraining_tp", "rope_interleaved"}),
    "mistral": frozenset({"sliding_window"}),
    # max_window_layers only picks which layers slide when use_sliding_window is true, which
    # is refused below.
    "qwen2": frozenset({"use_sliding_window", "sliding_window", "max_window_layers"}),
}

# Defaults of the transformers config classes (5.x) for fields a config.json may omit.
_FAMILY_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2},
    "mistral": {"max_position_embeddings": 4096 * 32, "bos_token_id": 1, "eos_token_id": 2,
                "sliding_window": 4096},
    "qwen2": {"max_position_embeddings": 32768, "bos_token_id": None, "eos_token_id": None},
}

_REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")

_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                     "original_max_position_embeddings")


def _field_error(source: str, field: str, value: Any, expected: str) -> ValueError:
  return ValueError(f"{source}: field {field}={value!r} is not supported; expected {expected}")


def _int_field(d: dict, field: str, source: str, default: Any = None) -> Optional[int]:
  value = d.get(field, default)
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(f"{source}: field {field}={value!r}: expected an integer")
  return value


def _bool_field(d: dict, field: str, source: str, default: bool = False) -> bool:
  value = d.get(field, default)
  if not isinstance(value, bool):
    raise ValueError(f"{source}: field {field}={value!r}: expected true or false")
  return value


def _float_field(d: dict, field: str, source: str, default: float) -> float:
  value = d.get(field, default)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{source}: field {field}={value!r}: expected a number")
  return float(value)


def _eos_ids(value: Any, source: str) -> tuple[int, ...]:
  if value is None:
    return ()
  ids = value if isinstance(value, list) else [value]
  for i in ids:
    if isinstance(i, bool) or not isinstance(i, int):
      raise ValueError(f"{source}: field eos_token_id={value!r}: expected an int or a list of ints")
  return tuple(ids)


def _rope(d: dict, source: str, max_position_embeddings: int
         ) -> tuple[float, Optional[RopeScaling]]:
  """(rope_theta, rope_scaling) from either config.json form.

  transformers 5 writes ``rope_parameters: {"rope_type": ..., "rope_theta": ..., <scaling
  keys>}`` and no top-level rope_theta; older files have top-level ``rope_theta`` plus
  ``rope_scaling`` (null or a dict keyed by ``rope_type`` or the older ``type``).
  """
  new, old = d.get("rope_parameters"), d.get("rope_scaling")
  for field, value in (("rope_parameters", new), ("rope_scaling", old)):
    if value is not None and not isinstance(value, dict):
      raise ValueError(f"{source}: field {field}={value!r}: expected null or an object")
  if new is not None and old is not None and new != old:
    raise ValueError(f"{source}: fields rope_parameters={new!r} and rope_scaling={old!r} "
                     "disagree; expected only one of them, or both equal")
  field = "rope_parameters" if new is not None else "rope_scaling"
  params = dict(new if new is not None else old or {})

  top_theta = _float_field(d, "rope_theta", source, 10000.0)
  theta = _float_field(params, "rope_theta", source, top_theta)
  if "rope_theta" in d and "rope_theta" in params and theta != top_theta:
    raise ValueError(f"{source}: field rope_theta={d['rope_theta']!r} disagrees with "
                     f"{field}.rope_theta={params['rope_theta']!r}; expected the same value")
  params.pop("rope_theta", None)

  rope_type = params.pop("rope_type", None)
  legacy_type = params.pop("type", None)
  if rope_type is not None and legacy_type is not None and rope_type != legacy_type:
    raise ValueError(f"{source}: field {field} has rope_type={rope_type!r} and "
                     f"type={legacy_type!r}; expected one rope type")
  rope_type = rope_type or legacy_type or "default"
  # partial_rotary_factor == 1.0 is the plain full-width rotation.
  if params.get("partial_rotary_factor", 1.0) == 1.0:
    params.pop("partial_rotary_factor", None)

  if rope_type == "default":
    scaling = None
  elif rope_type == "llama3":
    # transformers falls back to max_position_embeddings when the original length is absent.
    params.setdefault("original_max_position_embeddings", max_position_embeddings)
    missing = [k for k in _LLAMA3_ROPE_KEYS if k not in params]
    if missing:
      raise ValueError(f"{source}: field {field} with rope_type 'llama3' lacks {missing}; "
                       f"expected all of {list(_LLAMA3_ROPE_KEYS)}")
    values = {k: params.pop(k) for k in _LLAMA3_ROPE_KEYS}
    for k, v in values.items():
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{source}: field {field}.{k}={v!r}: expected a positive number")
    if values["high_freq_factor"] <= values["low_freq_factor"]:
      raise ValueError(
          f"{source}: field {field} has high_freq_factor={values['high_freq_factor']!r} <= "
          f"low_freq_factor={values['low_freq_factor']!r}; expected high > low")
    if not float(values["original_max_position_embeddings"]).is_integer():
      raise ValueError(f"{source}: field {field}.original_max_position_embeddings="
                       f"{values['original_max_position_embeddings']!r}: expected an integer")
    scaling = RopeScaling(
        factor=float(values["factor"]),
        low_freq_factor=float(values["low_freq_factor"]),
        high_freq_factor=float(values["high_freq_factor"]),
        original_max_position_embeddings=int(values["original_max_position_embeddings"]))
  else:
    raise _field_error(source, f"{field}.rope_type", rope_type, "'default' or 'llama3'")
  if params:
    raise ValueError(f"{source}: field {field} has unknown keys {sorted(params)} for rope_type "
                     f"{rope_type!r}; refusing to ignore them")
  return theta, scaling


def config_from_hf(d: dict, source: str = CONFIG_FILE) -> Config:
  """Builds a `Config` from a Hugging Face config.json dict.

  Args:
    d: the parsed config.json.
    source: how errors name the file (e.g. its path).

  Raises:
    ValueError: naming the field and value, for an unsupported model type, an unknown field,
      or a value this library does not implement (other activations, rope types, sliding
      window in Qwen2, non-full attention layer types, ...).
  """
  if not isinstance(d, dict):
    raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
  family = d.get("model_type")
  if family not in _FAMILY_FIELDS:
    raise _field_error(source, "model_type", family, f"one of {sorted(_FAMILY_FIELDS)}")

  unknown = sorted(set(d) - _HARMLESS_FIELDS - _COMMON_FIELDS - _FAMILY_FIELDS[family])
  if unknown:
    raise ValueError(
        f"{source}: unknown fields {unknown} for model_type {family!r}; refusing to ignore them "
        "(an unhandled field can silently change the model)")
  missing = [f for f in _REQUIRED_FIELDS if f not in d]
  if missing:
    raise ValueError(f"{source}: missing required fields {missing}")
  for field in _REQUIRED_FIELDS:
    if _int_field(d, field, source) <= 0:
      raise ValueError(f"{source}: field {field}={d[field]!r}: expected a positive integer")

  if d.get("hidden_act", "silu") != "silu":
    raise _field_error(source, "hidden_act", d["hidden_act"], "'silu'")
  if _float_field(d, "attention_dropout", source, 0.0) != 0.0:
    raise _field_error(source, "attention_dropout", d["attention_dropout"], "0.0")
  for field in ("is_encoder_decoder", "add_cross_attention", "rope_interleaved"):
    if _bool_field(d, field, source, False):
      raise _field_error(source, field, d[field], "false")
  if d.get("pretraining_tp", 1) not in (None, 1):
    raise _field_error(source, "pretraining_tp", d["pretraining_tp"], "1")
  layer_types = d.get("layer_types")
  if layer_types is not None and (not isinstance(layer_types, list) or
                                  any(t != "full_attention" for t in layer_types)):
    raise _field_error(source, "layer_types", layer_types,
                       "null or a list of 'full_attention' only")

  defaults = _FAMILY_DEFAULTS[family]
  hidden = _int_field(d, "hidden_size", source)
  heads = _int_field(d, "num_attention_heads", source)
  layers = _int_field(d, "num_hidden_layers", source)
  if layer_types is not None and len(layer_types) != layers:
    raise ValueError(f"{source}: field layer_types has {len(layer_types)} entries; expected "
                     f"num_hidden_layers={layers}")
  # transformers' Mistral/Qwen2 classes default this to 8/32 whatever the head count; a
  # config.json without it is a plain multi-head model, and the k_proj shape check catches
  # the rare file that relied on those constants.
  kv_heads = _int_field(d, "num_key_value_heads", source)
  kv_heads = heads if kv_heads is None else kv_heads
  head_dim = _int_field(d, "head_dim", source)
  if head_dim is None:
    if hidden % heads:
      raise ValueError(f"{source}: hidden_size={hidden} is not a multiple of "
                       f"num_attention_heads={heads} and head_dim is not given")
    head_dim = hidden // heads
  max_pos = _int_field(d, "max_position_embeddings", source, defaults["max_position_embeddings"])
  rope_theta, rope_scaling = _rope(d, source, max_pos)

  if family == "llama":
    attention_bias = _bool_field(d, "attention_bias", source)
    qkv_bias, o_bias = attention_bias, attention_bias
    mlp_bias = _bool_field(d, "mlp_bias", source)
    sliding_window = None
  elif family == "mistral":
    qkv_bias = o_bias = mlp_bias = False
    sliding_window = _int_field(d, "sliding_window", source, defaults["sliding_window"])
  else:
    qkv_bias, o_bias, mlp_bias = True, False, False
    if _bool_field(d, "use_sliding_window", source):
      raise _field_error(source, "use_sliding_window", d["use_sliding_window"],
                         "false (Qwen2 sliding-window attention is not implemented)")
    # Without use_sliding_window transformers drops sliding_window, whatever its value.
    sliding_window = None

  fields = dict(
      family=family,
      vocab_size=_int_field(d, "vocab_size", source),
      hidden_size=hidden,
      intermediate_size=_int_field(d, "intermediate_size", source),
      num_layers=layers,
      num_heads=heads,
      num_kv_heads=kv_heads,
      head_dim=head_dim,
      rms_norm_eps=_float_field(d, "rms_norm_eps", source, 1e-6),
      rope_theta=rope_theta,
      rope_scaling=rope_scaling,
      max_position_embeddings=max_pos,
      tie_word_embeddings=_bool_field(d, "tie_word_embeddings", source),
      qkv_bias=qkv_bias,
      o_bias=o_bias,
      mlp_bias=mlp_bias,
      sliding_window=sliding_window,
      bos_token_id=_int_field(d, "bos_token_id", source, defaults["bos_token_id"]),
      eos_token_ids=_eos_ids(d.get("eos_token_id", defaults["eos_token_id"]), source),
      pad_token_id=_int_field(d, "pad_token_id", source),
  )
  try:
    return Config(**fields)
  except ValueError as e:  # Config names its own fields; say which file they came from
    raise ValueError(f"{source}: {e}") from e


class HFTensor(NamedTuple):
  """Where one Hugging Face tensor lives in our params: the layout path, the layer index (None for
  tensors outside the layer stack) and whether it is transposed (HF Linear weights are [out, in],
  Flax kernels [in, out])."""

  path: tuple[str, ...]
  layer: Optional[int]
  transpose: bool


def hf_table(config: Config) -> dict[str, HFTensor]:
  """The one HF name table: every HF tensor name of `config`'s model, in the order transformers
  writes them, mapped to its place in the params. The loader reads by it and `export_hf` writes
  by it."""
  biases = {"q_proj": config.qkv_bias, "k_proj": config.qkv_bias, "v_proj": config.qkv_bias,
            "o_proj": config.o_bias, "gate_proj": config.mlp_bias, "up_proj": config.mlp_bias,
            "down_proj": config.mlp_bias}
  table = {"model.embed_tokens.weight": HFTensor(("embed", "embedding"), None, False)}
  for i in range(config.num_layers):
    prefix = f"model.layers.{i}"
    table[f"{prefix}.input_layernorm.weight"] = HFTensor(("layers", "attn_norm", "scale"), i, False)
    for ours, hf_module, projs in (("attn", "self_attn", layout.ATTN_LINEARS),
                                   ("mlp", "mlp", layout.MLP_LINEARS)):
      for proj in projs:
        table[f"{prefix}.{hf_module}.{proj}.weight"] = HFTensor(("layers", ours, proj, "kernel"),
                                                                i, True)
        if biases[proj]:
          table[f"{prefix}.{hf_module}.{proj}.bias"] = HFTensor(("layers", ours, proj, "bias"),
                                                                i, False)
      if ours == "attn":
        table[f"{prefix}.post_attention_layernorm.weight"] = HFTensor(
            ("layers", "mlp_norm", "scale"), i, False)
  table["model.norm.weight"] = HFTensor(("final_norm", "scale"), None, False)
  if not config.tie_word_embeddings:
    table["lm_head.weight"] = HFTensor(("lm_head", "kernel"), None, True)
  return table


def _ignorable(name: str, config: Config) -> bool:
  # Rotary inverse-frequency buffers are recomputed from the config; a tied lm_head is the
  # embedding again (transformers itself overwrites it with the embedding when tying).
  return name.endswith("rotary_emb.inv_freq") or (
      config.tie_word_embeddings and name == "lm_head.weight")


# Bytes per element of every safetensors dtype (to check the header's offsets against shapes).
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
             "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
# The float dtypes we read, as NumPy dtypes (NumPy has no bfloat16; ml_dtypes provides it).
_NUMPY_DTYPES = {"F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
                 "F32": np.dtype("<f4"), "F64": np.dtype("<f8")}


class _Entry(NamedTuple):
  """One tensor of a safetensors file: dtype name, shape, absolute [begin, end) byte range."""

  dtype: str
  shape: tuple[int, ...]
  begin: int
  end: int


class _SafetensorsFile:
  """One safetensors file: the header is parsed and checked on open; tensors are read with plain
  file reads at the header's offsets, never memory-mapped (mapped pages of the whole file would
  count in the process's resident memory while the model is loading).

  The format is an 8-byte little-endian header length, the JSON header {name: {"dtype", "shape",
  "data_offsets": [begin, end]}, "__metadata__": ...} with offsets relative to the data that
  follows it.
  """

  def __init__(self, path: str):
    self.path = path
    self.entries = self._parse_header()
    self.keys = set(self.entries)

  def _corrupt(self, why: str) -> ValueError:
    return ValueError(f"{self.path}: not a readable safetensors file (truncated or corrupt?): "
                      f"{why}")

  def _parse_header(self) -> dict[str, _Entry]:
    size = os.path.getsize(self.path)
    with open(self.path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise self._corrupt(f"the file has {size} bytes, fewer than the 8-byte header length")
      (n,) = struct.unpack("<Q", head)
      if 8 + n > size:
        raise self._corrupt(f"the header claims {n} bytes but the file has {size}")
      try:
        header = json.loads(f.read(n))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise self._corrupt(f"the header is not JSON ({e})") from e
    if not isinstance(header, dict):
      raise self._corrupt(f"the header is a {type(header).__name__}, not an object")
    data_start, data_size = 8 + n, size - 8 - n
    entries = {}
    for name, info in header.items():
      if name == "__metadata__":
        continue
      try:
        dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        ok = (dtype in _ITEMSIZE and all(isinstance(d, int) and d >= 0 for d in shape)
              and isinstance(begin, int) and isinstance(end, int))
      except (TypeError, KeyError, ValueError):
        ok = False
      if not ok:
        raise self._corrupt(f"tensor {name} has a malformed header entry {info!r}")
      nbytes = math.prod(shape) * _ITEMSIZE[dtype]
      if not 0 <= begin <= end or end - begin != nbytes:
        raise self._corrupt(f"tensor {name} ({dtype}{list(shape)}, {nbytes} bytes) has data "
                            f"offsets [{begin}, {end}]")
      if end > data_size:
        raise self._corrupt(f"tensor {name} ends at data byte {end} but the file holds "
                            f"{data_size} bytes of data")
      entries[name] = _Entry(dtype, shape, data_start + begin, data_start + end)
    return entries

  def shape(self, name: str) -> tuple[int, ...]:
    return self.entries[name].shape

  def check_float(self, name: str) -> None:
    dtype = self.entries[name].dtype
    if dtype not in _FLOAT_DTYPES:
      raise ValueError(f"{self.path}: tensor {name} has dtype {dtype}; expected one of "
                       f"{_FLOAT_DTYPES}")

  def numpy_dtype(self, name: str) -> np.dtype:
    return _NUMPY_DTYPES[self.entries[name].dtype]

  def read(self, name: str, out: Optional[np.ndarray] = None) -> np.ndarray:
    """The tensor in its file dtype ([out, in] for a Linear weight), read straight into `out`
    (a C-contiguous array of its shape and file dtype) or a freshly allocated array."""
    entry = self.entries[name]
    array = np.empty(entry.shape, self.numpy_dtype(name)) if out is None else out
    view = memoryview(array.reshape(-1).view(np.uint8))
    try:
      with open(self.path, "rb", buffering=0) as f:
        f.seek(entry.begin)
        done = 0
        while done < len(view):
          got = f.readinto(view[done:])
          if not got:
            raise EOFError(f"the file ends {len(view) - done} bytes before the tensor does")
          done += got
    except (OSError, EOFError) as e:
      raise ValueError(f"{self.path}: cannot read tensor {name} (dtype {entry.dtype}): {e}") from e
    return array


def _weight_files(path: str) -> dict[str, Optional[list[str]]]:
  """Safetensors file path -> HF tensor names the index puts there (None: no index)."""
  single = os.path.join(path, WEIGHTS_FILE)
  index = os.path.join(path, INDEX_FILE)
  if os.path.isfile(single):
    return {single: None}
  if not os.path.isfile(index):
    present = sorted(os.listdir(path))
    raise FileNotFoundError(
        f"{path}: no {WEIGHTS_FILE} nor {INDEX_FILE} (directory holds {present[:20]}); "
        "expected safetensors weights (convert .bin/.pt checkpoints with transformers first)")
  try:
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"{index}: expected JSON with a 'weight_map' object: {e}") from e
  if not isinstance(weight_map, dict):
    raise ValueError(f"{index}: field weight_map={type(weight_map).__name__}; expected an object")
  files: dict[str, list[str]] = {}
  for name, shard in weight_map.items():
    files.setdefault(os.path.join(path, shard), []).append(name)
  for shard in files:
    if not os.path.isfile(shard):
      raise FileNotFoundError(f"{index}: lists shard {os.path.basename(shard)}, which does not "
                              f"exist in {path}")
  return files


class _Source(NamedTuple):
  """Where one HF tensor is read from and where it goes."""

  file: _SafetensorsFile
  name: str
  layer: Optional[int]
  transpose: bool


def _plan(path: str, config: Config) -> dict[tuple[str, ...], list[_Source]]:
  """Every layout leaf -> the HF tensors that fill it, all checked before any data is read.

  Raises the loader's errors (missing shard, index/file disagreement, unexpected, duplicated,
  missing, mis-shaped or non-float tensors), naming the file and tensor.
  """
  names = hf_table(config)
  shapes = layout.param_shapes(config)
  plan: dict[tuple[str, ...], list[_Source]] = {}
  file_of: dict[str, str] = {}
  for file_path, listed in _weight_files(path).items():
    st = _SafetensorsFile(file_path)
    if listed is not None:
      absent = sorted(set(listed) - st.keys)
      if absent:
        raise ValueError(f"{file_path}: the index lists tensors {absent[:5]} in this shard but "
                         "the file does not hold them")
      keys = listed
    else:
      keys = sorted(st.keys)
    for name in keys:
      if name not in names:
        if _ignorable(name, config):
          continue
        raise ValueError(f"{file_path}: unexpected tensor {name} for this config "
                         f"(family={config.family}, num_layers={config.num_layers}, "
                         f"qkv_bias={config.qkv_bias}, o_bias={config.o_bias}, "
                         f"mlp_bias={config.mlp_bias}, "
                         f"tie_word_embeddings={config.tie_word_embeddings})")
      if name in file_of:
        raise ValueError(f"{file_path}: tensor {name} appears in more than one file")
      file_of[name] = file_path
      leaf_path, layer, transpose = names[name]
      full_shape = _at(shapes, leaf_path)
      one_shape = full_shape[1:] if layer is not None else full_shape
      hf_shape = tuple(reversed(one_shape)) if transpose else tuple(one_shape)
      if st.shape(name) != hf_shape:
        raise ValueError(f"{file_path}: tensor {name} has shape {st.shape(name)}, expected "
                         f"{hf_shape} from {CONFIG_FILE}")
      st.check_float(name)
      plan.setdefault(leaf_path, []).append(_Source(st, name, layer, transpose))
  missing = sorted(set(names) - set(file_of))
  if missing:
    raise ValueError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                     f"required by {CONFIG_FILE}")
  return plan


def _at(tree: dict, keys: tuple[str, ...]) -> Any:
  """The leaf of a layout-structured tree (shapes, shardings) at `keys`."""
  for k in keys:
    tree = tree[k]
  return tree


# Bits that are all set in the exponent of Inf and NaN, per float dtype (as unsigned integers).
_EXPONENT_BITS = {np.dtype(np.float16): (np.uint16, 0x7C00),
                  np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7F80),
                  np.dtype(np.float32): (np.uint32, 0x7F800000),
                  np.dtype(np.float64): (np.uint64, 0x7FF0000000000000)}


def _nonfinite(array: np.ndarray) -> bool:
  """Whether a float array holds NaN or Inf, read from its bits (integer temporaries of the
  tensor's size only: checking the loaded model on the device would materialise a flag per
  weight, a quarter of a bf16 model's size, at once)."""
  uint, bits = _EXPONENT_BITS[array.dtype]
  return bool(np.any((array.view(uint) & uint(bits)) == uint(bits)))


def _check_finite(src: _Source, stored: np.ndarray, loaded: np.ndarray) -> None:
  """Refuses a tensor holding NaN or Inf in the file, or values the target dtype overflows."""
  if not _nonfinite(loaded):
    return
  if stored is loaded or _nonfinite(stored):
    raise ValueError(f"{src.file.path}: tensor {src.name} contains NaN or Inf values; expected "
                     "finite weights")
  raise ValueError(f"{src.file.path}: tensor {src.name} holds values beyond the range of "
                   f"{loaded.dtype}, which become Inf; load the model in float32 (or bfloat16)")


def _read_leaf(sources: list[_Source], shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
  """One params leaf (a stacked [L, ...] one or a global one) in `dtype`, filled tensor by
  tensor: each is read, transposed to [in, out] if a Linear weight and converted while copied
  into its slot, so at most one file tensor exists besides the leaf. Every slot is checked to be
  finite as it is filled."""
  leaf = loading.host_buffer(shape, dtype)
  for src in sources:
    slot = leaf if src.layer is None else leaf[src.layer]
    if not src.transpose and src.file.numpy_dtype(src.name) == dtype:
      src.file.read(src.name, out=slot)  # norms, biases, the embedding: no copy at all
      _check_finite(src, slot, slot)
      continue
    array = src.file.read(src.name)
    with np.errstate(over="ignore"):  # an overflow is reported by name just below
      slot[...] = array.T if src.transpose else array
    _check_finite(src, array, slot)
    del array
  return leaf


def load_params(path: str, config: Config, dtype=None, mesh=None) -> dict:
  """Reads the safetensors weights under ``path`` into the layout pytree of JAX arrays.

  Streams: the whole plan (names, shapes, dtypes) is checked first, then each params leaf is
  filled tensor by tensor in `dtype` (each tensor checked to be finite on the host as it
  arrives), placed (on `mesh`'s sharding, if given) and its host buffer released before the next
  leaf is read.

  Args:
    path: the model directory.
    config: its `Config`.
    dtype: the params' dtype (see `loading.resolve_dtype`; default float32).
    mesh: None or a ("data", "model") mesh (see `prunerep_jax.parallel`).

  Raises:
    FileNotFoundError: no weights file, or a shard the index lists is absent.
    ValueError: naming the file and tensor, for corrupt files, unknown, missing, mis-shaped or
      non-finite tensors, or values `dtype` cannot hold.
  """
  dtype = loading.resolve_dtype("load_params", dtype)
  mesh = parallel.as_mesh("load_params", mesh)
  plan = _plan(path, config)
  shapes = layout.param_shapes(config)
  shardings = None if mesh is None else parallel.param_shardings(config, mesh)
  params: dict = {}
  for leaf_path in layout.flat_shapes(config):
    keys = tuple(leaf_path.split("/"))
    leaf = _read_leaf(plan[keys], _at(shapes, keys), dtype)
    node = params
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = loading.place_leaf(
        leaf, None if shardings is None else _at(shardings, keys))
    del leaf  # the host buffer goes before the next leaf is read (or is the device's, on CPU)
  layout.check_params(params, config, source=path)
  return params


def _load_tokenizer(path: str):
  if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
    warnings.warn(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                  "Model.tokenizer is None")
    return None
  import transformers  # heavy; only needed when there is a tokenizer to load

  try:
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  except Exception as e:
    raise ValueError(f"{path}: tokenizer files present but transformers.AutoTokenizer could not "
                     f"load them: {e}") from e


def load_hf_dir(path: str, *, dtype=None, mesh=None) -> Model:
  """Loads a local Hugging Face model directory.

  Args:
    path: directory holding config.json, model.safetensors (or model.safetensors.index.json
      and its shards) and optionally tokenizer files.
    dtype, mesh: the params' dtype (default float32) and placement, as `prunerep_jax.load`.

  Returns:
    `Model` with JAX params of `dtype` in the `prunerep_jax.layout` structure; tokenizer is None
    (with a warning) when the directory has no tokenizer files.

  Raises:
    ValueError: besides the config and weight errors above, a tokenizer with more tokens than
      config.json's vocab_size or special ids outside it (checked before the weights are read).
  """
  path = os.fspath(path)
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{config_path}: not found; a Hugging Face model directory needs "
                            f"{CONFIG_FILE}")
  try:
    with open(config_path) as f:
      d = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_path}: not valid JSON: {e}") from e
  config = config_from_hf(d, source=config_path)
  tokenizer = _load_tokenizer(path)
  loading.check_tokenizer(tokenizer, config, source=path)
  params = load_params(path, config, dtype, mesh)
  return Model(config=config, params=params, tokenizer=tokenizer, source=path)
