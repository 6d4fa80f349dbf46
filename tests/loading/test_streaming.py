"""`load(dtype=, mesh=)`: safetensors stream straight into the target dtype and placement, a bf16
file loaded as bf16 is bit-identical to it, GGUF casts after dequantising, bad headers fail."""

import json
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import prunerep_jax as pj  # noqa: E402
from prunerep_jax import parallel  # noqa: E402
from prunerep_jax.loading import hf  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer files")

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def _save(path, dtype):
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).to(dtype)
  model.save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
  return _save(tmp_path_factory.mktemp("bf16"), torch.bfloat16)


@pytest.fixture(scope="module")
def f32_dir(tmp_path_factory):
  return _save(tmp_path_factory.mktemp("f32"), torch.float32)


def _file_tensors(path) -> dict:
  """Every tensor of the file as torch tensors in their stored dtype (read by safetensors)."""
  return safetensors_torch.load_file(path / hf.WEIGHTS_FILE)


def _layout_value(params, config, name):
  """The [in, out] / [V, D] array our params hold for HF tensor `name`."""
  leaf_path, layer, transpose = hf.hf_table(config)[name]
  value = params
  for k in leaf_path:
    value = value[k]
  value = np.asarray(value)
  value = value if layer is None else value[layer]
  return value.T if transpose else value


def test_bf16_weights_loaded_as_bf16_are_bit_identical_to_the_file(bf16_dir):
  model = pj.load(bf16_dir, dtype="bfloat16")
  leaves = jax.tree_util.tree_leaves(model.params)
  assert all(x.dtype == jnp.bfloat16 for x in leaves)
  tensors = _file_tensors(bf16_dir)
  assert len(tensors) == len(hf.hf_table(model.config))
  for name, t in tensors.items():
    assert t.dtype == torch.bfloat16
    ours = _layout_value(model.params, model.config, name).view(np.int16)
    np.testing.assert_array_equal(ours, t.view(torch.int16).numpy(), err_msg=name)


def test_float32_weights_loaded_as_bf16_are_rounded_to_nearest_even(f32_dir):
  model = pj.load(f32_dir, dtype=jnp.bfloat16)
  for name, t in _file_tensors(f32_dir).items():
    expected = t.numpy().astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(_layout_value(model.params, model.config, name).view(np.int16),
                                  expected.view(np.int16), err_msg=name)
  # the same rounding as casting the float32 load on the device
  f32 = pj.load(f32_dir).params["layers"]["mlp"]["down_proj"]["kernel"]
  np.testing.assert_array_equal(
      np.asarray(model.params["layers"]["mlp"]["down_proj"]["kernel"]).view(np.int16),
      np.asarray(f32.astype(jnp.bfloat16)).view(np.int16))


@pytest.mark.parametrize("dtype, expected", [(None, np.float32), ("float32", np.float32),
                                             (np.float16, np.float16),
                                             ("bfloat16", ml_dtypes.bfloat16)])
def test_every_spelling_of_a_dtype_gives_that_dtype(bf16_dir, dtype, expected):
  model = pj.load(bf16_dir, dtype=dtype)
  assert {np.dtype(x.dtype) for x in jax.tree_util.tree_leaves(model.params)} == {
      np.dtype(expected)}
  upcast = np.asarray(model.params["embed"]["embedding"], np.float32)
  reference = _file_tensors(bf16_dir)["model.embed_tokens.weight"].float().numpy()
  np.testing.assert_allclose(upcast, reference, rtol=1e-3 if expected == np.float16 else 0)


@pytest.mark.parametrize("dtype", ["int8", "bf16", jnp.int32, np.float64, object()])
def test_other_dtypes_are_refused(bf16_dir, dtype):
  with pytest.raises(pj.validate.ArgumentError,
                     match=r"^load\(dtype=.*\): expected None or one of \('float32', "
                           r"'bfloat16', 'float16'\)"):
    pj.load(bf16_dir, dtype=dtype)


