"""Child process of test_multi_device.py: one device vs meshes over 4 forced CPU devices.

Run as `python tests/parallel/_multi_device.py OUT.json` with XLA_FLAGS holding
--xla_force_host_platform_device_count=4 (set by the parent before this interpreter imports JAX).
Every check runs the same call on one device and on each mesh and records how far apart the
results are; the parent asserts on the numbers, one behaviour per test.
"""

import json
import sys

import jax
import numpy as np

import prunerep_jax as pj
from prunerep_jax import layout
from prunerep_jax import parallel
from prunerep_jax.tasks.perplexity import next_token_kl, perplexity

MESHES = ("data:4", "model:4", "data:2,model:2")
# Every head count and width divides by 4, so model:4 splits every linear and the vocabulary.
# Few distinct kernel shapes (32 x 32 and 32 x 16) keep the compilations per mesh few.
EVEN = pj.Config(family="llama", vocab_size=96, hidden_size=32, intermediate_size=32,
                 num_layers=2, num_heads=8, num_kv_heads=4, head_dim=4)
# 97 words and 2 kv heads do not divide by 4: embedding, k and v are replicated on model:4.
ODD = pj.Config(family="qwen2", vocab_size=97, hidden_size=32, intermediate_size=64,
                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True,
                tie_word_embeddings=True)
# SparseGPT on one linear split on its output dim and one split on its input dim over model
# (every input group's Hessian is summed over the data axis either way).
SPARSEGPT_LINEARS = ("attn/q_proj", "mlp/down_proj")
B, T, STEPS = 3, 12, 6  # B = 3 is not a multiple of the data axis (4 or 2): padding is exercised


def random_params(config, seed):
  """Params of the layout drawn with NumPy (no Flax init to compile): kernels ~ N(0, 1/fan_in),
  norm scales near 1, embeddings ~ N(0, 0.2^2) (logits of order 1, tied or not)."""
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    name = str(path[-1].key)
    if name == "scale":
      return 1.0 + 0.1 * rng.standard_normal(shape, np.float32)
    if name == "kernel":
      return rng.standard_normal(shape, np.float32) / np.sqrt(shape[-2], dtype=np.float32)
    return rng.standard_normal(shape, np.float32) * (0.1 if name == "bias" else 0.2)

  return jax.tree_util.tree_map_with_path(draw, layout.param_shapes(config),
                                          is_leaf=lambda x: isinstance(x, tuple))


def host(x):
  return np.asarray(jax.device_get(x), np.float64)


def max_abs(a, b) -> float:
  return float(np.max(np.abs(host(a) - host(b))))


def max_rel(a, b) -> float:
  """Largest |a - b| over the tree, relative to each leaf's largest |a|."""
  return max(float(np.max(np.abs(host(x) - host(y))) / max(np.max(np.abs(host(x))), 1e-30))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def trees_equal(a, b) -> bool:
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                    for x, y in zip(la, lb))


def spec_of(x) -> str:
  return str(tuple(x.sharding.spec))


