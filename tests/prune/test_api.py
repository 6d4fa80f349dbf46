"""pj.prune transforms on whole models: sequential calibration, exact drops, reports, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prunerep_jax as pj
from prunerep_jax.prune import patterns
from prunerep_jax.prune.wanda import wanda_mask

CFG = pj.Config(family="llama", vocab_size=97, hidden_size=32, intermediate_size=64,
                num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8)
LINEARS = [("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj"), ("attn", "o_proj"),
           ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj")]


@pytest.fixture(scope="module")
def params():
  return pj.init_params(CFG, jax.random.key(3))


@pytest.fixture(scope="module")
def calib():
  return pj.prune.Calibration(np.random.RandomState(0).randint(0, 97, (6, 16)),
                              {"source": "random", "seed": 0})


def _leaves_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(
      x.shape == y.shape and np.array_equal(np.asarray(x).view(np.uint8),
                                            np.asarray(y).view(np.uint8)) for x, y in zip(la, lb))


def _rms_norm64(x, scale, eps):
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * np.asarray(scale, np.float64)


# ---------------------------------------------------------------------- zero means identical

@pytest.mark.parametrize("method, kwargs", [
    ("magnitude", dict(pattern=0.0)),
    ("wanda", dict(pattern=0.0)),
    ("sparsegpt", dict(pattern=0.0)),
    ("neurons", dict(sparsity=0.0)),
    ("drop_sublayers", dict(n=0)),
    ("drop_blocks", dict(n=0)),
])
def test_zero_pruning_returns_bit_identical_params(params, calib, method, kwargs):
  fn = pj.prune.get(method)
  if method != "magnitude":
    kwargs = dict(kwargs, calibration=calib)
  result = fn(params, CFG, **kwargs)
  assert _leaves_equal(result.params, params)
  assert result.config == CFG


def test_inputs_are_not_modified(params, calib):
  before = jax.tree_util.tree_map(np.array, params)
  pj.prune.wanda(params, CFG, 0.5, calibration=calib)
  pj.prune.drop_sublayers(params, CFG, 2, kind="joint", calibration=calib)
  assert _leaves_equal(params, before)


# ---------------------------------------------------------------- intra-layer, whole models

@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", [0.5, "2:4"])
def test_masks_match_the_zeros_and_report(params, calib, method, pattern):
  kwargs = {} if method == "magnitude" else dict(calibration=calib)
  result = pj.prune.get(method)(params, CFG, pattern, **kwargs)
  for sub, name in LINEARS:
    w = np.asarray(result.params["layers"][sub][name]["kernel"])
    mask = np.asarray(result.masks["layers"][sub][name]["kernel"])
    assert mask.shape == w.shape and mask.dtype == bool
    assert (w[~mask] == 0).all()
    if method != "sparsegpt":  # SparseGPT updates the kept weights; the others keep them
      np.testing.assert_array_equal(w[mask], np.asarray(params["layers"][sub][name]["kernel"])[mask])
    assert result.report["per_matrix_sparsity"][f"layers/2/{sub}/{name}"] == pytest.approx(0.5)
  assert result.report["sparsity"] == pytest.approx(0.5)
  assert result.report["per_layer_sparsity"] == pytest.approx([0.5] * 3)
  np.testing.assert_array_equal(result.params["embed"]["embedding"], params["embed"]["embedding"])
  np.testing.assert_array_equal(result.params["lm_head"]["kernel"], params["lm_head"]["kernel"])


def test_wanda_is_sequential_on_the_pruned_prefix(params, calib):
  """Layer l's q/k/v mask must come from the inputs the *pruned* layers 0..l-1 produce."""
  result = pj.prune.wanda(params, CFG, 0.5, calibration=calib)
  pruned_stream = pj.forward(result.params, CFG, calib.tokens).residual
  dense_stream = pj.forward(params, CFG, calib.tokens).residual
  for l in range(CFG.num_layers):
    scale = params["layers"]["attn_norm"]["scale"][l]
    x = _rms_norm64(pruned_stream[2 * l], scale, CFG.rms_norm_eps).reshape(-1, CFG.hidden_size)
    w = np.asarray(params["layers"]["attn"]["q_proj"]["kernel"][l], np.float64)
    score = np.abs(w) * np.sqrt((x * x).mean(0))[:, None]
    k = CFG.hidden_size // 2
    expect = np.ones_like(score, bool)
    for o in range(score.shape[1]):
      expect[np.argsort(score[:, o], kind="stable")[:k], o] = False
    got = np.asarray(result.masks["layers"]["attn"]["q_proj"]["kernel"][l])
    np.testing.assert_array_equal(got, expect)
  # and the dense stream would have given a different mask in a later layer
  x = _rms_norm64(dense_stream[4], params["layers"]["attn_norm"]["scale"][2], CFG.rms_norm_eps)
  act = (x.reshape(-1, CFG.hidden_size) ** 2).mean(0)
  dense_mask = np.asarray(wanda_mask(params["layers"]["attn"]["q_proj"]["kernel"][2],
                                               jnp.asarray(act, jnp.float32),
                                               patterns.Unstructured(0.5)))
  assert (dense_mask != np.asarray(result.masks["layers"]["attn"]["q_proj"]["kernel"][2])).any()


def test_include_filter_prunes_only_the_chosen_linears(params, calib):
  result = pj.prune.wanda(params, CFG, 0.5, calibration=calib, include=("mlp/*",))
  assert set(result.masks["layers"]) == {"mlp"}
  np.testing.assert_array_equal(result.params["layers"]["attn"]["q_proj"]["kernel"],
                                params["layers"]["attn"]["q_proj"]["kernel"])
  assert result.report["include"] == ["mlp/gate_proj", "mlp/up_proj", "mlp/down_proj"]


