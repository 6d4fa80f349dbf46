"""Hugging Face directory loading: configs map exactly, and bad input fails naming the problem."""

import json
import os
import shutil

import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from prunerep_jax.config import RopeScaling  # noqa: E402
from prunerep_jax.loading import hf  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer files")

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def _saved_config(cls, **kwargs) -> dict:
  """The config.json dict transformers itself writes for ``cls(**kwargs)``."""
  return json.loads(cls(**kwargs).to_json_string(use_diff=True))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  """A tiny random Llama saved by transformers, single-file safetensors."""
  path = tmp_path_factory.mktemp("llama")
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
  """The same kind of model saved in several shards with a model.safetensors.index.json."""
  path = tmp_path_factory.mktemp("sharded")
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
  model.save_pretrained(path, max_shard_size="20KB")
  assert os.path.isfile(path / hf.INDEX_FILE)
  return path


@pytest.fixture
def copy_of(tmp_path):
  def copy(src):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst
  return copy


def _rewrite_tensor(path, name, fn):
  tensors = safetensors.numpy.load_file(path)
  tensors[name] = fn(tensors[name])
  safetensors.numpy.save_file(tensors, path)


# config.json -> Config


@pytest.mark.parametrize("cls", [transformers.LlamaConfig, transformers.MistralConfig,
                                 transformers.Qwen2Config])
def test_configs_transformers_writes_are_accepted(cls):
  d = _saved_config(cls)
  config = hf.config_from_hf(d)
  assert config.family == d["model_type"]
  assert config.rope_theta == d["rope_parameters"]["rope_theta"]


def test_full_config_dict_with_generic_fields_is_accepted():
  d = transformers.LlamaConfig(**TINY).to_dict()
  assert hf.config_from_hf(d).num_kv_heads == 2


def test_llama3_rope_new_and_legacy_forms_agree():
  scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
  new = _saved_config(transformers.LlamaConfig, **TINY, max_position_embeddings=131072,
                      rope_parameters={**scaling, "rope_theta": 500000.0})
  legacy = {k: v for k, v in new.items() if k != "rope_parameters"}
  legacy.update(rope_theta=500000.0, rope_scaling=scaling)
  assert "rope_theta" not in new
  assert hf.config_from_hf(new) == hf.config_from_hf(legacy)
  assert hf.config_from_hf(new).rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
  assert hf.config_from_hf(new).rope_theta == 500000.0


def test_qwen2_has_qkv_bias_but_no_o_bias():
  config = hf.config_from_hf(_saved_config(transformers.Qwen2Config, **TINY))
  assert (config.qkv_bias, config.o_bias, config.mlp_bias) == (True, False, False)
  assert config.sliding_window is None


def test_llama_attention_bias_sets_qkv_and_o_bias():
  config = hf.config_from_hf(_saved_config(transformers.LlamaConfig, **TINY,
                                           attention_bias=True, mlp_bias=True))
  assert (config.qkv_bias, config.o_bias, config.mlp_bias) == (True, True, True)


def test_mistral_sliding_window_is_kept():
  d = _saved_config(transformers.MistralConfig, **TINY, sliding_window=16)
  assert hf.config_from_hf(d).sliding_window == 16
  d["sliding_window"] = None
  assert hf.config_from_hf(d).sliding_window is None


def test_eos_list_becomes_tuple():
  d = _saved_config(transformers.LlamaConfig, **TINY, eos_token_id=[2, 7])
  assert hf.config_from_hf(d).eos_token_ids == (2, 7)


def test_unknown_model_type_is_refused():
  d = _saved_config(transformers.LlamaConfig, **TINY)
  d["model_type"] = "gpt2"
  with pytest.raises(ValueError, match=r"config\.json: field model_type='gpt2'.*llama"):
    hf.config_from_hf(d, source="config.json")


def test_unknown_config_field_is_refused():
  d = _saved_config(transformers.LlamaConfig, **TINY)
  d["quantization_config"] = {"quant_method": "gptq"}
  with pytest.raises(ValueError, match=r"unknown fields \['quantization_config'\]"):
    hf.config_from_hf(d)


@pytest.mark.parametrize("field,value,expected", [
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, "yarn"),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "dynamic"),
])
def test_unsupported_rope_type_is_refused(field, value, expected):
  d = _saved_config(transformers.LlamaConfig, **TINY)
  d.pop("rope_parameters")
  d[field] = value
  with pytest.raises(ValueError, match=rf"{field}\.rope_type='{expected}'.*'llama3'"):
    hf.config_from_hf(d)


def test_unknown_rope_key_is_refused():
  d = _saved_config(transformers.LlamaConfig, **TINY)
  d["rope_parameters"]["mrope_section"] = [2, 2]
  with pytest.raises(ValueError, match=r"rope_parameters has unknown keys \['mrope_section'\]"):
    hf.config_from_hf(d)


def test_qwen2_sliding_window_is_refused():
  d = _saved_config(transformers.Qwen2Config, **TINY)
  d["use_sliding_window"] = True
  with pytest.raises(ValueError, match=r"use_sliding_window=True is not supported"):
    hf.config_from_hf(d)


