"""drift: the one-scan dense/pruned decoding against the two models run separately.

References run `pj.generate` (or `decode.prefill` / `decode_step` by hand) for each model on its
own and recompute every per-step metric with `pj.metrics` from the captured logits and hidden
states; the analysis must agree token for token and metric for metric.
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
TOL = {"rtol": 1e-4, "atol": 1e-6}  # two float32 programs computing the same numbers


@pytest.fixture(scope="module")
def pruned(params, cfg):
  return pj.prune.magnitude(params, cfg, 0.3).params


@pytest.fixture(scope="module")
def both(params, cfg, tokens, pruned, eos):
  return pj.analysis.drift(params, pruned, cfg, tokens, STEPS, eos_token_ids=(eos,),
                           tokenizer=Spaced())


@pytest.fixture(scope="module")
def dense_run(params, cfg, tokens, eos):
  return run(params, cfg, tokens, eos_token_ids=(eos,))


@pytest.fixture(scope="module")
def pruned_run(pruned, cfg, tokens, eos):
  return run(pruned, cfg, tokens, eos_token_ids=(eos,))


class Spaced:
  """A stand-in tokenizer: ids joined by spaces."""

  def decode(self, ids):
    return " ".join(str(i) for i in ids)


def run(params, cfg, tokens, **kwargs):
  return pj.generate(params, cfg, tokens, STEPS, capture=("logits", "hidden"), **kwargs)


@functools.partial(jax.jit, static_argnums=(6,))
def reference_metrics(hd, hp, zd, zp, tok_d, tok_p, T=1.0):
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


def test_free_greedy_drift_equals_two_separate_generations(both, dense_run, pruned_run):
  assert_free_equals_separate_generations(both, dense_run, pruned_run)
  assert (np.asarray(dense_run.tokens) != np.asarray(pruned_run.tokens)).any()  # they diverge
  assert int(dense_run.lengths[0]) <= 3  # and dense row 0 ends early on EOS
  assert both.meta["mode"] == "both" and both.meta["temperature"] == 0.0


def test_free_sampled_drift_equals_two_separate_generations_with_the_same_seed(params, cfg,
                                                                              tokens, pruned,
                                                                              eos):
  kwargs = {"temperature": 1.5, "seed": 3, "eos_token_ids": (eos,)}
  r = pj.analysis.drift(params, pruned, cfg, tokens, STEPS, mode="free",
                        analysis_temperature=0.7, **kwargs)
  gd, gp = run(params, cfg, tokens, **kwargs), run(pruned, cfg, tokens, **kwargs)
  a = r.arrays
  np.testing.assert_array_equal(a["dense/tokens"], gd.tokens)
  np.testing.assert_array_equal(a["free/tokens"], gp.tokens)
  np.testing.assert_array_equal(a["free/valid"], np.asarray(gd.valid) & np.asarray(gp.valid))
  assert "teacher/kl" not in a
  ref = reference_metrics(gd.hidden, gp.hidden, gd.logits, gp.logits, gd.tokens, gp.tokens, 0.7)
  assert_track(r, "free", ref, a["free/valid"])


def test_identical_params_drift_exactly_zero_at_every_step(params, cfg, tokens, eos):
  r = pj.analysis.drift(params, params, cfg, tokens, STEPS, eos_token_ids=(eos,))
  for track in ("teacher", "free"):
    a = {k: r.arrays[f"{track}/{k}"] for k in STEP_METRICS}
    np.testing.assert_array_equal(a["agree"], 1.0)
    for k in ("kl", "kl_estimate", "one_minus_cos_p", "cos_p_estimate", "one_minus_cos_z",
              "rms_dz"):
      np.testing.assert_array_equal(a[k], 0.0, err_msg=f"{track}/{k}")
    for k in ("cos_h", "cos_z", "cos_p"):  # <a, b> / sqrt(|a|^2 |b|^2): one float32 step
      np.testing.assert_allclose(a[k], 1.0, rtol=0, atol=2**-23, err_msg=f"{track}/{k}")
    # XLA compiles the two models' copies of the final norm into differently fused kernels, so
    # their hidden states may differ in the last bit (the logits come out identical): 1 - cos of
    # two vectors one float32 step apart is ~1e-15 at most
    assert a["one_minus_cos_h"].max() < 1e-14
  assert all(p["first_divergence"] == STEPS and not p["diverged"] for p in r.table("prompts"))


@functools.partial(jax.jit, static_argnums=(1,))
def _teacher_forced(pruned, cfg, tokens, dense_tokens):
  """The pruned model fed the dense tokens by hand: logits, hidden [B, S, ...]."""
  out, state = decode.prefill(pruned, cfg, tokens, jnp.ones(tokens.shape, bool),
                              tokens.shape[1] + STEPS)
  outs = [out]
  for i in range(1, STEPS):
    out, state = decode.decode_step(pruned, cfg, state, dense_tokens[:, i - 1])
    outs.append(out)
  return jnp.stack([o.logits for o in outs], 1), jnp.stack([o.hidden for o in outs], 1)


def test_teacher_mode_feeds_the_pruned_model_the_dense_tokens(cfg, tokens, pruned, both,
                                                              dense_run):
  gd = dense_run
  logits, hidden = _teacher_forced(pruned, cfg, tokens, gd.tokens)
  a = both.arrays
  valid = np.asarray(gd.valid)
  np.testing.assert_array_equal(a["teacher/valid"], valid)
  np.testing.assert_array_equal(a["teacher/running"], valid)
  # what the pruned model would choose in the dense context (pad once the dense row ended)
  np.testing.assert_array_equal(a["teacher/tokens"], np.where(valid, np.argmax(logits, -1), 0))
  ref = reference_metrics(gd.hidden, hidden, gd.logits, logits, gd.tokens, a["teacher/tokens"])
  assert_track(both, "teacher", ref, valid)
  # teacher forcing keeps the contexts together: it agrees at least as often as free running
  assert a["teacher/agree"][valid].mean() >= a["free/agree"][a["free/valid"]].mean()


def test_mode_both_equals_free_and_teacher_run_separately(params, cfg, tokens, pruned, eos,
                                                          both):
  free = pj.analysis.drift(params, pruned, cfg, tokens, STEPS, mode="free", eos_token_ids=(eos,))
  teacher = pj.analysis.drift(params, pruned, cfg, tokens, STEPS, mode="teacher",
                              eos_token_ids=(eos,))
  for single, track in ((free, "free"), (teacher, "teacher")):
    assert {k for k in single.arrays} == {k for k in both.arrays
                                          if k.startswith(("dense/", f"{track}/"))}
    for k, v in single.arrays.items():
      np.testing.assert_allclose(v, both.arrays[k], rtol=1e-6, atol=1e-7, err_msg=k)
    rows = [r for r in both.table("prompts") if r["track"] == track]
    assert [r["first_divergence"] for r in single.table("prompts")] == [
        r["first_divergence"] for r in rows]


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
  for b in range(a["dense/tokens"].shape[0]):
    n = int(a["dense/valid"][b].sum())
    assert texts[(b, "dense")] == " ".join(str(i) for i in a["dense/tokens"][b, :n])
    n = int(a["free/running"][b].sum())
    assert texts[(b, "free")] == " ".join(str(i) for i in a["free/tokens"][b, :n])


def test_rows_that_ended_stop_counting(both):
  a = both.arrays
  assert not a["free/valid"][0, 3:].any() and not a["teacher/valid"][0, 3:].any()
  np.testing.assert_array_equal(a["teacher/valid"], a["dense/valid"])
  np.testing.assert_array_equal(a["free/valid"], a["dense/valid"] & a["free/running"])
  np.testing.assert_array_equal(a["dense/tokens"][~a["dense/valid"]], 0)  # pad after the end
  for rec in both.table("summary"):
    valid = a[f"{rec['track']}/valid"][:, rec["step"]]
    assert rec["prompts"] == valid.sum()
    for k in ("kl", "cos_h", "agree"):
      if valid.any():
        np.testing.assert_allclose(rec[k], a[f"{rec['track']}/{k}"][valid, rec["step"]].mean(),
                                   rtol=1e-6)
      else:
        assert rec[k] is None


def test_a_block_dropped_model_drifts_with_its_own_config(params, cfg, tokens, eos, dense_run):
  pr = pj.prune.drop_blocks(params, cfg, 1, calibration=np.asarray(tokens))
  assert pr.config.num_layers == cfg.num_layers - 1
  r = pj.analysis.drift(params, pr.params, cfg, tokens, STEPS, pruned_config=pr.config,
                        mode="free", eos_token_ids=(eos,))
  assert_free_equals_separate_generations(r, dense_run,
                                          run(pr.params, pr.config, tokens, eos_token_ids=(eos,)))


def test_bad_inputs_are_refused_before_any_work(params, cfg, tokens, pruned, draw_params):
  T = tokens.shape[1]
  with pytest.raises(ValueError, match=r"drift\(mode='greedy'\): expected one of \('free', "):
    pj.analysis.drift(params, pruned, cfg, tokens, STEPS, mode="greedy")
  with pytest.raises(ValueError, match=rf"drift\(steps={64 - T + 1}\): expected an integer in "
                                       rf"\[1, max_position_embeddings - T = {64 - T}\]"):
    pj.analysis.drift(params, pruned, cfg, tokens, 64 - T + 1)
  with pytest.raises(ValueError, match=r"drift\(steps=0\)"):
    pj.analysis.drift(params, pruned, cfg, tokens, 0)
  wide = cfg.replace(vocab_size=cfg.vocab_size + 1)
  with pytest.raises(ValueError, match=r"drift\(pruned_config=.*vocab_size 101"):
    pj.analysis.drift(params, draw_params(wide), cfg, tokens, STEPS, pruned_config=wide)
  with pytest.raises(ValueError, match=r"drift\(analysis_temperature=0\)"):
    pj.analysis.drift(params, pruned, cfg, tokens, STEPS, analysis_temperature=0)
  with pytest.raises(ValueError, match=r"drift\(eos_token_ids\[0\]=101\)"):
    pj.analysis.drift(params, pruned, cfg, tokens, STEPS, eos_token_ids=[101])
