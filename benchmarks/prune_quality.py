r"""Quality of every pruning method on one model: held-out perplexity and next-token KL to dense.

  python -m benchmarks.prune_quality --nsamples=128 --seqlen=512 --eval_windows=32

Prints a markdown table (one row per method and setting) for BUILD_NOTES.md, including the
median forward time of each pruned model on 4 held-out windows relative to the dense model's
(calls interleaved: block drops run fewer layers; zeroed weights cost the same). Every method
shares the same calibration windows (seeded) and the same held-out windows.
"""

import json
import time

from absl import app, flags, logging

flags.DEFINE_string("model", "smollm2-135m-instruct", "Model name or local path.")
flags.DEFINE_string("calibration", "wikipedia", "Calibration source.")
flags.DEFINE_integer("nsamples", 128, "Calibration windows.")
flags.DEFINE_integer("seqlen", 512, "Tokens per calibration window.")
flags.DEFINE_integer("eval_seqlen", 512, "Tokens per held-out window.")
flags.DEFINE_integer("eval_windows", 32, "Held-out windows (0 = all).")
flags.DEFINE_list("only", None, "Run only rows whose label contains one of these strings.")
flags.DEFINE_string("json_out", None, "Also write the rows as JSON here.")
FLAGS = flags.FLAGS

ROWS = [
    ("magnitude 50%", "magnitude", {"pattern": 0.5}),
    ("magnitude 2:4", "magnitude", {"pattern": "2:4"}),
    ("magnitude 4:8", "magnitude", {"pattern": "4:8"}),
    ("wanda 50%", "wanda", {"pattern": 0.5}),
    ("wanda 2:4", "wanda", {"pattern": "2:4"}),
    ("wanda 4:8", "wanda", {"pattern": "4:8"}),
    ("sparsegpt 50%", "sparsegpt", {"pattern": 0.5}),
    ("sparsegpt 2:4", "sparsegpt", {"pattern": "2:4"}),
    ("sparsegpt 4:8", "sparsegpt", {"pattern": "4:8"}),
    ("drop 4 attn", "drop_sublayers", {"n": 4, "kind": "attn"}),
    ("drop 8 attn", "drop_sublayers", {"n": 8, "kind": "attn"}),
    ("drop 4 mlp", "drop_sublayers", {"n": 4, "kind": "mlp"}),
    ("drop 8 mlp", "drop_sublayers", {"n": 8, "kind": "mlp"}),
    ("drop 4 blocks", "drop_blocks", {"n": 4}),
    ("drop 8 blocks", "drop_blocks", {"n": 8}),
]


def relative_forward_time(dense, pruned, tokens, repeats: int = 5) -> float:
  """Median forward time of the pruned model over the dense model's, calls interleaved.

  dense, pruned: (params, config) pairs. Alternating the two models' calls exposes both to the
  same background load; each is compiled (warmed up) first.
  """
  import numpy as np
  import prunerep_jax as pj

  def timed(params, config):
    t0 = time.perf_counter()
    pj.forward(params, config, tokens, capture=False).logits.block_until_ready()
    return time.perf_counter() - t0

  timed(*dense), timed(*pruned)
  pairs = [(timed(*dense), timed(*pruned)) for _ in range(repeats)]
  return float(np.median([p for _, p in pairs]) / np.median([d for d, _ in pairs]))


def main(argv):
  del argv
  import prunerep_jax as pj
  from prunerep_jax import data
  from prunerep_jax.tasks.perplexity import next_token_kl, perplexity

  logging.set_verbosity(logging.WARNING)
  model = pj.load(FLAGS.model)
  calib = pj.prune.calibration(model.tokenizer, FLAGS.calibration, nsamples=FLAGS.nsamples,
                               seqlen=FLAGS.seqlen, seed=0)
  heldout, info = data.heldout_tokens(model.tokenizer, FLAGS.calibration,
                                      seqlen=FLAGS.eval_seqlen,
                                      max_windows=FLAGS.eval_windows or None)
  dense = perplexity(model.params, model.config, heldout)
  probe = heldout[:4]
  print(f"model {FLAGS.model}; calibration {FLAGS.calibration} {FLAGS.nsamples} x {FLAGS.seqlen} "
        f"(seed 0); held-out {heldout.shape[0]} x {heldout.shape[1]} tokens; "
        f"dense perplexity {dense['ppl']:.3f}\n", flush=True)
  print("| method | sparsity | perplexity | KL(dense‖pruned) nats/token | top-1 agreement | "
        "prune time s | forward time vs dense |")
  print("|---|---|---|---|---|---|---|", flush=True)
  rows = []
  for label, method, kwargs in ROWS:
    if FLAGS.only and not any(s in label for s in FLAGS.only):
      continue
    if method != "magnitude":
      kwargs = dict(kwargs, calibration=calib)
    t0 = time.perf_counter()
    result = pj.prune.get(method)(model.params, model.config, **kwargs)
    seconds = time.perf_counter() - t0
    ppl = perplexity(result.params, result.config, heldout)
    kl = next_token_kl(model.params, result.params, model.config, result.config, heldout)
    fwd = relative_forward_time((model.params, model.config), (result.params, result.config),
                                probe)
    sparsity = result.report.get("sparsity")
    if sparsity is None:
      sparsity = ", ".join(f"{d['sublayer']}{d['layer']}" for d in result.report["dropped"])
    else:
      sparsity = f"{sparsity:.3f}"
    row = {"label": label, "sparsity": sparsity, "ppl": ppl["ppl"], "kl": kl["kl"],
           "top1": kl["top1_agreement"], "seconds": seconds, "forward_vs_dense": fwd}
    rows.append(row)
    print(f"| {label} | {sparsity} | {ppl['ppl']:.3f} | {kl['kl']:.4f} | {kl['top1_agreement']:.3f} "
          f"| {seconds:.0f} | {fwd:.2f} |", flush=True)
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump({"dense_ppl": dense["ppl"], "heldout": info, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
