"""KV-cached decoding as pure steps, one public scan driver, and `generate` on top of it.

  prefill / decode_step   one model, one step: `StepOutput` (logits, final hidden, optionally
                          the step's residual stream) and the next `DecodeState`
  Sampling, sample        how a token is drawn (frozen, static under jit)
  Stopping, choose        EOS handling: one step's token for every row
  rollout                 the scan driver: prefill + decode steps, with a per-step `observe`
                          function evaluated inside the scan (metrics stay on the device)
  generate                the validated, jitted public entry point

The KV cache is a per-layer pytree (`model.LayerCache` with [L, ...] leaves); each layer's slice
goes into the layer scan and comes back updated, so several models' states (a dense and a pruned
one) can advance side by side in one scan (see `prunerep_jax.analysis.drift`).

Shape letters: B batch, T prompt positions, S steps / cache slots, V vocab, D hidden, L layers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from prunerep_jax import model as M
from prunerep_jax import parallel
from prunerep_jax import validate
from prunerep_jax.config import Config

Array = jax.Array
CAPTURES = ("hidden", "logits", "logprobs")


@flax.struct.dataclass
class DecodeState:
  """The decoding state of one model, advanced by `decode_step`.

  cache: the model's `LayerCache`, k and v [L, B, S, K, H] (each layer reads and returns its
    own slice inside the layer scan).
  kv_valid: [B, S] bool, slots holding real tokens.
  index: scalar int32, the next slot to write.
  next_pos: [B] int32, RoPE position of each row's next token.
  """

  cache: M.LayerCache
  kv_valid: Array
  index: Array
  next_pos: Array


def init_state(config: Config, batch: int, cache_len: int, dtype=jnp.float32) -> DecodeState:
  shape = (config.num_layers, batch, cache_len, config.num_kv_heads, config.head_dim)
  return DecodeState(M.LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)),
                     jnp.zeros((batch, cache_len), bool), jnp.zeros((), jnp.int32),
                     jnp.zeros((batch,), jnp.int32))


class StepOutput(NamedTuple):
  """What one decoding step (or the prefill, for its last position) produces.

  logits: [B, V] float32; hidden: [B, D] final-normed hidden state (what the LM head read);
  residual: [2L + 1, B, D] the residual stream at every sublayer boundary of this step's token
    (entering block l at 2l, after its attention at 2l + 1, leaving the last block at 2L), or None.
  """

  logits: Array
  hidden: Array
  residual: Optional[Array]


def _finish(params, config, h, residual):
  """Final norm and LM head on the last block's output h [B, D]; stacks the step's residual."""
  hidden = M.final_norm(params, config, h)
  if residual is not None:
    residual = jnp.concatenate([residual, h[None]], axis=0)
  return StepOutput(M.lm_head(params, config, hidden), hidden, residual)


def prefill(params, config: Config, tokens: Array, mask: Array, cache_len: int, *,
            capture: bool = False) -> tuple[StepOutput, DecodeState]:
  """Runs a left-aligned prompt (tokens, mask [B, T]) into a fresh cache of `cache_len` slots.

  Returns the `StepOutput` of the last position (with its residual stream if capture) and the
  state ready for the first `decode_step`.
  """
  B, T = tokens.shape
  mask = mask.astype(bool)
  state = init_state(config, B, cache_len, M.compute_dtype(params))
  kv_valid = state.kv_valid.at[:, :T].set(mask)
  ctx = M.make_context(config, M.positions_from_mask(mask), kv_valid,
                       jnp.arange(T, dtype=jnp.int32))
  h = M.embed(params, tokens).astype(M.compute_dtype(params))
  last = jnp.full((B, 1), T - 1, jnp.int32)
  h, residual, cache = M.run_layers(params["layers"], config, h, ctx, cache=state.cache,
                                    index=jnp.zeros((), jnp.int32),
                                    keep_idx=last if capture else None, capture=capture)
  out = _finish(params, config, h[:, -1], None if residual is None else residual[:, :, 0])
  next_pos = jnp.sum(mask, axis=1).astype(jnp.int32)
  return out, DecodeState(cache, kv_valid, jnp.asarray(T, jnp.int32), next_pos)


def decode_step(params, config: Config, state: DecodeState, token: Array, *,
                capture: bool = False) -> tuple[StepOutput, DecodeState]:
  """Feeds one token per row (token [B] int); returns this step's `StepOutput` (its residual
  stream [2L + 1, B, D] if capture) and the advanced state."""
  idx = state.index
  kv_valid = jax.lax.dynamic_update_slice(state.kv_valid, jnp.ones((token.shape[0], 1), bool),
                                          (jnp.zeros((), jnp.int32), idx))
  ctx = M.make_context(config, state.next_pos[:, None], kv_valid, idx[None])
  h = M.embed(params, token[:, None]).astype(M.compute_dtype(params))
  h, residual, cache = M.run_layers(params["layers"], config, h, ctx, cache=state.cache,
                                    index=idx, capture=capture)
  out = _finish(params, config, h[:, 0], None if residual is None else residual[:, :, 0])
  return out, DecodeState(cache, kv_valid, idx + 1, state.next_pos + 1)


# ----------------------------------------------------------------------------- sampling

@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is drawn: static under jit (hashable).

  temperature: 0 for greedy (argmax), > 0 to sample from softmax(logits / temperature).
  top_k: None, or keep only the k largest logits.
  top_p: None, or keep the smallest prefix of the sorted distribution whose mass reaches top_p.
  """

  temperature: float = 0.0
  top_k: Optional[int] = None
  top_p: Optional[float] = None

  def __post_init__(self):
    object.__setattr__(self, "temperature",
                       validate.temperature("Sampling", self.temperature, allow_zero=True))
    if self.top_k is not None:
      object.__setattr__(self, "top_k", validate.integer("Sampling", "top_k", self.top_k,
                                                         minimum=1))
    if self.top_p is not None:
      object.__setattr__(self, "top_p", validate.number(
          "Sampling", "top_p", self.top_p, minimum=0.0, maximum=1.0, min_open=True))

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def sample(logits: Array, key: Array, sampling: Sampling = Sampling()) -> Array:
  """Draws one token per row from logits [B, V] -> [B] int32 (argmax when greedy)."""
  if sampling.greedy:
    # top_k(., 1) is argmax with the same tie rule (lowest index), and XLA:CPU vectorises it
    return jax.lax.top_k(logits, 1)[1][..., 0].astype(jnp.int32)
  z = logits.astype(jnp.float32) / sampling.temperature
  if sampling.top_k is not None:
    kth = jax.lax.top_k(z, sampling.top_k)[0][..., -1:]
    z = jnp.where(z < kth, -jnp.inf, z)
  if sampling.top_p is not None:
    order = jnp.argsort(-z, axis=-1)
    z_sorted = jnp.take_along_axis(z, order, axis=-1)
    p_sorted = jax.nn.softmax(z_sorted, axis=-1)
    # keep the smallest prefix whose mass reaches top_p (always at least the top token)
    drop_sorted = (jnp.cumsum(p_sorted, axis=-1) - p_sorted) >= sampling.top_p
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(z.shape[0])[:, None], order].set(drop_sorted)
    z = jnp.where(drop, -jnp.inf, z)
  return jax.random.categorical(key, z, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Stopping:
  """When a row ends: after it emits one of eos_ids; afterwards it emits pad_id. Static."""

  eos_ids: tuple[int, ...] = ()
  pad_id: int = 0


def choose(logits: Array, key: Array, done: Array, sampling: Sampling,
           stopping: Stopping) -> tuple[Array, Array, Array]:
  """One step's token for every row, honouring rows that already ended.

  Args:
    logits: [B, V]; key: this step's PRNG key; done: [B] bool, rows that ended before this step.
  Returns:
    (token [B] int32 (pad_id where done), valid [B] bool (= not done), done after this step [B]).
  """
  tok = jnp.where(done, stopping.pad_id, sample(logits, key, sampling))
  ended = jnp.isin(tok, jnp.asarray(stopping.eos_ids, jnp.int32)) if stopping.eos_ids else False
  return tok, ~done, done | ended


def step_key(seed_key: Array, step) -> Array:
  """The key of decoding step `step`: fold_in(key(seed), step), the same for every model, so a
  dense and a pruned model sample with the same randomness."""
  return jax.random.fold_in(seed_key, step)


# ------------------------------------------------------------------------------ rollout

Observe = Callable[[StepOutput, Array, Array], Any]


class Rollout(NamedTuple):
  """tokens [B, S] int32; valid [B, S] bool; observed: what `observe` returned at each step,
  every leaf stacked with the step axis second ([B, S, ...]); state: the final DecodeState."""

  tokens: Array
  valid: Array
  observed: Any
  state: DecodeState


def rollout(params, config: Config, tokens: Array, mask: Array, steps: int, *,
            sampling: Sampling = Sampling(), stopping: Stopping = Stopping(),
            seed_key: Optional[Array] = None, observe: Optional[Observe] = None,
            capture: bool = False) -> Rollout:
  """The decoding scan: prefill, then `steps - 1` decode steps in one `jax.lax.scan`.

  Traceable (call it inside `jax.jit`); nothing leaves the device. At every step,
  ``observe(out, token, valid)`` (out the step's `StepOutput`, token [B] the token it chose,
  valid [B] whether the row was still running) computes whatever the caller wants kept, inside
  the scan: return per-step scalars to keep O(steps) memory, or whole logits if you need them.

  Args:
    tokens, mask: [B, T] left-aligned prompt (see `left_align`).
    steps: S, the number of tokens generated (static).
    sampling, stopping: see `Sampling`, `Stopping`.
    seed_key: `jax.random.key(seed)`; step i uses `step_key(seed_key, i)`.
    observe: None or the per-step function above.
    capture: give `observe` the step's residual stream (StepOutput.residual).
  """
  if seed_key is None:
    seed_key = jax.random.key(0)
  observe = observe or (lambda out, tok, valid: None)
  out, state = prefill(params, config, tokens, mask, tokens.shape[1] + steps, capture=capture)
  tok, valid, done = choose(out.logits, step_key(seed_key, 0), jnp.zeros(tokens.shape[0], bool),
                            sampling, stopping)
  first = (tok, valid, observe(out, tok, valid))

  def body(carry, i):
    state, tok, done = carry
    out, state = decode_step(params, config, state, tok, capture=capture)
    tok, valid, done = choose(out.logits, step_key(seed_key, i), done, sampling, stopping)
    return (state, tok, done), (tok, valid, observe(out, tok, valid))

  (state, _, _), rest = jax.lax.scan(body, (state, tok, done),
                                     jnp.arange(1, steps, dtype=jnp.int32))
  ys = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b], axis=0).swapaxes(0, 1),
                              first, rest)
  return Rollout(ys[0], ys[1], ys[2], state)


