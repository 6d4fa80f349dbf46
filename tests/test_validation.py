"""Bad input at the public boundary of the model core, one table row per case.

Each row names a public function, the keyword arguments that differ from a valid call, the
exception type, and a regex the message must match: it names the function, the argument, the
value and what was expected. Valid NumPy / JAX scalars and traced arguments are shown to work.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prunerep_jax as pj
from prunerep_jax import metrics as m
from prunerep_jax import validate
from prunerep_jax.validate import ArgumentError

CFG = pj.Config(family="llama", vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64,
                eos_token_ids=(7,), pad_token_id=0)
V, L, D = CFG.vocab_size, CFG.num_layers, CFG.hidden_size
B, T = 2, 5
TOKENS = np.random.RandomState(0).randint(8, V, (B, T)).astype(np.int32)
Z = np.random.RandomState(1).randn(3, V).astype(np.float32)
ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16)


@pytest.fixture(scope="module")
def params():
  return pj.init_params(CFG, jax.random.key(0))


def _tokens(value, dtype=np.int32):
  """TOKENS with id `value` at [0, 0], in `dtype`."""
  t = TOKENS.astype(dtype)
  t[0, 0] = value
  return t


def _mask(value=1, row_zero=None):
  mask = np.ones((B, T), type(value) if isinstance(value, float) else np.int32)
  mask[0, 0] = value
  if row_zero is not None:
    mask[row_zero] = 0
  return mask


def _config_dict(**changes):
  d = CFG.to_dict()
  d.update(changes)
  return d


def _without(d, key):
  return {k: v for k, v in d.items() if k != key}


def _one_layer(p):
  """params whose stacked layers hold one layer instead of L."""
  return dict(p, layers=jax.tree_util.tree_map(lambda x: x[:1], p["layers"]))


CALLS = {
    "forward": lambda p, kw: pj.forward(kw.pop("params", p), kw.pop("config", CFG),
                                        kw.pop("tokens", TOKENS), **kw),
    "generate": lambda p, kw: pj.generate(kw.pop("params", p), CFG,
                                          kw.pop("prompt_tokens", TOKENS),
                                          kw.pop("max_new_tokens", 2), **kw),
    "probs": lambda p, kw: m.probs(Z, **kw),
    "kl": lambda p, kw: m.kl(Z, Z, **kw),
    "kl_estimate": lambda p, kw: m.kl_estimate(Z, Z, **kw),
    "cos_p_estimate": lambda p, kw: m.cos_p_estimate(Z, Z, **kw),
    "sublayer_effects": lambda p, kw: pj.analysis.sublayer_effects(
        p, CFG, kw.pop("residual", np.zeros((2 * L + 1, B, T, D), np.float32)), **kw),
    "Config": lambda p, kw: CFG.replace(**kw),
    "RopeScaling": lambda p, kw: pj.RopeScaling(**dict(ROPE, **kw)),
    "Config.from_dict": lambda p, kw: pj.Config.from_dict(kw["d"]),
    "check_finite": lambda p, kw: validate.check_finite("fn", kw["tree"]),
}

_BAD_TEMPERATURES = [
    (0.0, r"temperature=0\.0"), (-1.0, r"temperature=-1\.0"),
    (np.float32(0.0), r"temperature=np\.float32\(0\.0\)"),
    (np.float64(-1.0), r"temperature=np\.float64\(-1\.0\)"),
    (jnp.asarray(0.0), r"temperature=Array\(0\., dtype=float32, weak_type=True\)"),
    (np.float64(math.nan), r"temperature=np\.float64\(nan\)"),
    ("1.0", r"temperature='1\.0'"),
]
_METRIC_ROWS = [
    (fn, dict(temperature=t), ArgumentError, rf"metrics\.{fn}\({match}\): expected a finite "
     r"number > 0")
    for fn in ("probs", "kl", "kl_estimate", "cos_p_estimate") for t, match in _BAD_TEMPERATURES]

_TOKEN_IDS = r"expected ids in \[0, 97\)"
_MASK = r"expected a 0/1 mask of shape \(2, 5\)"

BAD = [
    # forward: tokens
    ("forward", dict(tokens=_tokens(V)), ArgumentError,
     rf"forward\(tokens=\.\.\.\): token id 97 at position \(0, 0\) .*{_TOKEN_IDS}"),
    ("forward", dict(tokens=_tokens(-1)), ArgumentError,
     rf"forward\(tokens=\.\.\.\): token id -1 at position \(0, 0\) .*{_TOKEN_IDS}"),
    ("forward", dict(tokens=_tokens(2**32 + 5, np.int64)), ArgumentError,
     rf"forward\(tokens=\.\.\.\): token id 4294967301 at .*{_TOKEN_IDS}"),
    ("forward", dict(tokens=TOKENS.astype(np.float32)), ArgumentError,
     r"forward\(tokens=<array float32\[2, 5\]>\): expected integer token ids .*got dtype float32"),
    ("forward", dict(tokens=TOKENS[0]), ArgumentError,
     r"forward\(tokens=<array int32\[5\]>\): expected integer token ids \[B, T\] .*got shape "
     r"\(5,\)"),
    ("forward", dict(tokens=TOKENS[:, :0]), ArgumentError,
     r"forward\(tokens=<array int32\[2, 0\]>\): .*with B >= 1 and T >= 1"),
    # forward: attention_mask
    ("forward", dict(attention_mask=_mask(0.5)), ArgumentError,
     rf"forward\(attention_mask=<array float64\[2, 5\]>\): {_MASK}.*got dtype float64"),
    ("forward", dict(attention_mask=_mask(2)), ArgumentError,
     rf"forward\(attention_mask=<array int32\[2, 5\]>\): {_MASK}.*it holds \[2\]"),
    ("forward", dict(attention_mask=_mask(row_zero=1)), ArgumentError,
     rf"forward\(attention_mask=<array int32\[2, 5\]>\): {_MASK}.*rows \[1\] are all padding"),
    ("forward", dict(attention_mask=np.ones((B, T + 1), np.int32)), ArgumentError,
     rf"forward\(attention_mask=<array int32\[2, 6\]>\): {_MASK}.*got shape \(2, 6\)"),
    # forward: keep, for lists, NumPy and JAX arrays alike
    ("forward", dict(tokens=TOKENS[:1], keep=[[9]]), ArgumentError,
     r"forward\(keep=\[\[9\]\]\): expected integer positions \[B=1, P\] or \[P\] in \[0, 5\); "
     r"they span \[9, 9\]"),
    ("forward", dict(tokens=TOKENS[:1], keep=np.array([[9]])), ArgumentError,
     r"forward\(keep=<array int64\[1, 1\]>\): expected integer positions .*in \[0, 5\)"),
    ("forward", dict(tokens=TOKENS[:1], keep=jnp.array([[9]])), ArgumentError,
     r"forward\(keep=<array int32\[1, 1\]>\): expected integer positions .*in \[0, 5\)"),
    ("forward", dict(tokens=TOKENS[:1], keep=[[-1]]), ArgumentError,
     r"forward\(keep=\[\[-1\]\]\): .*they span \[-1, -1\]"),
    ("forward", dict(tokens=TOKENS[:1], keep=[[1.7]]), ArgumentError,
     r"forward\(keep=\[\[1\.7\]\]\): expected integer positions .*got dtype float64"),
    ("forward", dict(keep=[[0], [1], [2]]), ArgumentError,
     r"forward\(keep=\[\[0\], \[1\], \[2\]\]\): expected integer positions \[B=2, P\] .*got "
     r"shape \(3, 1\)"),
    ("forward", dict(keep="first"), ArgumentError,
     r"forward\(keep='first'\): expected 'all', 'last' or integer positions"),
    # forward: flags, params, config
    ("forward", dict(capture="yes"), ArgumentError, r"forward\(capture='yes'\): expected True or "
     "False"),
    ("forward", dict(logits=1), ArgumentError, r"forward\(logits=1\): expected True or False"),
    ("forward", dict(params=_one_layer), ValueError,
     r"forward\(params\): tensor layers/\S+ has shape \(1, .*expected \(2, .* for this config"),
    ("forward", dict(params=lambda p: _without(p, "lm_head")), ValueError,
     r"forward\(params\): missing tensors \['lm_head/kernel'\]"),
    ("forward", dict(params=lambda p: [p]), TypeError, r"forward\(params=\[.*expected a params "
     "pytree"),
    ("forward", dict(config=CFG.to_dict()), TypeError,
     r"forward\(config=\{.*\): expected a prunerep_jax Config"),
    # generate: prompt
    ("generate", dict(prompt_tokens=_tokens(V)), ArgumentError,
     rf"generate\(prompt_tokens=\.\.\.\): token id 97 .*{_TOKEN_IDS}"),
    ("generate", dict(prompt_tokens=_tokens(-1)), ArgumentError,
     rf"generate\(prompt_tokens=\.\.\.\): token id -1 .*{_TOKEN_IDS}"),
    ("generate", dict(prompt_tokens=_tokens(2**32 + 5, np.int64)), ArgumentError,
     rf"generate\(prompt_tokens=\.\.\.\): token id 4294967301 .*{_TOKEN_IDS}"),
    ("generate", dict(prompt_mask=_mask(2)), ArgumentError,
     rf"generate\(prompt_mask=<array int32\[2, 5\]>\): {_MASK}.*it holds \[2\]"),
    ("generate", dict(prompt_mask=_mask(0.5)), ArgumentError,
     rf"generate\(prompt_mask=<array float64\[2, 5\]>\): {_MASK}.*got dtype float64"),
    ("generate", dict(prompt_mask=_mask(row_zero=1)), ArgumentError,
     rf"generate\(prompt_mask=.*\): {_MASK}.*rows \[1\] are all padding"),
    # generate: counts and seeds
    ("generate", dict(seed=-1), ArgumentError,
     r"generate\(seed=-1\): expected an integer in \[0, 2\*\*32\)"),
    ("generate", dict(seed=2**32), ArgumentError,
     r"generate\(seed=4294967296\): expected an integer in \[0, 2\*\*32\)"),
    ("generate", dict(seed=1.5), ArgumentError, r"generate\(seed=1\.5\): expected an integer"),
    ("generate", dict(max_new_tokens=0), ArgumentError,
     r"generate\(max_new_tokens=0\): expected an integer >= 1"),
    ("generate", dict(max_new_tokens=2.0), ArgumentError,
     r"generate\(max_new_tokens=2\.0\): expected an integer >= 1"),
    ("generate", dict(max_new_tokens=10**9), ArgumentError,
     r"generate\(max_new_tokens=1000000000\): expected at most 59: prompt length 5 \+ "
     r"max_new_tokens must not exceed config\.max_position_embeddings=64"),
    ("generate", dict(max_new_tokens=60), ArgumentError,
     r"generate\(max_new_tokens=60\): expected at most 59"),
    # generate: sampling
    ("generate", dict(temperature=-0.5), ArgumentError,
     r"generate\(temperature=-0\.5\): expected a finite number >= 0 \(0 means greedy"),
    ("generate", dict(temperature=math.nan), ArgumentError,
     r"generate\(temperature=nan\): expected a finite number >= 0"),
    ("generate", dict(temperature="0.7"), ArgumentError,
     r"generate\(temperature='0\.7'\): expected a finite number >= 0"),
    ("generate", dict(top_k=0), ArgumentError,
     r"generate\(top_k=0\): expected None or an integer in \[1, 97\]"),
    ("generate", dict(top_k=V + 1), ArgumentError,
     r"generate\(top_k=98\): expected None or an integer in \[1, 97\]"),
    ("generate", dict(top_k=2.5), ArgumentError, r"generate\(top_k=2\.5\): expected None or an "
     "integer"),
    ("generate", dict(top_p=0.0), ArgumentError,
     r"generate\(top_p=0\.0\): expected None or a number in \(0, 1\]"),
    ("generate", dict(top_p=1.5), ArgumentError,
     r"generate\(top_p=1\.5\): expected None or a number in \(0, 1\]"),
    # generate: names and ids
    ("generate", dict(capture="logits"), ArgumentError,
     r"generate\(capture='logits'\): expected a tuple of names from \('hidden', 'logits', "
     r"'logprobs'\), e\.g\. \('logits',\)"),
    ("generate", dict(capture=("attn",)), ArgumentError,
     r"generate\(capture=\('attn',\)\): expected names from .*\['attn'\] are not"),
    ("generate", dict(eos_token_ids="abc"), ArgumentError,
     r"generate\(eos_token_ids='abc'\): expected a token id or a sequence of token ids in "
     r"\[0, 97\)"),
    ("generate", dict(eos_token_ids=(7, V)), ArgumentError,
     r"generate\(eos_token_ids\[1\]=97\): expected a token id in \[0, 97\)"),
    ("generate", dict(pad_id=V), ArgumentError,
     r"generate\(pad_id=97\): expected a token id in \[0, 97\)"),
    ("generate", dict(pad_id=-1), ArgumentError,
     r"generate\(pad_id=-1\): expected a token id in \[0, 97\)"),
    ("generate", dict(params=_one_layer), ValueError,
     r"generate\(params\): tensor layers/\S+ has shape \(1, "),
    # metrics: every temperature, Python, NumPy and JAX scalars alike
    *_METRIC_ROWS,
    # analysis.sublayer_effects
    ("sublayer_effects", dict(residual=np.zeros((2 * L, B, T, D), np.float32)), ArgumentError,
     r"analysis\.sublayer_effects\(residual=<array float32\[4, 2, 5, 32\]>\): expected floating "
     r"residual states \[2L \+ 1, B, P, D\] = \[5, B, P, 32\] for this config \(L = 2\).*got "
     r"shape \(4, 2, 5, 32\)"),
    ("sublayer_effects", dict(residual=np.zeros((2 * L + 1, B, T, D + 1), np.float32)),
     ArgumentError, r"sublayer_effects\(residual=.*= \[5, B, P, 32\].*got shape \(5, 2, 5, 33\)"),
    ("sublayer_effects", dict(residual=np.zeros((2 * L + 1, B, D), np.float32)), ArgumentError,
     r"sublayer_effects\(residual=.*got shape \(5, 2, 32\)"),
    ("sublayer_effects", dict(residual=np.zeros((2 * L + 1, B, T, D), np.int32)), ArgumentError,
     r"sublayer_effects\(residual=<array int32\[5, 2, 5, 32\]>\): expected floating"),
    ("sublayer_effects", dict(lens="norm"), ArgumentError,
     r"analysis\.sublayer_effects\(lens='norm'\): expected one of \('final_norm', 'raw'\)"),
    ("sublayer_effects", dict(temperature=0.0), ArgumentError,
     r"analysis\.sublayer_effects\(temperature=0\.0\): expected a finite number > 0"),
    ("sublayer_effects", dict(temperature=np.float32(-1.0)), ArgumentError,
     r"analysis\.sublayer_effects\(temperature=np\.float32\(-1\.0\)\): expected a finite number"),
    ("sublayer_effects", dict(temperature=jnp.asarray(0.0)), ArgumentError,
     r"analysis\.sublayer_effects\(temperature=Array\(0\..*expected a finite number > 0"),
    # Config
    ("Config", dict(bos_token_id=V), ArgumentError,
     r"Config\.bos_token_id=97: expected None or a token id in \[0, 97\)"),
    ("Config", dict(pad_token_id=-1), ArgumentError,
     r"Config\.pad_token_id=-1: expected None or a token id in \[0, 97\)"),
    ("Config", dict(eos_token_ids=(7, V)), ArgumentError,
     r"Config\.eos_token_ids=\(7, 97\): expected a tuple of token ids in \[0, 97\)"),
    ("Config", dict(eos_token_ids=[7]), ArgumentError,
     r"Config\.eos_token_ids=\[7\]: expected a tuple of token ids"),
    ("Config", dict(vocab_size=0), ArgumentError,
     r"Config\.vocab_size=0: expected a positive integer"),
    ("Config", dict(rms_norm_eps="1e-5"), ArgumentError,
     r"Config\.rms_norm_eps='1e-5': expected a positive finite number"),
    ("Config", dict(rope_theta=math.inf), ArgumentError,
     r"Config\.rope_theta=inf: expected a positive finite number"),
    ("Config", dict(tie_word_embeddings=1), ArgumentError,
     r"Config\.tie_word_embeddings=1: expected True or False"),
    ("Config", dict(sliding_window=0), ArgumentError,
     r"Config\.sliding_window=0: expected None or a positive integer"),
    ("Config", dict(rope_scaling=ROPE), ArgumentError,
     r"Config\.rope_scaling=\{.*: expected None or a RopeScaling"),
    ("Config", dict(num_kv_heads=3), ArgumentError,
     r"Config\.num_heads=4 is not a multiple of Config\.num_kv_heads=3"),
    ("Config", dict(family="gpt2"), ArgumentError,
     r"Config\.family='gpt2': expected one of \('llama', 'mistral', 'qwen2'\)"),
    # RopeScaling
    ("RopeScaling", dict(factor=0.0), ArgumentError,
     r"RopeScaling\.factor=0\.0: expected a positive finite number"),
    ("RopeScaling", dict(factor=math.inf), ArgumentError,
     r"RopeScaling\.factor=inf: expected a positive finite number"),
    ("RopeScaling", dict(factor="8"), ArgumentError,
     r"RopeScaling\.factor='8': expected a positive finite number"),
    ("RopeScaling", dict(low_freq_factor=-1.0), ArgumentError,
     r"RopeScaling\.low_freq_factor=-1\.0: expected a positive finite number"),
    ("RopeScaling", dict(low_freq_factor=4.0, high_freq_factor=1.0), ArgumentError,
     r"RopeScaling\.high_freq_factor=1\.0: expected a number > low_freq_factor=4\.0"),
    ("RopeScaling", dict(low_freq_factor=4.0), ArgumentError,
     r"RopeScaling\.high_freq_factor=4\.0: expected a number > low_freq_factor=4\.0"),
    ("RopeScaling", dict(original_max_position_embeddings=0), ArgumentError,
     r"RopeScaling\.original_max_position_embeddings=0: expected a positive integer"),
    ("RopeScaling", dict(original_max_position_embeddings=8.5), ArgumentError,
     r"RopeScaling\.original_max_position_embeddings=8\.5: expected a positive integer"),
    # Config.from_dict
    ("Config.from_dict", dict(d=[1, 2]), ArgumentError,
     r"Config\.from_dict\(d\): expected a dict of Config fields .*got list"),
    ("Config.from_dict", dict(d=_without(CFG.to_dict(), "vocab_size")), ArgumentError,
     r"Config\.from_dict\(d\): missing fields \['vocab_size'\]"),
    ("Config.from_dict", dict(d=_config_dict(heads=4)), ArgumentError,
     r"Config\.from_dict\(d\): unknown fields \['heads'\]"),
    ("Config.from_dict", dict(d=_config_dict(vocab_size="97")), ArgumentError,
     r"Config\.vocab_size='97': expected a positive integer"),
    ("Config.from_dict", dict(d=_config_dict(eos_token_ids="abc")), ArgumentError,
     r"Config\.from_dict\(d\): field eos_token_ids='abc': expected a list of token ids"),
    ("Config.from_dict", dict(d=_config_dict(rope_scaling="llama3")), ArgumentError,
     r"Config\.from_dict\(d\)\['rope_scaling'\]: expected a dict with keys \['factor', .*got "
     "str"),
    ("Config.from_dict", dict(d=_config_dict(rope_scaling=dict(ROPE, type="llama3"))),
     ArgumentError, r"\['rope_scaling'\]: expected exactly the keys .*unknown \['type'\], "
     r"missing \[\]"),
    ("Config.from_dict", dict(d=_config_dict(rope_scaling=_without(ROPE, "factor"))),
     ArgumentError, r"\['rope_scaling'\]: expected exactly the keys .*missing \['factor'\]"),
    ("Config.from_dict", dict(d=_config_dict(rope_scaling=dict(ROPE, factor=-2.0))),
     ArgumentError, r"RopeScaling\.factor=-2\.0: expected a positive finite number"),
    # the one finiteness check
    ("check_finite", dict(tree={"a": np.ones(3), "b": {"c": np.array([1.0, math.nan])}}),
     ArgumentError, r"fn\(params\): tensor b/c contains NaN or Inf values"),
]


def _row_id(row):
  target, kwargs = row[0], row[1]
  text = ",".join(f"{k}={validate._short(v) if not callable(v) else v.__name__}"
                  for k, v in kwargs.items())
  return f"{target}[{text}]"[:90]


@pytest.mark.parametrize("target, kwargs, error, match", BAD, ids=[_row_id(r) for r in BAD])
def test_bad_input_is_refused_naming_the_argument(params, target, kwargs, error, match):
  kwargs = dict(kwargs)
  if callable(kwargs.get("params")):
    kwargs["params"] = kwargs["params"](params)
  with pytest.raises(error, match=match):
    CALLS[target](params, kwargs)


# ---------------------------------------------------------------------------- valid input

def test_generate_takes_numpy_scalars_as_their_python_values(params):
  numpy_kw = dict(temperature=np.float32(0.7), top_k=np.int64(5), top_p=np.float64(0.9),
                  seed=np.uint32(3), pad_id=np.int32(1), eos_token_ids=np.array([7, 8]),
                  capture=["logits"])
  python_kw = dict(temperature=float(np.float32(0.7)), top_k=5, top_p=0.9, seed=3, pad_id=1,
                   eos_token_ids=(7, 8), capture=("logits",))
  a = pj.generate(params, CFG, TOKENS, np.int64(4), **numpy_kw)
  b = pj.generate(params, CFG, TOKENS, 4, **python_kw)
  assert a.tokens.shape == (B, 4) and a.logits.shape == (B, 4, V)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.logits, b.logits)


def test_generate_accepts_a_bool_mask_and_the_longest_allowed_run(params):
  mask = np.ones((B, T), bool)
  mask[1, :2] = False
  n = CFG.max_position_embeddings - T  # T + n == max_position_embeddings is allowed
  a = pj.generate(params, CFG, TOKENS, n, prompt_mask=mask)
  b = pj.generate(params, CFG, TOKENS, n, prompt_mask=mask.astype(np.int64))
  assert a.tokens.shape == (B, n)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.prompt_mask[1], [0, 0, 1, 1, 1])


def test_forward_takes_tokens_masks_and_positions_in_any_container(params):
  ref = pj.forward(params, CFG, TOKENS, capture=False)
  for tokens in (TOKENS.astype(np.int64), TOKENS.tolist(), jnp.asarray(TOKENS),
                 TOKENS.astype(np.uint8)):
    out = pj.forward(params, CFG, tokens, capture=False)
    np.testing.assert_array_equal(out.logits, ref.logits)
  mask = np.ones((B, T), np.int32)
  mask[0, :2] = 0
  by_int = pj.forward(params, CFG, TOKENS, mask, capture=False)
  by_bool = pj.forward(params, CFG, TOKENS, jnp.asarray(mask, bool), capture=False)
  np.testing.assert_array_equal(by_bool.logits, by_int.logits)
  idx = [[4], [0]]
  for keep in (idx, np.asarray(idx, np.int64), jnp.asarray(idx)):
    out = pj.forward(params, CFG, TOKENS, keep=keep, capture=np.bool_(False))
    np.testing.assert_array_equal(out.positions, idx)
    np.testing.assert_array_equal(out.logits[:, 0], np.asarray(ref.logits)[[0, 1], [4, 0]])


def test_forward_inside_the_callers_jit_checks_shapes_only(params):
  jitted = jax.jit(lambda p, t: pj.forward(p, CFG, t).logits)
  np.testing.assert_allclose(jitted(params, jnp.asarray(TOKENS)),
                             pj.forward(params, CFG, TOKENS).logits, atol=1e-6)
  with pytest.raises(ArgumentError, match=r"forward\(tokens=<traced float32\[2, 5\]>\)"):
    jitted(params, jnp.asarray(TOKENS, jnp.float32))


@pytest.mark.parametrize("t", [np.float32(0.5), np.float64(0.5), jnp.asarray(0.5), 0.5])
def test_metrics_take_numpy_and_jax_temperatures(t):
  ref = m.kl(Z, Z + 1.0 * np.arange(V, dtype=np.float32) / V, 0.5)
  got = m.kl(Z, Z + 1.0 * np.arange(V, dtype=np.float32) / V, t)
  np.testing.assert_array_equal(got, ref)
  assert float(ref[0]) > 0


def test_metrics_pass_a_traced_temperature():
  dz = np.arange(V, dtype=np.float32) / V
  f = jax.jit(lambda t: (m.kl(Z, Z + dz, t), m.probs(Z, t)))
  np.testing.assert_allclose(f(0.5)[0], m.kl(Z, Z + dz, 0.5), rtol=1e-6)
  np.testing.assert_allclose(f(2.0)[1], m.probs(Z, 2.0), rtol=1e-6)


def test_sublayer_effects_take_a_numpy_temperature(params):
  residual = pj.forward(params, CFG, TOKENS).residual
  a = pj.analysis.sublayer_effects(params, CFG, residual, temperature=np.float32(0.5))
  b = pj.analysis.sublayer_effects(params, CFG, residual, temperature=0.5)
  assert a["kl"].shape == (2 * L, B, T)
  np.testing.assert_array_equal(a["kl"], b["kl"])


def test_config_round_trips_through_from_dict_with_rope_scaling():
  cfg = CFG.replace(rope_scaling=pj.RopeScaling(**ROPE), bos_token_id=1, eos_token_ids=(2, 7))
  back = pj.Config.from_dict(cfg.to_dict())
  assert back == cfg and hash(back) == hash(cfg)
  assert dataclasses.asdict(back.rope_scaling) == ROPE
