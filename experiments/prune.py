r"""Prune a model with one method and compare it with the dense model on held-out text.

  python -m experiments.prune --model=smollm2-135m-instruct --method=wanda --pattern=2:4 \
      --nsamples=128 --seqlen=512 --out=runs/wanda_2of4 [--export_hf] [--overwrite]

Prints the pruning report (sparsity per layer, dropped sublayers, calibration, timings) and the
perplexity of dense vs pruned on held-out text, plus next-token KL(dense || pruned) and top-1
agreement. With --out=DIR, writes DIR/run.json (this launcher's marker: flags and outputs),
DIR/checkpoint (pruned params + masks + report, orbax), DIR/report.json, and with --export_hf
also DIR/hf, a Hugging Face safetensors directory that transformers loads. Every write is atomic.

Which flags apply to which --method (a flag given to a method that would ignore it is refused):
  --sparsity                         magnitude, wanda, sparsegpt, neurons
  --pattern, --include               magnitude, wanda, sparsegpt (--pattern or --sparsity, not both)
  --wanda_variant                    wanda (unstructured sparsity only)
  --blocksize, --percdamp            sparsegpt
  --n                                drop_sublayers, drop_blocks
  --kind, --iterative, --score       drop_sublayers
  --consecutive                      drop_blocks
  --calibration, --nsamples, --seqlen, --seed, --batch_size    every method but magnitude
  --eval_source, --eval_seqlen, --eval_windows                 every method
  --export_hf, --overwrite           only with --out

--out must be new or an empty directory. --overwrite replaces the outputs of an earlier run of
this launcher in DIR (recognised by DIR/run.json) and nothing else: a non-empty DIR without that
marker is refused, files of your own in DIR are left alone, an earlier output this run would not
rewrite (DIR/hf without --export_hf) is refused rather than left stale or deleted, and an --out
that contains the input --model (or lies inside it) is refused.

Every flag is checked before the model is loaded; after loading, the checks that need its config
(N:M divisibility, how many sublayers or blocks exist) and the held-out text run before
calibration and pruning. A refused flag prints one line on stderr and exits with status 2.
"""

import json
import os
import sys

from absl import flags, logging

from experiments import _common

PROG = "experiments.prune"
METHODS = ("magnitude", "wanda", "sparsegpt", "neurons", "drop_sublayers", "drop_blocks")
INTRA = ("magnitude", "wanda", "sparsegpt")
DROPS = ("drop_sublayers", "drop_blocks")
CALIBRATED = tuple(m for m in METHODS if m != "magnitude")
# flag -> the methods that read it; given explicitly to any other method it is refused.
APPLIES = {
    "sparsity": INTRA + ("neurons",),
    "pattern": INTRA,
    "include": INTRA,
    "wanda_variant": ("wanda",),
    "blocksize": ("sparsegpt",),
    "percdamp": ("sparsegpt",),
    "n": DROPS,
    "kind": ("drop_sublayers",),
    "iterative": ("drop_sublayers",),
    "score": ("drop_sublayers",),
    "consecutive": ("drop_blocks",),
    "calibration": CALIBRATED,
    "nsamples": CALIBRATED,
    "seqlen": CALIBRATED,
    "seed": CALIBRATED,
    "batch_size": CALIBRATED,
}
# Entries of --out this launcher writes; the marker lists those of each run.
CHECKPOINT, REPORT, HF = "checkpoint", "report.json", "hf"
OWNED = (_common.MARKER, CHECKPOINT, REPORT, HF)

flags.DEFINE_string("model", "smollm2-135m-instruct",
                    "Registered model name, local Hugging Face directory, or .gguf file.")
flags.DEFINE_enum("method", "wanda", list(METHODS), "Pruning method.")
flags.DEFINE_float("sparsity", 0.5, "Unstructured sparsity in [0, 1) (intra-layer methods; "
                   "fraction of MLP channels for --method=neurons).")
flags.DEFINE_string("pattern", None, "N:M pattern such as 2:4 or 4:8, or a sparsity such as 0.5 "
                    "(magnitude, wanda, sparsegpt; give it or --sparsity, not both).")
flags.DEFINE_list("include", None, "fnmatch patterns over linears to prune, e.g. "
                  "'mlp/*,attn/o_proj' (default: all seven linears of every block).")
flags.DEFINE_bool("wanda_variant", False, "Wanda's cumulative-threshold (alpha) variant "
                  "(unstructured sparsity only).")
