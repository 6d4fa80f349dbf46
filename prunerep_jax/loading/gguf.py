"""`load_gguf(path) -> Model`: a llama-architecture GGUF file (llama.cpp's format) in our layout.

Three things differ from a Hugging Face checkpoint and are undone here:

* Quantisation. Every tensor is dequantised to float32 with `gguf.quants.dequantize`; the model
  then runs in float32 on the dequantised values, exactly as transformers does with the same file.
* Orientation. GGUF lists a matrix's dims fastest-first (``ne = [in, out]``), so the numpy array
  the reader hands back is ``[out, in]``, the torch ``nn.Linear`` orientation; our kernels are
  ``[in, out]``, so every matrix is transposed.
* The q/k row order. llama.cpp's converter reorders the rows of each q and k head from Hugging
  Face's half-split RoPE pairing (dims ``i`` and ``i + H/2`` rotate together, ``rotate_half``) to
  an interleaved one (dims ``2i`` and ``2i + 1``). Within a head, HF row ``j * H/2 + i`` is stored
  at GGUF row ``2 * i + j`` (``i < H/2``, ``j`` in {0, 1}); `_unpermute_rows` inverts that so our
  model keeps HF's RoPE convention and its logits match transformers'.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import gguf
import numpy as np

from prunerep_jax import layout
from prunerep_jax import loading
from prunerep_jax import parallel
from prunerep_jax.config import Config
from prunerep_jax.loading import Model
from prunerep_jax.loading import tokenizer as tokenizer_lib

SUPPORTED_ARCHITECTURES = ("llama",)

# Per-block GGUF tensor -> (path in params["layers"], is a matrix). Matrices are transposed into
# kernels; norms and biases are vectors.
_BLOCK_TENSORS = {
    "attn_norm.weight": (("attn_norm", "scale"), False),
    "attn_q.weight": (("attn", "q_proj", "kernel"), True),
    "attn_k.weight": (("attn", "k_proj", "kernel"), True),
    "attn_v.weight": (("attn", "v_proj", "kernel"), True),
    "attn_output.weight": (("attn", "o_proj", "kernel"), True),
    "attn_q.bias": (("attn", "q_proj", "bias"), False),
    "attn_k.bias": (("attn", "k_proj", "bias"), False),
    "attn_v.bias": (("attn", "v_proj", "bias"), False),
    "attn_output.bias": (("attn", "o_proj", "bias"), False),
    "ffn_norm.weight": (("mlp_norm", "scale"), False),
    "ffn_gate.weight": (("mlp", "gate_proj", "kernel"), True),
    "ffn_up.weight": (("mlp", "up_proj", "kernel"), True),
    "ffn_down.weight": (("mlp", "down_proj", "kernel"), True),
    "ffn_gate.bias": (("mlp", "gate_proj", "bias"), False),
    "ffn_up.bias": (("mlp", "up_proj", "bias"), False),
    "ffn_down.bias": (("mlp", "down_proj", "bias"), False),
}
_GLOBAL_TENSORS = {
    "token_embd.weight": (("embed", "embedding"), False),  # [V, D] already: rows are tokens
    "output_norm.weight": (("final_norm", "scale"), False),
    "output.weight": (("lm_head", "kernel"), True),
}
_MISSING = object()


def load_gguf(path: str | os.PathLike, source: Optional[str] = None, *, dtype=None,
              mesh=None) -> Model:
  """Loads a llama-architecture GGUF file as params, its config and its tokenizer.

  Args:
    path: a ``.gguf`` file written by llama.cpp's converter (any quantisation gguf-py can
      dequantise).
    source: what to record as `Model.source` (default: the path).
    dtype: the params' dtype (default float32; see `prunerep_jax.load`). Tensors are always
      dequantised to float32 first, then cast leaf by leaf.
    mesh: None or a ("data", "model") mesh: each leaf is placed on its sharding.

  Returns:
    `Model` with params in the `prunerep_jax.layout` pytree (JAX arrays of `dtype`) and a
    `transformers.PreTrainedTokenizerFast` built from the file's metadata.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: the file is truncated or corrupt, its architecture is not llama, a config field or
      quantisation type is unsupported, the tokenizer has more tokens than the vocabulary, or a
      tensor is missing, mis-shaped or not finite. The message names the file and the offending
      key or tensor.
  """
  path = os.fspath(path)
  dtype = loading.resolve_dtype("load_gguf", dtype)
  mesh = parallel.as_mesh("load_gguf", mesh)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"load_gguf(path={path!r}): no such file")
  reader = _open(path)
  metadata = _read_metadata(reader, path)
  tensors = {t.name: t for t in reader.tensors}
  config = config_from_gguf(metadata, tensors, path)
  # The tokenizer is cached and cheap next to dequantising every tensor: refuse a mismatched one
  # before the heavy work.
  tokenizer = tokenizer_lib.gguf_tokenizer(path, metadata)
  loading.check_tokenizer(tokenizer, config, source=path)
  params = _read_params(tensors, config, path)
  layout.check_params(params, config, source=path)
  params = loading.place(params, config, dtype, mesh)
  loading.check_finite("load_gguf", params,
                       lambda keys, layer: f"{path}: tensor {_gguf_name(keys, layer)}")
  return Model(config=config, params=params, tokenizer=tokenizer, source=source or path)


def _gguf_name(keys: tuple[str, ...], layer: Optional[int]) -> str:
  """The GGUF tensor name behind a layout path (and layer, for the stacked block tensors)."""
  if keys[0] == "layers":
    (suffix,) = [n for n, (k, _) in _BLOCK_TENSORS.items() if k == keys[1:]]
    return f"blk.{layer}.{suffix}"
  (name,) = [n for n, (k, _) in _GLOBAL_TENSORS.items() if k == keys]
  return name


def _open(path: str) -> gguf.GGUFReader:
  """The reader; any failure to parse means a truncated or corrupt file."""
  try:
    # The reader memmaps the file and reshapes each tensor's slice to its declared size, so a
    # short file fails here too, not later with silently missing data.
    return gguf.GGUFReader(path)
  except Exception as e:  # noqa: BLE001 -- the reader fails deep inside numpy on bad bytes
    raise ValueError(
        f"{path}: not a readable GGUF file ({type(e).__name__}: {e}; the file has "
        f"{os.path.getsize(path)} bytes); it may be truncated or corrupt, so re-download or "
        "re-convert it") from e


def _read_metadata(reader: gguf.GGUFReader, path: str) -> dict[str, Any]:
  """Every metadata key as a plain Python value (str, int, float, bool or list)."""
  metadata = {}
  for key, field in reader.fields.items():
    try:
      metadata[key] = field.contents()
    except Exception as e:  # noqa: BLE001 -- same reason as in `_open`
      raise ValueError(f"{path}: cannot read metadata key {key!r} ({type(e).__name__}: {e}); "
                       "the file is corrupt") from e
  return metadata


def _get(metadata: dict, key: str, path: str, default: Any = _MISSING) -> Any:
  value = metadata.get(key, default)
  if value is _MISSING:
    raise ValueError(f"{path}: metadata key {key!r} is missing; a llama GGUF file needs it")
  return value


def config_from_gguf(metadata: dict[str, Any], tensors: dict[str, Any], path: str) -> Config:
  """`Config` from GGUF metadata; tensor names decide tied embeddings and biases.

  Args:
    metadata: GGUF key -> value, as `_read_metadata` returns.
    tensors: GGUF tensor name -> anything with a ``shape`` in GGUF order (``ne``, fastest first).
    path: the file, for error messages.
  """
  arch = _get(metadata, "general.architecture", path)
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ValueError(f"{path}: general.architecture={arch!r} is not supported; expected one of "
                     f"{SUPPORTED_ARCHITECTURES}")
  a = arch + "."

  hidden = int(_get(metadata, a + "embedding_length", path))
  num_heads = int(_get(metadata, a + "attention.head_count", path))
  num_kv_heads = _get(metadata, a + "attention.head_count_kv", path, num_heads)
  if isinstance(num_kv_heads, list):
    raise ValueError(f"{path}: {a}attention.head_count_kv={num_kv_heads!r} varies per layer; "
                     "expected one integer")
  head_dim = int(_get(metadata, a + "attention.key_length", path, hidden // num_heads))
  value_dim = int(_get(metadata, a + "attention.value_length", path, head_dim))
  if value_dim != head_dim:
    raise ValueError(f"{path}: {a}attention.value_length={value_dim} differs from key_length="
                     f"{head_dim}; expected equal head dims for keys and values")
  rope_dims = int(_get(metadata, a + "rope.dimension_count", path, head_dim))
  if rope_dims != head_dim:
    raise ValueError(f"{path}: {a}rope.dimension_count={rope_dims} with head_dim={head_dim}; "
                     "partial rotary embeddings are not supported (expected equal)")
  _check_rope_scaling(metadata, tensors, a, path)

  if "token_embd.weight" not in tensors:
    raise ValueError(f"{path}: tensor token_embd.weight is missing")
  embd_hidden, vocab = (int(n) for n in tensors["token_embd.weight"].shape)
  declared_vocab = metadata.get(a + "vocab_size", len(metadata.get("tokenizer.ggml.tokens", ())))
  if declared_vocab and int(declared_vocab) != vocab:
    raise ValueError(f"{path}: the vocabulary has {declared_vocab} entries but tensor "
                     f"token_embd.weight has {vocab} rows; expected equal")
  if embd_hidden != hidden:
    raise ValueError(f"{path}: tensor token_embd.weight has width {embd_hidden}, expected "
                     f"{a}embedding_length={hidden}")

  # llama.cpp stops generation at EOS and at the end-of-turn token when a file names one.
  eos = tuple(dict.fromkeys(
      int(metadata[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
      if k in metadata))
  bos, pad = metadata.get("tokenizer.ggml.bos_token_id"), metadata.get(
      "tokenizer.ggml.padding_token_id")
  try:
    return Config(
        family="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(_get(metadata, a + "feed_forward_length", path)),
        num_layers=int(_get(metadata, a + "block_count", path)),
        num_heads=num_heads,
        num_kv_heads=int(num_kv_heads),
        head_dim=head_dim,
        rms_norm_eps=float(_get(metadata, a + "attention.layer_norm_rms_epsilon", path)),
        rope_theta=float(_get(metadata, a + "rope.freq_base", path, 10000.0)),
        max_position_embeddings=int(_get(metadata, a + "context_length", path)),
        tie_word_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        o_bias="blk.0.attn_output.bias" in tensors,
        mlp_bias="blk.0.ffn_gate.bias" in tensors,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=eos,
        pad_token_id=None if pad is None else int(pad),
    )
  except ValueError as e:
    raise ValueError(f"{path}: metadata gives an invalid config: {e}") from e


def _check_rope_scaling(metadata: dict, tensors: dict, a: str, path: str) -> None:
  """Refuses every RoPE scaling: GGUF cannot carry the one kind Config expresses (Llama-3's)."""
  kind = metadata.get(a + "rope.scaling.type", "none")
  factor = float(metadata.get(a + "rope.scaling.factor", 1.0))
  if kind != "none" and factor != 1.0:
    raise ValueError(f"{path}: {a}rope.scaling.type={kind!r} (factor {factor}) is not supported; "
                     "expected no RoPE scaling (load the Hugging Face checkpoint instead)")
  if "rope_freqs.weight" in tensors:
    # The converter bakes Llama-3 scaling into per-frequency factors; the parameters that
    # Config.rope_scaling needs are not recoverable from them exactly.
    raise ValueError(f"{path}: tensor rope_freqs.weight (Llama-3 RoPE scaling baked into "
                     "frequency factors) is not supported; load the Hugging Face checkpoint "
                     "instead")


def _read_params(tensors: dict[str, Any], config: Config, path: str) -> dict[str, Any]:
  """Dequantises, reorients and stacks every tensor into the layout pytree (numpy float32)."""
  shapes = layout.param_shapes(config)
  params: dict[str, Any] = {}
  expected_names = set()

  def put(tree: dict, keys: tuple, value: np.ndarray) -> None:
    for k in keys[:-1]:
      tree = tree.setdefault(k, {})
    tree[keys[-1]] = value

  for name, (keys, is_matrix) in _GLOBAL_TENSORS.items():
    if name == "output.weight" and config.tie_word_embeddings:
      continue
    expected_names.add(name)
    put(params, keys, _to_kernel(_dequantize(tensors, name, path)) if is_matrix
        else _dequantize(tensors, name, path))

  for suffix, (keys, is_matrix) in _BLOCK_TENSORS.items():
    shape = _lookup(shapes["layers"], keys)
    if shape is None:  # a bias this config does not have
      continue
    stacked = np.empty(shape, np.float32)  # [L, ...], filled in place to hold one copy only
    for i in range(config.num_layers):
      name = f"blk.{i}.{suffix}"
      expected_names.add(name)
      w = _dequantize(tensors, name, path)
      if suffix.startswith(("attn_q.", "attn_k.")):
        heads = config.num_heads if suffix.startswith("attn_q.") else config.num_kv_heads
        w = _unpermute_rows(w, heads, name, path)
      w = _to_kernel(w) if is_matrix else w
      if w.shape != stacked.shape[1:]:
        raise ValueError(f"{path}: tensor {name} gives shape {w.shape} for layers/"
                         f"{'/'.join(keys)}, expected {stacked.shape[1:]}")
      stacked[i] = w
    put(params, ("layers",) + keys, stacked)

  unknown = sorted(set(tensors) - expected_names)
  if unknown:
    raise ValueError(f"{path}: unexpected tensors {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
                     f" for a llama model of {config.num_layers} layers; nothing may be ignored")
  return params


def _lookup(tree: dict, keys: tuple) -> Optional[tuple]:
  for k in keys:
    if k not in tree:
      return None
    tree = tree[k]
  return tree


def _dequantize(tensors: dict[str, Any], name: str, path: str) -> np.ndarray:
  """One tensor as float32 in numpy order (GGUF's ``ne`` reversed)."""
  if name not in tensors:
    raise ValueError(f"{path}: tensor {name} is missing")
  t = tensors[name]
  try:
    w = gguf.quants.dequantize(t.data, t.tensor_type)
  except NotImplementedError as e:
    raise ValueError(f"{path}: tensor {name} uses quantisation type {t.tensor_type.name}, which "
                     f"the installed gguf package cannot dequantise ({e}); expected a type "
                     "gguf.quants supports (F32, F16, BF16, Q4_0..Q8_0, K- and I-quants)") from e
  shape = tuple(int(n) for n in reversed(t.shape))
  if w.size != int(np.prod(shape)):
    raise ValueError(f"{path}: tensor {name} dequantises to {w.size} values, expected "
                     f"{int(np.prod(shape))} for shape {shape}; the file is corrupt")
  # F32 tensors dequantise to views of the reader's memory map; own a copy, or a placed leaf (a
  # zero-copy device_put on the CPU) would keep the whole mapped file resident for the model's
  # lifetime (93 MB of RSS for the default model, pinned by its final norm).
  return np.array(w, np.float32, copy=_maps_file(w, t.data)).reshape(shape)


def _maps_file(w: np.ndarray, data) -> bool:
  """Whether `w` may be a view of the reader's memory map (`data` is the tensor's raw slice)."""
  return isinstance(data, np.ndarray) and np.may_share_memory(w, data)


def _to_kernel(w: np.ndarray) -> np.ndarray:
  """[out, in] (numpy order of a GGUF matrix) -> [in, out] (Flax kernel), contiguous."""
  return np.ascontiguousarray(w.T)


def _unpermute_rows(w: np.ndarray, heads: int, name: str, path: str) -> np.ndarray:
  """Inverts llama.cpp's per-head q/k row interleaving.

  Args:
    w: [heads * H, ...] rows in GGUF order (weight [heads*H, D] or bias [heads*H]).
    heads: number of heads the rows belong to (N for q, K for k).
  Returns:
    [heads * H, ...] rows in Hugging Face order.
  """
  rows = w.shape[0]
  if rows % (2 * heads):
    raise ValueError(f"{path}: tensor {name} has {rows} rows, not a multiple of 2 * {heads} heads")
  # GGUF row (h, i, j) with i < H/2, j in {0, 1} is HF row (h, j, i): swap the last two row axes.
  w = w.reshape(heads, rows // heads // 2, 2, *w.shape[1:])
  return np.ascontiguousarray(w.swapaxes(1, 2)).reshape(rows, *w.shape[3:])
