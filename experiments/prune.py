r"""Prune a model with one method and compare it with the dense model on held-out text.

  python -m experiments.prune --model=smollm2-135m-instruct --method=wanda --pattern=2:4 \
      --nsamples=128 --seqlen=512 --out=runs/wanda_2of4 [--export_hf] [--overwrite]

Shows progress on stderr and, at the end, a summary on stdout: what was pruned, sparsity per layer
(or the dropped sublayers), timings, and the perplexity of dense vs pruned on held-out text with
next-token KL(dense || pruned) and top-1 agreement. Third-party INFO logs (orbax, absl) stay off
the console unless --verbosity asks for them. With --out=DIR, writes DIR/run.json (this launcher's
marker: flags and outputs), DIR/log.txt (everything printed and logged), DIR/checkpoint (pruned
params + masks + report, orbax), DIR/report.json, and with --export_hf also DIR/hf, a Hugging
Face safetensors directory that transformers loads. Every write is atomic.

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
  --mesh, --num_devices, --dtype, --distributed (+ --coordinator_address, --num_processes,
    --process_id)                    every method (devices; see prunerep_jax.parallel)

--out must be new or an empty directory. --overwrite replaces the outputs of an earlier run of
this launcher in DIR (recognised by DIR/run.json) and nothing else: a non-empty DIR without that
marker is refused, files of your own in DIR are left alone, an earlier output this run would not
rewrite (DIR/hf without --export_hf) is refused rather than left stale or deleted, and an --out
that contains the input --model (or lies inside it) is refused.

Every flag is checked before the model is loaded; after loading, the checks that need its config
(N:M divisibility, how many sublayers or blocks exist) and the held-out text run before
calibration and pruning. A refused flag prints one line on stderr and exits with status 2.
"""

import os
import sys

from absl import flags

from experiments import _common

PROG = "experiments.prune"
# Entries of --out this launcher writes; the marker lists those of each run.
CHECKPOINT, REPORT, HF = "checkpoint", "report.json", "hf"
OWNED = (_common.MARKER, _common.LOG, CHECKPOINT, REPORT, HF)
DIRECTORIES = (CHECKPOINT, HF)

flags.DEFINE_string("model", "smollm2-135m-instruct",
                    "Registered model name, local Hugging Face directory, or .gguf file.")
_common.define_pruning_flags("Calibration sampling seed, in [0, 2**32).")
flags.DEFINE_string("eval_source", None, "Held-out text for perplexity (default: the held-out "
                    "split of --calibration, or of wikipedia for magnitude).")
flags.DEFINE_integer("eval_seqlen", 512, "Tokens per perplexity window, >= 2.")
flags.DEFINE_integer("eval_windows", 32, "Held-out windows evaluated (0 = all).")
flags.DEFINE_string("out", None, "Directory for run.json, the pruned checkpoint and report.json; "
                    "must be new or empty unless --overwrite.")
flags.DEFINE_bool("export_hf", False, "Also export a Hugging Face directory to OUT/hf.")
flags.DEFINE_bool("overwrite", False, "Replace the outputs of an earlier run of this launcher in "
                  "--out (only those; a directory without its run.json is never overwritten).")
_common.define_device_flags()
flags.adopt_module_key_flags(_common)
FLAGS = flags.FLAGS


def check_flags(argv) -> dict:
  """Checks every flag without loading anything heavy; returns the values the run uses.

  Returns:
    {"pruning": `_common.check_pruning`'s dict, "model_path": real path or None,
     "out": absolute --out or None, "outputs": entries the run writes into --out}.

  Raises:
    app.UsageError: naming the flag, its value and what was expected.
  """
  _common.no_arguments(PROG, argv)
  _common.refuse_without(PROG, "export_hf", "out")
  _common.refuse_without(PROG, "overwrite", "out")
  pruning = _common.check_pruning(PROG, _common.PRUNING_APPLIES)

  from prunerep_jax import validate

  _common.checked(validate.integer, PROG, "--eval_seqlen", FLAGS.eval_seqlen, minimum=2)
  _common.checked(validate.integer, PROG, "--eval_windows", FLAGS.eval_windows, minimum=0)
  if FLAGS.eval_source is not None:
    _common.source_flag(PROG, "--eval_source", FLAGS.eval_source)

  model_path = _common.model_flag(PROG, FLAGS.model)
  out, outputs = None, ()
  if FLAGS.out is not None:
    outputs = (_common.MARKER, _common.LOG, CHECKPOINT, REPORT) + ((HF,) if FLAGS.export_hf
                                                                    else ())
    out = _common.check_out(PROG, FLAGS.out, overwrite=FLAGS.overwrite, outputs=outputs,
                            owned=OWNED, model_path=model_path, directories=DIRECTORIES)
  return {"pruning": pruning, "model_path": model_path, "out": out, "outputs": outputs,
          "directories": DIRECTORIES, "devices": _common.check_device_flags(PROG)}


