"""export_hf writes checkpoints transformers loads as ordinary models; save_pruned round trips.

Each case is a tiny random model in our layout, exported, then loaded twice: by transformers
(PyTorch CPU, fp32, eager attention; logits must equal ours to 1e-5) and by `prunerep_jax.load`
(equal Config, bit-identical params). Every weight, bias and norm scale is re-drawn at a size
that makes logits O(1): init_params' zero biases and unit norms would hide a swapped tensor.
"""

import functools
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import prunerep_jax as pj  # noqa: E402
from prunerep_jax import checkpoint, layout, validate  # noqa: E402
from prunerep_jax.export import export_hf  # noqa: E402
from prunerep_jax.prune.result import PruneResult  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer files")

TOL = 1e-5
PROMPT = 40  # longer than the Mistral window and the llama3 original context
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5)

CASES = {
    "llama": pj.Config(family="llama", bos_token_id=1, eos_token_ids=(2,), **BASE),
    # Also all Llama biases, several eos ids and a pad id.
    "llama3_rope_bias": pj.Config(
        family="llama", rope_theta=500000.0, max_position_embeddings=256,
        rope_scaling=pj.RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=16),
        qkv_bias=True, o_bias=True, mlp_bias=True, bos_token_id=1, eos_token_ids=(2, 3),
        pad_token_id=0, **BASE),
    "mistral_sliding_mqa": pj.Config(family="mistral", sliding_window=8, bos_token_id=1,
                                     eos_token_ids=(2,), **dict(BASE, num_kv_heads=1)),
    # head_dim * heads != hidden_size: head_dim must be written explicitly for Qwen2.
    "qwen2_tied": pj.Config(family="qwen2", tie_word_embeddings=True, qkv_bias=True,
                            max_position_embeddings=512,
                            **dict(BASE, hidden_size=48, head_dim=16)),
}


def _random_params(config, seed=0):
  # init_params gives the structure; only shapes are needed (eval_shape skips the slow init).
  params = jax.eval_shape(functools.partial(pj.init_params, config), jax.random.key(0))
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  new = []
  for path, leaf in leaves:
    name, shape = layout.path_str(path), leaf.shape
    if name.endswith("scale"):
      x = 1.0 + 0.3 * rng.standard_normal(shape)
    elif name.endswith("bias"):
      x = 0.3 * rng.standard_normal(shape)
    elif name == "embed/embedding":
      x = rng.standard_normal(shape) / np.sqrt(shape[-1])
    else:  # kernels [.., in, out]
      x = rng.standard_normal(shape) / np.sqrt(shape[-2])
    new.append(x.astype(np.float32))
  return jax.tree_util.tree_unflatten(treedef, new)


def _tokens(config, seed=0):
  return np.random.default_rng(seed).integers(0, config.vocab_size, (2, PROMPT), dtype=np.int32)


def _hf_model(path, dtype=torch.float32):
  return transformers.AutoModelForCausalLM.from_pretrained(
      path, attn_implementation="eager", dtype=dtype, local_files_only=True).eval()


def _hf_logits(hf_model, tokens):
  with torch.no_grad():
    out = hf_model(input_ids=torch.from_numpy(tokens.astype(np.int64)))
  return out.logits.float().numpy()


def _assert_matches_transformers(path, params, config, seed=0):
  tokens = _tokens(config, seed)
  expected = _hf_logits(_hf_model(path), tokens)
  got = np.asarray(pj.forward(params, config, tokens).logits)
  assert got.shape == expected.shape
  assert expected.std() > 0.5, "logits too flat for the tolerance to mean anything"
  diff = float(np.abs(got - expected).max())
  assert diff <= TOL, f"{path}: max |logits - HF logits| = {diff:.3g} > {TOL}"
  return diff


