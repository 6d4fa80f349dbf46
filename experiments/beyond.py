r"""Beyond the paper: choose what to prune by its probability-space cost; recover by distillation.

  python -m experiments.beyond [--profile=readme] [--model=smollm2-135m-instruct] \
      [--out=runs/beyond-readme] [--overwrite] [--dtype=float32] [--batch_size=8]

At equal compression on one model: LLM-Drop's cosine ranking vs the KL ranking
(`drop_sublayers(score="kl")`) for attention and MLP drops; Wanda with uniform vs OWL vs
KL-allocated per-layer sparsity; pruned models before vs after `pj.recover` (KL to the dense
model). Every model is evaluated on the study's suites (MMLU agreement, retrieval, perplexity,
GSM8K / HumanEval fidelity to the dense greedy output) and by free-running drift, with the
seconds pruning and recovery took. Writes into --out: report.md (where the prescription helped
and where it did not, by explicit rules), results.json / results.csv, figures/*.png, analyses/
(drift Result files), cells/ (the cache) and beyond.log.

Profiles (wall time on a 2-core CPU with the default 135M model): quick a few minutes, readme
well under an hour, full longer (more counts, sparsities, recovered models and steps).

Resuming: rerun the same command; finished models are read from --out/cells. --overwrite
recomputes every model even when cached (the outputs are rewritten). --out must be new, empty,
or a directory this launcher wrote (it holds run.json); nothing else in it is touched. A refused
flag prints one line on stderr and exits with status 2.
"""

from absl import flags

from experiments import _common

PROG = "experiments.beyond"
LOG = "beyond.log"
OWNED = (_common.MARKER, "results.json", "results.csv", "report.md", "figures", "analyses",
         "cells", LOG)

_common.define_study_flags("beyond", "Comparison size: quick (a few minutes on 2 CPU cores), "
                           "readme (well under an hour), full (more points, longer recovery).")
flags.DEFINE_bool("overwrite", False, "Recompute every model even when --out holds it from an "
                  "earlier run of this launcher (default: resume, reusing finished models).")
FLAGS = flags.FLAGS


def settings() -> dict:
  return {name: getattr(FLAGS, name) for name in _common.STUDY_SETTINGS + ("overwrite",)}


def main(argv):
  def body(model, out, options, console, started):
    from prunerep_jax.study import beyond
    beyond.run_beyond(model, beyond.profile(FLAGS.profile), out, options, console=console,
                      started=started, fresh=FLAGS.overwrite)

  _common.run_study(argv, PROG, "beyond", log_name=LOG, outputs=OWNED, settings=settings,
                    body=body)


if __name__ == "__main__":
  _common.run(main, PROG)