flags.DEFINE_integer("blocksize", 128, "SparseGPT: inputs per lazy-update block (a multiple of m "
                     "for N:M).")
flags.DEFINE_float("percdamp", 0.01, "SparseGPT: damping as a fraction of mean(diag H), > 0.")
flags.DEFINE_integer("n", 4, "Drop methods: number of sublayers / blocks to drop, >= 0.")
flags.DEFINE_enum("kind", "attn", ["attn", "mlp", "joint"], "drop_sublayers: which sublayers.")
flags.DEFINE_bool("iterative", False, "drop_sublayers: drop one, re-score, repeat.")
flags.DEFINE_enum("score", "residual", ["residual", "no_norm"],
                  "drop_sublayers: cos(X, X + F(norm X)) or cos(norm X, F(norm X)).")
flags.DEFINE_bool("consecutive", False, "drop_blocks: drop the best window of n blocks.")
flags.DEFINE_string("calibration", "wikipedia", "Calibration text: wikipedia, news, or a local "
                    ".txt/.jsonl file or dataset directory.")
flags.DEFINE_integer("nsamples", 128, "Calibration windows, >= 1.")
flags.DEFINE_integer("seqlen", 512, "Tokens per calibration window, >= 2.")
flags.DEFINE_integer("seed", 0, "Calibration sampling seed, in [0, 2**32).")
flags.DEFINE_integer("batch_size", 8, "Calibration windows per jitted step, >= 1.")
flags.DEFINE_string("eval_source", None, "Held-out text for perplexity (default: the held-out "
                    "split of --calibration, or of wikipedia for magnitude).")
flags.DEFINE_integer("eval_seqlen", 512, "Tokens per perplexity window, >= 2.")
flags.DEFINE_integer("eval_windows", 32, "Held-out windows evaluated (0 = all).")
flags.DEFINE_string("out", None, "Directory for run.json, the pruned checkpoint and report.json; "
                    "must be new or empty unless --overwrite.")
flags.DEFINE_bool("export_hf", False, "Also export a Hugging Face directory to OUT/hf.")
flags.DEFINE_bool("overwrite", False, "Replace the outputs of an earlier run of this launcher in "
                  "--out (only those; a directory without its run.json is never overwritten).")
FLAGS = flags.FLAGS


