"""Every formula of `prunerep_jax.metrics` against a float64 NumPy implementation of it.

Inputs are rounded to float32 first (what the library computes from) and the references are
computed in float64 from those same rounded values, so any difference is the library's float32
arithmetic. Tolerances: RTOL = 3e-6 relative for the quantities that can be arbitrarily small
(1 - cos, KL, variances: their relative precision is what matters), ATOL = 1e-6 absolute for
bounded ones (cosines, overlaps, agreements).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunerep_jax import metrics as m

RTOL, ATOL = 3e-6, 1e-6
V = 64
R = np.random.default_rng(0)


def f32(x):
  return np.asarray(x, np.float32)


def f64(x):
  return np.asarray(x, np.float64)


Z = f32(3.0 * R.standard_normal((4, 3, V)))  # [..., V] logits of a peaked distribution
NOISE = f32(R.standard_normal((4, 3, V)))


def pruned(scale):
  """Dense logits plus a change of size `scale`, rounded to float32."""
  return f32(Z + scale * NOISE)


# ------------------------------------------------------------------- float64 references

def softmax64(z, T=1.0):
  z = f64(z) / T
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def kl_definition64(z, zp, T=1.0):
  """sum p (log p - log p'), straight from the definition."""
  z, zp = f64(z) / T, f64(zp) / T
  lp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1,
                                                                                      keepdims=True)
  lq = zp - np.log(np.exp(zp - zp.max(-1, keepdims=True)).sum(-1, keepdims=True)) - zp.max(
      -1, keepdims=True)
  return (np.exp(lp) * (lp - lq)).sum(-1)


def kl64(z, zp, T=1.0):
  """KL through log E_p[exp(v)] - E_p[v], v = dz/T centred: in float64 this keeps its relative
  precision for KL far below the definition's cancellation floor (~1e-14 absolute)."""
  p = softmax64(z, T)
  u = (f64(zp) - f64(z)) / T
  v = u - (p * u).sum(-1, keepdims=True)
  return np.log1p((p * np.expm1(v)).sum(-1)) - (p * v).sum(-1)


def cos64(a, b):
  a, b = f64(a), f64(b)
  return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def one_minus_cos64(a, b):
  """1 - cos = |a/|a| - b/|b||^2 / 2, without the cancellation of 1 - cos."""
  a, b = f64(a), f64(b)
  ah = a / np.linalg.norm(a, axis=-1, keepdims=True)
  bh = b / np.linalg.norm(b, axis=-1, keepdims=True)
  return 0.5 * ((ah - bh) ** 2).sum(-1)


def weighted_var64(x, w):
  mean = (w * x).sum(-1, keepdims=True)
  return (w * (x - mean) ** 2).sum(-1)


def split64(x, xp):
  """alpha, |d_par| / |x|, |d_perp| / |x| of d = x' - x."""
  x, d = f64(x), f64(xp) - f64(x)
  alpha = (d * x).sum(-1) / (x * x).sum(-1)
  perp = d - alpha[..., None] * x
  return alpha, np.abs(alpha), np.linalg.norm(perp, axis=-1) / np.linalg.norm(x, axis=-1)


def top64(z, k):
  return np.argsort(-f64(z), axis=-1, kind="stable")[..., :k]


def close(actual, desired, rtol=RTOL, atol=0.0):
  np.testing.assert_allclose(np.asarray(actual, np.float64), desired, rtol=rtol, atol=atol)


def trees_close(actual, desired, rtol=RTOL, atol=0.0):
  """Same structure, every leaf close (chex.assert_trees_all_close without chex)."""
  assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(desired)
  jax.tree_util.tree_map(lambda a, b: close(a, np.asarray(b, np.float64), rtol, atol), actual,
                         desired)


def shapes(tree):
  return jax.tree_util.tree_map(np.shape, tree)


# ------------------------------------------------------------------------------ cosines