def test_a_mesh_places_every_leaf_on_its_sharding(bf16_dir):
  mesh = parallel.make_mesh("data:1,model:1")
  model = pj.load(bf16_dir, dtype="bfloat16", mesh=mesh)
  plain = pj.load(bf16_dir, dtype="bfloat16")
  shardings = jax.tree_util.tree_leaves(parallel.param_shardings(model.config, mesh))
  for leaf, ref, sharding in zip(jax.tree_util.tree_leaves(model.params),
                                 jax.tree_util.tree_leaves(plain.params), shardings):
    assert leaf.sharding == sharding
    np.testing.assert_array_equal(np.asarray(leaf).view(np.int16),
                                  np.asarray(ref).view(np.int16))
  with pytest.raises(pj.validate.ArgumentError, match=r"^load\(mesh='pipe:1'\)"):
    pj.load(bf16_dir, mesh="pipe:1")


def test_gguf_dequantises_to_float32_then_casts(tmp_path):
  from test_gguf import write_tiny_gguf

  path = write_tiny_gguf(tmp_path / "tiny.gguf")
  f32 = pj.load(path).params
  bf16 = pj.load(path, dtype="bfloat16").params
  for a, b in zip(jax.tree_util.tree_leaves(f32), jax.tree_util.tree_leaves(bf16)):
    assert a.dtype == jnp.float32 and b.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16)).view(np.int16),
                                  np.asarray(b).view(np.int16))


# ------------------------------------------------------------------------ corrupt headers

def _rewrite_header(src, dst, edit):
  """Copies a safetensors file with its JSON header passed through `edit(dict) -> bytes`."""
  raw = (src / hf.WEIGHTS_FILE).read_bytes()
  (n,) = struct.unpack("<Q", raw[:8])
  header = edit(json.loads(raw[8:8 + n]))
  (dst / hf.WEIGHTS_FILE).write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n:])
  (dst / hf.CONFIG_FILE).write_bytes((src / hf.CONFIG_FILE).read_bytes())
  return dst


def _shift(name, delta):
  def edit(header):
    header[name]["data_offsets"][1] += delta
    return json.dumps(header).encode()
  return edit


@pytest.mark.parametrize("edit, message", [
    (lambda h: b"{not json", r"the header is not JSON"),
    (lambda h: b"[]", r"the header is a list, not an object"),
    (_shift("model.norm.weight", 2), r"tensor model\.norm\.weight \(BF16\[32\], 64 bytes\) has "
                                     r"data offsets"),
])
def test_a_corrupt_header_names_the_file_and_the_problem(bf16_dir, tmp_path, edit, message):
  path = _rewrite_header(bf16_dir, tmp_path, edit)
  with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file "
                                       r"\(truncated or corrupt\?\): " + message):
    pj.load(path)


def test_a_header_longer_than_the_file_is_refused(bf16_dir, tmp_path):
  (tmp_path / hf.WEIGHTS_FILE).write_bytes(struct.pack("<Q", 10**9) + b"{}")
  (tmp_path / hf.CONFIG_FILE).write_bytes((bf16_dir / hf.CONFIG_FILE).read_bytes())
  with pytest.raises(ValueError, match=r"the header claims 1000000000 bytes but the file has 10"):
    pj.load(tmp_path)


def test_values_the_target_dtype_cannot_hold_are_refused(f32_dir, tmp_path):
  import shutil

  import safetensors.numpy

  path = tmp_path / "model"
  shutil.copytree(f32_dir, path)
  name = "model.layers.1.mlp.up_proj.weight"
  tensors = safetensors.numpy.load_file(path / hf.WEIGHTS_FILE)
  tensors[name][3, 4] = 1e6  # finite in float32 and bfloat16, Inf in float16
  safetensors.numpy.save_file(tensors, path / hf.WEIGHTS_FILE)
  assert np.isfinite(np.asarray(pj.load(path, dtype="bfloat16").params["embed"]["embedding"],
                                np.float32)).all()
  with pytest.raises(ValueError, match=rf"tensor {name} holds values beyond the range of "
                                       r"float16, which become Inf"):
    pj.load(path, dtype="float16")