def _assert_bit_identical(a, b):
  flat_a, tree_a = jax.tree_util.tree_flatten(a)
  flat_b, tree_b = jax.tree_util.tree_flatten(b)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    x, y = np.ascontiguousarray(x), np.ascontiguousarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """name -> (config, params, export directory), built once per module."""
  cache = {}

  def build(name):
    if name not in cache:
      config = CASES[name]
      params = _random_params(config)
      path = export_hf(tmp_path_factory.mktemp("export") / name, params, config)
      cache[name] = (config, params, path)
    return cache[name]

  return build


@pytest.mark.parametrize("name", list(CASES))
def test_transformers_logits_match_ours(name, exported):
  config, params, path = exported(name)
  _assert_matches_transformers(path, params, config)


@pytest.mark.parametrize("name", list(CASES))
def test_load_round_trips_config_and_params(name, exported):
  config, params, path = exported(name)
  model = pj.load(path)
  assert model.config == config
  _assert_bit_identical(model.params, params)


def test_config_json_fields(exported):
  d = {}
  for name in CASES:
    with open(os.path.join(exported(name)[2], "config.json")) as f:
      d[name] = json.load(f)
  assert d["llama"]["architectures"] == ["LlamaForCausalLM"]
  assert (d["llama"]["attention_bias"], d["llama"]["tie_word_embeddings"]) == (False, False)
  assert d["llama3_rope_bias"]["rope_parameters"] == {
      "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
  assert d["llama3_rope_bias"]["eos_token_id"] == [2, 3]
  assert (d["mistral_sliding_mqa"]["model_type"], d["mistral_sliding_mqa"]["sliding_window"]) == (
      "mistral", 8)
  assert d["qwen2_tied"]["architectures"] == ["Qwen2ForCausalLM"]
  assert (d["qwen2_tied"]["head_dim"], d["qwen2_tied"]["dtype"]) == (16, "float32")
  qwen_dir = exported("qwen2_tied")[2]
  assert os.listdir(qwen_dir) and not any(n.startswith(".") for n in os.listdir(qwen_dir))


def test_dropped_attention_sublayer_still_matches(exported, tmp_path):
  config, params, _ = exported("llama")
  params = jax.tree_util.tree_map(np.copy, params)
  params["layers"]["attn"]["o_proj"]["kernel"][1] = 0.0
  info = {"dropped_sublayers": ["attn/1"],
          "note": "dropped sublayers are exported as zeroed output projections"}
  path = export_hf(tmp_path / "dropped", params, config, extra_config={"prunerep_jax": info})
  _assert_matches_transformers(path, params, config)
  assert transformers.AutoConfig.from_pretrained(path).prunerep_jax == info
  model = pj.load(path)
  assert model.config == config
  _assert_bit_identical(model.params, params)


def test_block_drop_matches(exported, tmp_path):
  config, params, _ = exported("llama3_rope_bias")
  keep = np.array([1])  # drop block 0
  small = {**params, "layers": jax.tree_util.tree_map(lambda x: x[keep], params["layers"])}
  small_config = config.replace(num_layers=1)
  path = export_hf(tmp_path / "blocks", small, small_config)
  _assert_matches_transformers(path, small, small_config)
  assert pj.load(path).config == small_config


def test_bfloat16_export(exported, tmp_path):
  config, params, _ = exported("qwen2_tied")
  path = export_hf(tmp_path / "bf16", params, config, dtype="bfloat16")
  rounded = jax.tree_util.tree_map(
      lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), params)
  hf_auto = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
  assert hf_auto.model.embed_tokens.weight.dtype == torch.bfloat16
  model = pj.load(path)
  assert model.config == config
  _assert_bit_identical(model.params, rounded)
  # bf16 weights upcast to fp32 on both sides still give the same logits.
  _assert_matches_transformers(path, rounded, config)