def test_cosine_matches_float64_for_hidden_state_sized_vectors():
  a = f32(1e4 * R.standard_normal((5, 7, 48)))  # |h| ~ 1e4 as in SmolLM2's residual stream
  b = f32(a + 3e3 * R.standard_normal((5, 7, 48)))
  got = m.cosine(a, b)
  assert got.shape == (5, 7)
  close(got, cos64(a, b), rtol=0, atol=ATOL)
  close(m.cosine(a, -a), -1.0, rtol=0, atol=ATOL)


def test_cosine_of_a_zero_vector_is_zero():
  x = f32(R.standard_normal(8))
  np.testing.assert_array_equal(m.cosine(np.zeros(8), x), 0.0)
  np.testing.assert_array_equal(m.cosine(np.zeros(8), np.zeros(8)), 0.0)


@pytest.mark.parametrize("scale", [0.3, 1e-4])
def test_one_minus_cosine_matches_float64(scale):
  x = f32(R.standard_normal((4, 3, 48)))
  xp = f32(x + scale * R.standard_normal((4, 3, 48)))
  close(m.one_minus_cosine(x, xp), one_minus_cos64(x, xp))


def test_one_minus_cosine_with_d_is_accurate_below_float32_resolution_of_x_prime():
  # x' = x + d with d far below the rounding of x' (a difference of two sublayer deltas): only d
  # carries the change, and passing it gives 1 - cos of the exact x + d.
  x = f32(R.standard_normal((4, 3, 48)))
  d = f32(1e-6 * R.standard_normal((4, 3, 48)))
  exact = one_minus_cos64(x, f64(x) + f64(d))  # ~1e-13
  close(m.one_minus_cosine(x, f32(x + d), d), exact, rtol=1e-5)
  assert np.abs(np.asarray(m.one_minus_cosine(x, f32(x + d))) / exact - 1).max() > 0.01


def test_one_minus_cosine_of_zero_vectors():
  x = f32(R.standard_normal(8))
  zero = np.zeros(8, np.float32)
  np.testing.assert_array_equal(m.one_minus_cosine(zero, zero), 0.0)
  np.testing.assert_array_equal(m.one_minus_cosine(zero, x), 1.0)
  np.testing.assert_array_equal(m.one_minus_cosine(x, zero), 1.0)
  np.testing.assert_array_equal(m.one_minus_cosine(x, x), 0.0)


# ------------------------------------------------------------------- the probability space

@pytest.mark.parametrize("scale", [0.5, 1e-3, 1e-5])
@pytest.mark.parametrize("T", [1.0, 0.7, 2.0])
def test_kl_matches_float64(T, scale):
  zp = pruned(scale)
  got = m.kl(Z, zp, T)
  assert got.shape == Z.shape[:-1]
  close(got, kl64(Z, zp, T))


def test_kl_reference_is_the_definition():
  zp = pruned(0.5)
  close(kl64(Z, zp, 0.7), kl_definition64(Z, zp, 0.7), rtol=1e-12)
  close(m.kl(Z, zp, 0.7), kl_definition64(Z, zp, 0.7))


def test_kl_direction_is_dense_to_pruned():
  z1, z3 = np.array([4.0, 0.0, 0.0]), np.array([1.0, 1.0, 1.0])
  close(m.kl(z1, z3), kl_definition64(z1, z3))
  close(m.kl(z3, z1), kl_definition64(z3, z1))
  assert abs(float(m.kl(z1, z3)) - float(m.kl(z3, z1))) > 0.1


def test_kl_of_large_changes_uses_the_overflow_free_form():
  # max |v| > 20 takes the log-sum-exp branch; a token the dense model gives p ~ e^-400
  z = f32([[0.0, -400.0, 0.0, 3.0], [5.0, 0.0, -30.0, 1.0]])
  zp = f32([[-400.0, 0.0, 0.0, 3.0], [-25.0, 0.0, 10.0, 1.0]])
  close(m.kl(z, zp), kl_definition64(z, zp))


