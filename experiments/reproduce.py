r"""The reproduction study, the project's main job: when does pruning work?

  python -m experiments.reproduce [--profile=readme] [--model=smollm2-135m-instruct] \
      [--out=runs/reproduce-readme] [--dtype=float32] [--batch_size=8] [--gen_batch_size=8]

Prunes the model along the paper's sweeps (attention / MLP / block drops, magnitude, Wanda and
SparseGPT sparsity; which points depends on --profile), evaluates every pruned model on
non-generative tasks (MMLU by option likelihood, retrieval by embeddings, perplexity) and
generative ones (GSM8K, HumanEval, greedy), compares each with the dense model, runs the analyses
of prunerep_jax.analysis at the profile's chosen settings, and writes into --out: report.md (each
claim of the paper, what we measured, whether it held), results.json / results.csv /
main_table.csv, figures/*.png, analyses/ (Result files), cells/ (the cache) and reproduce.log.

Profiles (wall time on a 2-core CPU with the default 135M model): quick <= 5 min, readme <= 15
min, full <= 60 min. Progress: one line per finished model or analysis, with an ETA.

Resuming: rerun the same command. Finished units are read from --out/cells and not recomputed; a
unit whose settings changed (another --model, --dtype, batch size or profile size) is recomputed.
--out must be new, empty, or a directory this launcher wrote (it holds run.json); nothing else in
it is touched.

--model takes any prunerep_jax.load path (a registered name, a local Hugging Face directory or a
.gguf file), so the same command runs a local 7B checkpoint (use --dtype=bfloat16 and larger
batches on an accelerator). Third-party INFO logs go to reproduce.log only; --verbosity=0 (or
higher) shows them on the console too. A refused flag prints one line on stderr and exits with
status 2.
"""

from absl import flags

from experiments import _common

PROG = "experiments.reproduce"
LOG = "reproduce.log"
OWNED = (_common.MARKER, "results.json", "results.csv", "main_table.csv", "report.md", "figures",
         "analyses", "cells", LOG)

_common.define_study_flags("reproduce", "Study size: quick (<= 5 min on 2 CPU cores), readme "
                           "(<= 15 min), full (<= 60 min).")
flags.DEFINE_bool("execute", False, "Run HumanEval completions in a sandboxed subprocess for "
                  "pass@1 (executes model-written code; off by default).")
FLAGS = flags.FLAGS


def settings() -> dict:
  return {name: getattr(FLAGS, name) for name in _common.STUDY_SETTINGS + ("execute",)}


def main(argv):
  def body(model, out, options, console, started):
    from prunerep_jax import study
    study.run(model, study.profile(FLAGS.profile), out, options, console=console,
              started=started)

  _common.run_study(argv, PROG, "reproduce", log_name=LOG, outputs=OWNED, settings=settings,
                    body=body)


if __name__ == "__main__":
  _common.run(main, PROG)
