"""Bad input to pruning, calibration, data and perplexity: one row per case, each refused at the
public boundary with an error that names the function, the argument and the value.

A row is (function, the keyword arguments that differ from a valid call, exception type, regex).
The valid call is `VALID[function]`; `Fixture("name")` stands for a module-scoped fixture.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prunerep_jax as pj
from prunerep_jax import data
from prunerep_jax.prune import calibrate, drop
from prunerep_jax.tasks.perplexity import next_token_kl, perplexity
from prunerep_jax.validate import ArgumentError

CFG = pj.Config(family="llama", vocab_size=97, hidden_size=32, intermediate_size=64,
                num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8)
TWO_LAYERS = CFG.replace(num_layers=2)
TOKENS = np.random.RandomState(0).randint(0, 97, (6, 16)).astype(np.int32)
SEED_EXPECTED = r"expected an integer in \[0, 2\*\*32\)"
NAN_IN_UP = r"\(params\): tensor layers/mlp/up_proj/kernel contains NaN or Inf"


class Fixture:
  def __init__(self, name):
    self.name = name


def _no_tokenizing(texts, **kwargs):
  raise AssertionError("the input should have been refused before any text was tokenized")


def _no_pruning(*args):
  raise AssertionError("the input should have been refused before any layer was pruned")


@pytest.fixture(scope="module")
def params():
  return pj.init_params(CFG, jax.random.key(3))


@pytest.fixture(scope="module")
def nan_params(params):
  up = params["layers"]["mlp"]["up_proj"]["kernel"]
  return {**params, "layers": {**params["layers"], "mlp": {
      **params["layers"]["mlp"], "up_proj": {"kernel": up.at[1, 0, 0].set(jnp.nan)}}}}


@pytest.fixture(scope="module")
def inf_embedding_params(params):
  return {**params, "embed": {"embedding": params["embed"]["embedding"].at[5, 2].set(jnp.inf)}}


P = Fixture("params")
VALID = {
    pj.prune.magnitude: dict(params=P, config=CFG, pattern=0.5),
    pj.prune.wanda: dict(params=P, config=CFG, pattern=0.5, calibration=TOKENS),
    pj.prune.sparsegpt: dict(params=P, config=CFG, pattern=0.5, calibration=TOKENS),
    pj.prune.neurons: dict(params=P, config=CFG, sparsity=0.5, calibration=TOKENS),
    pj.prune.drop_sublayers: dict(params=P, config=CFG, n=1, calibration=TOKENS),
    pj.prune.drop_blocks: dict(params=P, config=CFG, n=1, calibration=TOKENS),
    drop.similarity: dict(params=P, config=CFG, calibration=TOKENS),
    drop.zero_sublayers: dict(params=P, dropped=[(0, "attn")]),
    calibrate.sequential: dict(params=P, config=CFG, calib=pj.prune.Calibration(TOKENS, {}),
                               kind="sq_sum", prune_layer=_no_pruning, method="wanda"),
    pj.prune.Calibration: dict(tokens=TOKENS, info={}),
    pj.prune.calibration: dict(tokenizer=_no_tokenizing, source="news", nsamples=2, seqlen=8),
    data.calibration_tokens: dict(tokenizer=_no_tokenizing, source="news", nsamples=2, seqlen=8),
    data.heldout_tokens: dict(tokenizer=_no_tokenizing, source="news", seqlen=8),
    perplexity: dict(params=P, config=CFG, tokens=TOKENS),
    next_token_kl: dict(params_dense=P, params_pruned=P, config_dense=CFG, config_pruned=CFG,
                        tokens=TOKENS),
    pj.prune.get: dict(method="wanda"),
}
TRANSFORMS = (pj.prune.magnitude, pj.prune.wanda, pj.prune.sparsegpt, pj.prune.neurons,
              pj.prune.drop_sublayers, pj.prune.drop_blocks)
BATCHED = (pj.prune.wanda, pj.prune.sparsegpt, pj.prune.neurons, pj.prune.drop_sublayers,
           pj.prune.drop_blocks, drop.similarity, calibrate.sequential, perplexity, next_token_kl)
CALIBRATED = (pj.prune.wanda, pj.prune.sparsegpt, pj.prune.neurons, pj.prune.drop_sublayers,
              pj.prune.drop_blocks)


def row(fn, exc, regex, **kwargs):
  shown = ", ".join(f"{k}={v.name if isinstance(v, Fixture) else v!r}"[:40]
                    for k, v in kwargs.items())
  return pytest.param(fn, kwargs, exc, regex, id=f"{fn.__name__}({shown})")


def name(fn):
  """How the error names `fn` (sequential reports batch_size under its caller, here wanda)."""
  return "wanda" if fn is calibrate.sequential else fn.__name__


ROWS = [
    # Calibration token ids: range-checked in their own dtype, before the int32 cast.
    row(pj.prune.wanda, ArgumentError,
        r"wanda\(calibration=\.\.\.\): token id 4294967301 at position \(0, 0\) is outside the "
        r"vocabulary; expected ids in \[0, 97\)",
        calibration=np.full((2, 8), 2**32 + 5, np.int64)),
    row(pj.prune.Calibration, ArgumentError,
        r"Calibration\(tokens=\.\.\.\): token id 4294967301 .*expected ids in \[0, 2147483648\)",
        tokens=np.full((2, 8), 2**32 + 5, np.int64)),
    row(pj.prune.sparsegpt, ArgumentError, r"sparsegpt\(calibration=\.\.\.\): token id -1 ",
        calibration=np.full((2, 8), -1)),
    row(pj.prune.neurons, ArgumentError,
        r"neurons\(calibration=\.\.\.\): token id 97 .*expected ids in \[0, 97\)",
        calibration=np.full((2, 8), 97)),
    row(pj.prune.drop_sublayers, ArgumentError,
        r"drop_sublayers\(calibration\.tokens=\.\.\.\): token id 500 .*\[0, 97\)",
        calibration=pj.prune.Calibration(np.full((2, 8), 500), {"source": "elsewhere"})),
    row(pj.prune.drop_blocks, ArgumentError,
        r"drop_blocks\(calibration=<array float32\[2, 8\]>\): expected integer token ids "
        r"\[B, T\] in \[0, 97\); got dtype float32", calibration=np.zeros((2, 8), np.float32)),
    row(pj.prune.wanda, ArgumentError,
        r"wanda\(calibration=<array int64\[0, 8\]>\): .*with B >= 1 and T >= 1; got shape "
        r"\(0, 8\)", calibration=np.zeros((0, 8), np.int64)),
    row(pj.prune.wanda, ArgumentError,
        r"wanda\(calibration=None\): expected a Calibration .*or integer token ids \[N, T\]",
        calibration=None),
    row(pj.prune.Calibration, TypeError, r"Calibration\(info='wiki'\): expected a dict",
        info="wiki"),
    # include=: every pattern must match a linear.
    row(pj.prune.wanda, ArgumentError,
        r"wanda\(include=\('mlp/\*', 'mlp/gate'\)\): .*pattern 'mlp/gate' matches none",
        include=("mlp/*", "mlp/gate")),
    row(pj.prune.magnitude, ArgumentError,
        r"magnitude\(include=\('embed',\)\): .*pattern 'embed' matches none", include=("embed",)),
    row(pj.prune.sparsegpt, ArgumentError,
        r"sparsegpt\(include=\[\]\): expected a non-empty sequence of fnmatch patterns",
        include=[]),
    row(pj.prune.magnitude, ArgumentError, r"magnitude\(include=\('mlp/\*', 3\)\): expected",
        include=("mlp/*", 3)),
    # Patterns and method options.
    row(pj.prune.magnitude, ArgumentError,
        r"magnitude\(pattern=1\.5\): expected a sparsity in \[0, 1\).*got 1\.5", pattern=1.5),
    row(pj.prune.magnitude, ArgumentError, r"magnitude\(pattern=None\): expected a sparsity",
        pattern=None),
    row(pj.prune.wanda, ArgumentError, r"wanda\(pattern='3:2'\): .*0 < n < m, got n=3, m=2",
        pattern="3:2"),
    row(pj.prune.wanda, ArgumentError,
        r"wanda\(pattern=NM\(n=2, m=5\)\): .*attn/q_proj has 32 inputs, not divisible by m=5",
        pattern="2:5"),
    row(pj.prune.wanda, ArgumentError,
        r"wanda\(use_variant=True\): expected False with pattern 2:4", pattern="2:4",
        use_variant=True),
    row(pj.prune.wanda, ArgumentError, r"wanda\(use_variant='yes'\): expected True or False",
        use_variant="yes"),
    row(pj.prune.sparsegpt, ArgumentError, r"sparsegpt\(blocksize=0\): expected an integer >= 1",
        blocksize=0),
    row(pj.prune.sparsegpt, ArgumentError,
        r"sparsegpt\(blocksize=6\): expected a multiple of m=4 of pattern 2:4", pattern="2:4",
        blocksize=6),
    row(pj.prune.sparsegpt, ArgumentError,
        r"sparsegpt\(percdamp=-0\.01\): expected a finite number > 0", percdamp=-0.01),
    row(pj.prune.neurons, ArgumentError,
        r"neurons\(sparsity=1\.0\): expected a number in \[0\.0, 1\.0\)", sparsity=1.0),
    row(pj.prune.neurons, ArgumentError, r"neurons\(sparsity='0\.5'\): expected a number",
        sparsity="0.5"),
    row(pj.prune.neurons, ArgumentError, r"neurons\(remove='no'\): expected True or False",
        remove="no"),
    # Drops.
    row(pj.prune.drop_sublayers, ArgumentError,
        r"drop_sublayers\(n=4\): expected an integer in \[0, 3\] \(how many attn sublayers to "
        r"drop\)", n=4),
    row(pj.prune.drop_sublayers, ArgumentError, r"drop_sublayers\(n=-1\): expected an integer "
        r"in \[0, 6\]", n=-1, kind="joint"),
    row(pj.prune.drop_sublayers, ArgumentError, r"drop_sublayers\(n=1\.5\): expected an integer",
        n=1.5),
    row(pj.prune.drop_sublayers, ArgumentError, r"drop_sublayers\(n=True\): expected an integer",
        n=True),
    row(pj.prune.drop_sublayers, ArgumentError,
        r"drop_sublayers\(kind='ffn'\): expected one of \('attn', 'mlp', 'joint'\)", kind="ffn"),
    row(pj.prune.drop_sublayers, ArgumentError,
        r"drop_sublayers\(score='cos'\): expected one of "
        r"\('residual', 'no_norm', 'kl', 'kl_exact'\)", score="cos"),
    row(pj.prune.drop_sublayers, ArgumentError,
        r"drop_sublayers\(iterative='yes'\): expected True or False", iterative="yes"),
    row(pj.prune.drop_blocks, ArgumentError,
        r"drop_blocks\(n=3\): expected an integer in \[0, 2\] \(how many blocks \(at least one "
        r"must remain\) to drop\)", n=3),
    row(pj.prune.drop_blocks, ArgumentError,
        r"drop_blocks\(consecutive=1\): expected True or False", consecutive=1),
    row(drop.similarity, ArgumentError, r"similarity\(score='cos'\): expected one of",
        score="cos"),
    row(drop.zero_sublayers, ArgumentError,
        r"zero_sublayers\(dropped\[0\]=\(3, 'attn'\)\): expected a \(layer, kind\) pair with "
        r"layer in \[0, 3\)", dropped=[(3, "attn")]),
    row(drop.zero_sublayers, ArgumentError,
        r"zero_sublayers\(dropped\[1\]=\(0, 'ffn'\)\): .*kind in \('attn', 'mlp'\)",
        dropped=[(0, "attn"), (0, "ffn")]),
    row(calibrate.sequential, ArgumentError,
        r"sequential\(kind='cube'\): expected one of \('sq_sum', 'hessian'\)", kind="cube"),
    row(calibrate.sequential, TypeError, r"sequential\(calib=<array int32\[6, 16\]>\): expected "
        r"a Calibration", calib=TOKENS),
    # Params that do not fit the config, and the config itself.
    row(pj.prune.wanda, ValueError,
        r"wanda\(params\): tensor layers/\S+ has shape \(3, [\d, ]+\), expected \(2, ",
        config=TWO_LAYERS),
    row(pj.prune.drop_blocks, TypeError,
        r"drop_blocks\(config=\{'num_layers': 3\}\): expected a prunerep_jax Config",
        config={"num_layers": 3}),
    row(perplexity, ValueError, r"perplexity\(params\): tensor layers/\S+ has shape \(3, ",
        config=TWO_LAYERS),
    # Tokenizers and calibration sampling.
    *[row(fn, ArgumentError, rf"{fn.__name__}\(seed={re.escape(repr(seed))}\): {SEED_EXPECTED}",
          seed=seed)
      for fn in (pj.prune.calibration, data.calibration_tokens)
      for seed in (-1, "abc", 1.5, 2**32)],
    *[row(fn, ArgumentError,
          rf"{fn.__name__}\(tokenizer=None\): expected a tokenizer; the model has no tokenizer, "
          rf"so .*pass calibration token ids \[N, T\] .*instead", tokenizer=None)
      for fn in (pj.prune.calibration, data.calibration_tokens)],
    row(data.heldout_tokens, ArgumentError,
        r"heldout_tokens\(tokenizer=None\): expected a tokenizer; the model has no tokenizer, so "
        r".*pass token ids \[W, T\] to the perplexity functions instead", tokenizer=None),
    row(pj.prune.calibration, TypeError, r"calibration\(tokenizer='gpt2'\): expected a "
        r"transformers tokenizer", tokenizer="gpt2"),
    row(pj.prune.calibration, ArgumentError, r"calibration\(nsamples=0\): expected an integer "
        r">= 1", nsamples=0),
    row(data.calibration_tokens, ArgumentError, r"calibration_tokens\(seqlen=1\): expected an "
        r"integer >= 2", seqlen=1),
    row(data.calibration_tokens, ArgumentError, r"calibration_tokens\(split='train'\): expected "
        r"one of \('calibration', 'heldout'\)", split="train"),
    row(data.heldout_tokens, ArgumentError, r"heldout_tokens\(max_windows=2\.0\): expected an "
        r"integer >= 1", max_windows=2.0),
    # Perplexity tokens.
    row(perplexity, ArgumentError, r"perplexity\(tokens=\.\.\.\): token id 4294967301 .*"
        r"\[0, 97\)", tokens=np.full((2, 4), 2**32 + 5, np.int64)),
    row(perplexity, ArgumentError, r"perplexity\(tokens=\.\.\.\): token id -1 ",
        tokens=np.full((2, 4), -1)),
    row(perplexity, ArgumentError, r"perplexity\(tokens=\.\.\.\): token id 97 .*\[0, 97\)",
        tokens=np.full((2, 4), 97)),
    row(perplexity, ArgumentError, r"perplexity\(tokens=<array int32\[4\]>\): expected integer "
        r"token ids \[B, T\] in \[0, 97\); got shape \(4,\)", tokens=np.zeros(4, np.int32)),
    row(perplexity, ArgumentError, r"perplexity\(tokens=<array int32\[2, 1\]>\): expected token "
        r"windows \[W, T\] with T >= 2", tokens=np.zeros((2, 1), np.int32)),
    row(next_token_kl, ArgumentError, r"next_token_kl\(tokens=<array float32\[2, 3\]>\): "
        r".*got dtype float32", tokens=np.zeros((2, 3), np.float32)),
    row(pj.prune.get, ArgumentError, r"get\(method='obs'\): expected one of \(", method="obs"),
    # batch_size everywhere it exists.
    *[row(fn, ArgumentError, rf"{name(fn)}\(batch_size={bad!r}\): expected an integer >= 1",
          batch_size=bad)
      for fn in BATCHED for bad in (0, 2.5)],
    # donate: a real boolean, refused before any work.
    *[row(fn, ArgumentError, rf"{fn.__name__}\(donate='yes'\): expected True or False",
          donate="yes")
      for fn in (pj.prune.wanda, pj.prune.sparsegpt, pj.prune.neurons)],
    # Non-finite weights, for every transform.
    *[row(fn, ArgumentError, fn.__name__ + NAN_IN_UP, params=Fixture("nan_params"))
      for fn in TRANSFORMS],
    row(pj.prune.magnitude, ArgumentError,
        r"magnitude\(params\): tensor embed/embedding contains NaN or Inf",
        params=Fixture("inf_embedding_params")),
]


@pytest.mark.parametrize("fn, kwargs, exc, regex", ROWS)
def test_bad_input_is_refused_naming_function_argument_and_value(request, fn, kwargs, exc, regex):
  args = {k: request.getfixturevalue(v.name) if isinstance(v, Fixture) else v
          for k, v in {**VALID[fn], **kwargs}.items()}
  with pytest.raises(exc, match=regex):
    fn(**args)


@pytest.mark.parametrize("fn", [pj.prune.drop_sublayers, pj.prune.wanda],
                         ids=lambda fn: fn.__name__)
def test_valid_calls_of_the_table_work(params, fn):
  """The table's base calls are valid, so each row fails for its own argument alone."""
  result = fn(params, CFG, **{k: v for k, v in VALID[fn].items() if k not in ("params", "config")})
  assert result.config == CFG


def test_int64_calibration_ids_in_range_are_kept_exactly():
  calib = pj.prune.Calibration(np.array([[0, 96, 5]], np.int64), {})
  assert calib.tokens.dtype == np.int32
  np.testing.assert_array_equal(calib.tokens, [[0, 96, 5]])
