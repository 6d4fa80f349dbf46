"""The parameter pytree: one source of truth for every weight's path and shape.

Params are a plain nested dict in Flax layout (kernels are [in, out]); the L decoder blocks are
stacked on a leading layer axis so the stack runs as one `jax.lax.scan`::

  embed/embedding                  [V, D]
  layers/attn_norm/scale           [L, D]
  layers/attn/{q,k,v}_proj/kernel  [L, D, N*H] / [L, D, K*H] / [L, D, K*H]
  layers/attn/{q,k,v}_proj/bias    [L, N*H] / [L, K*H]          (config.qkv_bias)
  layers/attn/o_proj/kernel        [L, N*H, D]
  layers/attn/o_proj/bias          [L, D]                        (config.o_bias)
  layers/mlp_norm/scale            [L, D]
  layers/mlp/{gate,up}_proj/kernel [L, D, F]
  layers/mlp/down_proj/kernel      [L, F, D]
  layers/mlp/*/bias                [L, F] / [L, D]               (config.mlp_bias)
  final_norm/scale                 [D]
  lm_head/kernel                   [D, V]                        (absent if tie_word_embeddings)

Loaders check every tensor against `param_shapes` and pruning transforms read and return this
same structure.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from prunerep_jax.config import Config

# The linear layers inside a decoder block, by (sublayer, name): what intra-layer pruning touches.
ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
BLOCK_LINEARS = tuple(("attn", n) for n in ATTN_LINEARS) + tuple(("mlp", n) for n in MLP_LINEARS)


def param_shapes(config: Config) -> dict[str, Any]:
  """Nested dict of shape tuples, the same structure as the params pytree."""
  c = config
  L, D, F, V = c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size

  def linear(d_in, d_out, bias):
    leaf = {"kernel": (L, d_in, d_out)}
    if bias:
      leaf["bias"] = (L, d_out)
    return leaf

  shapes = {
      "embed": {"embedding": (V, D)},
      "layers": {
          "attn_norm": {"scale": (L, D)},
          "attn": {
              "q_proj": linear(D, c.q_size, c.qkv_bias),
              "k_proj": linear(D, c.kv_size, c.qkv_bias),
              "v_proj": linear(D, c.kv_size, c.qkv_bias),
              "o_proj": linear(c.q_size, D, c.o_bias),
          },
          "mlp_norm": {"scale": (L, D)},
          "mlp": {
              "gate_proj": linear(D, F, c.mlp_bias),
              "up_proj": linear(D, F, c.mlp_bias),
              "down_proj": linear(F, D, c.mlp_bias),
          },
      },
      "final_norm": {"scale": (D,)},
  }
  if not c.tie_word_embeddings:
    shapes["lm_head"] = {"kernel": (D, V)}
  return shapes


def path_str(path) -> str:
  """'layers/attn/q_proj/kernel' for a pytree key path."""
  return "/".join(str(getattr(k, "key", k)) for k in path)


def flat_shapes(config: Config) -> dict[str, tuple[int, ...]]:
  """{'layers/attn/q_proj/kernel': (L, D, N*H), ...} for every tensor of the layout."""
  return dict(_flat_shapes(config))


@functools.lru_cache(maxsize=64)
def _flat_shapes(config: Config) -> tuple[tuple[str, tuple[int, ...]], ...]:
  # cached: `forward` checks params against it on every call
  flat = jax.tree_util.tree_flatten_with_path(
      param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))[0]
  return tuple((path_str(p), s) for p, s in flat)


def check_params(params: Any, config: Config, source: str = "params") -> None:
  """Raises ValueError naming the first missing, extra or mis-shaped tensor (shapes only)."""
  expected = _flat_shapes(config)
  got = {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  missing = sorted(set(dict(expected)) - set(got))
  if missing:
    raise ValueError(f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}"
                     " for this config")
  extra = sorted(set(got) - set(dict(expected)))
  if extra:
    raise ValueError(f"{source}: unexpected tensors {extra[:5]} for this config")
  for path, shape in expected:
    if tuple(np.shape(got[path])) != tuple(shape):
      raise ValueError(f"{source}: tensor {path} has shape {tuple(np.shape(got[path]))}, "
                       f"expected {tuple(shape)} for this config")
