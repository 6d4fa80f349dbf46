"""A tiny random model with a tiny byte-level BPE chat tokenizer, shared by the suite tests.

The tokenizer is trained in milliseconds on a few lines of text and code; byte-level, so every
string (newlines and indentation included) round-trips through encode/decode, which the
HumanEval stop handling relies on. Its vocabulary is exactly the model's.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import prunerep_jax as pj

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 300
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = [
    "The following is a multiple choice question about biology. Answer: A B C D",
    "Janet has 3 apples and buys 5 more. How many apples does she have? #### 8",
    "def add(a, b):\n    return a + b\n\nclass Point:\n    pass\n",
    "if __name__ == '__main__':\n    print(add(1, 2))\n",
] * 4


@functools.lru_cache(maxsize=None)
def tokenizer():
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(CORPUS, trainer)
  assert tok.get_vocab_size() == VOCAB
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", bos_token="<|im_start|>",
                                 chat_template=CHAT_TEMPLATE)


def config(num_layers: int = 2, intermediate_size: int = 64) -> pj.Config:
  tok = tokenizer()
  return pj.Config(family="llama", vocab_size=VOCAB, hidden_size=32,
                   intermediate_size=intermediate_size, num_layers=num_layers, num_heads=4,
                   num_kv_heads=2, head_dim=8, max_position_embeddings=4096,
                   eos_token_ids=(tok.convert_tokens_to_ids("<|im_end|>"),),
                   pad_token_id=tok.pad_token_id)


@functools.lru_cache(maxsize=None)
def params(seed: int):
  """Random params in the layout, drawn with NumPy (no compilation, unlike `pj.init_params`).

  Kernels have std 1/sqrt(fan_in) and the head 4/sqrt(D): logits far from uniform, so argmaxes
  do not flip on rounding differences between batch shapes.
  """
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    name = pj.layout.path_str(path)
    if name.endswith("scale"):
      return jnp.ones(shape, jnp.float32)
    gain = 4.0 if name.startswith("lm_head") else 1.0
    std = gain / np.sqrt(shape[-2]) if len(shape) >= 2 and "embed" not in name else 1.0
    return jnp.asarray(rng.normal(0.0, std, shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, pj.layout.param_shapes(config()),
                                          is_leaf=lambda x: isinstance(x, tuple))
