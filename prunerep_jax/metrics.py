"""The formulas of the method, as pure array functions.

Vectorised over leading axes and jittable. x is the dense (original) vector, x' the pruned one,
d = x' - x; z are logits [..., V]; p = softmax(z / T). KL is always KL(p_dense || p_pruned),
with dense weights in the estimates. Everything is computed in float32 with log_softmax.

Temperatures T must be > 0 (greedy decoding is analysed at T = 1): checked by value for Python,
NumPy and concrete JAX scalars, passed through when traced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prunerep_jax import validate

Array = jax.Array


def _f32(*xs):
  return tuple(jnp.asarray(x, jnp.float32) for x in xs)


def _dot(a, b):
  return jnp.sum(a * b, axis=-1)


def cosine(a: Array, b: Array) -> Array:
  """cos(a, b) over the last axis: [..., D] x2 -> [...]. Zero vectors give 0.

  Plain float32 dot products: hidden states of |h| ~ 1e4 square to 1e8, far from float32's
  range (entries beyond ~1e17 would overflow). Near cos = 1 prefer `one_minus_cosine`.
  """
  a, b = _f32(a, b)
  denom = jnp.sqrt(_dot(a, a) * _dot(b, b))
  return jnp.where(denom > 0, _dot(a, b) / jnp.where(denom > 0, denom, 1.0), 0.0)


def _temperature(fn: str, temperature):
  """A temperature > 0 as a Python float (Python, NumPy or concrete JAX scalar); a traced one
  (under the caller's jit) passes unchanged."""
  return validate.temperature(f"metrics.{fn}", temperature, allow_zero=False)


def probs(z: Array, temperature: float = 1.0) -> Array:
  """softmax(z / T) over the last axis, float32."""
  temperature = _temperature("probs", temperature)
  return jax.nn.softmax(jnp.asarray(z, jnp.float32) / temperature, axis=-1)


def _weighted_var(dz: Array, w: Array) -> Array:
  mean = _dot(w, dz)
  return _dot(w, jnp.square(dz - mean[..., None]))


def kl_estimate(z_dense: Array, z_pruned: Array, temperature: float = 1.0) -> Array:
  """Theorem 3: KL(p || p') ~= Var_p(dz) / (2 T^2), p the dense distribution. [..., V] -> [...]."""
  temperature = _temperature("kl_estimate", temperature)
  z_dense, z_pruned = _f32(z_dense, z_pruned)
  p = jax.nn.softmax(z_dense / temperature, axis=-1)
  return _weighted_var(z_pruned - z_dense, p) / (2.0 * temperature**2)


def cos_p_estimate(z_dense: Array, z_pruned: Array, temperature: float = 1.0) -> Array:
  """Theorem 2: 1 - cos(p, p') ~= Var_r(dz) / (2 T^2), r_i = p_i^2 / sum_j p_j^2."""
  temperature = _temperature("cos_p_estimate", temperature)
  z_dense, z_pruned = _f32(z_dense, z_pruned)
  logp = jax.nn.log_softmax(z_dense / temperature, axis=-1)
  r = jax.nn.softmax(2.0 * logp, axis=-1)  # p^2 normalised, computed stably in log space
  return _weighted_var(z_pruned - z_dense, r) / (2.0 * temperature**2)


def parallel_orthogonal(x: Array, x_pruned: Array, d: Array | None = None) -> dict[str, Array]:
  """Split d = x' - x into parts parallel and orthogonal to x. [..., D] -> dict of [...].

  alpha = <d, x> / |x|^2; par = |d_par| / |x| = |alpha|; perp = |d_perp| / |x|;
  ratio = perp / par (inf when par is 0). Pass d when it is known more accurately than x' - x.
  """
  x, xp = _f32(x, x_pruned)
  d = xp - x if d is None else jnp.asarray(d, jnp.float32)
  xx = _dot(x, x)
  alpha = _dot(d, x) / jnp.where(xx > 0, xx, 1.0)
  perp_vec = d - alpha[..., None] * x
  norm_x = jnp.sqrt(xx)
  par = jnp.abs(alpha)
  perp = jnp.sqrt(_dot(perp_vec, perp_vec)) / jnp.where(norm_x > 0, norm_x, 1.0)
  return {"alpha": alpha, "par": par, "perp": perp,
          "ratio": jnp.where(par > 0, perp / jnp.where(par > 0, par, 1.0), jnp.inf)}


def one_minus_cos_estimate(x: Array, x_pruned: Array) -> Array:
  """Theorem 1 exact form: 1 - (1 + rho^2)^(-1/2), rho = |d_perp| / ((1 + alpha) |x|)."""
  po = parallel_orthogonal(x, x_pruned)
  rho2 = jnp.square(po["perp"] / (1.0 + po["alpha"]))
  root = jnp.sqrt(1.0 + rho2)
  return rho2 / (root * (1.0 + root))  # = 1 - 1/root, without the cancellation


# ------------------------------------------------------------------ accurate small changes
#
# Pruning moves representations by little in h and z space, so the interesting quantities
# (1 - cos, KL) are tiny differences of O(1) numbers. The forms below never subtract two nearly
# equal O(1) values in float32: they start from the change d itself.


def one_minus_cosine(x: Array, x_pruned: Array, d: Array | None = None) -> Array:
  """1 - cos(x, x') over the last axis, accurate when x' is close to x. [..., D] -> [...].

  Uses the exact identity 1 - cos = |x|^2 |d_perp|^2 / (|x| |x'| (|x| |x'| + <x, x'>)), with
  d = x' - x (pass it when it is known more accurately than x' - x, e.g. a difference of two
  sublayer deltas) and d_perp its part orthogonal to x. Zero vectors give 0 (cos defined as 0
  gives 1 - cos = 1 for a zero vector against a nonzero one).
  """
  x, xp = _f32(x, x_pruned)
  d = xp - x if d is None else jnp.asarray(d, jnp.float32)
  return _one_minus_cosine(x, xp, d)


def _one_minus_cosine(x: Array, xp: Array, d: Array) -> Array:
  xx, pp = _dot(x, x), _dot(xp, xp)
  alpha = _dot(d, x) / jnp.where(xx > 0, xx, 1.0)
  perp = d - alpha[..., None] * x
  nx, np_ = jnp.sqrt(xx), jnp.sqrt(pp)
  denom = nx * np_ * (nx * np_ + _dot(x, xp))
  value = xx * _dot(perp, perp) / jnp.where(denom > 0, denom, 1.0)
  either_zero = (xx == 0) | (pp == 0)
  both_zero = (xx == 0) & (pp == 0)
  return jnp.where(either_zero, jnp.where(both_zero, 0.0, 1.0), value)


def _expm1_minus_x(v: Array) -> Array:
  """exp(v) - 1 - v >= 0 elementwise, without the cancellation of expm1(v) - v at small |v|."""
  small = jnp.abs(v) < 0.5
  s = jnp.where(small, v, 0.0)
  # Taylor series to v^9 (truncation < 1e-9 relative at |v| = 0.5); expm1(v) - v loses at most
  # 3e-7 relative for |v| >= 0.5.
  series = s * s * (1 / 2 + s * (1 / 6 + s * (1 / 24 + s * (1 / 120 + s * (
      1 / 720 + s * (1 / 5040 + s * (1 / 40320 + s / 362880)))))))
  return jnp.where(small, series, jnp.expm1(v) - v)


def _log_ratio_parts(z_dense: Array, z_pruned: Array, temperature: float):
  """What KL and log p' - log p are built from, for z [..., V]:

  logp [..., V] (dense log-softmax), v = u - E_p[u] [..., V] with u = dz / T, and the scalars
  [...] a = E_p[exp(v) - 1 - v] >= 0, b = E_p[v] (zero up to rounding) and small (max |v| <= 20).
  Then log E_p[exp(v)] = log1p(a + b) and log p' - log p = v - log1p(a + b): a is a sum of
  nonnegative terms, so it keeps float32's relative precision however small the change.
  """
  z_dense, z_pruned = _f32(z_dense, z_pruned)
  logp = jax.nn.log_softmax(z_dense / temperature, axis=-1)
  p = jnp.exp(logp)
  u = (z_pruned - z_dense) / temperature
  v = u - _dot(p, u)[..., None]
  small = jnp.max(jnp.abs(v), axis=-1) <= 20.0
  a = _dot(p, _expm1_minus_x(jnp.minimum(v, 20.0)))
  return logp, v, a, _dot(p, v), small


def kl(z_dense: Array, z_pruned: Array, temperature: float = 1.0) -> Array:
  """KL(p_dense || p_pruned) in nats, [..., V] -> [...], through the identity
  KL = log E_p[exp(u)] - E_p[u], u = dz / T.

  With v = u - E_p[u], KL = log E_p[exp(v)] - E_p[v] = log1p(a + b) - b, where a = E_p[exp(v) - 1
  - v] is a sum of nonnegative terms computed without cancellation and b = E_p[v] is zero up to
  rounding: float32 keeps ~1e-6 relative precision however small the KL (a log-softmax
  difference form bottoms out near 1e-7, and a plain E_p[expm1(v)] loses the first-order terms'
  rounding, ~1e-7 |v|, against KL ~ |v|^2). For large changes (max |v| > 20) the log-sum-exp form
  is used instead, which cannot overflow.
  """
  temperature = _temperature("kl", temperature)
  logp, v, a, b, small = _log_ratio_parts(z_dense, z_pruned, temperature)
  series = jnp.log1p(a + b) - b
  lse = jax.nn.logsumexp(logp + v, axis=-1) - b
  return jnp.maximum(jnp.where(small, series, lse), 0.0)


def one_minus_cos_p(z_dense: Array, z_pruned: Array, temperature: float = 1.0) -> Array:
  """1 - cos(p, p') with p = softmax(z / T), accurate for small changes. [..., V] -> [...].

  p' - p is formed as p * expm1(log p' - log p), never as a difference of two probabilities, and
  log p' - log p = v - log1p(a + b) from the change itself (see `kl`), never as a difference of
  two log-softmaxes (whose rounding, ~1e-7 |log p|, would swamp a change of 1e-5). Where p' is
  more than e times p the plain difference p' - p is exact enough and cannot overflow.
  """
  temperature = _temperature("one_minus_cos_p", temperature)
  logp, v, a, b, small = _log_ratio_parts(z_dense, z_pruned, temperature)
  lq = jax.nn.log_softmax(jnp.asarray(z_pruned, jnp.float32) / temperature, axis=-1)
  ratio = jnp.where(small[..., None], v - jnp.log1p(a + b)[..., None], lq - logp)
  p, q = jnp.exp(logp), jnp.exp(lq)
  d = jnp.where(ratio < 1.0, p * jnp.expm1(jnp.minimum(ratio, 1.0)), q - p)
  return one_minus_cosine(p, q, d)


def _cosine_from(a: Array, b: Array, one_minus: Array) -> Array:
  """cos(a, b): 1 - (1 - cos) near 1, where that is the accurate form; the plain ratio elsewhere
  (near 0, 1 - (1 - cos) would lose the relative precision)."""
  return jnp.where(one_minus < 0.5, 1.0 - one_minus, cosine(a, b))


LOGIT_COMPARISONS = ("cos_z", "one_minus_cos_z", "par_z", "perp_z", "rms_dz", "cos_p",
                     "one_minus_cos_p", "cos_p_estimate", "kl", "kl_estimate", "top1_agree")


def compare_logits(z_dense: Array, z_pruned: Array, temperature: float = 1.0) -> dict:
  """Every logit- and probability-space comparison of the analyses in one fused pass.

  [..., V] x2 -> dict of [...] float32 with the keys of LOGIT_COMPARISONS: cos(z, z') and
  1 - cos(z, z'); the parallel / orthogonal parts of dz (relative to |z|); RMS of dz; cos(p, p'),
  1 - cos(p, p') and its Theorem 2 estimate; KL(p || p') and its Theorem 3 estimate; whether the
  two argmax tokens agree. Each value equals its stand-alone function (`one_minus_cosine`, `kl`,
  ...), but the log-softmax, p, dz and the log-ratio are computed once and shared. The work runs
  vocabulary-major (see `compare_logits_vocab_major`); callers that can produce the logits in
  that layout directly should call that function.
  """
  temperature = _temperature("compare_logits", temperature)
  zd, zp = _f32(z_dense, z_pruned)
  lead = zd.shape[:-1]
  out = compare_logits_vocab_major(zd.reshape(-1, zd.shape[-1]).T,
                                   zp.reshape(-1, zp.shape[-1]).T, temperature)
  return {k: x.reshape(lead) for k, x in out.items()}


def compare_logits_vocab_major(z_dense: Array, z_pruned: Array, temperature: float) -> dict:
  """`compare_logits` on vocabulary-major logits [V, N] -> dict of [N].

  Every reduction runs over the LEADING axis: XLA:CPU vectorises a reduction over a non-minor
  axis across the minor one, and reduces [V, N] about 10x faster than [N, V] (a row-wise dot
  product of two [592, 49152] float32 arrays: 5.6 ms vs 57 ms on 2 cores). Two transcendental
  functions per vocabulary entry do all the work (exp for p, expm1 for the change); p', the
  log-ratio and p' - p follow from them algebraically. temperature may be traced.
  """
  zd, zp = _f32(z_dense, z_pruned)

  def dot(x, y):  # [V, N] x2 -> [N]
    return jnp.sum(x * y, axis=0)

  dz = zp - zd
  shifted = zd / temperature - jnp.max(zd / temperature, axis=0, keepdims=True)
  e = jnp.exp(shifted)
  total = jnp.sum(e, axis=0)
  p = e / total[None]
  logp = shifted - jnp.log(total)[None]
  u = dz / temperature
  v = u - dot(p, u)[None]
  b = dot(p, v)  # zero up to rounding
  # E = exp(v) - 1. With Z = E_p[exp(v)] = 1 + E_p[E], KL = log Z - E_p[v] and p' = p exp(v) / Z.
  # E_p[E] = E_p[exp(v) - 1 - v] + E_p[v]: the first sum has nonnegative terms (a Taylor series
  # below |v| = 0.5), so it keeps float32's relative precision however small the change.
  def change(safe: bool):
    # safe: some column's exp(v) could overflow; those take the log-sum-exp form (one more exp
    # per entry, so it runs only for chunks that need it).
    vc = jnp.minimum(v, 60.0) if safe else v
    E = jnp.expm1(vc)
    small = jnp.abs(vc) < 0.5
    t = jnp.where(small, vc, 0.0)
    series = t * t * (1 / 2 + t * (1 / 6 + t * (1 / 24 + t * (1 / 120 + t * (
        1 / 720 + t * (1 / 5040 + t * (1 / 40320 + t / 362880)))))))
    a = dot(p, jnp.where(small, series, E - vc))
    log_z = jnp.log1p(a + b)
    z_minus_1 = a + b
    # p' - p = p (exp(v) - Z) / Z = p (E - (Z - 1)) / Z, from the change itself.
    dp = p * (E - z_minus_1[None]) * (1.0 / (1.0 + z_minus_1))[None]
    if safe:
      big = jnp.max(v, axis=0) > 60.0
      log_z = jnp.where(big, jax.nn.logsumexp(logp + v, axis=0), log_z)
      dp = jnp.where(big[None], jnp.exp(logp + v - log_z[None]) - p, dp)
    return log_z, dp

  log_z, dp = jax.lax.cond(jnp.max(v) > 60.0, lambda: change(True), lambda: change(False))
  q = p + dp
  r = jnp.square(p) / jnp.sum(jnp.square(p), axis=0, keepdims=True)  # p^2 normalised

  def one_minus_cos(x, xp, d):  # `one_minus_cosine` over axis 0, plus cos, alpha, |d_perp|/|x|
    xx, pp, xxp = dot(x, x), dot(xp, xp), dot(x, xp)
    alpha = dot(d, x) / jnp.where(xx > 0, xx, 1.0)
    perp = d - alpha[None] * x
    nx, np_ = jnp.sqrt(xx), jnp.sqrt(pp)
    denom = nx * np_ * (nx * np_ + xxp)
    value = xx * dot(perp, perp) / jnp.where(denom > 0, denom, 1.0)
    zero = (xx == 0) | (pp == 0)
    cos = xxp / jnp.where(zero, 1.0, nx * np_)
    return (jnp.where(zero, jnp.where((xx == 0) & (pp == 0), 0.0, 1.0), value),
            jnp.where(zero, 0.0, cos), alpha, jnp.sqrt(dot(perp, perp)) / jnp.where(
                nx > 0, nx, 1.0))

  omc_p, cos_p, _, _ = one_minus_cos(p, q, dp)
  omc_z, cos_z, alpha_z, perp_z = one_minus_cos(zd, zp, dz)
  mean_u = dot(r, u)
  return {
      # 1 - (1 - cos) near 1, where that is the accurate form; the plain ratio elsewhere
      "cos_z": jnp.where(omc_z < 0.5, 1.0 - omc_z, cos_z),
      "one_minus_cos_z": omc_z,
      "par_z": jnp.abs(alpha_z),
      "perp_z": perp_z,
      "rms_dz": jnp.sqrt(jnp.mean(jnp.square(dz), axis=0)),
      # p, p' >= 0, so cos(p, p') >= 0; rounding of p' = p + dp can leave -1e-12
      "cos_p": jnp.maximum(jnp.where(omc_p < 0.5, 1.0 - omc_p, cos_p), 0.0),
      "one_minus_cos_p": jnp.minimum(omc_p, 1.0),
      "cos_p_estimate": dot(r, jnp.square(u - mean_u[None])) / 2.0,
      "kl": jnp.maximum(log_z - b, 0.0),
      "kl_estimate": dot(p, jnp.square(v)) / 2.0,
      "top1_agree": (jnp.argmax(zd, axis=0) == jnp.argmax(zp, axis=0)).astype(jnp.float32),
  }


def theorem1_estimate(x: Array, x_pruned: Array) -> Array:
  """Theorem 1, second order: 1 - cos(x, x + d) ~= |d_perp|^2 / (2 |x|^2). [..., D] -> [...]."""
  return 0.5 * jnp.square(parallel_orthogonal(x, x_pruned)["perp"])


# ------------------------------------------------------------- diagnostics of the logit change

def _dz(z_dense, z_pruned, temperature):
  z_dense, z_pruned = _f32(z_dense, z_pruned)
  return z_dense, (z_pruned - z_dense) / temperature


def uniform_variance(z_dense: Array, z_pruned: Array, temperature: float = 1.0) -> Array:
  """Var_uniform(dz) / (2 T^2): the estimate with every vocabulary entry weighted equally.

  (The reference code divides by 2T^2 in one script and not in another; we always do.)
  """
  temperature = _temperature("uniform_variance", temperature)
  _, u = _dz(z_dense, z_pruned, temperature)
  return jnp.var(u, axis=-1) / 2.0


def topk_variance(z_dense: Array, z_pruned: Array, temperature: float = 1.0,
                  k: int = 5) -> Array:
  """Var(dz) / (2 T^2) over the dense top-k tokens, weighted by p renormalised on them."""
  temperature = _temperature("topk_variance", temperature)
  z, u = _dz(z_dense, z_pruned, temperature)
  top_z, idx = jax.lax.top_k(z / temperature, k)
  w = jax.nn.softmax(top_z, axis=-1)
  return _weighted_var(jnp.take_along_axis(u, idx, axis=-1), w) / 2.0


def mean_abs_dz(z_dense: Array, z_pruned: Array, k: int | None = None) -> Array:
  """Mean |dz| over the vocabulary, or over the dense top-k tokens when k is given."""
  z, dz = _dz(z_dense, z_pruned, 1.0)
  if k is not None:
    dz = jnp.take_along_axis(dz, jax.lax.top_k(z, k)[1], axis=-1)
  return jnp.mean(jnp.abs(dz), axis=-1)


def rms_dz(z_dense: Array, z_pruned: Array, k: int | None = None) -> Array:
  """Root mean square of dz over the vocabulary, or over the dense top-k tokens."""
  z, dz = _dz(z_dense, z_pruned, 1.0)
  if k is not None:
    dz = jnp.take_along_axis(dz, jax.lax.top_k(z, k)[1], axis=-1)
  return jnp.sqrt(jnp.mean(jnp.square(dz), axis=-1))


def topk_overlap(z_dense: Array, z_pruned: Array, k: int = 5) -> Array:
  """|top-k(z) ∩ top-k(z')| / k. [..., V] -> [...]."""
  a = jax.lax.top_k(jnp.asarray(z_dense, jnp.float32), k)[1]
  b = jax.lax.top_k(jnp.asarray(z_pruned, jnp.float32), k)[1]
  return jnp.sum(jnp.any(a[..., :, None] == b[..., None, :], axis=-1), axis=-1) / k


def subset(z: Array, token_ids: Array) -> Array:
  """Logits restricted to a token subset [..., V] -> [..., K]; every distribution metric applied
  to the result (kl, one_minus_cos_p, ...) is the metric of p renormalised inside the subset."""
  return jnp.take(jnp.asarray(z, jnp.float32), jnp.asarray(token_ids, jnp.int32), axis=-1)


# ------------------------------------------------------------------- token trajectories

def token_agreement(a: Array, b: Array, valid: Array | None = None) -> Array:
  """Fraction of positions where two token sequences agree. a, b [..., S] -> [...]; positions
  with valid False (e.g. after EOS) are ignored (0 when none is valid)."""
  same = (jnp.asarray(a) == jnp.asarray(b)).astype(jnp.float32)
  if valid is None:
    return jnp.mean(same, axis=-1)
  w = jnp.asarray(valid, jnp.float32)
  n = jnp.sum(w, axis=-1)
  return jnp.sum(same * w, axis=-1) / jnp.where(n > 0, n, 1.0)


def first_divergence(a: Array, b: Array, valid: Array | None = None) -> Array:
  """Index of the first position where a and b differ, [..., S] -> [...] int32; S (the length)
  when they never differ within the valid positions."""
  differ = jnp.asarray(a) != jnp.asarray(b)
  if valid is not None:
    differ &= jnp.asarray(valid, bool)
  S = differ.shape[-1]
  return jnp.where(jnp.any(differ, axis=-1), jnp.argmax(differ, axis=-1), S).astype(jnp.int32)