@pytest.mark.parametrize("field,value", [
    ("hidden_act", "gelu"),
    ("attention_dropout", 0.1),
    ("pretraining_tp", 2),
    ("layer_types", ["full_attention", "sliding_attention"]),
    ("rope_interleaved", True),
])
def test_unsupported_llama_values_are_refused(field, value):
  d = _saved_config(transformers.LlamaConfig, **TINY)
  d[field] = value
  with pytest.raises(ValueError, match=rf"field {field}=.*is not supported"):
    hf.config_from_hf(d)


def test_missing_core_dimension_is_refused():
  d = _saved_config(transformers.LlamaConfig, **TINY)
  del d["hidden_size"]
  with pytest.raises(ValueError, match=r"missing required fields \['hidden_size'\]"):
    hf.config_from_hf(d)


def test_invalid_value_names_the_file():
  d = _saved_config(transformers.MistralConfig, **TINY, sliding_window=16)
  d["sliding_window"] = -1
  with pytest.raises(ValueError, match=r"^cfg\.json: Config\.sliding_window=-1"):
    hf.config_from_hf(d, source="cfg.json")
  d = _saved_config(transformers.LlamaConfig, **TINY)
  d["num_attention_heads"] = 0
  with pytest.raises(ValueError, match=r"num_attention_heads=0: expected a positive integer"):
    hf.config_from_hf(d)


# Directory loading


def test_loads_kernels_transposed_and_stacked(llama_dir):
  model = hf.load_hf_dir(llama_dir)
  tensors = safetensors.numpy.load_file(llama_dir / hf.WEIGHTS_FILE)
  q = model.params["layers"]["attn"]["q_proj"]["kernel"]
  np.testing.assert_array_equal(q[1], tensors["model.layers.1.self_attn.q_proj.weight"].T)
  np.testing.assert_array_equal(model.params["lm_head"]["kernel"], tensors["lm_head.weight"].T)
  assert q.dtype == np.float32


def test_sharded_equals_single_file(llama_dir, sharded_dir):
  single = hf.load_hf_dir(llama_dir).params
  sharded = hf.load_hf_dir(sharded_dir).params
  np.testing.assert_array_equal(single["layers"]["mlp"]["down_proj"]["kernel"],
                                sharded["layers"]["mlp"]["down_proj"]["kernel"])


def test_bf16_weights_load_as_float32(tmp_path):
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).to(torch.bfloat16)
  model.save_pretrained(tmp_path)
  params = hf.load_hf_dir(tmp_path).params
  expected = model.model.embed_tokens.weight.float().detach().numpy()
  np.testing.assert_array_equal(params["embed"]["embedding"], expected)
  assert params["embed"]["embedding"].dtype == np.float32


def test_no_tokenizer_files_gives_none_with_warning(llama_dir):
  with pytest.warns(UserWarning, match="no tokenizer files"):
    assert hf.load_hf_dir(llama_dir).tokenizer is None


def test_tokenizer_files_are_loaded(llama_dir, copy_of):
  tokenizers = pytest.importorskip("tokenizers")
  path = copy_of(llama_dir)
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(
      path)
  tokenizer = hf.load_hf_dir(path).tokenizer
  assert tokenizer("hello world")["input_ids"] == [3, 4]


def test_tied_checkpoint_may_carry_lm_head(tmp_path):
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, tie_word_embeddings=True))
  model.save_pretrained(tmp_path)
  tensors = safetensors.numpy.load_file(tmp_path / hf.WEIGHTS_FILE)
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
  safetensors.numpy.save_file(tensors, tmp_path / hf.WEIGHTS_FILE)
  params = hf.load_hf_dir(tmp_path).params
  assert "lm_head" not in params


def test_missing_config_json(llama_dir, copy_of):
  path = copy_of(llama_dir)
  os.remove(path / "config.json")
  with pytest.raises(FileNotFoundError, match=r"config\.json: not found"):
    hf.load_hf_dir(path)


def test_missing_weight_file(llama_dir, copy_of):
  path = copy_of(llama_dir)
  os.remove(path / hf.WEIGHTS_FILE)
  with pytest.raises(FileNotFoundError, match=r"no model\.safetensors nor "
                                              r"model\.safetensors\.index\.json"):
    hf.load_hf_dir(path)


