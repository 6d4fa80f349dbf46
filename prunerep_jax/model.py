"""The Llama-family decoder as pure functions on the params pytree, composed into a layer scan.

The building blocks are public so that calibration, drop scoring and the analyses compose the
same code instead of rebuilding it:

  make_context / prompt_context   positions -> RoPE tables, validity -> attention mask (once)
  attention_sublayer              pre-norm attention: residual delta, linear inputs, its cache
  mlp_sublayer                    pre-norm SwiGLU MLP: residual delta, linear inputs
  block                           h + attention, then + MLP
  run_layers                      the L stacked blocks as one `jax.lax.scan`, per-layer caches
  forward                         logits and the residual stream at every sublayer boundary

`Block` is the same block as a Flax module (it owns one layer's parameters; `init_params` uses
it). The KV-cached decoding in `prunerep_jax.decode` runs the same functions.

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

from prunerep_jax import parallel
from prunerep_jax import validate
from prunerep_jax.config import Config
from prunerep_jax.layout import param_shapes as layout_shapes

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


# ------------------------------------------------------------------------ shared inputs

class Rope(NamedTuple):
  """RoPE tables of the query positions: cos, sin [B, T, H] float32."""

  cos: Array
  sin: Array


class Context(NamedTuple):
  """What every layer needs besides its params and the residual stream.

  rope: the RoPE tables of the T query positions.
  mask: [B, T, S] bool, True where query t may attend to key slot s.
  """

  rope: Rope
  mask: Array


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


def make_context(config: Config, positions: Array, kv_valid: Array, q_slots: Array) -> Context:
  """The one place positions become RoPE tables and validity becomes an attention mask.

  Args:
    positions: [B, T] int RoPE position of each query.
    kv_valid: [B, S] bool, which key slots hold real tokens.
    q_slots: [T] int, the key slot of each query (causality and the sliding window).
  """
  return Context(Rope(*rope_tables(config, positions)), attention_mask_3d(kv_valid, q_slots, config))


def prompt_context(config: Config, mask: Array) -> Context:
  """Context of a full pass over tokens with padding mask [B, T] (1 = real; either side)."""
  mask = mask.astype(bool)
  T = mask.shape[1]
  slots = jnp.arange(T, dtype=jnp.int32)
  return make_context(config, positions_from_mask(mask), mask, slots)


# ---------------------------------------------------------------------------- sublayers

def rms_norm(scale: Array, x: Array, eps: float) -> Array:
  """RMSNorm of x [..., D] with scale [D]; statistics in float32, result in x's dtype."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale.astype(x.dtype) * y.astype(x.dtype)


def linear(p: dict, x: Array) -> Array:
  """x [..., I] @ p["kernel"] [I, O] (+ p["bias"] [O]) in x's dtype."""
  k = p["kernel"].astype(x.dtype)
  y = jax.lax.dot_general(x, k, (((x.ndim - 1,), (0,)), ((), ())), precision=_precision(x.dtype))
  if "bias" in p:
    y = y + jnp.reshape(p["bias"].astype(x.dtype), (1,) * (y.ndim - 1) + (-1,))
  return y


class LayerCache(NamedTuple):
  """Keys and values of one layer, k and v [B, S, K, H]; stacked on a leading L axis when it is
  the cache of a whole model (a scan hands each layer its own slice)."""

  k: Array
  v: Array


class AttnOut(NamedTuple):
  """delta [B, T, D] added to the residual; inputs {"attn_in": [B, T, D] (normed h, what q/k/v
  read), "o_in": [B, T, N*H]} when asked, else None; cache the updated LayerCache or None."""

  delta: Array
  inputs: Optional[dict]
  cache: Optional[LayerCache]


class MLPOut(NamedTuple):
  """delta [B, T, D]; inputs {"mlp_in": [B, T, D] (normed h), "down_in": [B, T, F]} or None."""

  delta: Array
  inputs: Optional[dict]


