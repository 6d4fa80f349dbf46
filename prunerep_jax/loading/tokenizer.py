"""Tokenizers: built from GGUF metadata (cached on disk), and the two ways the library encodes text.

A GGUF file has no tokenizer.json, only the vocabulary, merges and special ids under llama.cpp's
key names. transformers' GGUF tokenizer conversion turns those into a fast tokenizer; we call it
on metadata we already read with gguf-py, because transformers' own GGUF file reader needs torch.
The conversion result is saved with `save_pretrained` under the cache directory so later loads
read one tokenizer.json instead of rebuilding the BPE from 49k merges.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np

from prunerep_jax import atomic

CACHE_ENV = "PRUNEREP_CACHE"

log = logging.getLogger(__name__)

Messages = Sequence[Mapping[str, str]]


def cache_root() -> str:
  """``$PRUNEREP_CACHE`` or ``~/.cache/prunerep_jax``."""
  return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache",
                                                   "prunerep_jax")


def gguf_tokenizer_cache_dir(path: str) -> str:
  """Where the tokenizer converted from the GGUF file at ``path`` is cached.

  Keyed by the file's absolute path, size and modification time, so replacing the file (even under
  the same name) makes a new entry instead of reusing a stale tokenizer.
  """
  st = os.stat(path)
  key = f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}"
  digest = hashlib.sha256(key.encode()).hexdigest()[:20]
  stem = os.path.splitext(os.path.basename(path))[0]
  return os.path.join(cache_root(), "tokenizers", f"{stem}-{digest}")


def gguf_tokenizer(path: str, metadata: Mapping[str, Any]):
  """The `transformers.PreTrainedTokenizerFast` a GGUF file describes, from cache when possible.

  Args:
    path: the GGUF file (keys the cache).
    metadata: its metadata, GGUF key -> plain value (``tokenizer.ggml.*``,
      ``tokenizer.chat_template``, ``general.architecture``).
  """
  from transformers import PreTrainedTokenizerFast

  cache_dir = gguf_tokenizer_cache_dir(path)
  if os.path.isfile(os.path.join(cache_dir, "tokenizer.json")):
    try:
      return PreTrainedTokenizerFast.from_pretrained(cache_dir, local_files_only=True)
    except Exception as e:  # noqa: BLE001 -- a damaged cache entry is rebuilt, never fatal
      log.warning("ignoring unreadable tokenizer cache %s (%s: %s)", cache_dir, type(e).__name__, e)
  tokenizer = tokenizer_from_gguf_metadata(metadata, path)
  _save_atomically(tokenizer, cache_dir)
  return tokenizer


def tokenizer_from_gguf_metadata(metadata: Mapping[str, Any], path: str = "<gguf>"):
  """Converts GGUF tokenizer metadata to a `PreTrainedTokenizerFast` (no cache, no torch)."""
  from transformers import PreTrainedTokenizerFast
  from transformers.integrations.gguf.gguf_tokenizer_mapping import (GGUF_TOKENIZER_MAPPING,
                                                                      convert_gguf_tokenizer)

  tokens = metadata.get("tokenizer.ggml.tokens")
  if not tokens:
    raise ValueError(f"{path}: metadata key 'tokenizer.ggml.tokens' is missing or empty; a "
                     "tokenizer cannot be built without a vocabulary")
  groups = {
      group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items()
              if f"tokenizer.{key}" in metadata}
      for group, renames in GGUF_TOKENIZER_MAPPING.items()
  }
  tokenizer_dict, init_kwargs = groups["tokenizer"], groups["tokenizer_config"]
  try:
    backend, extra = convert_gguf_tokenizer(metadata.get("general.architecture"), tokenizer_dict)
  except (ValueError, KeyError) as e:
    raise ValueError(f"{path}: cannot build a tokenizer from tokenizer.ggml.model="
                     f"{tokenizer_dict.get('tokenizer_type')!r}: {e}") from e
  init_kwargs.update(extra)
  if tokenizer_dict.get("tokenizer_type") == "llama":
    # llama.cpp prepends BOS to sentencepiece vocabularies unless the file says otherwise.
    init_kwargs.setdefault("add_bos_token", True)
  for role, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                    ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
    token_id = metadata.get(f"tokenizer.ggml.{key}")
    if token_id is not None:
      if not 0 <= int(token_id) < len(tokens):
        raise ValueError(f"{path}: tokenizer.ggml.{key}={token_id} is outside the vocabulary "
                         f"of {len(tokens)} tokens")
      init_kwargs[role] = tokens[int(token_id)]
  return PreTrainedTokenizerFast(tokenizer_object=backend, **init_kwargs)


def _save_atomically(tokenizer, cache_dir: str) -> None:
  """Writes the cache entry through a staged directory, so readers never see half of one.

  A damaged entry present when the load began is replaced; one that a concurrent process created
  meanwhile is kept (it holds the same tokenizer).
  """
  replace = os.path.isdir(cache_dir) and not os.path.islink(cache_dir)
  try:
    with atomic.staged_directory(cache_dir, overwrite=replace, caller="gguf_tokenizer",
                                 name="cache_dir") as stage:
      tokenizer.save_pretrained(stage)
  except OSError as e:
    if isinstance(e, FileExistsError) and os.path.isdir(cache_dir) and not replace:
      log.debug("tokenizer cache %s was written by another process meanwhile; keeping it",
                cache_dir)
    else:  # the cache only saves time: an unwritable cache must not stop a load
      log.warning("cannot cache tokenizer in %s (%s); it will be rebuilt next time", cache_dir, e)


def chat_prompt(tokenizer, messages_or_text: Union[str, Messages],
                system: Optional[str] = None) -> list[int]:
  """Token ids of a chat prompt ending where the assistant's reply starts.

  Args:
    tokenizer: a transformers tokenizer with a chat template.
    messages_or_text: one user message as a string, or ``[{"role": ..., "content": ...}, ...]``.
    system: a system message to put first (the template's own default applies when None).

  Returns:
    The ids of the rendered template with ``add_generation_prompt=True``.
  """
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError(f"chat_prompt: tokenizer {type(tokenizer).__name__} "
                     f"({getattr(tokenizer, 'name_or_path', '')!r}) has no chat template; "
                     "use encode_batch for plain text")
  if isinstance(messages_or_text, str):
    messages = [{"role": "user", "content": messages_or_text}]
  else:
    messages = [dict(m) for m in messages_or_text]
    for i, m in enumerate(messages):
      if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
        raise ValueError(f"chat_prompt: messages_or_text[{i}]={m!r}: expected a dict with str "
                         "'role' and 'content'")
    if not messages:
      raise ValueError("chat_prompt: messages_or_text is empty; expected text or messages")
  if system is not None:
    if messages[0]["role"] == "system":
      raise ValueError(f"chat_prompt: system={system!r} given but messages_or_text already starts "
                       "with a system message; pass one or the other")
    messages.insert(0, {"role": "system", "content": system})
  text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  # The template writes the special tokens itself; letting the tokenizer add BOS would double it.
  return list(tokenizer.encode(text, add_special_tokens=False))


def encode_batch(tokenizer, texts: Union[str, Sequence[str]],
                 padding_side: str = "left") -> tuple[np.ndarray, np.ndarray]:
  """Encodes texts into one padded batch.

  Args:
    tokenizer: a transformers tokenizer; its own BOS/EOS settings apply.
    texts: B strings (a single string is a batch of one).
    padding_side: ``"left"`` (what generation wants: every prompt ends at the last column) or
      ``"right"``.

  Returns:
    ``(tokens, mask)``: int32 [B, T] ids, padded with the pad (else EOS, else 0) id, and int32
    [B, T] with 1 on real tokens and 0 on padding; T is the longest encoding.
  """
  if padding_side not in ("left", "right"):
    raise ValueError(f"encode_batch: padding_side={padding_side!r}: expected 'left' or 'right'")
  if isinstance(texts, str):
    texts = [texts]
  texts = list(texts)
  if not texts:
    raise ValueError("encode_batch: texts is empty; expected at least one string")
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise TypeError(f"encode_batch: texts[{i}]={t!r}: expected a str")
  ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
  for i, row in enumerate(ids):
    if not row:
      raise ValueError(f"encode_batch: texts[{i}]={texts[i]!r} encodes to no tokens; a row "
                       "without tokens has nothing to attend to")
  pad_id = tokenizer.pad_token_id
  if pad_id is None:
    pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
  width = max(len(row) for row in ids)
  tokens = np.full((len(ids), width), pad_id, np.int32)
  mask = np.zeros((len(ids), width), np.int32)
  for b, row in enumerate(ids):
    cols = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
    tokens[b, cols] = row
    mask[b, cols] = 1
  return tokens, mask