def test_truncated_safetensors(llama_dir, copy_of):
  path = copy_of(llama_dir)
  weights = path / hf.WEIGHTS_FILE
  size = os.path.getsize(weights)
  with open(weights, "r+b") as f:
    f.truncate(size // 2)
  with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
    hf.load_hf_dir(path)


def test_wrong_shape_tensor(llama_dir, copy_of):
  path = copy_of(llama_dir)
  name = "model.layers.1.mlp.up_proj.weight"
  _rewrite_tensor(path / hf.WEIGHTS_FILE, name, lambda w: w[:-1])
  with pytest.raises(ValueError, match=rf"{name} has shape \(47, 32\), expected \(48, 32\)"):
    hf.load_hf_dir(path)


def test_nan_tensor(llama_dir, copy_of):
  path = copy_of(llama_dir)
  name = "model.layers.0.self_attn.k_proj.weight"

  def poison(w):
    w = w.copy()
    w[3, 5] = np.nan
    return w

  _rewrite_tensor(path / hf.WEIGHTS_FILE, name, poison)
  with pytest.raises(ValueError, match=rf"tensor {name} contains NaN or Inf"):
    hf.load_hf_dir(path)


def test_missing_tensor(llama_dir, copy_of):
  path = copy_of(llama_dir)
  tensors = safetensors.numpy.load_file(path / hf.WEIGHTS_FILE)
  del tensors["model.norm.weight"]
  safetensors.numpy.save_file(tensors, path / hf.WEIGHTS_FILE)
  with pytest.raises(ValueError, match=r"missing tensors \['model\.norm\.weight'\]"):
    hf.load_hf_dir(path)


def test_unexpected_tensor(llama_dir, copy_of):
  path = copy_of(llama_dir)
  tensors = safetensors.numpy.load_file(path / hf.WEIGHTS_FILE)
  tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
  safetensors.numpy.save_file(tensors, path / hf.WEIGHTS_FILE)
  with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.0\.self_attn\.q_proj"
                                       r"\.bias"):
    hf.load_hf_dir(path)


def test_missing_shard_from_index(sharded_dir, copy_of):
  path = copy_of(sharded_dir)
  with open(path / hf.INDEX_FILE) as f:
    shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
  os.remove(path / shard)
  with pytest.raises(FileNotFoundError, match=rf"index\.json: lists shard {shard}, which does "
                                              r"not exist"):
    hf.load_hf_dir(path)


def test_unknown_field_in_directory_names_config_json(llama_dir, copy_of):
  path = copy_of(llama_dir)
  with open(path / "config.json") as f:
    d = json.load(f)
  d["rope_scaling_extra"] = 1
  with open(path / "config.json", "w") as f:
    json.dump(d, f)
  with pytest.raises(ValueError, match=r"config\.json: unknown fields \['rope_scaling_extra'\]"):
    hf.load_hf_dir(path)


# Loaded params are JAX arrays, so every transform applies; the tokenizer must fit the vocabulary.

SMALL = dict(family="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=3,
             num_heads=4, num_kv_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(directory, params, config): a tiny random model written by export_hf, no tokenizer."""
  import jax

  import prunerep_jax as pj
  from prunerep_jax.export import export_hf

  config = pj.Config(**SMALL)
  params = pj.init_params(config, jax.random.key(7))
  path = export_hf(tmp_path_factory.mktemp("exported") / "model", params, config)
  return path, params, config


def _word_tokenizer(vocab: dict, **special):
  tokenizers = pytest.importorskip("tokenizers")
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                              **special)


def test_loaded_params_are_jax_arrays_and_drop_sublayers_runs_on_them(exported):
  import jax

  import prunerep_jax as pj

  path, params, config = exported
  model = pj.load(path)
  leaves = jax.tree_util.tree_leaves(model.params)
  assert all(isinstance(x, jax.Array) and x.dtype == np.float32 for x in leaves)
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (4, 12))
  loaded = pj.prune.drop_sublayers(model.params, model.config, 2, kind="joint",
                                   calibration=tokens)
  direct = pj.prune.drop_sublayers(params, config, 2, kind="joint", calibration=tokens)
  assert loaded.report["dropped"] == direct.report["dropped"]
  for a, b in zip(jax.tree_util.tree_leaves(loaded.params),
                  jax.tree_util.tree_leaves(direct.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for d in loaded.report["dropped"]:
    proj = "o_proj" if d["sublayer"] == "attn" else "down_proj"
    assert not np.asarray(loaded.params["layers"][d["sublayer"]][proj]["kernel"][d["layer"]]).any()


def test_tokenizer_larger_than_the_vocabulary_is_refused(exported, copy_of):
  path = copy_of(exported[0])
  _word_tokenizer({"<unk>": 0, **{f"w{i}": i for i in range(1, 100)}}).save_pretrained(path)
  with pytest.raises(ValueError, match=r"the tokenizer has 100 tokens \(ids up to 99\) but the "
                                       r"model's vocab_size is 97"):
    hf.load_hf_dir(path)


def test_tokenizer_with_special_ids_past_the_vocabulary_is_refused(exported, copy_of):
  path = copy_of(exported[0])
  _word_tokenizer({"<unk>": 0, "a": 1, "</s>": 120}, eos_token="</s>").save_pretrained(path)
  with pytest.raises(ValueError, match=r"special token ids \[120\] are >= the model's "
                                       r"vocab_size 97"):
    hf.load_hf_dir(path)


def test_tokenizer_as_large_as_the_vocabulary_is_accepted(exported, copy_of):
  path = copy_of(exported[0])
  _word_tokenizer({"<unk>": 0, **{f"w{i}": i for i in range(1, 97)}}).save_pretrained(path)
  assert len(hf.load_hf_dir(path).tokenizer) == 97