class Generation(NamedTuple):
  """Output of `generate`. S = max_new_tokens.

  tokens:   [B, S] int32 new tokens; after a row's EOS, `pad_id`.
  valid:    [B, S] bool, True up to and including the row's EOS.
  lengths:  [B] int32 number of valid tokens.
  hidden:   [B, S, D] final-normed hidden state that produced each token (if captured).
  logits:   [B, S, V] float32 logits that produced each token (if captured).
  logprobs: [B, S, V] float32 log-softmax of logits / T (T = 1 for greedy) (if captured).
  prompt_tokens, prompt_mask: [B, T] the prompt, left-aligned as it was run.
  observed: what `observe` returned at each step, leaves [B, S, ...] (None without observe).
  """

  tokens: Array
  valid: Array
  lengths: Array
  hidden: Optional[Array]
  logits: Optional[Array]
  logprobs: Optional[Array]
  prompt_tokens: Array
  prompt_mask: Array
  observed: Any = None


def left_align(tokens: Array, mask: Array) -> tuple[Array, Array]:
  """Moves each row's padding to the left, keeping token order (works for any padding side).

  tokens [B, T]; mask [B, T] 0/1 (1 = real token; `generate` has validated it). Rows are sorted
  on `mask != 0` alone, so the mask's values can never reorder the tokens.
  Returns (tokens [B, T], mask [B, T] int32 0/1).
  """
  real = (mask != 0).astype(jnp.int32)
  order = jnp.argsort(real, axis=1, stable=True)
  return jnp.take_along_axis(tokens, order, axis=1), jnp.take_along_axis(real, order, axis=1)


