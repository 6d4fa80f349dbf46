"""The Llama-family decoder: Flax blocks, a layer stack run as `jax.lax.scan`, full capture.

`forward(params, config, tokens)` returns logits and the residual stream at every sublayer
boundary. The same block code serves the KV-cached decoding in `prunerep_jax.decode`.

Shape letters: B batch, T query positions, S key slots (cache length), P kept positions,
D hidden, N query heads, K kv heads, G = N // K, H head_dim, F intermediate, V vocab, L layers.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prunerep_jax import validate
from prunerep_jax.config import Config

Array = jax.Array
_MASKED = -1e30  # finite: a fully masked (padding) query row gives a uniform, not NaN, softmax


def _precision(dtype) -> jax.lax.Precision:
  # fp32 runs are for measurement: no TF32 / bf16 passes on accelerators.
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


# ----------------------------------------------------------------------------------- RoPE

def rope_inv_freq(config: Config) -> np.ndarray:
  """Inverse frequencies [H/2] in float32, computed as Hugging Face does (incl. llama3 scaling)."""
  H = config.head_dim
  exponent = np.arange(0, H, 2, dtype=np.int64).astype(np.float32) / np.float32(H)
  inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
  rs = config.rope_scaling
  if rs is not None:
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = ((rs.original_max_position_embeddings / wavelen - rs.low_freq_factor)
              / (rs.high_freq_factor - rs.low_freq_factor))
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
  return inv_freq


def rope_tables(config: Config, positions: Array) -> tuple[Array, Array]:
  """cos, sin [B, T, H] for integer positions [B, T] (rotate-half convention)."""
  inv_freq = jnp.asarray(rope_inv_freq(config))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """x [B, T, n, H] rotated by cos/sin [B, T, H]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


# ------------------------------------------------------------------------------- modules

class RMSNorm(nn.Module):
  eps: float

  @nn.compact
  def __call__(self, x: Array) -> Array:  # [..., D]
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(x.dtype) * y.astype(x.dtype)


def _dense(features: int, use_bias: bool, name: str, dtype) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, name=name, dtype=dtype, param_dtype=jnp.float32,
                  precision=_precision(dtype))


class Attention(nn.Module):
  """Grouped-query attention. With a cache, writes this step's k/v into it and attends over it."""

  config: Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, mask, kv: Optional[tuple] = None):
    """x [B, T, D]; cos/sin [B, T, H]; mask [B, T, S] bool (True = attend).

    kv: None (keys are this call's T tokens, S == T), or (cache_k, cache_v, layer, index) with
    caches [L, B, S, K, H]: the new k/v go to slots index..index+T-1 of `layer`.
    Returns (out [B, T, D], updated (cache_k, cache_v) or None).
    """
    c = self.config
    B, T, _ = x.shape
    N, K, H = c.num_heads, c.num_kv_heads, c.head_dim
    q = _dense(N * H, c.qkv_bias, "q_proj", self.dtype)(x).reshape(B, T, N, H)
    k = _dense(K * H, c.qkv_bias, "k_proj", self.dtype)(x).reshape(B, T, K, H)
    v = _dense(K * H, c.qkv_bias, "v_proj", self.dtype)(x).reshape(B, T, K, H)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    new_cache = None
    if kv is not None:
      cache_k, cache_v, layer, index = kv
      zero = jnp.zeros((), jnp.int32)
      start = (layer, zero, index, zero, zero)
      cache_k = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), start)
      cache_v = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), start)
      k, v = cache_k[layer], cache_v[layer]
      new_cache = (cache_k, cache_v)
    prec = _precision(self.dtype)
    q = q.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k.astype(q.dtype), precision=prec,
                        preferred_element_type=jnp.float32) / np.sqrt(H).astype(np.float32)
    scores = jnp.where(mask[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v.astype(self.dtype), precision=prec)
    out = _dense(c.hidden_size, c.o_bias, "o_proj", self.dtype)(out.reshape(B, T, N * H))
    return out, new_cache


class MLP(nn.Module):
  config: Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, T, D] -> [B, T, D]
    c = self.config
    gate = _dense(c.intermediate_size, c.mlp_bias, "gate_proj", self.dtype)(x)
    up = _dense(c.intermediate_size, c.mlp_bias, "up_proj", self.dtype)(x)
    return _dense(c.hidden_size, c.mlp_bias, "down_proj", self.dtype)(nn.silu(gate) * up)


class Block(nn.Module):
  """One pre-norm decoder block. Returns (h after MLP, h after attention, cache)."""

  config: Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, cos, sin, mask, kv=None):
    eps = self.config.rms_norm_eps
    a, kv = Attention(self.config, self.dtype, name="attn")(
        RMSNorm(eps, name="attn_norm")(h), cos, sin, mask, kv)
    h_attn = h + a
    h_out = h_attn + MLP(self.config, self.dtype, name="mlp")(RMSNorm(eps, name="mlp_norm")(h_attn))
    return h_out, h_attn, kv


