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
_EPS = 1e-30


def _f32(*xs):
  return tuple(jnp.asarray(x, jnp.float32) for x in xs)


def _dot(a, b):
  return jnp.sum(a * b, axis=-1)


def cosine(a: Array, b: Array) -> Array:
  """cos(a, b) over the last axis: [..., D] x2 -> [...]. Zero vectors give 0."""
  a, b = _f32(a, b)
  # scale both by their max-abs first: hidden states reach |h| ~ 1e4 and their squares sum fast
  sa = jnp.max(jnp.abs(a), axis=-1, keepdims=True)
  sb = jnp.max(jnp.abs(b), axis=-1, keepdims=True)
  a = a / jnp.where(sa > 0, sa, 1.0)
  b = b / jnp.where(sb > 0, sb, 1.0)
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


def kl(z_dense: Array, z_pruned: Array, temperature: float = 1.0) -> Array:
  """KL(p_dense || p_pruned) in nats from logits [..., V] -> [...]."""
  temperature = _temperature("kl", temperature)
  z_dense, z_pruned = _f32(z_dense, z_pruned)
  lp = jax.nn.log_softmax(z_dense / temperature, axis=-1)
  lq = jax.nn.log_softmax(z_pruned / temperature, axis=-1)
  return jnp.maximum(jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1), 0.0)


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


def parallel_orthogonal(x: Array, x_pruned: Array) -> dict[str, Array]:
  """Split d = x' - x into parts parallel and orthogonal to x. [..., D] -> dict of [...].

  alpha = <d, x> / |x|^2; par = |d_par| / |x|; perp = |d_perp| / |x|.
  """
  x, xp = _f32(x, x_pruned)
  s = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
  s = jnp.where(s > 0, s, 1.0)
  x, d = x / s, (xp - x) / s
  xx = _dot(x, x)
  alpha = _dot(d, x) / jnp.where(xx > 0, xx, 1.0)
  perp = d - alpha[..., None] * x
  norm_x = jnp.sqrt(xx)
  return {"alpha": alpha, "par": jnp.abs(alpha),
          "perp": jnp.sqrt(_dot(perp, perp)) / jnp.where(norm_x > 0, norm_x, 1.0)}


def one_minus_cos_estimate(x: Array, x_pruned: Array) -> Array:
  """Theorem 1 exact form: 1 - (1 + rho^2)^(-1/2), rho = |d_perp| / ((1 + alpha) |x|)."""
  po = parallel_orthogonal(x, x_pruned)
  rho = po["perp"] / (1.0 + po["alpha"])
  return 1.0 - jax.lax.rsqrt(1.0 + rho * rho)