def generate(params, config: Config, prompt_tokens, max_new_tokens: int, *, prompt_mask=None,
             temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, seed: int = 0,
             eos_token_ids: Optional[Sequence[int]] = None, pad_id: Optional[int] = None,
             capture: Sequence[str] = (), observe: Optional[Observe] = None,
             mesh=None) -> Generation:
  """Prefill, then a fixed-length `jax.lax.scan` over decoding steps with a KV cache.

  Every argument is checked once on the host before anything is traced (see
  `prunerep_jax.validate`); scalars may be Python or NumPy numbers.

  Args:
    params, config: the model; params must match config's layout (shapes only).
    prompt_tokens: integer ids [B, T] in [0, V); rows of different lengths are padded (either
      side) and described by `prompt_mask` [B, T] (bool or integer 0/1, 1 = real token, at
      least one per row).
    max_new_tokens: number of decoding steps S (static), an integer >= 1 with
      T + S <= config.max_position_embeddings.
    temperature: 0 for greedy, > 0 to sample from softmax(logits / temperature).
    top_k, top_p: optional truncation of the sampling distribution (top_k in [1, V], top_p in
      (0, 1]).
    seed: an integer in [0, 2**32); step i samples with `fold_in(key(seed), i)`, so two models
      given the same seed draw with the same randomness.
    eos_token_ids: token ids that end a row (default: config.eos_token_ids; () disables).
    pad_id: token id written after a row has ended (default: config.pad_token_id, else 0).
    capture: a tuple of any of "hidden", "logits", "logprobs": per-step arrays to return.
    observe: optional ``observe(out: StepOutput, token [B], valid [B]) -> pytree`` evaluated
      inside the decoding scan at every step (see `rollout`); its results come back in
      `Generation.observed`. Reduce there (e.g. an entropy per step) to keep memory O(steps).
      The function is a static argument: pass the same function object to reuse the compilation.
    mesh: None (one device), a ("data", "model") `jax.sharding.Mesh` or a spec such as
      "data:4" (see `prunerep_jax.parallel`): params are placed by `parallel.shard_params`, the
      prompts are padded to a multiple of the data axis and split over it (the KV cache follows),
      and every output comes back without the padding rows. Sampling draws the same numbers for a
      row whatever the padding (the PRNG bits of row b do not depend on the batch size).

  Raises:
    ArgumentError (a ValueError) naming the argument, the value and what was expected.
  """
  fn = "generate"
  validate.params(fn, params, config)
  V = config.vocab_size
  prompt_tokens = validate.tokens(fn, prompt_tokens, V, name="prompt_tokens")
  B, T = prompt_tokens.shape
  mask = validate.mask(fn, "prompt_mask", prompt_mask, (B, T))
  steps = validate.integer(fn, "max_new_tokens", max_new_tokens, minimum=1)
  limit = config.max_position_embeddings
  if T + steps > limit:
    raise validate.fail(
        fn, "max_new_tokens", max_new_tokens,
        f"at most {limit - T}: prompt length {T} + max_new_tokens must not exceed "
        f"config.max_position_embeddings={limit}")
  if validate.is_traced(temperature):
    raise validate.fail(fn, "temperature", temperature,
                        "a concrete number (it is static in generate's compiled scan)")
  temperature = validate.temperature(fn, temperature, allow_zero=True)
  if top_k is not None:
    top_k = validate.integer(fn, "top_k", top_k, minimum=1, maximum=V,
                             expected=f"None or an integer in [1, {V}]")
  if top_p is not None:
    top_p = validate.number(fn, "top_p", top_p, minimum=0.0, maximum=1.0, min_open=True,
                            expected="None or a number in (0, 1]")
  seed = validate.seed(fn, seed)
  capture = validate.names(fn, "capture", capture, CAPTURES)
  if eos_token_ids is None:
    eos = config.eos_token_ids
  else:
    eos = validate.token_ids(fn, "eos_token_ids", eos_token_ids, V)
  if pad_id is None:
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
  else:
    pad_id = validate.token_id(fn, "pad_id", pad_id, V)
  if observe is not None and not callable(observe):
    raise validate.fail(fn, "observe", observe, "None or a function (StepOutput, token, valid) "
                        "-> pytree", error=TypeError)
  mesh = parallel.as_mesh(fn, mesh)
  if mesh is not None:
    params = parallel.shard_params(params, config, mesh)
    prompt_tokens, _ = parallel.shard_batch(prompt_tokens, mesh)
    mask, _ = parallel.shard_batch(mask, mesh)
  tokens, mask = left_align(prompt_tokens, mask)
  sampling = Sampling(temperature, top_k, top_p)
  stopping = Stopping(tuple(eos), int(pad_id))
  out = _generate(params, config, tokens, mask, jnp.asarray(seed, jnp.uint32), steps,
                  sampling, stopping, tuple(c for c in CAPTURES if c in capture), observe)
  out = out._replace(prompt_tokens=tokens, prompt_mask=mask)
  return out if mesh is None else parallel.unpad(out, B)


@functools.partial(jax.jit, static_argnums=(1, 5, 6, 7, 8, 9))
def _generate(params, config, tokens, mask, seed, steps, sampling, stopping, capture, observe):
  logprob_t = sampling.temperature or 1.0

  def keep(out, tok, valid):
    ys = {}
    if "hidden" in capture:
      ys["hidden"] = out.hidden
    if "logits" in capture:
      ys["logits"] = out.logits
    if "logprobs" in capture:
      ys["logprobs"] = jax.nn.log_softmax(out.logits / logprob_t, axis=-1)
    if observe is not None:
      ys["observed"] = observe(out, tok, valid)
    return ys

  r = rollout(params, config, tokens, mask, steps, sampling=sampling, stopping=stopping,
              seed_key=jax.random.key(seed), observe=keep)
  ys = r.observed
  return Generation(r.tokens, r.valid, r.valid.sum(axis=1).astype(jnp.int32), ys.get("hidden"),
                    ys.get("logits"), ys.get("logprobs"), tokens, mask, ys.get("observed"))
