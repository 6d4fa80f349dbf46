"""drift: the one-scan dense/pruned decoding against the two models run separately.

References run `pj.generate` (or `decode.prefill` / `decode_step` by hand) for each model on its
own and recompute every per-step metric with `pj.metrics` from the captured logits and hidden
states; the analysis must agree token for token and metric for metric.

Compilations are the slow part, so the runs share settings: the main one samples (T = 1.5,
seed 3) in mode "both"; the block-dropped run is greedy and carries the greedy and the EOS checks
(the shared EOS id ends the dense greedy row 0 within 3 steps). Every run analyses at T_a = 0.7.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prunerep_jax as pj
from prunerep_jax import decode
from prunerep_jax import metrics as m
from prunerep_jax.analysis.drift import STEP_METRICS

STEPS = 6
T_A = 0.7
SAMPLED = {"temperature": 1.5, "seed": 3}
TOL = {"rtol": 1e-4, "atol": 1e-6}  # two float32 programs computing the same numbers


class Spaced:
  """A stand-in tokenizer: ids joined by spaces."""

  def decode(self, ids):
    return " ".join(str(i) for i in ids)


def run(params, cfg, tokens, eos, **kwargs):
  return pj.generate(params, cfg, tokens, STEPS, capture=("logits", "hidden"),
                     eos_token_ids=(eos,), **kwargs)


def analyse(dense, pruned, cfg, tokens, eos, **kwargs):
  return pj.analysis.drift(dense, pruned, cfg, tokens, STEPS, eos_token_ids=(eos,),
                           analysis_temperature=T_A, **kwargs)


@pytest.fixture(scope="module")
def pruned(params, cfg):
  return pj.prune.magnitude(params, cfg, 0.4).params


@pytest.fixture(scope="module")
def both(params, cfg, tokens, pruned, eos):
  return analyse(params, pruned, cfg, tokens, eos, tokenizer=Spaced(), **SAMPLED)


@pytest.fixture(scope="module")
def dense_sampled(params, cfg, tokens, eos):
  return run(params, cfg, tokens, eos, **SAMPLED)


@pytest.fixture(scope="module")
def blocks(params, cfg, tokens, eos):
  """A greedy free drift against a model with one block dropped, and its two generations."""
  pr = pj.prune.drop_blocks(params, cfg, 1, calibration=np.asarray(tokens))
  r = analyse(params, pr.params, cfg, tokens, eos, pruned_config=pr.config, mode="free")
  return r, run(params, cfg, tokens, eos), run(pr.params, pr.config, tokens, eos), pr.config


@functools.partial(jax.jit, static_argnums=(6,))
def reference_metrics(hd, hp, zd, zp, tok_d, tok_p, T=T_A):
  """STEP_METRICS from two models' captured hidden states [B, S, D] and logits [B, S, V]."""
  return {"cos_h": m.cosine(hd, hp), "one_minus_cos_h": m.one_minus_cosine(hd, hp),
          "cos_z": m.cosine(zd, zp), "one_minus_cos_z": m.one_minus_cosine(zd, zp),
          "rms_dz": m.rms_dz(zd, zp), "cos_p": m.cosine(m.probs(zd, T), m.probs(zp, T)),
          "one_minus_cos_p": m.one_minus_cos_p(zd, zp, T),
          "cos_p_estimate": m.cos_p_estimate(zd, zp, T), "kl": m.kl(zd, zp, T),
          "kl_estimate": m.kl_estimate(zd, zp, T), "agree": (tok_d == tok_p).astype(jnp.float32)}


def assert_track(result, track, ref, valid):
  for k in STEP_METRICS:
    np.testing.assert_allclose(result.arrays[f"{track}/{k}"][valid], np.asarray(ref[k])[valid],
                               **TOL, err_msg=f"{track}/{k}")


def assert_free_equals_separate_generations(result, gd, gp):
  a = result.arrays
  np.testing.assert_array_equal(a["dense/tokens"], gd.tokens)
  np.testing.assert_array_equal(a["dense/valid"], gd.valid)
  np.testing.assert_array_equal(a["free/tokens"], gp.tokens)
  np.testing.assert_array_equal(a["free/running"], gp.valid)
  np.testing.assert_array_equal(a["free/valid"], np.asarray(gd.valid) & np.asarray(gp.valid))
  ref = reference_metrics(gd.hidden, gp.hidden, gd.logits, gp.logits, gd.tokens, gp.tokens)
  assert_track(result, "free", ref, a["free/valid"])


def test_free_sampled_drift_equals_two_separate_generations_with_the_same_seed(
    cfg, tokens, pruned, eos, both, dense_sampled):
  assert_free_equals_separate_generations(both, dense_sampled,
                                          run(pruned, cfg, tokens, eos, **SAMPLED))
  assert both.meta["mode"] == "both" and both.meta["temperature"] == 1.5
  assert both.meta["analysis_temperature"] == T_A and both.meta["seed"] == 3


