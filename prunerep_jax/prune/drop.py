"""Inter-layer pruning: drop whole attention / MLP sublayers or whole blocks.

Importance of a sublayer F with input residual X (PAPER.md, LLM-Drop): the mean over calibration
tokens of cos(X, X + F(norm(X))) ("residual"), or of cos(norm(X), F(norm(X))) ("no_norm"). The
most similar (highest cosine) sublayers change the stream least and are dropped first.
Blocks (ShortGPT's Block Influence): cos(block input, block output); the consecutive variant scores
each window of n blocks by cos(input of block i, input of block i + n) and drops the best window.
KL-guided scores ("kl", "kl_exact"; see `prune.kl_score`) rank the same candidates by the
probability-space cost of removing each one alone, cheapest first.

A dropped sublayer must pass the residual stream through unchanged, exactly: its output
projection (o_proj or down_proj, kernel and bias) is zeroed, so it adds exactly +0.0 to every
finite residual entry. Dropped blocks are removed from the layer stack, so the pruned model runs
fewer layers (config.num_layers shrinks) and its forward is proportionally cheaper.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from prunerep_jax import parallel
from prunerep_jax import metrics
from prunerep_jax import model as M
from prunerep_jax import validate
from prunerep_jax.config import Config
from prunerep_jax.prune import calibrate
from prunerep_jax.prune import kl_score
from prunerep_jax.prune.result import PruneResult

SUBLAYER_KINDS = ("attn", "mlp", "joint")
SCORES = ("residual", "no_norm")
KL_SCORES = kl_score.SCORES  # ranked by the cost of removal, lowest first
_OUT_PROJ = {"attn": "o_proj", "mlp": "down_proj"}


@functools.partial(jax.jit, static_argnums=(1, 4))
def _cos_sums(params, config, tokens, weight, score):
  """Weighted sums over the batch's tokens of: sublayer cosines [2L] and block-input cosines.

  weight [B] is 1 for real rows and 0 for batch padding. Returns (sub [2L], pair [L + 1, L + 1])
  where pair[i, j] = sum cos(res[2i], res[2j]) (the stream entering block i vs entering block j;
  index L is the last block's output).
  """
  ctx = M.prompt_context(config, jnp.ones(tokens.shape, bool))
  h = M.embed(params, tokens).astype(M.compute_dtype(params))
  h_last, residual, _ = M.run_layers(params["layers"], config, h, ctx)
  residual = jnp.concatenate([residual, h_last[None]], axis=0)  # [2L + 1, B, T, D]
  before, after = residual[:-1], residual[1:]
  if score == "residual":
    sub = metrics.cosine(before, after)
  else:
    # The sublayer's own input: the pre-norm of block l's attention (2l) or MLP (2l + 1).
    scales = jnp.stack([params["layers"]["attn_norm"]["scale"],
                        params["layers"]["mlp_norm"]["scale"]], axis=1).reshape(
                            2 * config.num_layers, 1, 1, -1)
    normed = M.rms_norm(scales, before.astype(jnp.float32), config.rms_norm_eps)
    sub = metrics.cosine(normed, after - before)
  w = weight[:, None]
  inputs = residual[::2]  # [L + 1, B, T, D]
  pair = jax.vmap(lambda a: jax.vmap(lambda b: jnp.sum(metrics.cosine(a, b) * w))(inputs))(inputs)
  return jnp.sum(sub * w, axis=(1, 2)), pair


def similarity(params, config: Config, calibration, *, score: str = "residual",
               batch_size: int = 4, method: str = "similarity", mesh=None) -> dict:
  """Mean cosine scores over all calibration tokens.

  params are not validated here: the drop transforms check them once at their entry, and call
  this once per round. With a mesh (`prunerep_jax.parallel`), each batch of windows is split over
  its data axis (place the params on it first, as the drop transforms do).

  Returns dict with "attn" [L], "mlp" [L] (sublayer scores of the chosen kind), "block" [L]
  (cos(block input, block output)) and "pair" [L + 1, L + 1] (cos between block inputs).
  """
  score = validate.choice(method, "score", score, SCORES)
  batch_size = validate.integer(method, "batch_size", batch_size, minimum=1)
  calib = calibrate.as_calibration(calibration, config, method)
  tokens = np.asarray(calib.tokens)
  mesh = parallel.as_mesh(method, mesh)
  sub = pair = 0.0
  for b in parallel.batches(tokens.shape[0], batch_size, mesh):
    s, p = _cos_sums(params, config, parallel.put_batch(tokens[b.rows], mesh),
                     parallel.put_batch(b.weight, mesh), score)
    sub, pair = sub + parallel.fetch(s), pair + parallel.fetch(p)
  n = tokens.size
  sub, pair = np.asarray(sub) / n, np.asarray(pair) / n
  L = config.num_layers
  return {"attn": sub[0::2], "mlp": sub[1::2],
          "block": np.array([pair[i, i + 1] for i in range(L)]), "pair": pair}


def _check_count(n, available: int, what: str, method: str) -> int:
  return validate.integer(method, "n", n, minimum=0, maximum=available,
                          expected=f"an integer in [0, {available}] (how many {what} to drop)")


def zero_sublayers(params, dropped):
  """Params with the output projections (kernel and bias) of the given sublayers zeroed.

  Args:
    params: params pytree (leaves NumPy or JAX arrays; the result's changed leaves are JAX).
    dropped: (layer, kind) pairs, kind "attn" or "mlp".

  Returns:
    A new pytree sharing every unchanged leaf with `params`.
  """
  num_layers = np.shape(params["layers"]["attn"]["o_proj"]["kernel"])[0]
  by_kind: dict[str, list[int]] = {k: [] for k in _OUT_PROJ}
  for i, item in enumerate(dropped):
    if (not isinstance(item, (tuple, list)) or len(item) != 2 or item[1] not in _OUT_PROJ
        or isinstance(item[0], bool) or not isinstance(item[0], (int, np.integer))
        or not 0 <= item[0] < num_layers):
      raise validate.fail("zero_sublayers", f"dropped[{i}]", item,
                          f"a (layer, kind) pair with layer in [0, {num_layers}) and kind in "
                          f"{tuple(_OUT_PROJ)}")
    by_kind[item[1]].append(int(item[0]))
  layers = dict(params["layers"])
  for kind, ls in by_kind.items():
    if ls:
      proj_name = _OUT_PROJ[kind]
      idx = np.asarray(sorted(set(ls)))
      proj = {k: jnp.asarray(v).at[idx].set(0) for k, v in layers[kind][proj_name].items()}
      layers[kind] = dict(layers[kind], **{proj_name: proj})
  return dict(params, layers=layers)


def _check_kl_at(kl_at, score: str, method: str) -> str:
  kl_at = validate.choice(method, "kl_at", kl_at, kl_score.PLACES)
  if kl_at != "boundary" and score not in KL_SCORES:
    raise validate.fail(method, "kl_at", kl_at,
                        f"'boundary' (the default) with score={score!r}: kl_at places the KL "
                        f"scores {KL_SCORES}")
  return kl_at


def drop_sublayers(params, config: Config, n: int, *, kind: str = "attn", calibration=None,
                   iterative: bool = False, score: str = "residual", kl_at: str = "boundary",
                   batch_size: int = 4, mesh=None) -> PruneResult:
  """Drops the n most redundant attention and/or MLP sublayers.

  Args:
    params, config: the dense model (not modified).
    n: how many sublayers to drop (0 returns the params bit-identical).
    kind: "attn", "mlp", or "joint" (attention and MLP sublayers ranked together).
    calibration: a `Calibration` or int tokens [N, T].
    iterative: drop one, re-score on the pruned model, repeat (else one scoring, top n).
    score: "residual" (cos(X, X + F(norm X))) or "no_norm" (cos(norm X, F(norm X))), dropping
      the highest first; or "kl" (Theorem 3 estimate) or "kl_exact" (exact KL) of removing each
      sublayer alone (`kl_score.sublayer_costs`), dropping the lowest first.
    kl_at: where a KL score is measured: "boundary" (final-norm lens at the sublayer's output)
      or "output" (the model's logits); see `prune.kl_score`.
    batch_size: calibration samples per jitted scoring step.
    mesh: None or a ("data", "model") mesh / spec (`prunerep_jax.parallel`): the params are placed
      on it and the scoring batches split over its data axis; the result stays placed.

  Returns:
    PruneResult with masks None; report["dropped"] lists {"layer", "sublayer"} in drop order and
    report["importance"] the scores (per round when iterative).
  """
  t0 = time.perf_counter()
  method = "drop_sublayers"
  kind = validate.choice(method, "kind", kind, SUBLAYER_KINDS)
  score = validate.choice(method, "score", score, SCORES + KL_SCORES)
  kl_at = _check_kl_at(kl_at, score, method)
  iterative = validate.boolean(method, "iterative", iterative)
  batch_size = validate.integer(method, "batch_size", batch_size, minimum=1)
  validate.params(method, params, config, finite=True)
  mesh = parallel.as_mesh(method, mesh)
  if mesh is not None:
    params = parallel.shard_params(params, config, mesh)
  L = config.num_layers
  kinds = ("attn", "mlp") if kind == "joint" else (kind,)
  n = _check_count(n, L * len(kinds), f"{kind} sublayers", method)
  calib = calibrate.as_calibration(calibration, config, method)
  dropped: list[tuple[int, str]] = []
  rounds = []
  current = params
  while len(dropped) < n:
    if score in KL_SCORES:
      sims = kl_score.sublayer_costs(current, config, calib, kinds=kinds, score=score, at=kl_at,
                                     batch_size=batch_size, method=method, mesh=mesh)
    else:
      sims = similarity(current, config, calib, score=score, batch_size=batch_size, method=method,
                        mesh=mesh)
    rounds.append({k: [float(v) for v in sims[k]] for k in kinds})
    # Cheapest removal first (highest cosine, lowest KL); ties: attention, then lower layer.
    sign = 1.0 if score in KL_SCORES else -1.0
    candidates = sorted((sign * float(sims[k][l]), i, l, k) for i, k in enumerate(kinds)
                        for l in range(L) if (l, k) not in dropped)
    take = 1 if iterative else n - len(dropped)
    chosen = [(l, k) for _, _, l, k in candidates[:take]]
    dropped.extend(chosen)
    current = zero_sublayers(params, dropped)
    if not iterative:
      break
  report = {"method": "drop_sublayers", "kind": kind, "n": n, "iterative": iterative,
            "score": score, **({"kl_at": kl_at} if score in KL_SCORES else {}),
            "calibration": calib.info if n else None,
            "importance": rounds if iterative else (rounds[0] if rounds else {}),
            "dropped": [{"layer": l, "sublayer": k} for l, k in dropped],
            "timings": {"total_s": time.perf_counter() - t0}}
  return PruneResult(current if n else params, None, report, config)


def drop_listed(params, config: Config, sublayers) -> PruneResult:
  """Drops exactly the listed sublayers (no calibration, no scoring).

  For controlled experiments ("what does dropping attention 3 and MLP 5 do?") and for reproducing
  a drop chosen elsewhere. The dropped sublayers pass the residual stream through unchanged, as in
  `drop_sublayers`.

  Args:
    params, config: the dense model (not modified).
    sublayers: (layer, kind) pairs, layer in [0, num_layers), kind "attn" or "mlp", no repeats;
      an empty list returns the params bit-identical.

  Returns:
    PruneResult with masks None; report as `drop_sublayers`'s: method "drop_listed", kind ("attn",
    "mlp", "joint" when both occur, None for an empty list), n, calibration None, importance {}
    (nothing was scored), dropped [{"layer", "sublayer"}] in the given order, timings.
  """
  t0 = time.perf_counter()
  method = "drop_listed"
  validate.params(method, params, config, finite=True)
  L = config.num_layers
  if isinstance(sublayers, (str, bytes, dict)):
    raise validate.fail(method, "sublayers", sublayers, "a list of (layer, kind) pairs such as "
                        "[(3, 'attn'), (5, 'mlp')]", error=TypeError)
  try:
    items = list(sublayers)
  except TypeError:
    raise validate.fail(method, "sublayers", sublayers, "a list of (layer, kind) pairs such as "
                        "[(3, 'attn'), (5, 'mlp')]", error=TypeError) from None
  dropped: list[tuple[int, str]] = []
  for i, item in enumerate(items):
    if not isinstance(item, (tuple, list)) or len(item) != 2:
      raise validate.fail(method, f"sublayers[{i}]", item, "a (layer, kind) pair")
    layer = validate.integer(method, f"sublayers[{i}][0]", item[0], minimum=0, maximum=L - 1,
                             expected=f"a layer index in [0, {L})")
    kind = validate.choice(method, f"sublayers[{i}][1]", item[1], tuple(_OUT_PROJ))
    if (layer, kind) in dropped:
      raise validate.fail(method, f"sublayers[{i}]", item, "each sublayer listed once")
    dropped.append((layer, kind))
  kinds = sorted({k for _, k in dropped})
  kind = "joint" if len(kinds) == 2 else (kinds[0] if kinds else None)
  report = {"method": method, "kind": kind,
            "n": len(dropped), "calibration": None, "importance": {},
            "dropped": [{"layer": l, "sublayer": k} for l, k in dropped],
            "timings": {"total_s": time.perf_counter() - t0}}
  return PruneResult(zero_sublayers(params, dropped) if dropped else params, None, report, config)


def remove_blocks(params, config: Config, blocks) -> tuple[dict, Config]:
  """Params and config without the given block indices (layer stack shortened)."""
  keep = np.array([l for l in range(config.num_layers) if l not in set(blocks)], np.int32)
  layers = jax.tree_util.tree_map(lambda x: x[keep], params["layers"])
  return dict(params, layers=layers), config.replace(num_layers=int(keep.size))


def _rank_blocks(params, config: Config, n: int, calib, *, score: str, kl_at: str,
                 consecutive: bool, iterative: bool, batch_size: int, method: str, mesh=None):
  """The n blocks to drop (cheapest removal first) and the scores behind the choice."""
  L = config.num_layers
  kl = score in KL_SCORES
  name = score if kl else "cosine"
  sign = 1.0 if kl else -1.0  # the lowest KL or the highest cosine goes first

  def scores(current, window=None):
    if kl:
      kw = dict(score=score, at=kl_at, batch_size=batch_size, method=method, mesh=mesh)
      if window:
        return kl_score.window_costs(current, config, calib, window, **kw)
      return kl_score.block_costs(current, config, calib, **kw)
    sims = similarity(current, config, calib, batch_size=batch_size, method=method, mesh=mesh)
    if window:
      return [sims["pair"][i, i + window] for i in range(L - window + 1)]
    return sims["block"]

  if consecutive:
    window = [float(v) for v in scores(params, n)]
    start = min(range(len(window)), key=lambda i: (sign * window[i], i))  # ties: the earliest
    return list(range(start, start + n)), {"window_start": list(range(L - n + 1)), name: window}
  blocks, rounds, current = [], [], params
  while len(blocks) < n:
    values = [float(v) for v in scores(current)]
    rounds.append({"block": values})
    order = sorted((l for l in range(L) if l not in blocks), key=lambda l: (sign * values[l], l))
    blocks += order[:1 if iterative else n]
    if iterative:
      # Zeroed output projections pass the stream through exactly, as a removed block does, and
      # keep the layer count (one compiled shape for every round).
      current = zero_sublayers(params, [(l, k) for l in blocks for k in _OUT_PROJ])
  return sorted(blocks), (rounds if iterative else rounds[0])


def drop_blocks(params, config: Config, n: int, *, calibration=None, consecutive: bool = False,
                score: str = "residual", kl_at: str = "boundary", iterative: bool = False,
                batch_size: int = 4, mesh=None) -> PruneResult:
  """Drops n whole decoder blocks by Block Influence (ShortGPT).

  Args:
    params, config: the dense model (not modified).
    n: blocks to drop, 0 <= n < num_layers (0 returns the params bit-identical).
    calibration: a `Calibration` or int tokens [N, T].
    consecutive: drop the window of n consecutive blocks i..i+n-1 whose input and output are most
      similar (cos(input of block i, input of block i + n)), instead of the n individually most
      redundant blocks.
    score: "residual" (Block Influence, highest cosine first), or "kl" / "kl_exact": the cost of
      removing each block (window) alone, lowest first (`kl_score.block_costs`, `window_costs`).
    kl_at: where a KL score is measured, "boundary" or "output" (see `prune.kl_score`).
    iterative: drop one block, re-score on the pruned model, repeat (not with consecutive).
    batch_size: calibration samples per jitted scoring step.
    mesh: None or a ("data", "model") mesh / spec, as in `drop_sublayers`.

  Returns:
    PruneResult whose config has num_layers - n layers; masks None.
  """
  t0 = time.perf_counter()
  method = "drop_blocks"
  consecutive = validate.boolean(method, "consecutive", consecutive)
  score = validate.choice(method, "score", score, ("residual",) + KL_SCORES)
  kl_at = _check_kl_at(kl_at, score, method)
  iterative = validate.boolean(method, "iterative", iterative)
  if iterative and consecutive:
    raise validate.fail(method, "iterative", iterative,
                        "False with consecutive=True (a window is chosen in one scoring)")
  batch_size = validate.integer(method, "batch_size", batch_size, minimum=1)
  validate.params(method, params, config, finite=True)
  mesh = parallel.as_mesh(method, mesh)
  if mesh is not None:
    params = parallel.shard_params(params, config, mesh)
  L = config.num_layers
  n = _check_count(n, L - 1, "blocks (at least one must remain)", method)
  calib = calibrate.as_calibration(calibration, config, method)
  if n == 0:
    report = {"method": "drop_blocks", "n": 0, "consecutive": consecutive, "dropped": [],
              "calibration": None, "timings": {"total_s": time.perf_counter() - t0}}
    return PruneResult(params, None, report, config)
  blocks, importance = _rank_blocks(params, config, n, calib, score=score, kl_at=kl_at,
                                    consecutive=consecutive, iterative=iterative,
                                    batch_size=batch_size, method=method, mesh=mesh)
  new_params, new_config = remove_blocks(params, config, blocks)
  report = {"method": "drop_blocks", "n": n, "consecutive": consecutive, "score": score,
            **({"kl_at": kl_at} if score in KL_SCORES else {}), "iterative": iterative,
            "calibration": calib.info, "importance": importance,
            "dropped": [{"layer": l, "sublayer": "block"} for l in blocks],
            "num_layers": new_config.num_layers,
            "timings": {"total_s": time.perf_counter() - t0}}
  return PruneResult(new_params, None, report, new_config)
