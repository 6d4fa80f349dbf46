"""Random-weight Llama checkpoints built with transformers, for benchmarks that must not download.

`SHAPES` holds the config fields of each named shape; `build` draws the weights with transformers'
own initialisation (seeded) directly in the requested dtype on the requested torch device; the
model's `save_pretrained(path)` writes config.json + safetensors, which `pj.load(path)` reads.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The rope fields are written in the rope_theta + rope_scaling form that transformers 4 takes and
# transformers 5 still converts into rope_parameters, so the builder runs on either.
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

SHAPES = {
    # Llama-3.2-1B (meta-llama/Llama-3.2-1B config.json), written out so nothing is downloaded:
    # 1.24 B params, 2.47 GB in bf16.
    "llama-3.2-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
        max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=128000,
        eos_token_id=128001, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE),
    # The same structure (GQA, tied embeddings, Llama-3 rope scaling) at smoke-test size.
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
        max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        rope_theta=500000.0,
        rope_scaling=dict(_LLAMA3_ROPE, original_max_position_embeddings=256)),
}


def build(shape: str, *, device: str = "cpu", dtype: str = "bfloat16", seed: int = 0):
  """A random-weight `LlamaForCausalLM` of `SHAPES[shape]`, in eval mode.

  Args:
    shape: a key of SHAPES.
    device: the torch device the weights are drawn on ("cpu", "cuda"): on an accelerator the
      draw takes seconds where the host would take minutes.
    dtype: the torch dtype name the weights are drawn in; drawing in bf16 directly means the
      builder never holds a float32 copy.
    seed: torch's seed for the draw.
  """
  import torch
  import transformers

  if shape not in SHAPES:
    raise ValueError(f"build(shape={shape!r}): expected one of {sorted(SHAPES)}")
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(**SHAPES[shape])
  previous = torch.get_default_dtype()
  torch.set_default_dtype(getattr(torch, dtype))
  try:
    with torch.device(device):
      model = transformers.LlamaForCausalLM(config)
  finally:
    torch.set_default_dtype(previous)
  return model.eval()

