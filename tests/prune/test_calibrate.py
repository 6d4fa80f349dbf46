"""The sequential calibration driver: statistics summed batch by batch equal the one-shot sums."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prunerep_jax as pj
from prunerep_jax import model as M
from prunerep_jax.prune import calibrate

CFG = pj.Config(family="llama", vocab_size=97, hidden_size=32, intermediate_size=64,
                num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8)
GROUPS = ("attn_in", "o_in", "mlp_in", "down_in")


@pytest.fixture(scope="module")
def params():
  return pj.init_params(CFG, jax.random.key(5))


@pytest.fixture(scope="module")
def calib():
  # 5 windows: batches of 2 pad the last batch. The calibration attention runs in query chunks
  # only when T exceeds the chunk, so the windows are one chunk plus a short second one.
  T = calibrate._QUERY_CHUNK + 24
  return pj.prune.Calibration(np.random.RandomState(1).randint(0, 97, (5, T)), {})


@pytest.fixture(scope="module")
def one_shot(params, calib):
  """{kind: [{group: float64 sum}] per layer} from the dense model's unchunked forward."""
  stream = pj.forward(params, CFG, calib.tokens, logits=False).residual  # [2L+1, N, T, D]
  ctx = M.prompt_context(CFG, jnp.ones(calib.tokens.shape, bool))
  out = {"sq_sum": [], "hessian": []}
  for l in range(CFG.num_layers):
    p = calibrate.layer_of(params["layers"], l)
    inputs = M.block(p, CFG, stream[2 * l], ctx, inputs=True).inputs
    xs = {g: np.asarray(inputs[g], np.float64).reshape(-1, inputs[g].shape[-1]) for g in GROUPS}
    out["sq_sum"].append({g: (x * x).sum(0) for g, x in xs.items()})
    out["hessian"].append({g: x.T @ x for g, x in xs.items()})
  return out


def _collect(params, calib, kind, batch_size):
  per_layer = []

  def keep(l, layer_p, stats, ntokens):
    assert ntokens == calib.tokens.size
    per_layer.append(stats)
    return layer_p, {}, {}

  new_params, _, _, _ = calibrate.sequential(params, CFG, calib, kind, keep,
                                             batch_size=batch_size)
  return new_params, per_layer


@pytest.mark.parametrize("kind", ["sq_sum", "hessian"])
@pytest.mark.parametrize("batch_size", [2, 5])
def test_batched_statistics_equal_the_one_shot_sums(params, calib, one_shot, kind, batch_size):
  new_params, per_layer = _collect(params, calib, kind, batch_size)
  assert len(per_layer) == CFG.num_layers
  for l, stats in enumerate(per_layer):
    for g in GROUPS:
      expect = one_shot[kind][l][g]
      np.testing.assert_allclose(np.asarray(stats[g], np.float64), expect, rtol=2e-5,
                                 atol=2e-5 * np.abs(expect).max(), err_msg=f"layer {l} {g}")
  # Nothing pruned: the layers written back in place are the input layers, bit for bit.
  for a, b in zip(jax.tree_util.tree_leaves(new_params), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_next_layer_sees_the_pruned_previous_layer(params, calib):
  """Layer 1's statistics come from block 0 as pruned (here: q_proj zeroed), not the dense one."""
  zero_q = lambda p: {**p, "attn": {**p["attn"], "q_proj": {"kernel": 0 * p["attn"]["q_proj"][
      "kernel"]}}}
  seen = []

  def prune(l, layer_p, stats, ntokens):
    seen.append(stats)
    return (zero_q(layer_p) if l == 0 else layer_p), {}, {}

  new_params, _, _, _ = calibrate.sequential(params, CFG, calib, "sq_sum", prune, batch_size=2)
  np.testing.assert_array_equal(new_params["layers"]["attn"]["q_proj"]["kernel"][0], 0)
  stream = pj.forward(new_params, CFG, calib.tokens, logits=False).residual
  x = M.rms_norm(params["layers"]["attn_norm"]["scale"][1], stream[2], CFG.rms_norm_eps)
  expect = (np.asarray(x, np.float64) ** 2).reshape(-1, CFG.hidden_size).sum(0)
  np.testing.assert_allclose(seen[1]["attn_in"], expect, rtol=2e-5)


def test_per_layer_outputs_come_back_stacked(params, calib):
  """What prune_layer returns per layer comes back as one [L, ...] array per leaf, in order."""
  def prune(l, layer_p, stats, ntokens):
    return layer_p, {"id": jnp.full((2, 3), l, jnp.int32), "keep": stats["down_in"] > 0}, {}

  _, stacked, _, _ = calibrate.sequential(params, CFG, calib, "sq_sum", prune, batch_size=2)
  np.testing.assert_array_equal(stacked["id"], np.arange(CFG.num_layers)[:, None, None]
                                * np.ones((1, 2, 3), np.int32))
  assert stacked["keep"].shape == (CFG.num_layers, CFG.intermediate_size)
  assert stacked["keep"].dtype == jnp.bool_


def test_donate_prunes_in_place_with_the_same_result(params, calib):
  """donate=True writes the pruned layers into the caller's buffers (which are deleted) and gives
  the same params and masks, bit for bit, as the default copy."""
  ref = pj.prune.wanda(params, CFG, 0.5, calibration=calib.tokens, batch_size=2)
  given = jax.tree_util.tree_map(jnp.copy, params)
  kernel = given["layers"]["mlp"]["up_proj"]["kernel"]
  address = kernel.unsafe_buffer_pointer()
  out = pj.prune.wanda(given, CFG, 0.5, calibration=calib.tokens, batch_size=2, donate=True)
  assert kernel.is_deleted()
  assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(given["layers"]))
  assert not given["embed"]["embedding"].is_deleted()
  pruned = out.params["layers"]["mlp"]["up_proj"]["kernel"]
  assert pruned.unsafe_buffer_pointer() == address  # the same buffer, pruned in place
  for a, b in zip(jax.tree_util.tree_leaves(out.params), jax.tree_util.tree_leaves(ref.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree_util.tree_leaves(out.masks), jax.tree_util.tree_leaves(ref.masks)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The default leaves the caller's params whole.
  assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(params))
