"""Recovery fine-tuning of a pruned model with optax, keeping its pruning structure exactly.

    result = pj.recover(dense_params, pruned, config, data, steps=200)

What is trained: the kernels of the selected block linears (`include`, default all seven), or,
with lora_rank r, low-rank adapters A [L, I, r] and B [L, r, O] on them (B starts at zero, so step
0 is the pruned model), merged into the kernels at the end. Embeddings, norms, biases and the LM
head stay frozen.

Structure, exactly, after every step:
  * pruned weights: the keep-mask of every kernel (PruneResult.masks; neurons' channel masks when
    the channels were zeroed rather than removed) multiplies the gradients, so optimizer moments
    of pruned entries stay zero, and the kernels are re-masked after every update (jnp.where:
    exact zeros whatever the optimizer does). N:M groups thus keep their n zeros. With LoRA the
    forward is W + mask * (A B), so the merged kernel where(mask, W + A B, 0) computes exactly
    what was trained.
  * dropped sublayers: their output projections (named in report["dropped"], or any all-zero
    o_proj / down_proj kernel) are frozen at zero, so the sublayer still adds exactly +0.0.
    Removed blocks and channels are absent from the params and stay absent.

Losses, per position, averaged over every position of a step:
  "kl_to_dense"  KL(p_dense || p_pruned) at `temperature`, the dense model's logits computed on the
                 fly from the same windows (distillation; T positions per window);
  "next_token"   cross-entropy of the next token (language modelling; T - 1 positions).
Logits exist one chunk of positions at a time ([B, C, V], `batching.map_chunks`) and are
recomputed in the backward pass (jax.checkpoint), as are the blocks: no [B, T, V] array beyond a
chunk, and activation memory O(L B T D) rather than O(L B T (F + N T)).

A step is `accumulate` micro-batches of `batch_size` windows, gradients averaged in a
`jax.lax.scan`, then one optax update, all in one jitted function. The default optimizer is AdamW
on a warmup-cosine schedule (`default_optimizer`). Windows are drawn without replacement from a
seeded permutation per epoch, a pure function of (seed, step), so a resumed run sees the batches
the uninterrupted one would have.

Checkpoints (checkpoint_dir): every `checkpoint_every` steps and after the last one,
DIR/step_XXXXXXXX/ holds state/ (orbax: the trained leaves and the optimizer state) and meta.json
(format, step, losses so far, the run's arguments), written atomically
(`atomic.staged_directory`); only the newest `keep_checkpoints` are kept, and only directories
this function wrote (recognised by their meta.json) are ever removed. resume=True continues from
the newest, after checking it was written by a run with the same arguments; the optimizer
cannot be compared, so pass the same one.

Shape letters: N windows, T positions, B batch, A micro-batches per step, L layers, I inputs,
O outputs, r LoRA rank, D hidden, V vocab, C positions per chunk.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import time
from typing import Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from prunerep_jax import atomic, batching, validate
from prunerep_jax import model as M
from prunerep_jax.config import Config
from prunerep_jax.prune import calibrate
from prunerep_jax.prune import linears as lin
from prunerep_jax.prune.result import PruneResult

LOSSES = ("kl_to_dense", "next_token")
FORMAT = "prunerep_jax.recover/1"
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_OUT_PROJ = {"attn": "o_proj", "mlp": "down_proj"}
DEFAULT_LR = 1e-4
DEFAULT_LORA_LR = 1e-3


def default_optimizer(steps: int, learning_rate: float = DEFAULT_LR,
                      warmup_steps: Optional[int] = None,
                      weight_decay: float = 0.0) -> optax.GradientTransformation:
  """AdamW on optax.warmup_cosine_decay_schedule: linear warmup from 0 over warmup_steps
  (default steps // 10), cosine decay to learning_rate / 10 at `steps`; gradients clipped to
  global norm 1."""
  fn = "default_optimizer"
  steps = validate.integer(fn, "steps", steps, minimum=1)
  learning_rate = validate.number(fn, "learning_rate", learning_rate, minimum=0.0, min_open=True)
  warmup = steps // 10 if warmup_steps is None else validate.integer(
      fn, "warmup_steps", warmup_steps, minimum=0, maximum=steps - 1,
      expected=f"an integer in [0, {steps - 1}] (steps before the cosine decay)")
  weight_decay = validate.number(fn, "weight_decay", weight_decay, minimum=0.0)
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, steps,
                                                end_value=learning_rate / 10)
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, weight_decay=weight_decay))


# ----------------------------------------------------------------------------- structure

def _kernel_keep(pruned: PruneResult, linears) -> dict:
  """{sub: {name: [L, I, O] bool}}: True where a chosen kernel may be nonzero."""
  params, config, masks = pruned.params, pruned.config, pruned.masks or {}
  layers = masks.get("layers", {}) if isinstance(masks, dict) else {}
  dropped = {(d["layer"], d["sublayer"]) for d in pruned.report.get("dropped", [])
             if isinstance(d, dict) and d.get("sublayer") in _OUT_PROJ}
  channels = layers.get("mlp", {}).get("channels")
  keep = {}
  for sub, name in linears:
    w = params["layers"][sub][name]["kernel"]
    k = layers.get(sub, {}).get(name, {}).get("kernel")
    k = jnp.ones(w.shape, bool) if k is None else jnp.asarray(k, bool)
    if tuple(k.shape) != tuple(w.shape):
      raise validate.fail("recover", f"pruned.masks['layers']['{sub}']['{name}']['kernel']", k,
                          f"a bool keep-mask of the kernel's shape {tuple(w.shape)}")
    if channels is not None and np.shape(channels)[-1] == config.intermediate_size:
      # neurons(remove=False): zeroed channels are columns of gate/up and rows of down
      c = jnp.asarray(channels, bool)
      if (sub, name) in (("mlp", "gate_proj"), ("mlp", "up_proj")):
        k = k & c[:, None, :]
      elif (sub, name) == ("mlp", "down_proj"):
        k = k & c[:, :, None]
    if name == _OUT_PROJ.get(sub):
      zero = np.asarray(jnp.all(w == 0, axis=(1, 2)))
      frozen = [l for l in range(config.num_layers) if zero[l] or (l, sub) in dropped]
      if frozen:
        k = k.at[np.asarray(frozen)].set(False)
    keep.setdefault(sub, {})[name] = k
  return keep


def _map(keep, fn, *trees):
  """fn(keep_leaf, *leaves) over the {sub: {name: ...}} trees of the chosen linears."""
  return {sub: {name: fn(k, *(t[sub][name] for t in trees)) for name, k in names.items()}
          for sub, names in keep.items()}


def _masked(keep, tree):
  return _map(keep, lambda k, x: jnp.where(k, x, jnp.zeros((), x.dtype)), tree)


def _kernels(params, keep, trainable, lora: bool):
  """The chosen kernels the model runs with: the trained ones, or W + mask * (A B)."""
  if not lora:
    return trainable
  return _map(keep, lambda k, w, ab: w + jnp.where(
      k, jnp.einsum("LIr,LrO->LIO", ab["a"], ab["b"]).astype(w.dtype), jnp.zeros((), w.dtype)),
      {sub: {n: params["layers"][sub][n]["kernel"] for n in names} for sub, names in keep.items()},
      trainable)


def _with_kernels(params, kernels):
  layers = dict(params["layers"])
  for sub, names in kernels.items():
    layers[sub] = dict(layers[sub], **{n: dict(layers[sub][n], kernel=k) for n, k in names.items()})
  return dict(params, layers=layers)


# -------------------------------------------------------------------------------- losses

def _hidden(params, config: Config, tokens, remat: bool):
  """The last block's output [B, T, D]; with remat, each block recomputed in the backward pass."""
  ctx = M.prompt_context(config, jnp.ones(tokens.shape, bool))
  h = M.embed(params, tokens).astype(M.compute_dtype(params))
  run = lambda p, h: M.block(p, config, h, ctx).h_out
  if remat:
    run = jax.checkpoint(run)
  h, _ = jax.lax.scan(lambda h, p: (run(p, h), None), h, params["layers"])
  return h


def _loss(params, config, dense, dense_config, tokens, loss: str, temperature, chunk: int):
  """Mean per-position loss of the student `params` on tokens [B, T]."""
  h = _hidden(params, config, tokens, remat=True)
  lens = lambda p, c, x: M.lm_head(p, c, M.final_norm(p, c, x))
  if loss == "kl_to_dense":
    h_dense = jax.lax.stop_gradient(_hidden(dense, dense_config, tokens, remat=False))

    def per_position(hs, hd):  # [B, C, D] x2 -> [B, C]
      logq = jax.nn.log_softmax(lens(params, config, hs) / temperature, axis=-1)
      logp = jax.nn.log_softmax(lens(dense, dense_config, hd) / temperature, axis=-1)
      return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)

    values = batching.map_chunks(jax.checkpoint(per_position), chunk, h, h_dense)
  else:
    def per_position(hs, target):  # [B, C, D], [B, C] -> [B, C]
      z = lens(params, config, hs)
      return jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, target[..., None], -1)[..., 0]

    values = batching.map_chunks(jax.checkpoint(per_position), chunk, h[:, :-1], tokens[:, 1:])
  return jnp.mean(values)