# --------------------------------------------------------------------------- the stack

def compute_dtype(params) -> jnp.dtype:
  """Activations run in the dtype of the embedding table (fp32 by default, bf16 via `cast`)."""
  return params["embed"]["embedding"].dtype


def cast(params, dtype) -> Any:
  """Params with every floating leaf cast to `dtype` (e.g. jnp.bfloat16 for bf16 runs)."""
  return jax.tree_util.tree_map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def gather_positions(x: Array, idx: Array) -> Array:
  """x [B, T, ...] at positions idx [B, P] -> [B, P, ...]."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def run_layers(layer_params, config: Config, h, cos, sin, mask, *, kv=None, keep_idx=None,
               capture: bool = True):
  """Runs the L stacked blocks with `jax.lax.scan`.

  Args:
    layer_params: params["layers"], every leaf stacked on a leading L axis.
    h: [B, T, D] residual stream entering block 0.
    cos, sin: [B, T, H] RoPE tables; mask: [B, T, S] bool.
    kv: None or (cache_k, cache_v, index) with caches [L, B, S, K, H].
    keep_idx: None (keep all T) or [B, P] positions whose residual states are captured.
    capture: whether to return the per-sublayer residual states.

  Returns:
    (h_out [B, T, D], residual [2L, B, P, D] or None, (cache_k, cache_v) or None), where
    residual[2l] enters block l and residual[2l + 1] is after its attention.
  """
  dtype = h.dtype
  block = Block(config, dtype)

  def keep(x):
    return x if keep_idx is None else gather_positions(x, keep_idx)

  def body(carry, xs):
    h, caches = carry
    p, layer = xs
    layer_kv = None if caches is None else (caches[0], caches[1], layer, kv[2])
    h_out, h_attn, caches = block.apply({"params": p}, h, cos, sin, mask, layer_kv)
    ys = jnp.stack([keep(h), keep(h_attn)]) if capture else None
    return (h_out, caches), ys

  caches = None if kv is None else (kv[0], kv[1])
  layers = jnp.arange(config.num_layers, dtype=jnp.int32)
  (h, caches), ys = jax.lax.scan(body, (h, caches), (layer_params, layers))
  residual = None
  if capture:
    residual = ys.reshape((2 * config.num_layers,) + ys.shape[2:])
  return h, residual, caches


def embed(params, tokens: Array) -> Array:
  """tokens [B, T] int -> [B, T, D] in the compute dtype."""
  return jnp.take(params["embed"]["embedding"], tokens, axis=0)


def final_norm(params, config: Config, h: Array) -> Array:
  return RMSNorm(config.rms_norm_eps).apply({"params": params["final_norm"]}, h)


def lm_head(params, config: Config, x: Array) -> Array:
  """x [..., D] (already final-normed) -> logits [..., V] float32."""
  if config.tie_word_embeddings:
    w = params["embed"]["embedding"].T
  else:
    w = params["lm_head"]["kernel"]
  return jnp.einsum("...D,DV->...V", x, w.astype(x.dtype), precision=_precision(x.dtype),
                    preferred_element_type=jnp.float32)


def attention_mask_3d(kv_valid: Array, q_slots: Array, config: Config) -> Array:
  """[B, T, S] bool: key slot valid, not in the future, inside the sliding window.

  kv_valid [B, S] bool; q_slots [T] int slot index of each query. Slots of real tokens are
  contiguous (padding lies only before or after them), so slot distance is position distance.
  """
  S = kv_valid.shape[1]
  k_slots = jnp.arange(S, dtype=jnp.int32)
  rel = q_slots[:, None] - k_slots[None, :]  # [T, S]
  allowed = rel >= 0
  if config.sliding_window is not None:
    allowed &= rel < config.sliding_window
  return allowed[None] & kv_valid[:, None, :]


def positions_from_mask(mask: Array) -> Array:
  """[B, T] position ids: 0, 1, ... over real tokens (padding gets 0), as HF generate does."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def last_positions(mask: Array) -> Array:
  """[B, 1] index of the last real token of each row (left or right padding)."""
  T = mask.shape[1]
  return (T - 1 - jnp.argmax(mask[:, ::-1].astype(jnp.int32), axis=1))[:, None].astype(jnp.int32)


# ------------------------------------------------------------------------------ forward

