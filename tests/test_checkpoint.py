"""orbax checkpoints: bit-identical round trips and clear errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prunerep_jax as pj
from prunerep_jax import checkpoint

CFG = pj.Config(family="qwen2", vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=2,
                num_heads=2, num_kv_heads=1, head_dim=8, qkv_bias=True, tie_word_embeddings=True,
                eos_token_ids=(1, 2))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_round_trip_is_bit_identical(tmp_path, dtype):
  params = pj.cast(pj.init_params(CFG, jax.random.key(1)), dtype)
  checkpoint.save(tmp_path / "ck", params, CFG, extra={"note": "x", "sparsity": 0.5})
  restored, config, extra = checkpoint.restore(tmp_path / "ck")
  assert config == CFG and extra == {"note": "x", "sparsity": 0.5}
  flat_a, tree_a = jax.tree_util.tree_flatten(params)
  flat_b, tree_b = jax.tree_util.tree_flatten(restored)
  assert tree_a == tree_b
  for a, b in zip(flat_a, flat_b):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
  params = pj.init_params(CFG, jax.random.key(1))
  checkpoint.save(tmp_path / "ck", params, CFG)
  with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
    checkpoint.save(tmp_path / "ck", params, CFG)
  checkpoint.save(tmp_path / "ck", params, CFG, overwrite=True)


def test_save_rejects_params_that_do_not_fit_the_config(tmp_path):
  params = pj.init_params(CFG, jax.random.key(1))
  with pytest.raises(ValueError, match=r"layers/attn/o_proj/kernel has shape \(2, 16, 16\), "
                     r"expected \(2, 8, 16\)"):
    checkpoint.save(tmp_path / "ck", params, CFG.replace(num_heads=1))


def test_restore_errors_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match="no config.json"):
    checkpoint.restore(tmp_path / "missing")
  params = pj.init_params(CFG, jax.random.key(1))
  checkpoint.save(tmp_path / "ck", params, CFG)
  meta_path = tmp_path / "ck" / "config.json"
  meta = json.loads(meta_path.read_text())
  meta["format"] = "other/9"
  meta_path.write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="format='other/9'"):
    checkpoint.restore(tmp_path / "ck")
  meta["format"] = "prunerep_jax.checkpoint/1"
  meta["config"]["num_layers"] = 3
  meta_path.write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=r"tensor layers/attn/k_proj/bias in .* has shape \(2, 8\), "
                     r"but config.json implies \(3, 8\)"):
    checkpoint.restore(tmp_path / "ck")
