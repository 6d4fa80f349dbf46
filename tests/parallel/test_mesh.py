"""Mesh specs, partition specs and batch padding, on this process's single device (the specs are
checked on abstract meshes of any size; results on real meshes are in test_multi_device.py)."""

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

import prunerep_jax as pj
from prunerep_jax import parallel

CFG = pj.Config(family="llama", vocab_size=96, hidden_size=32, intermediate_size=64,
                num_layers=2, num_heads=8, num_kv_heads=4, head_dim=4, qkv_bias=True,
                o_bias=True, mlp_bias=True)


def abstract(data: int, model: int) -> AbstractMesh:
  return AbstractMesh((data, model), parallel.AXES)


# ---------------------------------------------------------------------------------- specs

def test_a_spec_names_each_axis_and_omitted_axes_have_size_one():
  assert parallel.parse_spec("f", "data:4,model:2") == {"data": 4, "model": 2}
  assert parallel.parse_spec("f", " model:4 ") == {"data": 1, "model": 4}


def test_make_mesh_builds_auto_data_and_model_axes():
  mesh = parallel.make_mesh("data:1,model:1")
  assert mesh.axis_names == ("data", "model")
  assert dict(mesh.shape) == {"data": 1, "model": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("spec, message", [
    ("pipe:2", r"make_mesh\(spec='pipe:2'\): expected axes from \('data', 'model'\); 'pipe' is "
               r"not one"),
    ("data", r"make_mesh\(spec='data'\): expected a mesh spec .* item 'data' is not AXIS:SIZE"),
    ("data:0", r"expected a positive integer size for axis 'data'; got '0'"),
    ("data:two", r"expected a positive integer size for axis 'data'; got 'two'"),
    ("data:1,data:1", r"expected each axis at most once; 'data' is repeated"),
    ("", r"make_mesh\(spec=''\): expected a mesh spec"),
    ("data:2,model:2", r"make_mesh\(spec='data:2,model:2'\): expected axis sizes whose product "
                       r"is the number of devices used, 1 \(all 1 devices JAX sees\); data x "
                       r"model = 2 x 2 = 4"),
])
def test_bad_specs_are_refused_naming_the_problem(spec, message):
  with pytest.raises(pj.validate.ArgumentError, match=message):
    parallel.make_mesh(spec)


def test_more_devices_than_jax_sees_are_refused():
  with pytest.raises(pj.validate.ArgumentError,
                     match=r"make_mesh\(num_devices=2\): expected None or an integer in \[1, 1\] "
                           r"\(JAX sees 1 cpu devices\)"):
    parallel.make_mesh("data:2", num_devices=2)


def test_public_functions_name_themselves_in_mesh_errors():
  params = pj.init_params(CFG, jax.random.key(0))
  with pytest.raises(pj.validate.ArgumentError, match=r"^forward\(mesh='pipe:2'\)"):
    pj.forward(params, CFG, np.zeros((1, 2), np.int32), mesh="pipe:2")
  with pytest.raises(TypeError, match=r"^generate\(mesh=4\): expected None, a "
                                      r"jax.sharding.Mesh"):
    pj.generate(params, CFG, np.zeros((1, 2), np.int32), 1, mesh=4)
  other = jax.make_mesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  with pytest.raises(pj.validate.ArgumentError, match=r"^wanda\(mesh=.*\): expected a Mesh whose "
                                                      r"axes are among \('data', 'model'\)"):
    pj.prune.wanda(params, CFG, 0.5, calibration=np.zeros((2, 4), np.int32), mesh=other)


# ------------------------------------------------------------------------ partition specs

def test_param_specs_split_linears_on_heads_and_widths_and_the_vocabulary():
  specs = parallel.param_specs(CFG, abstract(2, 4))
  layers = specs["layers"]
  out_split, in_split, bias_split = P(None, None, "model"), P(None, "model", None), P(None, "model")
  for name in ("q_proj", "k_proj", "v_proj"):
    assert layers["attn"][name] == {"kernel": out_split, "bias": bias_split}
  assert layers["attn"]["o_proj"] == {"kernel": in_split, "bias": P()}
  for name in ("gate_proj", "up_proj"):
    assert layers["mlp"][name] == {"kernel": out_split, "bias": bias_split}
  assert layers["mlp"]["down_proj"] == {"kernel": in_split, "bias": P()}
  assert layers["attn_norm"]["scale"] == P() and specs["final_norm"]["scale"] == P()
  assert specs["embed"]["embedding"] == P("model", None)
  assert specs["lm_head"]["kernel"] == P(None, "model")


def test_dims_that_do_not_divide_the_model_axis_are_replicated():
  # on model:8, 8 query heads, F = 64 and V = 96 divide; 4 kv heads do not
  specs = parallel.param_specs(CFG, abstract(1, 8))
  assert specs["layers"]["attn"]["q_proj"]["kernel"] == P(None, None, "model")
  assert specs["layers"]["attn"]["k_proj"] == {"kernel": P(), "bias": P()}
  odd = CFG.replace(vocab_size=97, intermediate_size=60)  # 60 = 4 * 15: not a multiple of 8
  specs = parallel.param_specs(odd, abstract(1, 8))
  assert specs["embed"]["embedding"] == P() and specs["lm_head"]["kernel"] == P()
  assert specs["layers"]["mlp"]["gate_proj"] == {"kernel": P(), "bias": P()}
  assert specs["layers"]["mlp"]["down_proj"]["kernel"] == P()


def test_without_a_model_axis_everything_is_replicated():
  for mesh in (None, abstract(4, 1)):
    specs = jax.tree_util.tree_leaves(parallel.param_specs(CFG, mesh),
                                      is_leaf=lambda x: isinstance(x, P))
    assert specs and all(s == P() for s in specs)


# ------------------------------------------------------------------------------- batches

def test_batches_round_up_to_the_data_axis_and_pad_with_weight_zero():
  got = list(parallel.batches(3, 8, abstract(4, 1)))
  assert len(got) == 1
  np.testing.assert_array_equal(got[0].rows, [0, 1, 2, 2])
  np.testing.assert_array_equal(got[0].weight, [1, 1, 1, 0])
  assert got[0].real == 3
  got = list(parallel.batches(10, 6, abstract(4, 2)))  # 6 rows -> 8, a multiple of data:4
  assert [b.rows.tolist() for b in got] == [list(range(8)), [8, 9, 9, 9, 9, 9, 9, 9]]
  assert [b.real for b in got] == [8, 2]
  assert got[1].weight.tolist() == [1, 1, 0, 0, 0, 0, 0, 0]


def test_without_a_mesh_batches_are_those_of_batching():
  from prunerep_jax import batching
  for a, b in zip(parallel.batches(7, 3), batching.batches(7, 3)):
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_array_equal(a.weight, b.weight)
    assert a.real == b.real


def test_shard_batch_places_rows_over_data_and_returns_the_real_count():
  mesh = parallel.make_mesh("data:1")
  x = np.arange(6).reshape(3, 2)
  placed, n = parallel.shard_batch(x, mesh)
  assert n == 3 and placed.sharding.spec == P("data")
  np.testing.assert_array_equal(placed, x)
  again, _ = parallel.shard_batch(placed, mesh)
  assert again is placed


def test_pad_rows_repeats_the_last_row_and_unpad_cuts_it_off():
  x = np.arange(6).reshape(3, 2)
  padded = parallel.pad_rows(x, 5)
  np.testing.assert_array_equal(padded, [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]])
  np.testing.assert_array_equal(parallel.unpad({"a": padded, "b": None}, 3)["a"], x)
  np.testing.assert_array_equal(parallel.unpad(padded.T, 3, axis=1), x.T)