def test_free_greedy_drift_equals_two_separate_generations(blocks):
  r, gd, gp, _ = blocks
  assert_free_equals_separate_generations(r, gd, gp)
  assert "teacher/kl" not in r.arrays
  assert (np.asarray(gd.tokens) != np.asarray(gp.tokens)).any()  # the models do diverge


def test_a_block_dropped_model_drifts_with_its_own_config(cfg, blocks):
  _, _, _, pconfig = blocks
  assert pconfig.num_layers == cfg.num_layers - 1  # (the drift itself: the test above)


def test_identical_params_drift_exactly_zero_at_every_step(params, cfg, tokens, eos):
  r = analyse(params, params, cfg, tokens, eos, **SAMPLED)
  for track in ("teacher", "free"):
    a = {k: r.arrays[f"{track}/{k}"] for k in STEP_METRICS}
    np.testing.assert_array_equal(a["agree"], 1.0)
    for k in ("kl", "kl_estimate", "one_minus_cos_p", "cos_p_estimate", "one_minus_cos_z",
              "rms_dz"):
      np.testing.assert_array_equal(a[k], 0.0, err_msg=f"{track}/{k}")
    # XLA compiles the two models' copies of the final norm into differently fused kernels, so
    # their hidden states may differ in the last bit (the logits come out identical): 1 - cos of
    # two vectors a float32 step apart is ~1e-15 at most, and the plain cosine
    # <a, b> / sqrt(|a|^2 |b|^2) lands within a few float32 steps of 1
    assert a["one_minus_cos_h"].max() < 1e-14
    for k in ("cos_h", "cos_z", "cos_p"):
      np.testing.assert_allclose(a[k], 1.0, rtol=0, atol=1e-6, err_msg=f"{track}/{k}")
  assert all(p["first_divergence"] == STEPS and not p["diverged"] for p in r.table("prompts"))


@functools.partial(jax.jit, static_argnums=(1,))
def _teacher_forced(pruned, cfg, tokens, dense_tokens, dense_valid):
  """The pruned model fed the dense tokens by hand: its logits, hidden states [B, S, ...] and the
  tokens it would sample with the drift's per-step keys (pad 0 once the dense row ended)."""
  out, state = decode.prefill(pruned, cfg, tokens, jnp.ones(tokens.shape, bool),
                              tokens.shape[1] + STEPS)
  outs = [out]
  for i in range(1, STEPS):
    out, state = decode.decode_step(pruned, cfg, state, dense_tokens[:, i - 1])
    outs.append(out)
  key = jax.random.key(SAMPLED["seed"])
  chosen = [decode.sample(o.logits, decode.step_key(key, i),
                          decode.Sampling(SAMPLED["temperature"])) for i, o in enumerate(outs)]
  return (jnp.stack([o.logits for o in outs], 1), jnp.stack([o.hidden for o in outs], 1),
          jnp.where(dense_valid, jnp.stack(chosen, 1), 0))


def test_teacher_mode_feeds_the_pruned_model_the_dense_tokens(cfg, tokens, pruned, both,
                                                              dense_sampled):
  gd = dense_sampled
  logits, hidden, chosen = _teacher_forced(pruned, cfg, tokens, gd.tokens, gd.valid)
  a = both.arrays
  valid = np.asarray(gd.valid)
  np.testing.assert_array_equal(a["teacher/valid"], valid)
  np.testing.assert_array_equal(a["teacher/running"], valid)
  np.testing.assert_array_equal(a["teacher/tokens"], chosen)
  ref = reference_metrics(gd.hidden, hidden, gd.logits, logits, gd.tokens, chosen)
  assert_track(both, "teacher", ref, valid)
  # once free running diverged, its contexts differ from the teacher-forced ones
  assert not np.array_equal(a["teacher/kl"], a["free/kl"])


def test_mode_both_equals_free_and_teacher_run_separately(params, cfg, tokens, pruned, eos,
                                                          both):
  for track in ("free", "teacher"):
    single = analyse(params, pruned, cfg, tokens, eos, mode=track, **SAMPLED)
    assert set(single.arrays) == {k for k in both.arrays if k.startswith(("dense/", track))}
    for k, v in single.arrays.items():
      np.testing.assert_allclose(v, both.arrays[k], rtol=1e-6, atol=1e-7, err_msg=k)
    rows = [r for r in both.table("prompts") if r["track"] == track]
    assert single.table("prompts") == rows
    steps = [r for r in both.table("summary") if r["track"] == track]
    for got, want in zip(single.table("summary"), steps, strict=True):
      assert got.keys() == want.keys()
      np.testing.assert_allclose([got[k] for k in STEP_METRICS], [want[k] for k in STEP_METRICS],
                                 rtol=1e-6)


