"""Shared tiny configs and params for the model, decoding, metrics and analysis tests.

One Llama GQA config (with EOS and pad ids) serves almost every test, so each jitted function
compiles once per session for the few shapes the tests use ([3, 12] prompts, 6 decoding steps).
Params are drawn with NumPy (no compilation, unlike `pj.init_params`): kernels with std
1/sqrt(fan_in), norm scales near 1 (not exactly 1, so a wrong norm would show), and an LM head
with std 4/sqrt(D), which makes the logits far from uniform so that greedy argmaxes do not flip on
rounding differences between two equivalent computations.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prunerep_jax as pj

# GQA (4 query heads over 2 kv heads), untied head, EOS 7 and pad 0; a short context so that the
# "steps beyond the context" errors are cheap to reach.
LLAMA = pj.Config(family="llama", vocab_size=101, hidden_size=32, intermediate_size=48,
                  num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                  max_position_embeddings=64, eos_token_ids=(7,), pad_token_id=0)
TIED = LLAMA.replace(tie_word_embeddings=True)
BATCH, PROMPT = 3, 12


def random_params(config: pj.Config, seed: int = 0, head_gain: float = 4.0) -> dict:
  """Params in `config`'s layout, float32, drawn with NumPy from `seed`."""
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    name = pj.layout.path_str(path)
    if name.endswith("scale"):
      return jnp.asarray(1.0 + 0.1 * rng.standard_normal(shape), jnp.float32)
    if name.endswith("bias"):
      return jnp.asarray(0.1 * rng.standard_normal(shape), jnp.float32)
    if name == "embed/embedding":
      return jnp.asarray(rng.standard_normal(shape), jnp.float32)
    gain = head_gain if name.startswith("lm_head") else 1.0
    return jnp.asarray(rng.normal(0.0, gain / np.sqrt(shape[-2]), shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, pj.layout.param_shapes(config),
                                          is_leaf=lambda x: isinstance(x, tuple))


@pytest.fixture(scope="session")
def draw_params():
  """`random_params(config, seed=0, head_gain=4.0)`, for tests that need another model."""
  return random_params


@pytest.fixture(scope="session")
def cfg() -> pj.Config:
  return LLAMA


@pytest.fixture(scope="session")
def params():
  return random_params(LLAMA, 0)


@pytest.fixture(scope="session")
def tied_cfg() -> pj.Config:
  return TIED


@pytest.fixture(scope="session")
def tied_params():
  return random_params(TIED, 1)


@pytest.fixture(scope="session")
def tokens():
  """[3, 12] prompt ids in [8, V): no EOS (7) and no pad (0) inside a prompt."""
  return jnp.asarray(np.random.RandomState(0).randint(8, LLAMA.vocab_size, (BATCH, PROMPT)),
                     jnp.int32)
