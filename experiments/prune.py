r"""Prune a model with one method and compare it with the dense model on held-out text.

  python -m experiments.prune --model=smollm2-135m-instruct --method=wanda --sparsity=0.5 \
      --pattern=2:4 --nsamples=128 --seqlen=512 --out=runs/wanda_2of4

Prints the pruning report (sparsity per layer, dropped sublayers, calibration, timings) and the
perplexity of dense vs pruned on held-out text, plus next-token KL(dense || pruned) and top-1
agreement. With --out, writes the pruned params + masks + report (orbax) and report.json there;
with --export_hf also a Hugging Face safetensors directory DIR/hf that transformers loads.
"""

import json
import os

from absl import app, flags, logging

flags.DEFINE_string("model", "smollm2-135m-instruct",
                    "Registered model name, local Hugging Face directory, or .gguf file.")
flags.DEFINE_enum("method", "wanda", ["magnitude", "wanda", "sparsegpt", "neurons",
                                      "drop_sublayers", "drop_blocks"], "Pruning method.")
flags.DEFINE_float("sparsity", 0.5, "Unstructured sparsity in [0, 1) (intra-layer methods; "
                   "fraction of MLP channels for --method=neurons).")
flags.DEFINE_string("pattern", None, "N:M pattern such as 2:4 or 4:8 (overrides --sparsity for "
                    "magnitude, wanda, sparsegpt).")
flags.DEFINE_list("include", None, "fnmatch patterns over linears to prune, e.g. 'mlp/*,attn/o_proj' "
                  "(default: all seven linears of every block).")
flags.DEFINE_bool("wanda_variant", False, "Wanda's cumulative-threshold (alpha) variant.")
flags.DEFINE_integer("blocksize", 128, "SparseGPT: inputs per lazy-update block.")
flags.DEFINE_float("percdamp", 0.01, "SparseGPT: damping as a fraction of mean(diag H).")
flags.DEFINE_integer("n", 4, "Drop methods: number of sublayers / blocks to drop.")
flags.DEFINE_enum("kind", "attn", ["attn", "mlp", "joint"], "drop_sublayers: which sublayers.")
flags.DEFINE_bool("iterative", False, "drop_sublayers: drop one, re-score, repeat.")
flags.DEFINE_enum("score", "residual", ["residual", "no_norm"],
                  "drop_sublayers: cos(X, X + F(norm X)) or cos(norm X, F(norm X)).")
flags.DEFINE_bool("consecutive", False, "drop_blocks: drop the best window of n blocks.")
flags.DEFINE_string("calibration", "wikipedia", "Calibration text: wikipedia, news, or a local "
                    ".txt/.jsonl file or dataset directory.")
flags.DEFINE_integer("nsamples", 128, "Calibration windows.")
flags.DEFINE_integer("seqlen", 512, "Tokens per calibration window.")
flags.DEFINE_integer("seed", 0, "Calibration sampling seed.")
flags.DEFINE_integer("batch_size", 8, "Calibration windows per jitted step.")
flags.DEFINE_string("eval_source", None, "Held-out text for perplexity (default: the held-out "
                    "split of --calibration).")
flags.DEFINE_integer("eval_seqlen", 512, "Tokens per perplexity window.")
flags.DEFINE_integer("eval_windows", 32, "Held-out windows evaluated (0 = all).")
flags.DEFINE_string("out", None, "Directory for the pruned checkpoint and report.json.")
flags.DEFINE_bool("export_hf", False, "Also export a Hugging Face directory to OUT/hf.")
FLAGS = flags.FLAGS


def prune_kwargs(method: str) -> dict:
  """The keyword arguments of `pj.prune.<method>` that the flags describe."""
  pattern = FLAGS.pattern if FLAGS.pattern else FLAGS.sparsity
  if method in ("magnitude", "wanda", "sparsegpt"):
    kw = {"pattern": pattern, "include": FLAGS.include}
    if method == "wanda":
      kw["use_variant"] = FLAGS.wanda_variant
    if method == "sparsegpt":
      kw.update(blocksize=FLAGS.blocksize, percdamp=FLAGS.percdamp)
    return kw
  if method == "neurons":
    return {"sparsity": FLAGS.sparsity}
  if method == "drop_sublayers":
    return {"n": FLAGS.n, "kind": FLAGS.kind, "iterative": FLAGS.iterative, "score": FLAGS.score}
  return {"n": FLAGS.n, "consecutive": FLAGS.consecutive}


def summarize(report: dict) -> str:
  """The report without its long per-matrix tables, for the terminal."""
  short = {k: v for k, v in report.items() if k not in ("per_matrix_sparsity", "importance")}
  return json.dumps(short, indent=2, default=str)


def main(argv):
  del argv
  import prunerep_jax as pj
  from prunerep_jax import data
  from prunerep_jax.tasks.perplexity import next_token_kl, perplexity

  logging.set_verbosity(logging.INFO)
  model = pj.load(FLAGS.model)
  method = FLAGS.method
  kwargs = prune_kwargs(method)
  if method != "magnitude":
    kwargs["calibration"] = pj.prune.calibration(
        model.tokenizer, FLAGS.calibration, nsamples=FLAGS.nsamples, seqlen=FLAGS.seqlen,
        seed=FLAGS.seed)
    kwargs["batch_size"] = FLAGS.batch_size
  result = pj.prune.get(method)(model.params, model.config, **kwargs)
  print(f"== {method} on {FLAGS.model}")
  print(summarize(result.report))

  eval_source = FLAGS.eval_source or FLAGS.calibration
  tokens, info = data.heldout_tokens(model.tokenizer, eval_source, seqlen=FLAGS.eval_seqlen,
                                     max_windows=FLAGS.eval_windows or None)
  dense = perplexity(model.params, model.config, tokens)
  pruned = perplexity(result.params, result.config, tokens)
  kl = next_token_kl(model.params, result.params, model.config, result.config, tokens)
  evaluation = {"heldout": info, "dense_ppl": dense["ppl"], "pruned_ppl": pruned["ppl"],
                "kl_dense_pruned": kl["kl"], "top1_agreement": kl["top1_agreement"]}
  print(f"held-out {info['source']} ({tokens.shape[0]} x {tokens.shape[1]} tokens): "
        f"perplexity dense {dense['ppl']:.3f} -> pruned {pruned['ppl']:.3f}; "
        f"KL(dense||pruned) {kl['kl']:.4f} nats/token; top-1 agreement {kl['top1_agreement']:.3f}")

  if FLAGS.out:
    out = os.path.abspath(FLAGS.out)
    pj.checkpoint.save_pruned(os.path.join(out, "checkpoint"), result, overwrite=True)
    with open(os.path.join(out, "report.json"), "w") as f:
      json.dump({"report": result.report, "evaluation": evaluation}, f, indent=2, default=str)
    if FLAGS.export_hf:
      from prunerep_jax.export import export_hf
      extra = {"prunerep_jax": {"method": method, "dropped": result.report.get("dropped", []),
                                "note": "dropped sublayers are exported as zeroed output "
                                        "projections"}}
      export_hf(os.path.join(out, "hf"), result.params, result.config, model.tokenizer,
                extra_config=extra, overwrite=True)
    print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