@functools.lru_cache(maxsize=8)
def _make_step(optimizer, config, dense_config, lora: bool, loss: str, chunk: int):
  """The jitted step: (trainable, opt_state, params, dense, keep, tokens [A, B, T],
  temperature) -> (trainable, opt_state, mean loss). Arrays are arguments, never constants
  folded into the compiled function; one per (optimizer, configs, mode), so runs with the same
  optimizer object and shapes (a resumed run) reuse the compiled step."""

  def micro(trainable, params, dense, keep, tokens, temperature):
    student = _with_kernels(params, _kernels(params, keep, trainable, lora))
    return _loss(student, config, dense, dense_config, tokens, loss, temperature, chunk)

  grad = jax.value_and_grad(micro)

  @jax.jit
  def step(trainable, opt_state, params, dense, keep, tokens, temperature):
    def accumulate(carry, tok):
      value, g = grad(trainable, params, dense, keep, tok, temperature)
      return (carry[0] + value, jax.tree_util.tree_map(jnp.add, carry[1], g)), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
    (total, g), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), tokens)
    A = tokens.shape[0]
    g = jax.tree_util.tree_map(lambda x: x / A, g)
    if not lora:
      g = _masked(keep, g)
    updates, opt_state = optimizer.update(g, opt_state, trainable)
    if not lora:
      updates = _masked(keep, updates)
    trainable = optax.apply_updates(trainable, updates)
    if not lora:
      trainable = _masked(keep, trainable)
    return trainable, opt_state, total / A

  return step


