"""sublayer_effects and logit_lens against explicit per-sublayer computations."""

import functools

import jax
import numpy as np
import pytest

import prunerep_jax as pj
from prunerep_jax import metrics as m
from prunerep_jax import model as M


@pytest.fixture(scope="module")
def residual(params, cfg, tokens):
  return pj.forward(params, cfg, tokens).residual


@pytest.mark.parametrize("lens", ["final_norm", "raw"])
def test_sublayer_effects_equal_metrics_on_the_explicit_logit_lens(params, cfg, tokens, residual,
                                                                   lens):
  eff = pj.analysis.sublayer_effects(params, cfg, residual, lens=lens, temperature=0.5)
  L, (B, T) = cfg.num_layers, tokens.shape
  assert {k: v.shape for k, v in eff.items()} == {
      k: (2 * L, B, T) for k in ("cos_h", "cos_z", "cos_p", "kl", "kl_estimate",
                                 "cos_p_estimate")}
  for i in (0, 3):  # block 0's attention, block 1's MLP
    ref = _explicit(params, cfg, residual[i], residual[i + 1], lens)
    for k, v in ref.items():
      np.testing.assert_allclose(eff[k][i], v, rtol=1e-4, atol=1e-6, err_msg=k)


@functools.partial(jax.jit, static_argnums=(1, 4))
def _explicit(params, cfg, before, after, lens):
  """The effect metrics of one sublayer at T = 0.5, from the LM head on each (normed) state."""
  def head(h):
    return M.lm_head(params, cfg, h if lens == "raw" else M.final_norm(params, cfg, h))

  z0, z1 = head(before), head(after)
  return {"kl": m.kl(z0, z1, 0.5), "kl_estimate": m.kl_estimate(z0, z1, 0.5),
          "cos_p_estimate": m.cos_p_estimate(z0, z1, 0.5), "cos_z": m.cosine(z0, z1),
          "cos_p": m.cosine(m.probs(z0, 0.5), m.probs(z1, 0.5)),
          "cos_h": m.cosine(before, after)}


def test_the_final_norm_lens_of_the_last_state_is_the_model_output(params, cfg, tokens):
  out = pj.forward(params, cfg, tokens)
  z = pj.analysis.logit_lens(params, cfg, out.residual[-1], "final_norm")
  np.testing.assert_allclose(z, out.logits, rtol=1e-5, atol=1e-5)
  raw = pj.analysis.logit_lens(params, cfg, out.residual[-1], "raw")
  np.testing.assert_allclose(raw, M.lm_head(params, cfg, out.residual[-1]), rtol=1e-6)


def test_bad_arguments_are_refused(params, cfg, residual):
  with pytest.raises(ValueError, match=r"analysis.sublayer_effects\(lens='norm'\)"):
    pj.analysis.sublayer_effects(params, cfg, residual, lens="norm")
  with pytest.raises(ValueError, match=r"analysis.sublayer_effects\(residual=.*\[7, B, P, 32\]"):
    pj.analysis.sublayer_effects(params, cfg, residual[1:])