def test_report_records_calibration_and_timings(params, calib):
  result = pj.prune.sparsegpt(params, CFG, "4:8", calibration=calib)
  assert result.report["calibration"] == {"source": "random", "seed": 0}
  assert result.report["pattern"] == "4:8"
  assert result.report["timings"]["total_s"] > 0


def test_neurons_remove_channels_equivalently_to_zeroing(params, calib):
  removed = pj.prune.neurons(params, CFG, 0.25, calibration=calib)
  zeroed = pj.prune.neurons(params, CFG, 0.25, calibration=calib, remove=False)
  assert removed.config.intermediate_size == 48
  assert removed.params["layers"]["mlp"]["down_proj"]["kernel"].shape == (3, 48, 32)
  keep = np.asarray(zeroed.masks["layers"]["mlp"]["channels"])
  assert keep.shape == (3, 64) and (keep.sum(1) == 48).all()
  a = pj.forward(removed.params, removed.config, calib.tokens).logits
  b = pj.forward(zeroed.params, zeroed.config, calib.tokens).logits
  np.testing.assert_allclose(a, b, atol=1e-5)


# ------------------------------------------------------------------------------ inter-layer

def test_dropped_sublayer_passes_the_residual_unchanged_exactly(params, calib):
  result = pj.prune.drop_sublayers(params, CFG, 2, kind="joint", calibration=calib)
  stream = pj.forward(result.params, CFG, calib.tokens).residual
  for d in result.report["dropped"]:
    i = 2 * d["layer"] + (d["sublayer"] == "mlp")
    np.testing.assert_array_equal(stream[i + 1], stream[i])


def test_drop_accepts_numpy_params(params, calib):
  numpy_params = jax.tree_util.tree_map(np.asarray, params)
  from_numpy = pj.prune.drop_sublayers(numpy_params, CFG, 2, kind="joint", calibration=calib)
  from_jax = pj.prune.drop_sublayers(params, CFG, 2, kind="joint", calibration=calib)
  assert from_numpy.report["dropped"] == from_jax.report["dropped"]
  assert _leaves_equal(from_numpy.params, from_jax.params)


def test_drop_chooses_the_highest_cosine_sublayers(params, calib):
  result = pj.prune.drop_sublayers(params, CFG, 2, kind="mlp", calibration=calib)
  stream = np.asarray(pj.forward(params, CFG, calib.tokens).residual, np.float64)
  before, after = stream[1::2], stream[2::2]  # around each MLP
  cos = (before * after).sum(-1) / np.linalg.norm(before, axis=-1) / np.linalg.norm(after, axis=-1)
  mean = cos.reshape(CFG.num_layers, -1).mean(1)
  np.testing.assert_allclose(result.report["importance"]["mlp"], mean, rtol=1e-5)
  assert sorted(d["layer"] for d in result.report["dropped"]) == sorted(np.argsort(-mean)[:2])


def test_iterative_drop_rescored_after_each_removal(params, calib):
  result = pj.prune.drop_sublayers(params, CFG, 2, kind="attn", calibration=calib, iterative=True)
  assert len(result.report["importance"]) == 2
  first = result.report["dropped"][0]["layer"]
  assert result.report["importance"][1]["attn"][first] == pytest.approx(1.0)  # now the identity
  assert result.report["dropped"][1]["layer"] != first


def test_block_drop_removes_layers_and_runs_fewer(params, calib):
  result = pj.prune.drop_blocks(params, CFG, 1, calibration=calib)
  (dropped,) = [d["layer"] for d in result.report["dropped"]]
  assert result.config.num_layers == 2
  keep = [l for l in range(3) if l != dropped]
  np.testing.assert_array_equal(result.params["layers"]["mlp"]["up_proj"]["kernel"],
                                np.asarray(params["layers"]["mlp"]["up_proj"]["kernel"])[keep])
  assert pj.forward(result.params, result.config, calib.tokens).residual.shape[0] == 5


def test_consecutive_block_drop_takes_the_most_similar_window(params, calib):
  result = pj.prune.drop_blocks(params, CFG, 2, calibration=calib, consecutive=True)
  stream = np.asarray(pj.forward(params, CFG, calib.tokens).residual, np.float64)
  inputs = stream[::2]
  def cos(a, b):
    return ((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).mean()
  windows = [cos(inputs[i], inputs[i + 2]) for i in range(2)]
  np.testing.assert_allclose(result.report["importance"]["cosine"], windows, rtol=1e-5)
  start = int(np.argmax(windows))
  assert [d["layer"] for d in result.report["dropped"]] == [start, start + 1]


# ------------------------------------ statistics that overflow (bad arguments: test_bad_input.py)

def test_overflowing_statistics_are_refused(params, calib):
  huge = jax.tree_util.tree_map(lambda x: x, params)
  # finite weights whose MLP activations overflow float32 (silu(g) * u ~ 1e60)
  for name in ("gate_proj", "up_proj"):
    huge["layers"]["mlp"][name] = {"kernel": params["layers"]["mlp"][name]["kernel"] * 1e30}
  with pytest.raises(ValueError, match=r"calibration statistics of layer 0 \(down_in, "
                     r"kind=hessian\) contain NaN or Inf"):
    pj.prune.sparsegpt(huge, CFG, 0.5, calibration=calib)