def main(out_path: str) -> None:
  assert jax.device_count() == 4, jax.devices()
  rng = np.random.default_rng(0)
  params = jax.device_put(random_params(EVEN, 0))
  params_odd = jax.device_put(random_params(ODD, 1))
  tokens = rng.integers(0, EVEN.vocab_size, (B, T))
  mask = np.ones((B, T), np.int32)
  mask[1, :4] = 0  # a left-padded prompt
  calib = rng.integers(0, EVEN.vocab_size, (6, 8))  # 6 windows in batches of 4: one padded
  windows = rng.integers(0, EVEN.vocab_size, (5, 10))

  ref = {
      "forward": pj.forward(params, EVEN, tokens, mask),
      "forward_odd": pj.forward(params_odd, ODD, tokens),
      "greedy": pj.generate(params, EVEN, tokens, STEPS, prompt_mask=mask).tokens,
      "sampled": pj.generate(params, EVEN, tokens, STEPS, prompt_mask=mask, temperature=1.0,
                             seed=5).tokens,
      "wanda": pj.prune.wanda(params, EVEN, 0.5, calibration=calib, batch_size=4),
      "sparsegpt": pj.prune.sparsegpt(params, EVEN, 0.5, calibration=calib, batch_size=4,
                                      include=SPARSEGPT_LINEARS),
      "perplexity": perplexity(params, EVEN, windows, batch_size=2),
  }
  ref["neurons"] = pj.prune.neurons(params, EVEN, 0.5, calibration=calib, batch_size=4)
  ref["magnitude"] = pj.prune.magnitude(params, EVEN, "2:4")
  ref["kl"] = next_token_kl(params, ref["wanda"].params, EVEN, EVEN, windows, batch_size=2)
  pruned = ref["wanda"].params
  ref["drift"] = pj.analysis.drift(params, pruned, EVEN, tokens, STEPS, prompt_mask=mask,
                                   temperature=1.0, seed=3)
  ref["layerwise"] = pj.analysis.layerwise(params, EVEN, tokens, ref["wanda"],
                                           attention_mask=mask, batch_size=2)
  ref["subspace"] = pj.analysis.option_subspace(params, pruned, EVEN, tokens, [1, 2, 3, 4],
                                                prompt_mask=mask, batch_size=2)
  ref["drop"] = pj.prune.drop_sublayers(params, EVEN, 2, kind="joint", calibration=calib)

  results = {"logits_scale": {"even": float(np.max(np.abs(host(ref["forward"].logits)))),
                             "odd": float(np.max(np.abs(host(ref["forward_odd"].logits))))}}
  for spec in MESHES:
    mesh = parallel.make_mesh(spec)
    r = {}
    placed = parallel.shard_params(params, EVEN, mesh)
    r["q_kernel_spec"] = spec_of(placed["layers"]["attn"]["q_proj"]["kernel"])
    again = parallel.shard_params(placed, EVEN, mesh)
    r["reshard_is_noop"] = all(a is b for a, b in zip(jax.tree_util.tree_leaves(placed),
                                                      jax.tree_util.tree_leaves(again)))

    out = pj.forward(placed, EVEN, tokens, mask, mesh=mesh)
    r["logits_shape"] = list(out.logits.shape)
    r["logits_diff"] = max_abs(out.logits, ref["forward"].logits)
    r["residual_diff"] = max_abs(out.residual, ref["forward"].residual)

    if "model" in spec:  # where dims that do not divide must fall back to replication
      odd = pj.forward(params_odd, ODD, tokens, mesh=mesh)
      placed_odd = parallel.shard_params(params_odd, ODD, mesh)
      r["odd_logits_diff"] = max_abs(odd.logits, ref["forward_odd"].logits)
      r["odd_specs"] = {name: spec_of(x) for name, x in (
          ("embedding", placed_odd["embed"]["embedding"]),
          ("q_kernel", placed_odd["layers"]["attn"]["q_proj"]["kernel"]),
          ("k_kernel", placed_odd["layers"]["attn"]["k_proj"]["kernel"]))}

    r["greedy_equal"] = bool(np.array_equal(
        pj.generate(params, EVEN, tokens, STEPS, prompt_mask=mask, mesh=mesh).tokens,
        ref["greedy"]))
    if spec == "data:4":  # sampling draws the same numbers whatever the padding
      r["sampled_equal"] = bool(np.array_equal(
          pj.generate(params, EVEN, tokens, STEPS, prompt_mask=mask, temperature=1.0, seed=5,
                      mesh=mesh).tokens, ref["sampled"]))

    wanda = pj.prune.wanda(params, EVEN, 0.5, calibration=calib, batch_size=4, mesh=mesh)
    r["wanda_masks_equal"] = trees_equal(wanda.masks, ref["wanda"].masks)
    r["wanda_params_diff"] = max_rel(wanda.params, ref["wanda"].params)
    r["wanda_report_equal"] = wanda.report["sparsity"] == ref["wanda"].report["sparsity"]

    sgpt = pj.prune.sparsegpt(params, EVEN, 0.5, calibration=calib, batch_size=4,
                              include=SPARSEGPT_LINEARS, mesh=mesh)
    r["sparsegpt_params_rel"] = max_rel(ref["sparsegpt"].params, sgpt.params)
    r["sparsegpt_masks_equal"] = trees_equal(sgpt.masks, ref["sparsegpt"].masks)

    ppl = perplexity(params, EVEN, windows, batch_size=2, mesh=mesh)
    r["nll_rel"] = abs(ppl["nll"] - ref["perplexity"]["nll"]) / ref["perplexity"]["nll"]
    r["ppl_tokens"] = ppl["tokens"]
    if spec == "data:2,model:2":  # the other transforms, and two models' row sums at once
      neurons = pj.prune.neurons(params, EVEN, 0.5, calibration=calib, batch_size=4, mesh=mesh)
      r["neurons_equal"] = (trees_equal(neurons.masks, ref["neurons"].masks)
                            and trees_equal(neurons.params, ref["neurons"].params)
                            and neurons.config == ref["neurons"].config)
      magnitude = pj.prune.magnitude(params, EVEN, "2:4", mesh=mesh)
      r["magnitude_equal"] = (trees_equal(magnitude.masks, ref["magnitude"].masks)
                              and trees_equal(magnitude.params, ref["magnitude"].params))
      kl = next_token_kl(params, wanda.params, EVEN, EVEN, windows, batch_size=2, mesh=mesh)
      r["kl_abs"] = abs(kl["kl"] - ref["kl"]["kl"])
      r["top1_equal"] = kl["top1_agreement"] == ref["kl"]["top1_agreement"]
    drift = pj.analysis.drift(params, pruned, EVEN, tokens, STEPS, prompt_mask=mask,
                              temperature=1.0, seed=3, mesh=mesh)
    r["drift_tokens_equal"] = all(np.array_equal(drift.arrays[k], ref["drift"].arrays[k])
                                  for k in drift.arrays if k.endswith("tokens"))
    r["drift_curves_diff"] = max(max_abs(drift.arrays[k], ref["drift"].arrays[k])
                                 for k in drift.arrays if k.split("/")[-1] in (
                                     "kl", "kl_estimate", "cos_p", "cos_h", "agree"))
    if spec == "data:2,model:2":  # the other analyses and drop scoring
      lw = pj.analysis.layerwise(params, EVEN, tokens, ref["wanda"], attention_mask=mask,
                                 batch_size=2, mesh=mesh)
      r["layerwise_diff"] = max(max_abs(lw.arrays[k], ref["layerwise"].arrays[k])
                                for k in ("cos_h", "cos_z", "cos_p", "kl", "kl_estimate"))
      sub = pj.analysis.option_subspace(params, pruned, EVEN, tokens, [1, 2, 3, 4],
                                        prompt_mask=mask, batch_size=2, mesh=mesh)
      r["subspace_diff"] = max(max_abs(sub.arrays[k], ref["subspace"].arrays[k])
                               for k in ("kl", "subset_kl", "option_logp_dense"))
      r["subspace_choice_equal"] = bool(np.array_equal(sub.arrays["option_pruned"],
                                                       ref["subspace"].arrays["option_pruned"]))
      # A checkpoint saved from the mesh restores on one device and onto a mesh, bit for bit.
      import tempfile
      with tempfile.TemporaryDirectory() as tmp:
        pj.checkpoint.save_pruned(tmp + "/ck", wanda)
        one = pj.checkpoint.restore_pruned(tmp + "/ck")
        back = pj.checkpoint.restore_pruned(tmp + "/ck", mesh=mesh)
      r["restore_one_device"] = (trees_equal(one.params, wanda.params)
                                 and trees_equal(one.masks, wanda.masks)
                                 and len(one.params["embed"]["embedding"].devices()) == 1)
      r["restore_on_mesh"] = (trees_equal(back.params, wanda.params)
                              and spec_of(back.params["layers"]["attn"]["q_proj"]["kernel"])
                              == spec_of(parallel.shard_params(params, EVEN, mesh)[
                                  "layers"]["attn"]["q_proj"]["kernel"]))
      drop = pj.prune.drop_sublayers(params, EVEN, 2, kind="joint", calibration=calib, mesh=mesh)
      r["drop_same_choice"] = drop.report["dropped"] == ref["drop"].report["dropped"]
      r["drop_scores_diff"] = max(
          float(np.max(np.abs(np.asarray(drop.report["importance"][k])
                              - np.asarray(ref["drop"].report["importance"][k]))))
          for k in ("attn", "mlp"))
    results[spec] = r
    print(spec, r, flush=True)

  with open(out_path, "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1])