# ---------------------------------------------------------------------------------- data

class _Order:
  """Rows of micro-batch m of step s: positions (s A + m) B .. + B of the stream of per-epoch
  permutations of the N windows, permutation e seeded by (seed, e)."""

  def __init__(self, n: int, seed: int):
    self.n, self.seed, self._perms = n, seed, {}

  def rows(self, step: int, accumulate: int, batch: int) -> np.ndarray:
    start = step * accumulate * batch
    pos = np.arange(start, start + accumulate * batch)
    out = np.empty(pos.shape, np.int64)
    for e in np.unique(pos // self.n):
      if e not in self._perms:
        self._perms = {e: np.random.default_rng([self.seed, int(e)]).permutation(self.n)}
      sel = pos // self.n == e
      out[sel] = self._perms[e][pos[sel] % self.n]
    return out.reshape(accumulate, batch)


# --------------------------------------------------------------------------- checkpoints

def _step_dirs(directory: str) -> list[tuple[int, str]]:
  """(step, path) of this function's checkpoints in `directory`, oldest first."""
  if not os.path.isdir(directory):
    return []
  found = []
  for entry in os.listdir(directory):
    m = _STEP_DIR.match(entry)
    path = os.path.join(directory, entry)
    if m and os.path.isfile(os.path.join(path, META_FILE)):
      try:
        with open(os.path.join(path, META_FILE), encoding="utf-8") as f:
          meta = json.load(f)
      except (OSError, ValueError):
        continue
      if isinstance(meta, dict) and meta.get("format") == FORMAT:
        found.append((int(m.group(1)), path))
  return sorted(found)


def _save(directory: str, step: int, trainable, opt_state, meta: dict, keep: int) -> None:
  path = os.path.join(directory, f"step_{step:08d}")
  text = atomic.json_text(meta, caller="recover", name="meta")
  state = {"trainable": trainable, "opt": _opt_leaves(opt_state)}
  with atomic.staged_directory(path, overwrite=False, caller="recover",
                               name="checkpoint_dir") as stage:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(stage, "state"), state)
      ckptr.wait_until_finished()
    with open(os.path.join(stage, META_FILE), "x", encoding="utf-8") as f:
      f.write(text)
  for _, old in _step_dirs(directory)[:-keep]:
    shutil.rmtree(old)