def _attend(q: Array, k: Array, v: Array, mask: Array, dtype) -> Array:
  """Softmax attention of q [B, T, K, G, H] over k, v [B, S, K, H] with mask [B, T, S];
  returns [B, T, K, G, H] in `dtype`."""
  prec = _precision(dtype)
  scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k.astype(q.dtype), precision=prec,
                      preferred_element_type=jnp.float32) / np.sqrt(q.shape[-1]).astype(np.float32)
  scores = jnp.where(mask[:, None, None], scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
  return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v.astype(dtype), precision=prec)


def attention_sublayer(p: dict, config: Config, h: Array, ctx: Context, *,
                       cache: Optional[LayerCache] = None, index: Optional[Array] = None,
                       inputs: bool = False, causal_chunk: Optional[int] = None) -> AttnOut:
  """Pre-norm grouped-query attention of one layer: what it adds to the residual stream.

  Args:
    p: one layer's params (leaves without the L axis); reads p["attn_norm"] and p["attn"].
    h: [B, T, D] residual stream entering the sublayer.
    ctx: RoPE tables of the T queries and the mask [B, T, S].
    cache: None (keys are these T tokens, S == T), or this layer's cache [B, S, K, H] into which
      the new keys and values are written at slots index .. index + T - 1 before attending.
    index: scalar int32 slot of the first query (with a cache).
    inputs: also return the inputs of the linears (calibration statistics).
    causal_chunk: None, or a query chunk size for a causal pass without a cache in which query t
      sits at key slot t (a `prompt_context`): each chunk of queries attends only to the keys up
      to its last query, skipping the upper triangle of the scores, which the mask removes
      anyway (exp underflows to exactly 0). Same result up to float summation order for every
      query with at least one visible key; a fully masked (padding) query gets a uniform average
      over fewer keys, a different but equally meaningless value. On XLA:CPU at T=512, chunks
      of 64-128 queries run the attention 2-3x faster (the smaller score tiles stay in cache).
  """
  if causal_chunk is not None and cache is not None:
    raise ValueError("attention_sublayer: causal_chunk needs a pass without a cache (query t at "
                     f"key slot t), got causal_chunk={causal_chunk} with a cache")
  c = config
  B, T, _ = h.shape
  N, K, H = c.num_heads, c.num_kv_heads, c.head_dim
  a = p["attn"]
  x = rms_norm(p["attn_norm"]["scale"], h, c.rms_norm_eps)
  q = linear(a["q_proj"], x).reshape(B, T, N, H)
  k = linear(a["k_proj"], x).reshape(B, T, K, H)
  v = linear(a["v_proj"], x).reshape(B, T, K, H)
  q, k = apply_rope(q, *ctx.rope), apply_rope(k, *ctx.rope)
  new_cache = None
  if cache is not None:
    zero = jnp.zeros((), jnp.int32)
    start = (zero, index, zero, zero)
    new_cache = LayerCache(jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start),
                           jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start))
    k, v = new_cache
  q = q.reshape(B, T, K, N // K, H)
  if causal_chunk is None or causal_chunk >= T:
    o_in = _attend(q, k, v, ctx.mask, h.dtype)
  else:
    o_in = jnp.concatenate(
        [_attend(q[:, s:s + causal_chunk], k[:, :s + causal_chunk], v[:, :s + causal_chunk],
                 ctx.mask[:, s:s + causal_chunk, :s + causal_chunk], h.dtype)
         for s in range(0, T, causal_chunk)], axis=1)
  o_in = o_in.reshape(B, T, N * H)
  delta = linear(a["o_proj"], o_in)
  return AttnOut(delta, {"attn_in": x, "o_in": o_in} if inputs else None, new_cache)


def mlp_sublayer(p: dict, config: Config, h: Array, *, inputs: bool = False) -> MLPOut:
  """Pre-norm SwiGLU MLP of one layer (reads p["mlp_norm"], p["mlp"]); h [B, T, D]."""
  m = p["mlp"]
  x = rms_norm(p["mlp_norm"]["scale"], h, config.rms_norm_eps)
  down_in = jax.nn.silu(linear(m["gate_proj"], x)) * linear(m["up_proj"], x)
  delta = linear(m["down_proj"], down_in)
  return MLPOut(delta, {"mlp_in": x, "down_in": down_in} if inputs else None)


class BlockOut(NamedTuple):
  """h_out [B, T, D] after the block; h_attn [B, T, D] after its attention; cache; inputs (the
  four linear-input groups attn_in, o_in, mlp_in, down_in, when asked)."""

  h_out: Array
  h_attn: Array
  cache: Optional[LayerCache]
  inputs: Optional[dict]


def block(p: dict, config: Config, h: Array, ctx: Context, *,
          cache: Optional[LayerCache] = None, index: Optional[Array] = None,
          inputs: bool = False, causal_chunk: Optional[int] = None) -> BlockOut:
  """One pre-norm decoder block: h + attention, then + MLP (see the two sublayer functions)."""
  a = attention_sublayer(p, config, h, ctx, cache=cache, index=index, inputs=inputs,
                         causal_chunk=causal_chunk)
  h_attn = h + a.delta
  m = mlp_sublayer(p, config, h_attn, inputs=inputs)
  return BlockOut(h_attn + m.delta, h_attn, a.cache, {**a.inputs, **m.inputs} if inputs else None)


# ------------------------------------------------------------------------- Flax module

def _init_layer_params(config: Config, key: Array) -> dict:
  """One layer's params in the layout of `prunerep_jax.layout`: lecun-normal kernels, zero
  biases, unit norm scales (float32)."""
  shapes = jax.tree_util.tree_map(lambda s: s[1:], layout_shapes(config)["layers"],
                                  is_leaf=lambda x: isinstance(x, tuple))
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes,
                                                       is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(key, len(flat))
  kernel_init = nn.initializers.lecun_normal()
  leaves = []
  for (path, shape), k in zip(flat, keys):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "kernel":
      leaves.append(kernel_init(k, shape, jnp.float32))
    elif name == "scale":
      leaves.append(jnp.ones(shape, jnp.float32))
    else:
      leaves.append(jnp.zeros(shape, jnp.float32))
  return jax.tree_util.tree_unflatten(treedef, leaves)


class Block(nn.Module):
  """The decoder block as a Flax module: it owns the parameters of one layer (in the layout of
  `prunerep_jax.layout`) and runs the pure `block` function on them."""

  config: Config

  @nn.compact
  def __call__(self, h: Array, ctx: Context) -> BlockOut:
    p = self.param("layer", lambda key: _init_layer_params(self.config, key))
    return block(p, self.config, h, ctx)

  @staticmethod
  def params_of(variables: dict) -> dict:
    """The layer params (layout structure) inside this module's variables."""
    return variables["params"]["layer"]


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


def run_layers(layer_params, config: Config, h: Array, ctx: Context, *,
               cache: Optional[LayerCache] = None, index: Optional[Array] = None,
               keep_idx: Optional[Array] = None, capture: bool = True):
  """Runs the L stacked blocks with `jax.lax.scan`, each layer with its own cache slice.

  Args:
    layer_params: params["layers"], every leaf stacked on a leading L axis.
    h: [B, T, D] residual stream entering block 0.
    ctx: the shared `Context` of the T queries.
    cache: None, or the model's LayerCache with leaves [L, B, S, K, H]: the scan hands layer l
      its slice and collects the updated slices, so the cache goes in and comes out as a per-layer
      pytree (no layer index inside the carry).
    index: scalar int32 slot of the first query (with a cache).
    keep_idx: None (keep all T) or [B, P] positions whose residual states are captured.
    capture: whether to return the per-sublayer residual states.

  Returns:
    (h_out [B, T, D], residual [2L, B, P, D] or None, updated cache or None), where
    residual[2l] enters block l and residual[2l + 1] is after its attention.
  """

  def keep(x):
    return x if keep_idx is None else gather_positions(x, keep_idx)

  def body(h, xs):
    p, layer_cache = xs
    out = block(p, config, h, ctx, cache=layer_cache, index=index)
    ys = (jnp.stack([keep(h), keep(out.h_attn)]) if capture else None, out.cache)
    return out.h_out, ys

  h, (ys, cache) = jax.lax.scan(body, h, (layer_params, cache))
  residual = None
  if capture:
    residual = ys.reshape((2 * config.num_layers,) + ys.shape[2:])
  return h, residual, cache


def embed(params, tokens: Array) -> Array:
  """tokens [B, T] int -> [B, T, D] in the compute dtype."""
  return jnp.take(params["embed"]["embedding"], tokens, axis=0)


def final_norm(params, config: Config, h: Array) -> Array:
  return rms_norm(params["final_norm"]["scale"], h, config.rms_norm_eps)


def lm_head(params, config: Config, x: Array) -> Array:
  """x [..., D] (already final-normed) -> logits [..., V] float32."""
  if config.tie_word_embeddings:
    w = params["embed"]["embedding"].T
  else:
    w = params["lm_head"]["kernel"]
  return jnp.einsum("...D,DV->...V", x, w.astype(x.dtype), precision=_precision(x.dtype),
                    preferred_element_type=jnp.float32)


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
            capture: bool = True, logits: bool = True, mesh=None) -> ForwardOutput:
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
    mesh: None (one device), a ("data", "model") `jax.sharding.Mesh` or a spec such as
      "data:2,model:2" (see `prunerep_jax.parallel`): params are placed by
      `parallel.shard_params` (a no-op for params already placed so), the batch is padded to a
      multiple of the data axis and split over it, and the outputs come back without the
      padding rows (as global arrays: `parallel.fetch` reads them on every host).

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
  mesh = parallel.as_mesh(fn, mesh)
  if mesh is None:
    return _forward(params, config, tokens, mask, keep_idx, mode, capture, logits)
  params = parallel.shard_params(params, config, mesh)
  tokens, _ = parallel.shard_batch(tokens, mesh)
  mask, _ = parallel.shard_batch(mask, mesh)
  if keep_idx is not None:
    keep_idx, _ = parallel.shard_batch(keep_idx, mesh)
  out = _forward(params, config, tokens, mask, keep_idx, mode, capture, logits)
  return ForwardOutput(parallel.unpad(out.logits, B), parallel.unpad(out.residual, B, axis=1),
                       parallel.unpad(out.final_hidden, B), parallel.unpad(out.positions, B))


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
  ctx = prompt_context(config, mask)
  h = embed(params, tokens).astype(compute_dtype(params))
  layer_keep = None if mode == "all" else idx
  h, residual, _ = run_layers(params["layers"], config, h, ctx, keep_idx=layer_keep,
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
  layer_keys = jax.random.split(k_layers, config.num_layers)
  ctx = prompt_context(config, jnp.ones((1, 1), bool))
  module = Block(config)
  dummy = jnp.zeros((1, 1, D), jnp.float32)
  layers = jax.vmap(lambda k: Block.params_of(module.init(k, dummy, ctx)))(layer_keys)
  params = {
      "embed": {"embedding": 0.02 * jax.random.normal(k_embed, (config.vocab_size, D))},
      "layers": layers,
      "final_norm": {"scale": jnp.ones((D,), jnp.float32)},
  }
  if not config.tie_word_embeddings:
    params["lm_head"] = {"kernel": 0.02 * jax.random.normal(k_head, (D, config.vocab_size))}
  return cast(params, dtype)
