"""The formulas of PAPER.md against float64 NumPy references and exact identities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prunerep_jax as pj
from prunerep_jax import metrics as m

R = np.random.RandomState(0)
Z = R.randn(4, 3, 200) * 3.0  # [..., V] logits with a peaked distribution
DZ = 0.05 * R.randn(4, 3, 200)


def _softmax64(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _cos64(a, b):
  return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_cosine_matches_float64_and_handles_large_and_zero_vectors():
  a, b = R.randn(5, 64) * 1e4, R.randn(5, 64) * 1e4  # |h| ~ 1e4 as in SmolLM2
  np.testing.assert_allclose(m.cosine(a, b), _cos64(a, b), atol=1e-6)
  np.testing.assert_allclose(m.cosine(a, a), 1.0, atol=1e-6)
  assert float(m.cosine(np.zeros(8), np.ones(8))) == 0.0
  assert m.cosine(np.ones((2, 3, 7)), np.ones((2, 3, 7))).shape == (2, 3)


@pytest.mark.parametrize("T", [1.0, 0.5, 2.0])
def test_kl_matches_float64_and_the_exact_identity(T):
  p, q = _softmax64(Z / T), _softmax64((Z + DZ) / T)
  ref = (p * (np.log(p) - np.log(q))).sum(-1)
  got = np.asarray(m.kl(Z, Z + DZ, T))
  np.testing.assert_allclose(got, ref, rtol=2e-3, atol=1e-7)
  # KL(p||p') = log E_p[exp(dz/T)] - E_p[dz]/T
  identity = np.log((p * np.exp(DZ / T)).sum(-1)) - (p * DZ).sum(-1) / T
  np.testing.assert_allclose(ref, identity, rtol=1e-9)


def test_kl_direction_is_dense_to_pruned():
  z1 = np.array([4.0, 0.0, 0.0])
  z2 = np.array([0.0, 4.0, 0.0])
  z3 = np.array([1.0, 1.0, 1.0])
  p, q = _softmax64(z1), _softmax64(z3)
  np.testing.assert_allclose(m.kl(z1, z3), (p * np.log(p / q)).sum(), rtol=1e-5)
  assert abs(float(m.kl(z1, z3)) - float(m.kl(z3, z1))) > 0.1
  assert float(m.kl(z1, z2)) > 0


def test_uniform_logit_shift_changes_nothing():
  assert np.allclose(m.kl(Z, Z + 7.0), 0.0, atol=1e-5)
  assert np.allclose(m.kl_estimate(Z, Z + 7.0), 0.0, atol=1e-5)
  assert np.allclose(m.cos_p_estimate(Z, Z + 7.0), 0.0, atol=1e-5)


@pytest.mark.parametrize("T", [1.0, 0.5])
def test_kl_estimate_is_half_the_p_weighted_variance_over_T2(T):
  p = _softmax64(Z / T)
  mean = (p * DZ).sum(-1, keepdims=True)
  ref = (p * (DZ - mean) ** 2).sum(-1) / (2 * T * T)
  np.testing.assert_allclose(m.kl_estimate(Z, Z + DZ, T), ref, rtol=1e-4)
  # and it is the second-order approximation of the true KL for small dz
  np.testing.assert_allclose(m.kl_estimate(Z, Z + DZ, T), m.kl(Z, Z + DZ, T), rtol=0.1)


def test_cos_p_estimate_uses_r_proportional_to_p_squared():
  p = _softmax64(Z)
  r = p ** 2 / (p ** 2).sum(-1, keepdims=True)
  mean = (r * DZ).sum(-1, keepdims=True)
  ref = (r * (DZ - mean) ** 2).sum(-1) / 2
  np.testing.assert_allclose(m.cos_p_estimate(Z, Z + DZ), ref, rtol=1e-4)
  true = 1 - _cos64(p, _softmax64(Z + DZ))
  np.testing.assert_allclose(m.cos_p_estimate(Z, Z + DZ), true, rtol=0.15)


def test_parallel_orthogonal_split_and_theorem_1():
  x = R.randn(6, 32) * 100
  d = 0.1 * R.randn(6, 32) * 100
  alpha = (d * x).sum(-1) / (x * x).sum(-1)
  perp = d - alpha[:, None] * x
  po = m.parallel_orthogonal(x, x + d)
  np.testing.assert_allclose(po["alpha"], alpha, rtol=1e-4)
  np.testing.assert_allclose(po["perp"], np.linalg.norm(perp, axis=-1) / np.linalg.norm(x, axis=-1),
                             rtol=1e-4)
  # Theorem 1 in its exact form equals 1 - cos.
  np.testing.assert_allclose(m.one_minus_cos_estimate(x, x + d), 1 - _cos64(x, x + d), rtol=1e-3)


def test_metrics_are_jittable_and_vectorised():
  f = jax.jit(lambda a, b: (m.kl(a, b, 0.5), m.kl_estimate(a, b, 0.5), m.cos_p_estimate(a, b, 0.5),
                            m.cosine(a, b)))
  outs = f(jnp.asarray(Z, jnp.float32), jnp.asarray(Z + DZ, jnp.float32))
  assert all(o.shape == (4, 3) for o in outs)


@pytest.mark.parametrize("T", [0.0, -1.0])
def test_non_positive_temperature_is_refused(T):
  with pytest.raises(ValueError, match=f"temperature={T}"):
    m.kl(Z, Z, T)
  with pytest.raises(ValueError, match=f"temperature={T}"):
    m.kl_estimate(Z, Z, T)


# ------------------------------------------------------------------- sublayer effects analysis

def test_sublayer_effects_equal_metrics_on_explicit_logit_lens():
  cfg = pj.Config(family="llama", vocab_size=50, hidden_size=16, intermediate_size=32,
                  num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8)
  params = pj.init_params(cfg, jax.random.key(0))
  tokens = np.random.RandomState(1).randint(0, 50, (2, 5))
  out = pj.forward(params, cfg, tokens)
  for lens in ("final_norm", "raw"):
    eff = pj.analysis.sublayer_effects(params, cfg, out.residual, lens=lens, temperature=0.5)
    assert eff["cos_h"].shape == (4, 2, 5)
    i = 3  # block 1's MLP: residual[3] -> residual[4]
    z0 = pj.analysis.logit_lens(params, cfg, out.residual[i], lens)
    z1 = pj.analysis.logit_lens(params, cfg, out.residual[i + 1], lens)
    np.testing.assert_allclose(eff["kl"][i], m.kl(z0, z1, 0.5), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(eff["cos_z"][i], m.cosine(z0, z1), rtol=1e-6)
    np.testing.assert_allclose(eff["cos_h"][i], m.cosine(out.residual[i], out.residual[i + 1]),
                               rtol=1e-6)
  # the final-norm lens of the last state is the model's own logits
  z = pj.analysis.logit_lens(params, cfg, out.residual[-1], "final_norm")
  np.testing.assert_allclose(z, out.logits, atol=1e-5)
  with pytest.raises(ValueError, match="lens='norm'"):
    pj.analysis.sublayer_effects(params, cfg, out.residual, lens="norm")