def summary(report: dict, evaluation: dict) -> str:
  """The readable end-of-run summary: what was pruned, sparsity per layer (or what was dropped),
  time, and the held-out comparison with the dense model."""
  lines = [f"pruned: {_common.pruning_line(report)}"]
  per_layer = report.get("per_layer_sparsity")
  if per_layer:
    rows = [[l, f"{s:.3f}"] for l, s in enumerate(per_layer)]
    lines.append(f"overall sparsity {report.get('sparsity', float('nan')):.4f} of the "
                 f"{report.get('prunable_weights', '?')} prunable weights; per layer:")
    lines.append(_common.table(["layer", "sparsity"], rows))
  timings = report.get("timings", {})
  if timings:
    lines.append("time: " + ", ".join(f"{k[:-2] if k.endswith('_s') else k} {v:.1f} s"
                                      for k, v in timings.items()))
  held = evaluation["heldout"]
  lines.append(f"held-out {held['source']} ({held['windows']} windows x {held['seqlen']} tokens):")
  lines.append(_common.table(
      ["model", "perplexity", "KL(dense||pruned) nats/token", "top-1 agreement"],
      [["dense", evaluation["dense_ppl"], 0.0, 1.0],
       ["pruned", evaluation["pruned_ppl"], evaluation["kl_dense_pruned"],
        evaluation["top1_agreement"]]]))
  return "\n".join(lines)


def write_outputs(out: str, result, evaluation: dict, tokenizer) -> None:
  """Writes the checkpoint, report.json and (with --export_hf) the HF directory, each atomic;
  `_common.write_run` adds the marker and the log around them."""
  import prunerep_jax as pj
  from prunerep_jax import atomic
  from prunerep_jax.export import export_hf

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


def main(argv):
  checks = check_flags(argv)
  console = _common.Console(PROG)
  _common.console_logging(console)

  import prunerep_jax as pj
  from prunerep_jax import data
  from prunerep_jax.tasks.perplexity import next_token_kl, perplexity

  mesh = _common.start_devices(PROG, checks["devices"])
  with console.stage(f"loading {FLAGS.model} ({FLAGS.dtype})"):
    model = pj.load(FLAGS.model, dtype=FLAGS.dtype, mesh=mesh)
  _common.check_pruning_against_config(PROG, model.config, checks["pruning"])
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
  with console.stage(f"pruning with {FLAGS.method}"):
    result = _common.prune_from_flags(PROG, model, checks["pruning"], mesh)
  with console.stage(f"held-out evaluation ({tokens.shape[0]} x {tokens.shape[1]} tokens)"):
    dense = perplexity(model.params, model.config, tokens, mesh=mesh)
    pruned = perplexity(result.params, result.config, tokens, mesh=mesh)
    kl = next_token_kl(model.params, result.params, model.config, result.config, tokens,
                       mesh=mesh)
  evaluation = {"heldout": info, "dense_ppl": dense["ppl"], "pruned_ppl": pruned["ppl"],
                "kl_dense_pruned": kl["kl"], "top1_agreement": kl["top1_agreement"]}
  console.show(summary(result.report, evaluation))
  if checks["out"] is not None:
    _common.write_run(PROG, console, checks, overwrite=FLAGS.overwrite, owned=OWNED,
                      settings=_common.flag_settings(sys.modules[__name__]),
                      write=lambda out: write_outputs(out, result, evaluation, model.tokenizer))


if __name__ == "__main__":
  _common.run(main, PROG)