def test_shard_params_places_every_leaf_by_its_spec():
  mesh = parallel.make_mesh("model:1")
  params = pj.init_params(CFG, jax.random.key(0))
  placed = parallel.shard_params(params, CFG, mesh)
  shardings = jax.tree_util.tree_leaves(parallel.param_shardings(CFG, mesh))
  leaves = jax.tree_util.tree_leaves(placed)
  assert len(shardings) == len(leaves)
  for leaf, sharding in zip(leaves, shardings):
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
  with pytest.raises(ValueError, match=r"shard_params\(params\): missing tensors"):
    parallel.shard_params({"embed": params["embed"]}, CFG, mesh)


def test_initialize_distributed_refuses_bad_arguments_before_touching_jax():
  with pytest.raises(pj.validate.ArgumentError, match=r"initialize_distributed\(process_id=2\): "
                                                      r"expected an integer in \[0, 1\]"):
    parallel.initialize_distributed("localhost:1234", num_processes=2, process_id=2)
  with pytest.raises(pj.validate.ArgumentError,
                     match=r"initialize_distributed\(coordinator_address='localhost'\)"):
    parallel.initialize_distributed("localhost", num_processes=2, process_id=0)
  with pytest.raises(pj.validate.ArgumentError, match=r"cpu_collectives='nccl'"):
    parallel.initialize_distributed(cpu_collectives="nccl")
