"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning with an approximate OBS weight update.

The reference is `SparseGPT.fasterprune` (IST-DASLab/sparsegpt), written for torch weights
[out, in]. Here weights are Flax [I, O]: the reference's column i (input i) is our row i, its
"blocks of 128 columns" are blocks of 128 rows, and its `W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]` is
our `W[i2:] -= Hinv[i1:i2, i2:]^T @ Err1`. The algorithm:

1. H [I, I] = (2/n) sum_t x_t x_t^T over calibration inputs (`hessian_update`). Dead inputs
   (H_jj = 0) get H_jj = 1 and their weights W_j,: = 0.
2. H += percdamp * mean(diag H) * Id; Hinv = the upper Cholesky factor U of H^-1 (H^-1 = U^T U).
3. For each block of `blocksize` inputs: unstructured masks prune, within the block and across all
   outputs, the entries with the lowest w^2 / U_jj^2 (k = floor(sparsity * size of the block),
   ties at the threshold pruned); N:M chooses, at the first input of every group of m, the n
   lowest of that score per output, using the weights as updated so far. Then input by input:
   q = w_j with pruned entries zeroed, err = (w_j - q) / U[j, j], and the rest of the block absorbs
   the error, W[j'] -= U[j, j'] * err for j' > j (the OBS update). After the block, the later
   inputs get the lazy update W[i2:] -= U[i1:i2, i2:]^T Err.

Everything runs in float32 with HIGHEST matmul precision (no TF32), as the reference insists. The
input loop is a `lax.fori_loop` inside a `lax.fori_loop` over blocks, so one shape compiles once.
JAX's Cholesky returns NaN instead of raising, so the factorisation is checked on the host and
retried with ten times the damping, a few times, before failing with the matrix's name.

Deviation from the reference: its unstructured threshold is sorted[k] (0-based), the (k+1)-th
smallest score, so it prunes one entry per block more than floor(sparsity * size), and one per
block even at sparsity 0. We threshold at the k-th smallest, like magnitude pruning, and return the
weight untouched at sparsity 0.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from prunerep_jax import parallel
from prunerep_jax import validate
from prunerep_jax.prune import allocate
from prunerep_jax.prune import calibrate
from prunerep_jax.prune import linears as lin
from prunerep_jax.prune import patterns
from prunerep_jax.prune.result import PruneResult

_HIGHEST = jax.lax.Precision.HIGHEST
# Damping tried: percdamp, then x10 up to this many times (0.01 -> 0.1 -> 1 -> 10 by default).
_DAMP_RETRIES = 3


def hessian_update(h: jax.Array, n, x: jax.Array):
  """Folds a batch of calibration inputs into the running H = (2/n) sum_t x_t x_t^T.

  As in the reference: H *= n / (n + b); x *= sqrt(2 / (n + b)); H += x^T x. The reference counts
  sequences (b = batch size) rather than tokens; the scale of H cancels everywhere in SparseGPT (the
  damping is relative to mean(diag H)), so we count rows, which makes H exactly 2 * E[x x^T].

  Args:
    h: [I, I] float32 running Hessian (zeros to start).
    n: rows folded in so far (int or scalar array).
    x: [..., I] new inputs; all leading axes are rows (e.g. [B, T, I]).

  Returns:
    (h, n): [I, I] updated Hessian and the new row count.
  """
  if np.ndim(h) != 2 or np.shape(h)[0] != np.shape(h)[1]:
    raise ValueError(f"hessian_update: h must have shape [I, I], got {tuple(np.shape(h))}")
  i = np.shape(h)[0]
  if np.ndim(x) < 1 or np.shape(x)[-1] != i:
    raise ValueError(f"hessian_update: x must have shape [..., I] with I={i}, got "
                     f"{tuple(np.shape(x))}")
  x = jnp.reshape(jnp.asarray(x, jnp.float32), (-1, i))
  total = n + x.shape[0]
  h = jnp.asarray(h, jnp.float32) * (n / total)
  x = x * jnp.sqrt(2.0 / total)
  return h + jnp.matmul(x.T, x, precision=_HIGHEST), total