@pytest.mark.parametrize("T", [1.0, 0.7])
def test_uniform_logit_shift_changes_nothing(T):
  for fn in (m.kl, m.kl_estimate, m.cos_p_estimate, m.one_minus_cos_p):
    close(fn(Z, Z + 7.0, T), 0.0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("scale", [0.5, 1e-3, 1e-5])
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_one_minus_cos_p_matches_float64(T, scale):
  zp = pruned(scale)
  close(m.one_minus_cos_p(Z, zp, T), one_minus_cos64(softmax64(Z, T), softmax64(zp, T)))
  close(m.cosine(m.probs(Z, T), m.probs(zp, T)), cos64(softmax64(Z, T), softmax64(zp, T)),
        rtol=0, atol=ATOL)


def test_one_minus_cos_p_when_a_dense_probability_underflows():
  # p = (1/2, e^-200, 1/2), p' = (e^-200, 1/2, 1/2): p' / p overflows float32 on one token
  z, zp = f32([0.0, -200.0, 0.0]), f32([-200.0, 0.0, 0.0])
  close(m.one_minus_cos_p(z, zp), one_minus_cos64(softmax64(z), softmax64(zp)))
  close(m.one_minus_cos_p(z, f32([0.0, 0.0, 0.0]), 0.5), 1.0 - np.sqrt(2.0 / 3.0))


@pytest.mark.parametrize("scale", [0.5, 1e-4])
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_kl_estimate_is_half_the_p_weighted_variance_over_T2(T, scale):
  zp = pruned(scale)
  dz = f64(zp) - f64(Z)
  close(m.kl_estimate(Z, zp, T), weighted_var64(dz, softmax64(Z, T)) / (2 * T * T))


@pytest.mark.parametrize("scale", [0.5, 1e-4])
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_cos_p_estimate_is_half_the_r_weighted_variance_over_T2(T, scale):
  zp = pruned(scale)
  dz = f64(zp) - f64(Z)
  p = softmax64(Z, T)
  r = p**2 / (p**2).sum(-1, keepdims=True)
  close(m.cos_p_estimate(Z, zp, T), weighted_var64(dz, r) / (2 * T * T))


# ---------------------------------------------------------------------- the hidden space

X = f32(50.0 * R.standard_normal((4, 3, 48)))
XNOISE = f32(10.0 * R.standard_normal((4, 3, 48)))
XP = f32(X + 0.5 * XNOISE)


def test_parallel_orthogonal_split_matches_float64():
  po = m.parallel_orthogonal(X, XP)
  assert set(shapes(po).values()) == {(4, 3)}
  alpha, par, perp = split64(X, XP)
  close(po["alpha"], alpha)
  close(po["par"], par)
  close(po["perp"], perp)
  close(po["ratio"], perp / par)
  # d given explicitly is used as the change
  d = f32(XP - X)
  trees_close(m.parallel_orthogonal(X, X, d), po)


def test_parallel_orthogonal_of_a_purely_orthogonal_change():
  x = f32([3.0, 0.0, 0.0])
  po = m.parallel_orthogonal(x, f32([3.0, 4.0, 0.0]))
  assert float(po["alpha"]) == 0.0 and float(po["par"]) == 0.0
  close(po["perp"], 4.0 / 3.0)
  assert float(po["ratio"]) == np.inf


def test_one_minus_cos_estimate_is_theorem_1_exact_form():
  alpha, _, perp = split64(X, XP)
  rho2 = (perp / (1.0 + alpha)) ** 2
  close(m.one_minus_cos_estimate(X, XP), 1.0 - (1.0 + rho2) ** -0.5)
  close(m.one_minus_cos_estimate(X, XP), one_minus_cos64(X, XP))  # and it is exact


def test_theorem1_estimate_is_half_the_squared_orthogonal_ratio():
  _, _, perp = split64(X, XP)
  close(m.theorem1_estimate(X, XP), 0.5 * perp**2)


# ---------------------------------------------------------- diagnostics of the logit change

@pytest.mark.parametrize("T", [1.0, 0.7])
def test_logit_change_diagnostics_match_float64(T):
  zp = pruned(0.5)
  dz = f64(zp) - f64(Z)
  close(m.uniform_variance(Z, zp, T), dz.var(-1) / (2 * T * T))
  for k in (5, 10):
    top = top64(Z, k)
    w = np.take_along_axis(softmax64(Z, T), top, -1)
    w /= w.sum(-1, keepdims=True)
    close(m.topk_variance(Z, zp, T, k=k), weighted_var64(np.take_along_axis(dz, top, -1), w)
          / (2 * T * T))
  close(m.mean_abs_dz(Z, zp), np.abs(dz).mean(-1))
  close(m.rms_dz(Z, zp), np.sqrt((dz**2).mean(-1)))
  top5 = np.take_along_axis(dz, top64(Z, 5), -1)
  close(m.mean_abs_dz(Z, zp, k=5), np.abs(top5).mean(-1))
  close(m.rms_dz(Z, zp, k=5), np.sqrt((top5**2).mean(-1)))


@pytest.mark.parametrize("k", [1, 5, 10])
def test_topk_overlap_matches_a_set_intersection(k):
  zp = pruned(3.0)  # a large change: overlaps between 0 and 1
  a, b = top64(Z, k), top64(zp, k)
  ref = np.array([[len(set(a[i, j]) & set(b[i, j])) / k for j in range(3)] for i in range(4)])
  close(m.topk_overlap(Z, zp, k), ref, rtol=0, atol=ATOL)
  if k == 5:
    assert 0 < ref.min() < 1 and ref.max() <= 1
  close(m.topk_overlap(Z, Z, k), 1.0, rtol=0, atol=0)


def test_subset_metrics_are_those_of_the_renormalised_subset_distributions():
  ids = np.array([17, 3, 40, 9])
  zp = pruned(0.5)
  s, sp = m.subset(Z, ids), m.subset(zp, ids)
  assert s.shape == (4, 3, 4)
  np.testing.assert_array_equal(s, Z[..., ids])
  p, q = softmax64(Z, 0.7)[..., ids], softmax64(zp, 0.7)[..., ids]
  p, q = p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True)
  close(m.kl(s, sp, 0.7), (p * np.log(p / q)).sum(-1), rtol=1e-5)
  close(m.one_minus_cos_p(s, sp, 0.7), one_minus_cos64(p, q))