def _opt_leaves(opt_state) -> dict:
  return {f"{i:05d}": x for i, x in enumerate(jax.tree_util.tree_leaves(opt_state))}


def _restore(path: str, trainable, opt_state):
  treedef = jax.tree_util.tree_structure(opt_state)
  target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                  {"trainable": trainable, "opt": _opt_leaves(opt_state)})
  try:
    with ocp.StandardCheckpointer() as ckptr:
      state = ckptr.restore(os.path.join(path, "state"), target)
  except Exception as e:  # noqa: BLE001 -- orbax/tensorstore raise many types for bad data
    first = (str(e).strip().splitlines() or [""])[0][:300]
    raise ValueError(f"recover(checkpoint_dir=...): cannot restore {path} with this run's "
                     f"trainable params and optimizer ({type(e).__name__}: {first}); was it "
                     "written with the same optimizer?") from e
  opt = jax.tree_util.tree_unflatten(treedef, [state["opt"][k] for k in sorted(state["opt"])])
  return state["trainable"], opt


# ------------------------------------------------------------------------------ the API

def recover(dense_params, pruned: PruneResult, config: Config, data, *, steps: int,
            optimizer: Optional[optax.GradientTransformation] = None,
            loss: str = "kl_to_dense", lora_rank: Optional[int] = None, include=None,
            batch_size: int = 4, accumulate: int = 1, temperature: float = 1.0, seed: int = 0,
            checkpoint_dir: Optional[str] = None, checkpoint_every: Optional[int] = None,
            keep_checkpoints: int = 2, resume: bool = False,
            log_every: int = 10) -> PruneResult:
  """Fine-tunes a pruned model to recover the dense model's behaviour (module docstring).

  Args:
    dense_params: the dense model's params (the teacher of "kl_to_dense"; None is allowed with
      loss="next_token").
    pruned: the `PruneResult` to recover; its params, masks, report and config.
    config: the dense model's config.
    data: token windows int [N, T] (T >= 2) or a `Calibration` (e.g. pj.prune.calibration(
      tokenizer, "wikipedia", ...), or dense-model generations for distillation).
    steps: optimizer steps (each `accumulate` x `batch_size` windows).
    optimizer: an optax.GradientTransformation; None for `default_optimizer(steps)` (learning
      rate 1e-4, or 1e-3 with LoRA).
    loss: "kl_to_dense" or "next_token".
    lora_rank: None to train the kernels, or r >= 1 to train rank-r adapters and merge them.
    include: fnmatch patterns over "attn/q_proj"-style names of the linears to train (default
      all seven).
    batch_size, accumulate: windows per micro-batch, micro-batches per step.
    temperature: T > 0 of the distillation KL.
    seed: data order and LoRA initialisation, in [0, 2**32).
    checkpoint_dir: where checkpoints go (None: none); must hold no checkpoints unless resume.
    checkpoint_every: steps between checkpoints (default: only after the last step).
    keep_checkpoints: how many of the newest checkpoints to keep (>= 1).
    resume: continue from the newest checkpoint in checkpoint_dir (start afresh if none).
    log_every: log the loss every this many steps.

  Returns:
    PruneResult with the recovered params (LoRA merged, masks re-applied), pruned.masks and
    pruned.config unchanged, and report = pruned.report plus report["recovery"]: loss, steps,
    losses [steps] (mean loss of each step, before its update), lora_rank, include, batch_size,
    accumulate, tokens_per_step, time_s, resumed_from.

  Raises:
    ArgumentError / TypeError naming the argument for bad input, before any work;
    FileExistsError when checkpoint_dir holds checkpoints and resume is False.
  """
  t0 = time.perf_counter()
  fn = "recover"
  if not isinstance(pruned, PruneResult):
    raise validate.fail(fn, "pruned", pruned, "a PruneResult (what pj.prune.* returns)",
                        error=TypeError)
  steps = validate.integer(fn, "steps", steps, minimum=1)
  if optimizer is not None and not isinstance(optimizer, optax.GradientTransformation):
    raise validate.fail(fn, "optimizer", optimizer,
                        "an optax.GradientTransformation (e.g. optax.adamw(1e-4)) or None",
                        error=TypeError)
  loss = validate.choice(fn, "loss", loss, LOSSES)
  linears = lin.select(include, fn)
  pconfig = pruned.config
  validate.params(fn, pruned.params, pconfig, finite=True)
  if lora_rank is not None:
    shapes = [np.shape(pruned.params["layers"][s][n]["kernel"])[1:] for s, n in linears]
    most = int(min(min(s) for s in shapes))
    lora_rank = validate.integer(fn, "lora_rank", lora_rank, minimum=1, maximum=most,
                                 expected=f"None or an integer in [1, {most}] (the adapters' "
                                 "rank, at most the smallest side of a trained kernel)")
  batch_size = validate.integer(fn, "batch_size", batch_size, minimum=1)
  accumulate = validate.integer(fn, "accumulate", accumulate, minimum=1)
  temperature = validate.temperature(fn, temperature, allow_zero=False)
  seed = validate.seed(fn, seed)
  keep_checkpoints = validate.integer(fn, "keep_checkpoints", keep_checkpoints, minimum=1)
  resume = validate.boolean(fn, "resume", resume)
  log_every = validate.integer(fn, "log_every", log_every, minimum=1)
  if checkpoint_every is not None:
    checkpoint_every = validate.integer(fn, "checkpoint_every", checkpoint_every, minimum=1)
  if checkpoint_dir is not None:
    checkpoint_dir = validate.output_path(fn, "checkpoint_dir", checkpoint_dir)
    if os.path.lexists(checkpoint_dir) and not os.path.isdir(checkpoint_dir):
      raise validate.fail(fn, "checkpoint_dir", checkpoint_dir, "a directory; this is a file")
  elif resume or checkpoint_every is not None:
    raise validate.fail(fn, "checkpoint_dir", None,
                        "a directory when resume=True or checkpoint_every is given")
  if loss == "kl_to_dense":
    validate.params(fn, dense_params, config, finite=True)
    if config.vocab_size != pconfig.vocab_size:
      raise validate.fail(fn, "config", config, f"the pruned model's vocabulary "
                          f"({pconfig.vocab_size}); got vocab_size {config.vocab_size}")
  elif not isinstance(config, Config):
    raise validate.fail(fn, "config", config, "a prunerep_jax Config", error=TypeError)
  tokens = data.tokens if isinstance(data, calibrate.Calibration) else data
  tokens = validate.tokens(fn, tokens, pconfig.vocab_size, name="data")
  if tokens.shape[1] < 2:
    raise validate.fail(fn, "data", tokens, "token windows [N, T] with T >= 2")
  existing = _step_dirs(checkpoint_dir) if checkpoint_dir else []
  if existing and not resume:
    raise FileExistsError(f"recover(checkpoint_dir={checkpoint_dir!r}): holds checkpoints of a "
                          "run (up to step {}); pass resume=True to continue it, or another "
                          "directory".format(existing[-1][0]))

  lora = lora_rank is not None
  if optimizer is None:
    optimizer = default_optimizer(steps, DEFAULT_LORA_LR if lora else DEFAULT_LR)
  keep = _kernel_keep(pruned, linears)
  params = pruned.params
  if lora:
    key = jax.random.key(seed)
    trainable = {}
    for i, (sub, name) in enumerate(linears):
      L, I, O = np.shape(params["layers"][sub][name]["kernel"])
      dtype = params["layers"][sub][name]["kernel"].dtype
      a = jax.random.normal(jax.random.fold_in(key, i), (L, I, lora_rank), dtype) / np.sqrt(I)
      trainable.setdefault(sub, {})[name] = {"a": a, "b": jnp.zeros((L, lora_rank, O), dtype)}
  else:
    trainable = _masked(keep, {sub: {n: params["layers"][sub][n]["kernel"] for n in names}
                               for sub, names in keep.items()})
  opt_state = optimizer.init(trainable)
  N, T = tokens.shape
  B = batching.batch_size_for(N, batch_size)
  run = {"steps": steps, "loss": loss, "lora_rank": lora_rank,
         "include": [f"{s}/{n}" for s, n in linears], "batch_size": B, "accumulate": accumulate,
         "temperature": temperature if loss == "kl_to_dense" else None, "seed": seed,
         "data": {"shape": [N, T], "sha256": hashlib.sha256(tokens.tobytes()).hexdigest()},
         "pruned_method": pruned.report.get("method")}
  losses: list[float] = []
  start, resumed_from = 0, None
  if existing:
    step0, path = existing[-1]
    with open(os.path.join(path, META_FILE), encoding="utf-8") as f:
      meta = json.load(f)
    for k, v in run.items():
      if meta.get("run", {}).get(k) != v:
        raise validate.fail(fn, "resume", resume,
                            f"a checkpoint of the same run; {path} was written with {k}="
                            f"{meta.get('run', {}).get(k)!r}, this run has {k}={v!r}")
    trainable, opt_state = _restore(path, trainable, opt_state)
    losses, start, resumed_from = list(meta["losses"]), step0, step0

  dense = dense_params if loss == "kl_to_dense" else params
  dense_config = config if loss == "kl_to_dense" else pconfig
  chunk = batching.chunk_size(2 * B, T, pconfig.vocab_size)
  step_fn = _make_step(optimizer, pconfig, dense_config, lora, loss, chunk)
  order = _Order(N, seed)
  temp = jnp.float32(temperature)
  t_train = time.perf_counter()
  for s in range(start, steps):
    batch = jnp.asarray(tokens[order.rows(s, accumulate, B)])
    trainable, opt_state, value = step_fn(trainable, opt_state, params, dense, keep, batch, temp)
    losses.append(float(value))
    done = s + 1
    if done % log_every == 0 or done == steps:
      logging.info("recover: step %d/%d, %s %.6f (%.1f s)", done, steps, loss, losses[-1],
                   time.perf_counter() - t_train)
    if checkpoint_dir and (done == steps or (checkpoint_every and done % checkpoint_every == 0)):
      _save(checkpoint_dir, done, trainable, opt_state,
            {"format": FORMAT, "step": done, "losses": losses, "run": run}, keep_checkpoints)

  kernels = _masked(keep, _kernels(params, keep, trainable, lora))
  report = dict(pruned.report, recovery={
      "loss": loss, "steps": steps, "losses": losses, "lora_rank": lora_rank,
      "include": run["include"], "batch_size": B, "accumulate": accumulate,
      "temperature": run["temperature"], "seed": seed, "tokens_per_step": accumulate * B * T,
      "resumed_from": resumed_from, "time_s": time.perf_counter() - t0})
  return PruneResult(_with_kernels(params, kernels), pruned.masks, report, pconfig)