@jax.jit
def _inverse_factor(h: jax.Array, percdamp: jax.Array):
  """Dead-input fix, damping and U = upper Cholesky of H^-1; returns (U [I, I], dead [I])."""
  diag = jnp.diagonal(h)
  dead = diag == 0
  idx = jnp.arange(h.shape[0])
  h = h.at[idx, idx].set(jnp.where(dead, 1.0, diag))
  damp = percdamp * jnp.mean(jnp.diagonal(h))
  h = h.at[idx, idx].add(damp)
  lower = jnp.linalg.cholesky(h)
  hinv = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(h.shape[0], dtype=h.dtype))
  # jnp.linalg.cholesky reads the symmetrised input, so cho_solve's rounding asymmetry is harmless.
  upper = jnp.triu(jnp.linalg.cholesky(hinv).T)
  return upper, dead


@functools.partial(jax.jit, static_argnames=("blocksize", "sparsity", "n", "m"))
def _fasterprune(w, upper, dead, *, blocksize: int, sparsity: float, n: int, m: int):
  """The block/column OBS loop on w [I, O]; returns (new_w [I, O], prune [I, O] bool)."""
  i_dim, o_dim = w.shape
  nblocks = -(-i_dim // blocksize)
  padded = nblocks * blocksize
  pad = padded - i_dim
  # Padding inputs with zero weights and an identity block of U leaves the real inputs' updates
  # unchanged (U's cross terms are zero), so every block has the same static shape.
  w = jnp.pad(jnp.where(dead[:, None], 0.0, w), ((0, pad), (0, 0)))
  upper = jnp.pad(upper, ((0, pad), (0, pad))) + jnp.diag(
      (jnp.arange(padded) >= i_dim).astype(w.dtype))
  real = jnp.arange(padded) < i_dim
  rows = jnp.arange(padded)
  k_full = patterns.prune_count(blocksize * o_dim, sparsity)
  k_last = patterns.prune_count((i_dim - (nblocks - 1) * blocksize) * o_dim, sparsity)

  def nm_group(i, state):
    w1, prune1, d1 = state
    group = jax.lax.dynamic_slice_in_dim(w1, i, m) ** 2 / jax.lax.dynamic_slice_in_dim(d1, i, m)[
        :, None] ** 2
    return jax.lax.dynamic_update_slice_in_dim(prune1, ~patterns.nm_mask(group, n, m), i, axis=0)

  def block(b, carry):
    w, prune = carry
    i1 = b * blocksize
    w1 = jax.lax.dynamic_slice_in_dim(w, i1, blocksize)                      # [B, O]
    u_rows = jax.lax.dynamic_slice_in_dim(upper, i1, blocksize)              # [B, Ip]
    u1 = jax.lax.dynamic_slice_in_dim(u_rows, i1, blocksize, axis=1)         # [B, B]
    d1 = jnp.diagonal(u1)                                                    # [B]
    if n == 0:
      score = w1 ** 2 / d1[:, None] ** 2
      # Padding must never take a pruning slot.
      score = jnp.where(jax.lax.dynamic_slice_in_dim(real, i1, blocksize)[:, None], score, jnp.inf)
      k = jnp.where(b == nblocks - 1, k_last, k_full)
      kth = patterns.kth_smallest(score.ravel(), jnp.maximum(k, 1), axis=0)[0]
      prune1 = score <= jnp.where(k > 0, kth, -jnp.inf)
    else:
      prune1 = jnp.zeros(w1.shape, bool)

    def column(i, state):
      w1, prune1, q1, err1 = state
      if n:
        prune1 = jax.lax.cond(i % m == 0, nm_group, lambda i, s: s[1], i, (w1, prune1, d1))
      w_i = w1[i]
      q = jnp.where(prune1[i], 0.0, w_i)
      err = (w_i - q) / d1[i]
      # Row i of U1 is zero left of the diagonal, so this touches only inputs i.. of the block.
      w1 = w1 - u1[i][:, None] * err[None, :]
      return w1, prune1, q1.at[i].set(q), err1.at[i].set(err)

    zeros = jnp.zeros_like(w1)
    _, prune1, q1, err1 = jax.lax.fori_loop(0, blocksize, column, (w1, prune1, zeros, zeros))
    lazy = jnp.matmul(u_rows.T, err1, precision=_HIGHEST)                    # [Ip, O]
    w = jnp.where((rows >= i1 + blocksize)[:, None], w - lazy, w)
    w = jax.lax.dynamic_update_slice_in_dim(w, q1, i1, axis=0)
    prune = jax.lax.dynamic_update_slice_in_dim(prune, prune1, i1, axis=0)
    return w, prune

  w, prune = jax.lax.fori_loop(0, nblocks, block, (w, jnp.zeros(w.shape, bool)))
  return w[:i_dim], prune[:i_dim]


def sparsegpt_prune(w: jax.Array, hessian: jax.Array, pattern: patterns.Pattern, *,
                    blocksize: int = 128, percdamp: float = 0.01,
                    name: str = "w") -> tuple[jax.Array, jax.Array]:
  """Prunes one matrix with SparseGPT.

  Not traceable under an outer jit: the Cholesky retry needs the factor's values on the host. Its
  two device stages are jitted and compile once per shape and pattern.

  Args:
    w: [I, O] weights (Flax layout); computed in float32, returned in w's dtype.
    hessian: [I, I] H = (2/n) sum_t x_t x_t^T of the layer's inputs (`hessian_update`).
    pattern: Unstructured (per block of `blocksize` inputs) or NM (prunen/prunem of the reference).
    blocksize: inputs per lazy-update block; a multiple of m for N:M.
    percdamp: damping as a fraction of mean(diag H); multiplied by 10 on Cholesky failure.
    name: the matrix's name for error messages (e.g. "layers/3/mlp/down_proj/kernel").

  Returns:
    (new_w, mask): new_w [I, O], pruned entries exactly zero and kept ones OBS-updated; mask [I, O]
    bool, True = keep. At sparsity 0, w itself and an all-True mask.

  Raises:
    ValueError: bad shapes or arguments, or a Hessian whose factor stays non-finite after the
      damping retries (not positive definite, or holding NaN/Inf). The values of w are not
      checked here; `sparsegpt` refuses non-finite params at its entry.
  """
  w_shape, h_shape = tuple(np.shape(w)), tuple(np.shape(hessian))
  if len(w_shape) != 2:
    raise ValueError(f"sparsegpt_prune: {name} must have shape [I, O], got {w_shape}")
  if h_shape != (w_shape[0],) * 2:
    raise ValueError(f"sparsegpt_prune: hessian of {name} must have shape [I, I] = "
                     f"{(w_shape[0],) * 2} for weight shape {w_shape}, got {h_shape}")
  blocksize = validate.integer("sparsegpt_prune", "blocksize", blocksize, minimum=1)
  percdamp = validate.number("sparsegpt_prune", "percdamp", percdamp, minimum=0.0, min_open=True)
  if isinstance(pattern, patterns.NM):
    if w_shape[0] % pattern.m:
      raise ValueError(f"sparsegpt_prune: input dim I={w_shape[0]} of {name} (shape {w_shape}) "
                       f"is not divisible by m={pattern.m} of pattern {pattern}")
    if blocksize % pattern.m:
      raise ValueError(f"sparsegpt_prune: blocksize={blocksize} is not a multiple of "
                       f"m={pattern.m} of pattern {pattern}; N:M groups must not straddle blocks")
  elif not isinstance(pattern, patterns.Unstructured):
    raise ValueError(f"sparsegpt_prune: pattern must be Unstructured or NM, got {pattern!r}")
  if pattern.sparsity == 0.0:
    return jnp.asarray(w), jnp.ones(w_shape, bool)
  return _prune_factored(w, _damped_factor(hessian, percdamp, name), pattern, blocksize)


@functools.cache
def _scipy_openblas() -> Optional[ctypes.CDLL]:
  """scipy's OpenBLAS, which jax's CPU LAPACK kernels call, or None where it is not found."""
  try:
    import scipy
  except ImportError:
    return None
  libs = glob.glob(os.path.join(os.path.dirname(os.path.dirname(scipy.__file__)), "scipy.libs",
                                "libscipy_openblas*.so*"))
  if len(libs) != 1:
    return None
  lib = ctypes.CDLL(libs[0])
  needed = ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads")
  return lib if all(hasattr(lib, f) for f in needed) else None


@contextlib.contextmanager
def _one_blas_thread():
  """Runs the LAPACK calls inside on one OpenBLAS thread, then restores the thread count.

  The factorisations are small ([I, I] with I <= a few thousand), and OpenBLAS workers that
  spin-wait for the cores XLA's own threads hold slow them down many times over: a 1536 x 1536
  `_inverse_factor` took 2.6-3.9 s with two OpenBLAS threads on a loaded 2-core machine and 0.1 s
  with one. The work must finish inside (the callers read the result on the host there).
  """
  lib = _scipy_openblas()
  if lib is None:
    yield
    return
  before = lib.scipy_openblas_get_num_threads()
  lib.scipy_openblas_set_num_threads(1)
  try:
    yield
  finally:
    lib.scipy_openblas_set_num_threads(before)


def _damped_factor(hessian: jax.Array, percdamp: float, name: str) -> tuple[jax.Array, jax.Array]:
  """(U [I, I], dead [I]) of `_inverse_factor`, retrying with ten times the damping while the
  factor is not finite; raises ValueError naming `name` when no damping helps."""
  h = jnp.asarray(hessian, jnp.float32)
  tried = []
  with jax.default_matmul_precision("highest"), _one_blas_thread():
    for attempt in range(_DAMP_RETRIES + 1):
      damp = percdamp * 10.0 ** attempt
      tried.append(damp)
      upper, dead = _inverse_factor(h, jnp.float32(damp))
      if bool(jnp.all(jnp.isfinite(upper))):
        return upper, dead
  raise ValueError(f"sparsegpt_prune: Cholesky of the hessian of {name} (shape {h.shape}) is "
                   f"not finite with percdamp {tried}; expected a finite, positive "
                   "semi-definite Hessian of calibration inputs")


def _prune_factored(w: jax.Array, factor: tuple[jax.Array, jax.Array], pattern: patterns.Pattern,
                    blocksize: int) -> tuple[jax.Array, jax.Array]:
  """`sparsegpt_prune` (sparsity > 0) given the damped inverse factor of the Hessian."""
  n, m = (pattern.n, pattern.m) if isinstance(pattern, patterns.NM) else (0, 0)
  upper, dead = factor
  with jax.default_matmul_precision("highest"):
    new_w, prune = _fasterprune(jnp.asarray(w, jnp.float32), upper, dead, blocksize=blocksize,
                                sparsity=pattern.sparsity, n=n, m=m)
  return new_w.astype(jnp.asarray(w).dtype), ~prune


def sparsegpt(params, config, pattern=0.5, *, calibration=None, blocksize: int = 128,
              percdamp: float = 0.01, include=None, allocation=None, batch_size: int = 8,
              mesh=None, donate: bool = False):
  """SparseGPT on every selected block linear, layer by layer on the already pruned prefix.

  Args:
    params, config: the dense model (not modified unless `donate`).
    pattern: sparsity in [0, 1) (per block of `blocksize` inputs), "n:m", or a patterns value.
    calibration: a `Calibration` or int tokens [N, T].
    blocksize, percdamp: as in `sparsegpt_prune`.
    include: fnmatch patterns over "attn/q_proj"-style names (default: all seven linears).
    allocation: per-layer sparsities for an unstructured target, as in `wanda` (the KL curves
      use Wanda masks, SparseGPT's diagonal approximation; see `prune.allocate`).
    batch_size: calibration samples per batch.
    mesh: None, a ("data", "model") mesh or a spec such as "data:4" (`prunerep_jax.parallel`):
      params are placed on it and the calibration batches split over its data axis (statistics
      summed across it); the pruned params come back placed on the mesh.
    donate: True to give `params`' block weights up for the result (JAX buffer donation):
      the pruned layers are written into their buffers in place, saving one copy of the block
      weights (425 MB for the default model in float32); the given `params["layers"]` arrays are
      deleted (reading them afterwards raises). Default False: `params` is left as it was.
  """

  t0 = time.perf_counter()
  pattern = lin.as_pattern(pattern, "sparsegpt")
  chosen = lin.select(include, "sparsegpt")
  blocksize = validate.integer("sparsegpt", "blocksize", blocksize, minimum=1)
  percdamp = validate.number("sparsegpt", "percdamp", percdamp, minimum=0.0, min_open=True)
  if isinstance(pattern, patterns.NM) and blocksize % pattern.m:
    raise validate.fail("sparsegpt", "blocksize", blocksize,
                        f"a multiple of m={pattern.m} of pattern {pattern} (N:M groups must not "
                        "straddle blocks)")
  batch_size = validate.integer("sparsegpt", "batch_size", batch_size, minimum=1)
  donate = validate.boolean("sparsegpt", "donate", donate)
  validate.params("sparsegpt", params, config, finite=True)
  lin.check_nm_divides(pattern, config, chosen, "sparsegpt")
  calib = calibrate.as_calibration(calibration, config, "sparsegpt")
  mesh = parallel.as_mesh("sparsegpt", mesh)
  per_layer, allocated = allocate.resolve(allocation, params, config, pattern, calib, chosen,
                                          batch_size=batch_size, method="sparsegpt")

  def prune_layer(l, layer_p, stats, ntokens):
    layer_p = jax.tree_util.tree_map(lambda x: x, layer_p)
    layer_pattern = pattern if per_layer is None else patterns.Unstructured(per_layer[l])
    masks = {}
    factors = {}  # q/k/v and gate/up read the same inputs: one factorisation per input group
    for sub, name in chosen:
      w = layer_p[sub][name]["kernel"]
      if layer_pattern.sparsity == 0.0:
        new_w, mask = w, jnp.ones(w.shape, bool)
      else:
        group = calibrate.GROUP_OF[(sub, name)]
        if group not in factors:
          factors[group] = _damped_factor(stats[group] * (2.0 / ntokens), percdamp,
                                          f"layers/{l}/{sub}/{name}/kernel")
        new_w, mask = _prune_factored(w, factors[group], layer_pattern, blocksize)
      layer_p[sub][name]["kernel"] = new_w
      masks[(sub, name)] = mask
    return layer_p, masks, {}

  new_params, stacked, _, timings = calibrate.sequential(
      params, config, calib, "hessian", prune_layer, batch_size=batch_size, method="sparsegpt",
      mesh=mesh, donate=donate)
  masks = lin.masks_tree(stacked, chosen)
  report = {"method": "sparsegpt",
            "pattern": str(pattern) if isinstance(pattern, patterns.NM) else pattern.sparsity,
            "blocksize": blocksize, "percdamp": percdamp,
            "include": [f"{s}/{n}" for s, n in chosen], "calibration": calib.info,
            **lin.sparsity_report(masks, chosen),
            "timings": dict(timings, total_s=time.perf_counter() - t0)}
  if allocated is not None:
    report["allocation"] = allocated
  return PruneResult(new_params, masks, report, config)