# ------------------------------------------------------------------- token trajectories

A = np.array([[[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]], [[9, 9, 9, 9, 9], [0, 1, 2, 3, 4]]])
B = np.array([[[1, 2, 0, 4, 0], [1, 2, 3, 4, 5]], [[8, 9, 9, 9, 9], [0, 1, 2, 3, 7]]])
VALID = np.array([[[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], [[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]]], bool)


def test_token_agreement_counts_only_valid_positions():
  same = A == B
  close(m.token_agreement(A, B), same.mean(-1), rtol=0, atol=ATOL)
  ref = (same & VALID).sum(-1) / VALID.sum(-1)
  close(m.token_agreement(A, B, VALID), ref, rtol=0, atol=ATOL)
  np.testing.assert_array_equal(m.token_agreement(A, B, np.zeros_like(VALID)), 0.0)


def test_first_divergence_is_the_first_valid_difference_or_the_length():
  np.testing.assert_array_equal(m.first_divergence(A, B), [[2, 5], [0, 4]])
  # invalid positions never count: row (1, 0) differs only where invalid, (1, 1) likewise
  np.testing.assert_array_equal(m.first_divergence(A, B, VALID), [[2, 5], [5, 5]])
  assert m.first_divergence(A, B).dtype == jnp.int32


# ------------------------------------------------------------ vectorised, jitted, refused

def test_metrics_are_vectorised_over_leading_axes_and_jittable():
  zp = pruned(0.5)

  def all_metrics(a, b, t):
    return {"kl": m.kl(a, b, t), "kl_est": m.kl_estimate(a, b, t),
            "cos_est": m.cos_p_estimate(a, b, t), "omcp": m.one_minus_cos_p(a, b, t),
            "cos": m.cosine(a, b), "omc": m.one_minus_cosine(a, b),
            "top": m.topk_variance(a, b, t, k=5), "overlap": m.topk_overlap(a, b)}

  eager = all_metrics(Z, zp, 0.7)
  jitted = jax.jit(all_metrics)
  assert set(shapes(eager).values()) == {(4, 3)}
  trees_close(jitted(Z, zp, 0.7), eager)  # a traced temperature passes through
  # each entry is the metric of its own row (the float64 references above are row-wise too)
  flat = jitted(Z.reshape(12, V), zp.reshape(12, V), 0.7)
  trees_close(flat, jax.tree_util.tree_map(lambda x: x.reshape(12), eager))


@pytest.mark.parametrize("T", [0.0, -1.0])
@pytest.mark.parametrize("fn", [m.kl, m.kl_estimate, m.cos_p_estimate, m.one_minus_cos_p,
                                m.probs])
def test_non_positive_temperature_is_refused_with_the_function_name(fn, T):
  args = (Z,) if fn is m.probs else (Z, Z)
  with pytest.raises(ValueError, match=rf"metrics\.{fn.__name__}\(temperature={T}\)"):
    fn(*args, T)


# ------------------------------------------------------------- the second-order estimates

def _relative_errors(estimate, exact, base, scales):
  return np.array([np.median(np.abs(np.asarray(estimate(*base(s)), np.float64)
                                    / np.asarray(exact(*base(s)), np.float64) - 1))
                   for s in scales])


@pytest.mark.parametrize("estimate, exact, space", [
    (m.kl_estimate, m.kl, "logits"),                   # Theorem 3
    (m.cos_p_estimate, m.one_minus_cos_p, "logits"),   # Theorem 2
    (m.theorem1_estimate, m.one_minus_cosine, "hidden"),  # Theorem 1, second order
])
def test_estimates_converge_to_the_exact_values_linearly_in_the_change(estimate, exact, space):
  scales = [10.0**-k for k in range(1, 5)]
  if space == "logits":
    base = lambda s: (Z, f32(Z + s * NOISE))  # noqa: E731
  else:
    base = lambda s: (X, f32(X + s * XNOISE))  # noqa: E731
  err = _relative_errors(estimate, exact, base, scales)
  assert err[0] < 0.2
  # the error is third order over second order: ~10x smaller for each 10x smaller change
  np.testing.assert_allclose(err[:-1] / err[1:], 10.0, rtol=0.2)


@pytest.mark.parametrize("T", [1.0, 0.7])
def test_small_changes_keep_float32_within_one_percent_of_float64(T):
  zp = pruned(1e-3)
  close(m.kl(Z, zp, T), kl64(Z, zp, T), rtol=1e-2)
  close(m.one_minus_cos_p(Z, zp, T), one_minus_cos64(softmax64(Z, T), softmax64(zp, T)),
        rtol=1e-2)


def test_compare_logits_keeps_cos_p_in_range_for_disjoint_distributions():
  # p and p' concentrated on different tokens (logit gaps of 80 to 200 nats): cos(p, p') is
  # 0 up to e^-80, and rounding p' = p + dp must not push it below 0 or 1 - cos above 1.
  v = 64
  zd = np.zeros((6, v), np.float32)
  zp = np.zeros((6, v), np.float32)
  for i, gap in enumerate((80.0, 100.0, 120.0, 150.0, 180.0, 200.0)):
    zd[i, i] = gap
    zp[i, i + 10] = gap
  out = m.compare_logits(zd, zp)
  assert np.all(np.asarray(out["cos_p"]) >= 0.0)
  assert np.all(np.asarray(out["one_minus_cos_p"]) <= 1.0)
  np.testing.assert_allclose(out["cos_p"], 0.0, atol=1e-30)
  np.testing.assert_allclose(out["one_minus_cos_p"], 1.0, rtol=1e-6)
  assert np.all(np.asarray(out["top1_agree"]) == 0.0)
