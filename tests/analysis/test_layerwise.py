"""layerwise: every counterfactual against an independent recomputation.

The references never call the analysis: they run `pj.forward` (the dense and the pruned model),
the pure sublayer functions on explicit inputs, and `pj.metrics` on the two states (the metrics
themselves are checked against float64 in tests/test_metrics.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prunerep_jax as pj
from prunerep_jax import metrics as m
from prunerep_jax import model as M
from prunerep_jax.analysis.layerwise import POSITION_METRICS, SUBLAYERS

DECODE = 3
# Loose enough for two float32 programs (a jitted scan vs separate forwards) computing the same
# numbers in a different order; these values are O(1e-3 .. 1), never near float32's floor.
TOL = {"rtol": 2e-4, "atol": 2e-5}


@pytest.fixture(scope="module")
def magnitude(params, cfg):
  return pj.prune.magnitude(params, cfg, 0.5)


@pytest.fixture(scope="module")
def calibration(tokens):
  return np.asarray(tokens)


@functools.partial(jax.jit, static_argnums=(1, 4, 5))
def reference(params, cfg, h, h_cf, lens="final_norm", T=1.0):
  """POSITION_METRICS of dense states h vs counterfactual states h_cf [..., D], from scratch: the
  LM head on the raw state, or on final_norm(state)."""
  def head(x):
    return M.lm_head(params, cfg, M.final_norm(params, cfg, x) if lens == "final_norm" else x)

  z, z_cf = head(h), head(h_cf)
  po_h, po_z = m.parallel_orthogonal(h, h_cf), m.parallel_orthogonal(z, z_cf)
  return {"cos_h": m.cosine(h, h_cf), "one_minus_cos_h": m.one_minus_cosine(h, h_cf),
          "alpha_h": po_h["alpha"], "par_h": po_h["par"], "perp_h": po_h["perp"],
          "cos_z": m.cosine(z, z_cf), "one_minus_cos_z": m.one_minus_cosine(z, z_cf),
          "par_z": po_z["par"], "perp_z": po_z["perp"], "rms_dz": m.rms_dz(z, z_cf),
          "cos_p": m.cosine(m.probs(z, T), m.probs(z_cf, T)),
          "one_minus_cos_p": m.one_minus_cos_p(z, z_cf, T),
          "cos_p_estimate": m.cos_p_estimate(z, z_cf, T), "kl": m.kl(z, z_cf, T),
          "kl_estimate": m.kl_estimate(z, z_cf, T),
          "top1_agree": (jnp.argmax(z, -1) == jnp.argmax(z_cf, -1)).astype(jnp.float32)}


def assert_metrics(result, l, s, ref, where=(slice(None), slice(None))):
  for k in POSITION_METRICS:
    np.testing.assert_allclose(result.arrays[k][l, s][where], np.asarray(ref[k])[where], **TOL,
                               err_msg=f"{k} at layer {l} {SUBLAYERS[s]}")


def assert_exactly_unchanged(result, l, s):
  """Identical sublayers: every metric at its exact no-change value, bit for bit, except the
  plain cosines <a, b> / sqrt(|a|^2 |b|^2), which may round to a neighbour of 1 (one float32
  step); their accurate forms one_minus_cos_* are exactly 0."""
  a = {k: result.arrays[k][l, s] for k in POSITION_METRICS}
  np.testing.assert_array_equal(a["top1_agree"], 1.0)
  for k in ("cos_h", "cos_z", "cos_p"):
    np.testing.assert_allclose(a[k], 1.0, rtol=0, atol=2**-23, err_msg=k)
  for k in ("one_minus_cos_h", "alpha_h", "par_h", "perp_h", "one_minus_cos_z", "par_z",
            "perp_z", "rms_dz", "one_minus_cos_p", "cos_p_estimate", "kl", "kl_estimate"):
    np.testing.assert_array_equal(a[k], 0.0, err_msg=k)


def test_identical_params_give_exact_no_change_everywhere(params, cfg, tokens):
  r = pj.analysis.layerwise(params, cfg, tokens, params)
  L, (B, T) = cfg.num_layers, tokens.shape
  assert r.kind == "layerwise"
  assert all(r.arrays[k].shape == (L, 2, B, T) for k in POSITION_METRICS)
  for l in range(L):
    for s in range(2):
      assert_exactly_unchanged(r, l, s)


@pytest.mark.parametrize("kind", ["attn", "mlp"])
def test_a_dropped_sublayer_counterfactual_equals_running_the_dropped_model(params, cfg, tokens,
                                                                           calibration, kind):
  pr = pj.prune.drop_sublayers(params, cfg, 1, kind=kind, calibration=calibration)
  (dropped,) = pr.report["dropped"]
  l, s = dropped["layer"], SUBLAYERS.index(kind)
  r = pj.analysis.layerwise(params, cfg, tokens, pr)
  dense = pj.forward(params, cfg, tokens)
  cut = pj.forward(pr.params, cfg, tokens)
  # the stream just after the dropped sublayer: entering the dropped sublayer, every earlier
  # sublayer is dense in both models, so the dropped model's state there is the counterfactual
  boundary = 2 * l + 1 + s
  assert_metrics(r, l, s, reference(params, cfg, dense.residual[boundary],
                                    cut.residual[boundary]))
  assert (np.asarray(r.arrays["one_minus_cos_h"][l, s]) > 1e-4).all()  # a real change
  for l2 in range(cfg.num_layers):
    for s2 in range(2):
      if (l2, s2) != (l, s):
        assert_exactly_unchanged(r, l2, s2)
  assert r.meta["pruned"]["method"] == "drop_sublayers"


@pytest.fixture(scope="module")
def continuation(params, cfg, tokens):
  """The dense greedy continuation layerwise(decode_steps=3) analyses: [3, 12 + 3] tokens and
  which generated tokens are real (EOS 7 ends a row)."""
  gen = pj.generate(params, cfg, tokens, DECODE)
  return np.concatenate([np.asarray(tokens), np.asarray(gen.tokens)], axis=1), np.asarray(
      gen.valid)


def naive_decode_reference(params, pruned, cfg, seq, T, layers, lens, temperature):
  """For every decoding position t: the prefix seq[:, :t + 1] through the dense model with no
  cache, the sublayer replaced by the pruned one on the dense input of every prefix position,
  metrics at position t. Returns {(layer, sublayer): {metric: [B, steps]}}."""
  states = [_last_states(params, pruned, cfg, jnp.asarray(seq[:, :t + 1]), layers)
            for t in range(T - 1, T - 1 + DECODE)]  # [steps] x (h, h_cf) [layers, 2, B, D]
  h, h_cf = (np.stack([st[i] for st in states], axis=3) for i in (0, 1))  # [layers, 2, B, S, D]
  ref = reference(params, cfg, h, h_cf, lens, temperature)
  return {(l, s): {k: np.asarray(v)[i, s] for k, v in ref.items()}
          for i, l in enumerate(layers) for s in range(2)}


@functools.partial(jax.jit, static_argnums=(2, 4))
def _last_states(params, pruned, cfg, prefix, layers):
  """Dense states h and counterfactual states h_cf [layers, 2 (attn, MLP), B, D] at the last
  position of prefix [B, t + 1], from a full uncached pass."""
  ctx = M.prompt_context(cfg, jnp.ones(prefix.shape, bool))
  h = M.embed(params, prefix)
  dense, counterfactual = [], []
  for l in range(cfg.num_layers):
    pd = jax.tree_util.tree_map(lambda x: x[l], params["layers"])
    pp = jax.tree_util.tree_map(lambda x: x[l], pruned["layers"])
    h_attn = h + M.attention_sublayer(pd, cfg, h, ctx).delta
    h_attn_cf = h + M.attention_sublayer(pp, cfg, h, ctx).delta
    h_out = h_attn + M.mlp_sublayer(pd, cfg, h_attn).delta
    h_mlp_cf = h_attn + M.mlp_sublayer(pp, cfg, h_attn).delta
    if l in layers:
      dense.append(jnp.stack([h_attn[:, -1], h_out[:, -1]]))
      counterfactual.append(jnp.stack([h_attn_cf[:, -1], h_mlp_cf[:, -1]]))
    h = h_out
  return jnp.stack(dense), jnp.stack(counterfactual)


LENSES = {"final_norm": 1.0, "raw": 0.7}  # lens -> the temperature it is analysed at


@pytest.fixture(scope="module")
def decoded(params, cfg, tokens, magnitude):
  return {lens: pj.analysis.layerwise(params, cfg, tokens, magnitude, lens=lens, temperature=t,
                                      decode_steps=DECODE) for lens, t in LENSES.items()}


@pytest.mark.parametrize("lens", LENSES)
def test_decode_step_counterfactual_equals_a_naive_recompute_without_cache(
    params, cfg, tokens, magnitude, continuation, decoded, lens):
  seq, valid = continuation
  T, temperature = tokens.shape[1], LENSES[lens]
  r = decoded[lens]
  np.testing.assert_array_equal(r.arrays["valid"], valid)
  np.testing.assert_array_equal(r.arrays["positions"][0], np.arange(T - 1, T - 1 + DECODE))
  assert r.meta["lens"] == lens and r.meta["temperature"] == temperature
  ref = naive_decode_reference(params, magnitude.params, cfg, seq, T, (0, 2), lens, temperature)
  for (l, s), metrics in ref.items():
    assert_metrics(r, l, s, metrics, where=valid)


def test_the_two_lenses_differ(decoded):
  raw, normed = decoded["raw"], decoded["final_norm"]
  np.testing.assert_array_equal(raw.arrays["cos_h"], normed.arrays["cos_h"])  # lens-free
  assert np.abs(raw.arrays["cos_z"] - normed.arrays["cos_z"]).max() > 1e-3


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_real_positions(params, cfg, tokens, magnitude, side):
  B, T = tokens.shape
  lengths = [T, 7, 4]
  toks, mask = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
  for b, n in enumerate(lengths):
    sl = slice(T - n, T) if side == "left" else slice(0, n)
    toks[b, sl], mask[b, sl] = np.asarray(tokens[b, :n]), 1
  padded = pj.analysis.layerwise(params, cfg, toks, magnitude, attention_mask=mask)
  # causality: a row's first n positions unpadded are the row of length n
  unpadded = pj.analysis.layerwise(params, cfg, tokens, magnitude)
  np.testing.assert_array_equal(padded.arrays["valid"], mask.astype(bool))
  for b, n in enumerate(lengths):
    sl = slice(T - n, T) if side == "left" else slice(0, n)
    for k in POSITION_METRICS:
      np.testing.assert_allclose(padded.arrays[k][:, :, b, sl], unpadded.arrays[k][:, :, b, :n],
                                 **TOL, err_msg=f"{k} row {b}")


def test_summary_table_matches_the_arrays(params, cfg, tokens, magnitude):
  mask = np.ones(tokens.shape, np.int32)
  mask[1, :5] = 0
  r = pj.analysis.layerwise(params, cfg, tokens, magnitude, attention_mask=mask)
  table = r.table("summary")
  assert len(table) == cfg.num_layers * 2 * len(POSITION_METRICS)
  valid = mask.astype(bool)
  for rec in table:
    v = np.asarray(r.arrays[rec["metric"]][rec["layer"], SUBLAYERS.index(rec["sublayer"])],
                   np.float64)[valid]
    assert rec["count"] == valid.sum()
    np.testing.assert_allclose([rec["mean"], rec["median"], rec["min"], rec["max"]],
                               [v.mean(), np.median(v), v.min(), v.max()], rtol=1e-12)


def test_a_block_dropped_model_is_refused_with_what_is_supported(params, cfg, tokens,
                                                                 calibration):
  pr = pj.prune.drop_blocks(params, cfg, 1, calibration=calibration)
  with pytest.raises(ValueError, match=r"layerwise\(pruned=PruneResult\): the pruned model has 2 "
                                       r"layers and the dense one 3.*analysis\.drift"):
    pj.analysis.layerwise(params, cfg, tokens, pr)
  with pytest.raises(ValueError, match=r"layerwise\(pruned=\.\.\.\): a params tree must have the "
                                       r"dense model's layout"):
    pj.analysis.layerwise(params, cfg, tokens, pr.params)
  with pytest.raises(TypeError, match=r"layerwise\(pruned="):
    pj.analysis.layerwise(params, cfg, tokens, [pr.params])


@pytest.mark.parametrize("kwargs, match", [
    ({"lens": "norm"}, r"layerwise\(lens='norm'\)"),
    ({"temperature": 0.0}, r"layerwise\(temperature=0.0\)"),
    ({"decode_steps": -1}, r"layerwise\(decode_steps=-1\)"),
])
def test_bad_arguments_are_refused(params, cfg, tokens, kwargs, match):
  with pytest.raises(ValueError, match=match):
    pj.analysis.layerwise(params, cfg, tokens, params, **kwargs)
