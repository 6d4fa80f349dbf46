"""The model configuration: one frozen, hashable dataclass, static under jit.

Covers the Llama family as Hugging Face defines it: Llama (with Llama-3 rope scaling), Mistral
(sliding-window attention), Qwen2 (q/k/v bias); tied or untied embeddings; MHA, GQA, MQA.
Loaders (``prunerep_jax.loading``) build it from a config.json or from GGUF metadata and refuse
anything it cannot express.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

FAMILIES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 style frequency-dependent RoPE scaling (HF ``rope_type == "llama3"``)."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class Config:
  """Architecture of a decoder-only Llama-family model.

  Shapes elsewhere use: V vocab_size, D hidden_size, F intermediate_size, L num_layers,
  N num_heads, K num_kv_heads, H head_dim.
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
      raise ValueError(f"Config.family={self.family!r}: expected one of {FAMILIES}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "max_position_embeddings"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"Config.{name}={value!r}: expected a positive integer")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"Config.num_heads={self.num_heads} is not a multiple of "
          f"Config.num_kv_heads={self.num_kv_heads}: grouped-query attention needs it to be")
    if self.head_dim % 2:
      raise ValueError(f"Config.head_dim={self.head_dim}: RoPE needs an even head dimension")
    if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
      raise ValueError(f"Config.rms_norm_eps={self.rms_norm_eps!r}: expected a positive float")
    if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
      raise ValueError(f"Config.rope_theta={self.rope_theta!r}: expected a positive float")
    if self.sliding_window is not None and self.sliding_window <= 0:
      raise ValueError(
          f"Config.sliding_window={self.sliding_window!r}: expected None or a positive integer")
    if not isinstance(self.eos_token_ids, tuple):
      raise ValueError(f"Config.eos_token_ids={self.eos_token_ids!r}: expected a tuple of ints")

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
  def from_dict(cls, d: dict) -> "Config":
    d = dict(d)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"Config.from_dict: unknown fields {unknown}; expected a subset of "
                       f"{sorted(fields)}")
    if d.get("rope_scaling") is not None:
      d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
    return cls(**d)
