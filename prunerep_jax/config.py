"""The model configuration: one frozen, hashable dataclass, static under jit.

Covers the Llama family as Hugging Face defines it: Llama (with Llama-3 rope scaling), Mistral
(sliding-window attention), Qwen2 (q/k/v bias); tied or untied embeddings; MHA, GQA, MQA.
Loaders (``prunerep_jax.loading``) build it from a config.json or from GGUF metadata and refuse
anything it cannot express.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Optional

from prunerep_jax.validate import ArgumentError, field_error

FAMILIES = ("llama", "mistral", "qwen2")


def _positive_number(owner: str, name: str, value: Any) -> None:
  if (isinstance(value, bool) or not isinstance(value, numbers.Real)
      or not math.isfinite(value) or value <= 0):
    raise field_error(owner, name, value, "a positive finite number")


def _positive_int(owner: str, name: str, value: Any, expected: str = "a positive integer") -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise field_error(owner, name, value, expected)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 style frequency-dependent RoPE scaling (HF ``rope_type == "llama3"``)."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int

  def __post_init__(self):
    for name in ("factor", "low_freq_factor", "high_freq_factor"):
      _positive_number("RopeScaling", name, getattr(self, name))
    if not self.high_freq_factor > self.low_freq_factor:
      raise field_error("RopeScaling", "high_freq_factor", self.high_freq_factor,
                        f"a number > low_freq_factor={self.low_freq_factor!r} (the smoothing "
                        "band between them would be empty or inverted)")
    _positive_int("RopeScaling", "original_max_position_embeddings",
                  self.original_max_position_embeddings)

  @classmethod
  def from_dict(cls, d: Any, where: str = "RopeScaling.from_dict(d)") -> "RopeScaling":
    """From a dict holding exactly the four fields (as `Config.to_dict` writes them)."""
    fields = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(d, dict):
      raise ArgumentError(f"{where}: expected a dict with keys {fields}; got {_type(d)}")
    unknown, missing = sorted(set(d) - set(fields)), [f for f in fields if f not in d]
    if unknown or missing:
      raise ArgumentError(f"{where}: expected exactly the keys {fields}; unknown {unknown}, "
                          f"missing {missing}")
    return cls(**d)


def _type(value: Any) -> str:
  return type(value).__name__


@dataclasses.dataclass(frozen=True)
class Config:
  """Architecture of a decoder-only Llama-family model.

  Shapes elsewhere use: V vocab_size, D hidden_size, F intermediate_size, L num_layers,
  N num_heads, K num_kv_heads, H head_dim.

  Every field is checked on construction (type and range; special token ids inside [0, V)), so a
  Config that exists is one the model can run.
  """

  family: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: Optional[RopeScaling] = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  qkv_bias: bool = False  # bias on q/k/v projections (Qwen2; Llama attention_bias)
  o_bias: bool = False  # bias on the output projection (Llama attention_bias)
  mlp_bias: bool = False  # bias on gate/up/down (Llama mlp_bias)
  sliding_window: Optional[int] = None  # key kept iff 0 <= q_pos - k_pos < sliding_window
  bos_token_id: Optional[int] = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: Optional[int] = None

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise field_error("Config", "family", self.family, f"one of {FAMILIES}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "max_position_embeddings"):
      _positive_int("Config", name, getattr(self, name))
    if self.num_heads % self.num_kv_heads:
      raise ArgumentError(
          f"Config.num_heads={self.num_heads} is not a multiple of "
          f"Config.num_kv_heads={self.num_kv_heads}: grouped-query attention needs it to be")
    if self.head_dim % 2:
      raise ArgumentError(f"Config.head_dim={self.head_dim}: RoPE needs an even head dimension")
    _positive_number("Config", "rms_norm_eps", self.rms_norm_eps)
    _positive_number("Config", "rope_theta", self.rope_theta)
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
      raise field_error("Config", "rope_scaling", self.rope_scaling, "None or a RopeScaling")
    for name in ("tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias"):
      if not isinstance(getattr(self, name), bool):
        raise field_error("Config", name, getattr(self, name), "True or False")
    if self.sliding_window is not None:
      _positive_int("Config", "sliding_window", self.sliding_window,
                    "None or a positive integer")
    V = self.vocab_size
    for name in ("bos_token_id", "pad_token_id"):
      value = getattr(self, name)
      if value is not None and not _is_token_id(value, V):
        raise field_error("Config", name, value, f"None or a token id in [0, {V})")
    if not isinstance(self.eos_token_ids, tuple) or not all(
        _is_token_id(t, V) for t in self.eos_token_ids):
      raise field_error("Config", "eos_token_ids", self.eos_token_ids,
                        f"a tuple of token ids in [0, {V})")

  @property
  def q_size(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def kv_size(self) -> int:
    return self.num_kv_heads * self.head_dim

  def replace(self, **changes) -> "Config":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    """JSON-serialisable form (used by checkpoints); inverse of `Config.from_dict`."""
    d = dataclasses.asdict(self)
    d["eos_token_ids"] = list(self.eos_token_ids)
    return d

  @classmethod
  def from_dict(cls, d: Any) -> "Config":
    """The Config that `to_dict` wrote. Raises ArgumentError (a ValueError) naming the field for
    a non-dict, unknown or missing fields, a malformed rope_scaling and wrongly typed values."""
    where = "Config.from_dict(d)"
    if not isinstance(d, dict):
      raise ArgumentError(f"{where}: expected a dict of Config fields (as Config.to_dict writes "
                          f"it); got {_type(d)}")
    d = dict(d)
    fields = [f.name for f in dataclasses.fields(cls)]
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
    unknown = sorted(set(d) - set(fields))
    if unknown:
      raise ArgumentError(f"{where}: unknown fields {unknown}; expected a subset of {fields}")
    missing = [f for f in required if f not in d]
    if missing:
      raise ArgumentError(f"{where}: missing fields {missing}")
    if d.get("rope_scaling") is not None:
      d["rope_scaling"] = RopeScaling.from_dict(d["rope_scaling"], f"{where}['rope_scaling']")
    if "eos_token_ids" in d:
      eos = d["eos_token_ids"]
      if not isinstance(eos, (list, tuple)):
        raise ArgumentError(f"{where}: field eos_token_ids={eos!r}: expected a list of token "
                            "ids")
      d["eos_token_ids"] = tuple(eos)
    return cls(**d)


def _is_token_id(value: Any, vocab_size: int) -> bool:
  return (isinstance(value, numbers.Integral) and not isinstance(value, bool)
          and 0 <= value < vocab_size)