class ForwardOutput(NamedTuple):
  """What `forward` returns. P = number of kept positions (T for keep="all").

  logits:       [B, P, V] float32 (None with logits=False).
  residual:     [2L + 1, B, P, D]: residual[2l] enters block l, residual[2l + 1] is after its
                attention, residual[2l + 2] after its MLP; residual[2L] leaves the last block.
                None with capture=False.
  final_hidden: [B, P, D], after the final norm (what the LM head reads).
  positions:    [B, P] int32, the token positions that were kept.
  """

  logits: Optional[Array]
  residual: Optional[Array]
  final_hidden: Array
  positions: Array

  @property
  def block_inputs(self) -> Array:  # [L, B, P, D]
    return self.residual[0:-1:2]

  @property
  def after_attn(self) -> Array:  # [L, B, P, D]
    return self.residual[1::2]

  @property
  def after_mlp(self) -> Array:  # [L, B, P, D]
    return self.residual[2::2]


Keep = Union[str, Array, np.ndarray]


def forward(params, config: Config, tokens, attention_mask=None, *, keep: Keep = "all",
            capture: bool = True, logits: bool = True) -> ForwardOutput:
  """Full forward pass; jitted once per (config, shapes, keep mode, flags).

  Every argument is checked on the host before any tracing (see `prunerep_jax.validate`); under
  the caller's own `jax.jit`, traced arguments are checked for shape and dtype only.

  Args:
    params: the params pytree (see `prunerep_jax.layout`); every path and shape must match
      `config` (shapes only: finiteness is the loaders' and pruners' job, not a per-call cost).
    config: the model's `Config` (static).
    tokens: integer ids [B, T] in [0, V), any integer dtype (checked before the int32 cast).
    attention_mask: None (all real) or [B, T] bool or integer 0/1, 1 for real tokens, 0 for
      padding; padding may be on the left or the right; every row needs a real token.
      Positions count real tokens only.
    keep: which positions to return: "all", "last" (last real token of each row), or integer
      indices [B, P] / [P] in [0, T) (a list, NumPy or JAX array).
    capture: return the residual stream at every sublayer boundary.
    logits: compute logits (set False to keep only hidden states).

  Raises:
    ArgumentError (a ValueError) naming the argument, the value and what was expected;
    TypeError for a config that is not a `Config` or params that are not a dict.
  """
  fn = "forward"
  validate.params(fn, params, config)
  tokens = validate.tokens(fn, tokens, config.vocab_size)
  B, T = tokens.shape
  mask = validate.mask(fn, "attention_mask", attention_mask, (B, T))
  if isinstance(keep, str):
    if keep not in ("all", "last"):
      raise validate.fail(fn, "keep", keep, "'all', 'last' or integer positions [B, P] / [P]")
    keep_idx, mode = None, keep
  else:
    keep_idx, mode = validate.positions(fn, "keep", keep, B, T), "indices"
  capture = validate.boolean(fn, "capture", capture)
  logits = validate.boolean(fn, "logits", logits)
  return _forward(params, config, tokens, mask, keep_idx, mode, capture, logits)


@functools.partial(jax.jit, static_argnums=(1, 5, 6, 7))
def _forward(params, config, tokens, mask, keep_idx, mode, capture, want_logits):
  B, T = tokens.shape
  mask = mask.astype(bool)
  if mode == "all":
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  elif mode == "last":
    idx = last_positions(mask)
  else:
    idx = keep_idx
  positions = positions_from_mask(mask)
  cos, sin = rope_tables(config, positions)
  attn = attention_mask_3d(mask, jnp.arange(T, dtype=jnp.int32), config)
  h = embed(params, tokens).astype(compute_dtype(params))
  layer_keep = None if mode == "all" else idx
  h, residual, _ = run_layers(params["layers"], config, h, cos, sin, attn, keep_idx=layer_keep,
                              capture=capture)
  h_kept = h if mode == "all" else gather_positions(h, idx)
  if capture:
    residual = jnp.concatenate([residual, h_kept[None]], axis=0)
  hidden = final_norm(params, config, h_kept)
  out_logits = lm_head(params, config, hidden) if want_logits else None
  return ForwardOutput(out_logits, residual, hidden, idx)


def init_params(config: Config, key: Array, dtype=jnp.float32) -> Any:
  """Random params in the layout of `prunerep_jax.layout` (for tests and tiny experiments)."""
  D = config.hidden_size
  k_embed, k_layers, k_head = jax.random.split(key, 3)
  block = Block(config)
  dummy = jnp.zeros((1, 1, D), dtype)
  cos = sin = jnp.zeros((1, 1, config.head_dim), jnp.float32)
  mask = jnp.ones((1, 1, 1), bool)
  layer_keys = jax.random.split(k_layers, config.num_layers)
  layers = jax.vmap(lambda k: block.init(k, dummy, cos, sin, mask)["params"])(layer_keys)
  params = {
      "embed": {"embedding": 0.02 * jax.random.normal(k_embed, (config.vocab_size, D))},
      "layers": layers,
      "final_norm": {"scale": jnp.ones((D,), jnp.float32)},
  }
  if not config.tie_word_embeddings:
    params["lm_head"] = {"kernel": 0.02 * jax.random.normal(k_head, (D, config.vocab_size))}
  return cast(params, dtype)