def test_first_divergence_and_agreement_match_a_hand_computation(both):
  a = both.arrays
  dense, dense_valid = a["dense/tokens"], a["dense/valid"]
  rows = both.table("prompts")
  assert len(rows) == 2 * dense.shape[0]
  for rec in rows:
    t, b = rec["track"], rec["prompt"]
    tok, running, valid = a[f"{t}/tokens"][b], a[f"{t}/running"][b], a[f"{t}/valid"][b]
    differs = [s for s in range(STEPS) if (dense_valid[b, s] or running[s])
               and dense[b, s] != tok[s]]
    first = differs[0] if differs else STEPS
    assert rec["first_divergence"] == first and rec["diverged"] == (first < STEPS)
    assert rec["steps_compared"] == valid.sum()
    np.testing.assert_allclose(rec["token_agreement"], (dense[b] == tok)[valid].mean(),
                               rtol=1e-6)
    np.testing.assert_allclose(rec["mean_kl"], a[f"{t}/kl"][b][valid].mean(), rtol=1e-6)
  assert any(r["diverged"] for r in rows if r["track"] == "free")


def test_texts_decode_each_trajectory_up_to_its_end(both):
  a = both.arrays
  texts = {(r["prompt"], r["track"]): r["text"] for r in both.table("texts")}
  assert len(texts) == 3 * a["dense/tokens"].shape[0]
  for b in range(a["dense/tokens"].shape[0]):
    for track, running in (("dense", "dense/valid"), ("free", "free/running"),
                           ("teacher", "teacher/running")):
      tokens = a["dense/tokens" if track == "dense" else f"{track}/tokens"][b]
      n = int(a[running][b].sum())
      assert texts[(b, track)] == " ".join(str(i) for i in tokens[:n])


def test_rows_that_ended_stop_counting(blocks):
  r, gd, _, _ = blocks
  a = r.arrays
  n = int(gd.lengths[0])
  assert n <= 3  # the shared EOS id ends dense row 0 early
  assert not a["free/valid"][0, n:].any()
  np.testing.assert_array_equal(a["dense/tokens"][0, n:], 0)  # pad after the end
  for rec in r.table("summary"):
    valid = a["free/valid"][:, rec["step"]]
    assert rec["prompts"] == valid.sum()
    for k in ("kl", "cos_h", "agree"):
      if valid.any():
        np.testing.assert_allclose(rec[k], a[f"free/{k}"][valid, rec["step"]].mean(), rtol=1e-6)
      else:
        assert rec[k] is None
  first = r.table("prompts")[0]
  assert first["steps_compared"] == a["free/valid"][0].sum() <= n


def test_bad_inputs_are_refused_before_any_work(params, cfg, tokens, pruned, draw_params):
  T = tokens.shape[1]
  with pytest.raises(ValueError, match=r"drift\(mode='greedy'\): expected one of \('free', "):
    pj.analysis.drift(params, pruned, cfg, tokens, STEPS, mode="greedy")
  with pytest.raises(ValueError, match=rf"drift\(steps={64 - T + 1}\): expected an integer in "
                                       rf"\[1, max_position_embeddings - T = {64 - T}\]"):
    pj.analysis.drift(params, pruned, cfg, tokens, 64 - T + 1)
  with pytest.raises(ValueError, match=r"drift\(steps=0\)"):
    pj.analysis.drift(params, pruned, cfg, tokens, 0)
  short = cfg.replace(max_position_embeddings=20)  # the pruned model's context bounds it too
  with pytest.raises(ValueError, match=r"drift\(steps=9\): expected an integer in "
                                       r"\[1, max_position_embeddings - T = 8\]"):
    pj.analysis.drift(params, pruned, cfg, tokens, 9, pruned_config=short)
  wide = cfg.replace(vocab_size=cfg.vocab_size + 1)
  with pytest.raises(ValueError, match=r"drift\(pruned_config=.*vocab_size 101"):
    pj.analysis.drift(params, draw_params(wide), cfg, tokens, STEPS, pruned_config=wide)
  with pytest.raises(ValueError, match=r"drift\(analysis_temperature=0\)"):
    pj.analysis.drift(params, pruned, cfg, tokens, STEPS, analysis_temperature=0)
  with pytest.raises(ValueError, match=r"drift\(eos_token_ids\[0\]=101\)"):
    pj.analysis.drift(params, pruned, cfg, tokens, STEPS, eos_token_ids=[101])
  with pytest.raises(ValueError, match=r"drift\(eos_token_ids='5'\): expected a token id or a "
                                       r"sequence of token ids in \[0, 101\)"):
    pj.analysis.drift(params, pruned, cfg, tokens, STEPS, eos_token_ids="5")


def test_eos_ids_may_be_any_sequence_of_ids(params, cfg, tokens, pruned, eos, both):
  r = pj.analysis.drift(params, pruned, cfg, tokens, STEPS, eos_token_ids=np.array([eos]),
                        analysis_temperature=T_A, **SAMPLED)
  for k, v in both.arrays.items():
    np.testing.assert_array_equal(r.arrays[k], v, err_msg=k)