def check_flags(argv) -> dict:
  """Checks every flag without loading anything heavy; returns the values the run uses.

  Returns:
    {"pattern": the Pattern (intra-layer methods), "model_path": real path or None,
     "out": absolute --out or None, "outputs": entries the run writes into --out}.

  Raises:
    app.UsageError: naming the flag, its value and what was expected.
  """
  _common.no_arguments(PROG, argv)
  method = FLAGS.method
  _common.refuse_inapplicable(PROG, method, APPLIES)
  _common.refuse_without(PROG, "export_hf", "out")
  _common.refuse_without(PROG, "overwrite", "out")

  # Imported after the checks above, which need no library: those refusals come at once.
  from prunerep_jax import validate
  from prunerep_jax.prune import linears, patterns

  pattern = None
  if method in INTRA + ("neurons",):
    sparsity = _common.checked(validate.number, PROG, "--sparsity", FLAGS.sparsity, minimum=0.0,
                               maximum=1.0, max_open=True)
    pattern = patterns.Unstructured(sparsity)
  if method in INTRA and FLAGS.pattern is not None:
    if _common.present("sparsity"):
      raise _common.usage(f"{PROG}: --pattern={FLAGS.pattern!r} and --sparsity="
                          f"{FLAGS.sparsity} both set the sparsity; give one of them")
    try:
      pattern = patterns.parse_pattern(FLAGS.pattern)
    except ValueError as e:
      raise _common.usage(f"{PROG}(--pattern={FLAGS.pattern!r}): expected 'n:m' with integers "
                          f"0 < n < m, or a sparsity in [0, 1) such as '0.5' ({e})") from None
  if method in INTRA and FLAGS.include is not None:
    if not FLAGS.include:
      raise _common.usage(f"{PROG}(--include=''): expected fnmatch patterns such as 'mlp/*'")
    for pat in FLAGS.include:  # each pattern on its own: one that matches nothing is a typo
      _common.checked(linears.select, (pat,), f"{PROG}(--include)")
  if method == "wanda" and FLAGS.wanda_variant and isinstance(pattern, patterns.NM):
    raise _common.usage(f"{PROG}: --wanda_variant needs an unstructured sparsity, got "
                        f"--pattern={FLAGS.pattern}")
  if method == "sparsegpt":
    blocksize = _common.checked(validate.integer, PROG, "--blocksize", FLAGS.blocksize,
                                minimum=1)
    _common.checked(validate.number, PROG, "--percdamp", FLAGS.percdamp, minimum=0.0,
                    min_open=True)
    if isinstance(pattern, patterns.NM) and blocksize % pattern.m:
      raise _common.usage(f"{PROG}(--blocksize={blocksize}): expected a multiple of m="
                          f"{pattern.m} of --pattern={FLAGS.pattern} (N:M groups must not "
                          "straddle blocks)")
  if method in DROPS:
    _common.checked(validate.integer, PROG, "--n", FLAGS.n, minimum=0)
  if method in CALIBRATED:
    _common.checked(validate.integer, PROG, "--nsamples", FLAGS.nsamples, minimum=1)
    _common.checked(validate.integer, PROG, "--seqlen", FLAGS.seqlen, minimum=2)
    _common.checked(validate.integer, PROG, "--batch_size", FLAGS.batch_size, minimum=1)
    _common.checked(validate.seed, PROG, FLAGS.seed, name="--seed")
    _common.source_flag(PROG, "--calibration", FLAGS.calibration)
  _common.checked(validate.integer, PROG, "--eval_seqlen", FLAGS.eval_seqlen, minimum=2)
  _common.checked(validate.integer, PROG, "--eval_windows", FLAGS.eval_windows, minimum=0)
  if FLAGS.eval_source is not None:
    _common.source_flag(PROG, "--eval_source", FLAGS.eval_source)

  model_path = _common.model_flag(PROG, FLAGS.model)
  out, outputs = None, ()
  if FLAGS.out is not None:
    outputs = (_common.MARKER, CHECKPOINT, REPORT) + ((HF,) if FLAGS.export_hf else ())
    out = _common.check_out(PROG, FLAGS.out, overwrite=FLAGS.overwrite, outputs=outputs,
                            owned=OWNED, model_path=model_path)
  return {"pattern": pattern, "model_path": model_path, "out": out, "outputs": outputs}


def check_against_config(config, pattern) -> None:
  """The flag checks that need the model's config; they run before calibration and pruning."""
  from prunerep_jax.prune import linears

  method = FLAGS.method
  if method in INTRA:
    chosen = linears.select(FLAGS.include, PROG)
    _common.checked(linears.check_nm_divides, pattern, config, chosen, f"{PROG}(--pattern)")
  if method in DROPS:
    L = config.num_layers
    if method == "drop_blocks":
      most, why = L - 1, f"the model has {L} blocks and at least one must remain"
    else:
      most = 2 * L if FLAGS.kind == "joint" else L
      what = "attention and MLP" if FLAGS.kind == "joint" else FLAGS.kind
      why = f"the model has {most} {what} sublayers"
    if FLAGS.n > most:
      raise _common.usage(f"{PROG}(--n={FLAGS.n}): expected at most {most}; {why}")


def prune_kwargs(method: str, pattern) -> dict:
  """The keyword arguments of `pj.prune.<method>` that the flags describe."""
  if method in INTRA:
    kw = {"pattern": pattern, "include": FLAGS.include}
    if method == "wanda":
      kw["use_variant"] = FLAGS.wanda_variant
    if method == "sparsegpt":
      kw.update(blocksize=FLAGS.blocksize, percdamp=FLAGS.percdamp)
    return kw
  if method == "neurons":
    return {"sparsity": pattern.sparsity}
  if method == "drop_sublayers":
    return {"n": FLAGS.n, "kind": FLAGS.kind, "iterative": FLAGS.iterative, "score": FLAGS.score}
  return {"n": FLAGS.n, "consecutive": FLAGS.consecutive}


def summarize(report: dict) -> str:
  """The report without its long per-matrix tables, for the terminal."""
  short = {k: v for k, v in report.items() if k not in ("per_matrix_sparsity", "importance")}
  return json.dumps(short, indent=2, default=str)


