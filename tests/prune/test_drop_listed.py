"""pj.prune.drop.drop_listed: exactly the listed sublayers dropped, the same way drop_sublayers
drops its choice; bad lists refused with the argument named."""

import jax
import numpy as np
import pytest

import prunerep_jax as pj
from prunerep_jax import validate
from prunerep_jax.prune.drop import drop_listed, drop_sublayers

CFG = pj.Config(family="llama", vocab_size=97, hidden_size=32, intermediate_size=64,
                num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def params():
  return pj.init_params(CFG, jax.random.key(5))


def _bits(tree):
  return [np.asarray(x).view(np.uint8).tobytes() for x in jax.tree_util.tree_leaves(tree)]


def test_listed_drop_equals_the_scored_drop_of_the_same_sublayers(params):
  calib = np.random.RandomState(0).randint(0, 97, (4, 12))
  scored = drop_sublayers(params, CFG, 2, kind="joint", calibration=calib)
  chosen = [(d["layer"], d["sublayer"]) for d in scored.report["dropped"]]
  listed = drop_listed(params, CFG, chosen)
  assert _bits(listed.params) == _bits(scored.params)
  assert listed.report["dropped"] == scored.report["dropped"]
  assert listed.masks is None and listed.config == CFG


def test_only_the_listed_output_projections_are_zeroed(params):
  result = drop_listed(params, CFG, [(2, "mlp"), (0, "attn")])
  layers, dense = result.params["layers"], params["layers"]
  o, down = np.asarray(layers["attn"]["o_proj"]["kernel"]), np.asarray(
      layers["mlp"]["down_proj"]["kernel"])
  assert not o[0].any() and not down[2].any()
  np.testing.assert_array_equal(o[1:], np.asarray(dense["attn"]["o_proj"]["kernel"])[1:])
  np.testing.assert_array_equal(down[:2], np.asarray(dense["mlp"]["down_proj"]["kernel"])[:2])
  assert _bits(layers["attn"]["q_proj"]) == _bits(dense["attn"]["q_proj"])
  report = result.report
  assert report["method"] == "drop_listed" and report["kind"] == "joint" and report["n"] == 2
  assert report["dropped"] == [{"layer": 2, "sublayer": "mlp"}, {"layer": 0, "sublayer": "attn"}]
  assert report["calibration"] is None and report["importance"] == {}
  assert drop_listed(params, CFG, [(1, "attn")]).report["kind"] == "attn"


def test_empty_list_returns_the_params_unchanged(params):
  result = drop_listed(params, CFG, [])
  assert result.params is params and result.report["n"] == 0 and result.report["kind"] is None


@pytest.mark.parametrize("sublayers,message", [
    ([(3, "attn")], "drop_listed(sublayers[0][0]=3): expected a layer index in [0, 3)"),
    ([(-1, "mlp")], "drop_listed(sublayers[0][0]=-1): expected a layer index in [0, 3)"),
    ([(1.0, "mlp")], "drop_listed(sublayers[0][0]=1.0): expected a layer index in [0, 3)"),
    ([(1, "ffn")], "drop_listed(sublayers[0][1]='ffn'): expected one of ('attn', 'mlp')"),
    ([(1, "mlp"), (1, "mlp")], "drop_listed(sublayers[1]=(1, 'mlp')): expected each sublayer "
     "listed once"),
    ([(1, "mlp", 2)], "drop_listed(sublayers[0]=(1, 'mlp', 2)): expected a (layer, kind) pair"),
    ("attn:1", "drop_listed(sublayers='attn:1'): expected a list of (layer, kind) pairs such as "
     "[(3, 'attn'), (5, 'mlp')]"),
])
def test_bad_lists_are_refused(params, sublayers, message):
  with pytest.raises((validate.ArgumentError, TypeError)) as e:
    drop_listed(params, CFG, sublayers)
  assert str(e.value) == message