def test_sharded_export(exported, tmp_path):
  config, params, _ = exported("mistral_sliding_mqa")
  path = export_hf(tmp_path / "sharded", params, config, max_shard_size="40KB")
  with open(os.path.join(path, "model.safetensors.index.json")) as f:
    index = json.load(f)
  shards = set(index["weight_map"].values())
  assert len(shards) > 2 and not os.path.exists(os.path.join(path, "model.safetensors"))
  assert all(os.path.isfile(os.path.join(path, s)) for s in shards)
  _assert_matches_transformers(path, params, config)
  _assert_bit_identical(pj.load(path).params, params)


def test_tokenizer_is_saved(exported, tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  config, params, _ = exported("llama")
  vocab = {f"w{i}": i for i in range(config.vocab_size - 1)}
  vocab["<unk>"] = config.vocab_size - 1
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
  path = export_hf(tmp_path / "tok", params, config, tok)
  assert pj.load(path).tokenizer("w3 w7 w100")["input_ids"] == [3, 7, 100]


def test_refuses_existing_directory_unless_overwrite(exported, tmp_path):
  config, params, _ = exported("llama")
  target = tmp_path / "out"
  target.mkdir()
  (target / "stale.txt").write_text("old")
  with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
    export_hf(target, params, config)
  assert (target / "stale.txt").is_file()
  export_hf(target, params, config, overwrite=True)
  assert not (target / "stale.txt").exists() and (target / "model.safetensors").is_file()
  assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging or backup directory left


def test_failure_midway_leaves_no_checkpoint(exported, tmp_path):
  config, params, _ = exported("llama")

  class BrokenTokenizer:
    def save_pretrained(self, directory):
      raise RuntimeError("disk full")

  with pytest.raises(RuntimeError, match="disk full"):
    export_hf(tmp_path / "new", params, config, BrokenTokenizer())
  assert os.listdir(tmp_path) == []
  export_hf(tmp_path / "old", params, config)
  before = sorted(os.listdir(tmp_path / "old"))
  with pytest.raises(RuntimeError, match="disk full"):
    export_hf(tmp_path / "old", params, config, BrokenTokenizer(), overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["old"] and sorted(os.listdir(tmp_path / "old")) == before


def test_bad_inputs_raise_clear_errors(exported, tmp_path):
  config, params, _ = exported("llama")
  with pytest.raises(ValueError, match="export_hf\\(params\\).*shape"):
    export_hf(tmp_path / "a", params, config.replace(hidden_size=32))
  with pytest.raises(ValueError, match="missing tensors"):
    export_hf(tmp_path / "a", {k: v for k, v in params.items() if k != "lm_head"}, config)
  with pytest.raises(ValueError, match="attention_bias"):
    export_hf(tmp_path / "a", params, config.replace(qkv_bias=True))  # o_bias stays False
  with pytest.raises(ValueError, match="dtype='float16'"):
    export_hf(tmp_path / "a", params, config, dtype="float16")
  with pytest.raises(ValueError, match="would overwrite fields"):
    export_hf(tmp_path / "a", params, config, extra_config={"hidden_size": 1})
  with pytest.raises(ValueError, match="would not load back"):
    export_hf(tmp_path / "a", params, config, extra_config={"my_field": 1})
  nan = {**params, "final_norm": {"scale": np.full_like(params["final_norm"]["scale"], np.nan)}}
  with pytest.raises(ValueError, match="final_norm/scale.*NaN"):
    export_hf(tmp_path / "a", nan, config)
  assert os.listdir(tmp_path) == []  # nothing written for any bad input


def test_exported_files_get_the_umask_modes(exported, tmp_path):
  config, params, _ = exported("llama")
  old = os.umask(0o022)
  try:
    path = export_hf(tmp_path / "modes", params, config)
  finally:
    os.umask(old)
  files = sorted(os.listdir(path))
  assert files == ["config.json", "model.safetensors"]  # safetensors alone would leave 0600
  modes = {f: os.stat(os.path.join(path, f)).st_mode & 0o777 for f in files}
  assert modes == {f: 0o644 for f in files}
  assert os.stat(path).st_mode & 0o777 == 0o755


def test_finiteness_is_checked_once_before_writing(exported, tmp_path, monkeypatch):
  config, params, _ = exported("llama")
  calls = []
  real = validate.check_finite

  def counting(fn, tree, *args, **kwargs):
    calls.append((fn, len(jax.tree_util.tree_leaves(tree)), os.listdir(tmp_path)))
    return real(fn, tree, *args, **kwargs)

  monkeypatch.setattr(validate, "check_finite", counting)
  export_hf(tmp_path / "once", params, config)
  assert calls == [("export_hf", len(jax.tree_util.tree_leaves(params)), [])]


def test_unwritable_destinations_are_named(exported, tmp_path):
  config, params, _ = exported("llama")
  (tmp_path / "file").write_text("x")
  with pytest.raises(NotADirectoryError, match=r"export_hf\(directory='.*file/hf'\): cannot be "
                     "created, .*file is a file"):
    export_hf(tmp_path / "file" / "hf", params, config)
  with pytest.raises(FileExistsError, match=r"export_hf\(directory='.*file'\): exists and is a "
                     "file"):
    export_hf(tmp_path / "file", params, config, overwrite=True)
  assert os.listdir(tmp_path) == ["file"]


def _prune_result(config, params, with_masks=True):
  rng = np.random.default_rng(3)
  masks = None
  if with_masks:
    attn = params["layers"]["attn"]
    masks = {"layers": {"attn": {n: {"kernel": rng.random(attn[n]["kernel"].shape) < 0.5}
                                 for n in ("q_proj", "o_proj")}}}
  report = {"method": "magnitude", "sparsity": 0.5, "per_layer": [0.49, 0.51],
            "dropped": [], "calibration": None, "include": ["attn/q_proj", "attn/o_proj"]}
  return PruneResult(params=params, masks=masks, report=report, config=config)


def test_save_pruned_round_trip(exported, tmp_path):
  config, params, _ = exported("llama3_rope_bias")
  result = _prune_result(config, params)
  checkpoint.save_pruned(tmp_path / "p", result)
  back = checkpoint.restore_pruned(tmp_path / "p")
  assert back.config == config and back.report == result.report
  _assert_bit_identical(back.params, params)
  _assert_bit_identical(back.masks, result.masks)
  assert np.asarray(jax.tree_util.tree_leaves(back.masks)[0]).dtype == np.bool_

  # Overwriting with a mask-free result must not leave the old masks behind.
  with pytest.raises(FileExistsError, match="overwrite=True"):
    checkpoint.save_pruned(tmp_path / "p", result)
  checkpoint.save_pruned(tmp_path / "p", _prune_result(config, params, False), overwrite=True)
  back = checkpoint.restore_pruned(tmp_path / "p")
  assert back.masks is None and not (tmp_path / "p" / "masks").exists()
  assert sorted(os.listdir(tmp_path)) == ["p"]


def test_save_pruned_errors(exported, tmp_path):
  config, params, _ = exported("qwen2_tied")
  result = _prune_result(config, params)
  bad_masks = PruneResult(params, jax.tree_util.tree_map(lambda m: m.astype(np.float32),
                                                         result.masks), result.report, config)
  with pytest.raises(ValueError, match="expected bool"):
    checkpoint.save_pruned(tmp_path / "p", bad_masks)
  with pytest.raises(ValueError, match="JSON-serialisable"):
    checkpoint.save_pruned(tmp_path / "p", PruneResult(params, None, {"x": object()}, config))
  with pytest.raises(ValueError, match="shape"):
    checkpoint.save_pruned(tmp_path / "p", PruneResult(params, None, {}, config.replace(
        vocab_size=64)))
  assert os.listdir(tmp_path) == []
  checkpoint.save(tmp_path / "plain", params, config)
  with pytest.raises(ValueError, match="written by save_pruned"):
    checkpoint.restore_pruned(tmp_path / "plain")