def write_outputs(checks: dict, result, evaluation: dict, tokenizer) -> str:
  """Writes the run's outputs into --out: the marker first (so an interrupted run still marks
  the directory as ours), then each output atomically, then the marker again, complete."""
  import prunerep_jax as pj
  from prunerep_jax import atomic
  from prunerep_jax.export import export_hf

  # Checked again: the directory may have changed while the model was pruned.
  out = _common.check_out(PROG, FLAGS.out, overwrite=FLAGS.overwrite, outputs=checks["outputs"],
                          owned=OWNED, model_path=checks["model_path"])
  settings = {f.name: f.value for f in FLAGS.get_flags_for_module(sys.modules[__name__])}
  outputs = checks["outputs"]
  _common.write_marker(PROG, out, status="writing", outputs=outputs, settings=settings)
  pj.checkpoint.save_pruned(os.path.join(out, CHECKPOINT), result, overwrite=FLAGS.overwrite)
  atomic.write_json(os.path.join(out, REPORT),
                    _common.jsonable({"report": result.report, "evaluation": evaluation}),
                    overwrite=FLAGS.overwrite, caller=PROG, name="--out")
  if FLAGS.export_hf:
    extra = {"prunerep_jax": {"method": FLAGS.method,
                              "dropped": _common.jsonable(result.report.get("dropped", [])),
                              "note": "dropped sublayers are exported as zeroed output "
                                      "projections"}}
    export_hf(os.path.join(out, HF), result.params, result.config, tokenizer,
              extra_config=extra, overwrite=FLAGS.overwrite)
  _common.write_marker(PROG, out, status="complete", outputs=outputs, settings=settings)
  return out


def main(argv):
  checks = check_flags(argv)

  import prunerep_jax as pj
  from prunerep_jax import data
  from prunerep_jax.tasks.perplexity import next_token_kl, perplexity

  logging.set_verbosity(logging.INFO)
  method = FLAGS.method
  model = pj.load(FLAGS.model)
  check_against_config(model.config, checks["pattern"])
  if model.tokenizer is None:
    raise _common.usage(f"{PROG}(--model={FLAGS.model!r}): the model has no tokenizer; the "
                        "calibration and held-out text cannot be encoded")
  # The held-out windows come first: a source too short for --eval_seqlen is refused before the
  # (long) pruning rather than after it.
  eval_source = FLAGS.eval_source or FLAGS.calibration
  eval_flag = "--eval_source" if FLAGS.eval_source else "--calibration"
  try:
    tokens, info = data.heldout_tokens(model.tokenizer, eval_source, seqlen=FLAGS.eval_seqlen,
                                       max_windows=FLAGS.eval_windows or None)
  except ValueError as e:
    raise _common.usage(f"{PROG}({eval_flag}={eval_source!r}, --eval_seqlen="
                        f"{FLAGS.eval_seqlen}): {e}") from None
  kwargs = prune_kwargs(method, checks["pattern"])
  if method in CALIBRATED:
    try:
      kwargs["calibration"] = pj.prune.calibration(
          model.tokenizer, FLAGS.calibration, nsamples=FLAGS.nsamples, seqlen=FLAGS.seqlen,
          seed=FLAGS.seed)
    except ValueError as e:
      raise _common.usage(f"{PROG}(--calibration={FLAGS.calibration!r}, --seqlen="
                          f"{FLAGS.seqlen}): {e}") from None
    kwargs["batch_size"] = FLAGS.batch_size
  result = pj.prune.get(method)(model.params, model.config, **kwargs)
  print(f"== {method} on {FLAGS.model}")
  print(summarize(result.report))

  dense = perplexity(model.params, model.config, tokens)
  pruned = perplexity(result.params, result.config, tokens)
  kl = next_token_kl(model.params, result.params, model.config, result.config, tokens)
  evaluation = {"heldout": info, "dense_ppl": dense["ppl"], "pruned_ppl": pruned["ppl"],
                "kl_dense_pruned": kl["kl"], "top1_agreement": kl["top1_agreement"]}
  print(f"held-out {info['source']} ({tokens.shape[0]} x {tokens.shape[1]} tokens): "
        f"perplexity dense {dense['ppl']:.3f} -> pruned {pruned['ppl']:.3f}; "
        f"KL(dense||pruned) {kl['kl']:.4f} nats/token; top-1 agreement {kl['top1_agreement']:.3f}")

  if checks["out"] is not None:
    print(f"wrote {write_outputs(checks, result, evaluation, model.tokenizer)}")


if __name__ == "__main__":
  _common.run(main, PROG)
