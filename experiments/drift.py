r"""Drift in generation: the dense and the pruned model decoding side by side, step by step.

  python -m experiments.drift --model=smollm2-135m-instruct --method=drop_sublayers --kind=attn \
      --n=4 --nsamples=16 --seqlen=128 --num_prompts=4 --steps=32 --out=runs/drift_drop4attn
  python -m experiments.drift --drop=mlp:2 --prompts=my_prompts.txt --temperature=0.7 \
      --out=runs/drift_listed

Prunes the model (--method and its options, as experiments.prune takes them, or an explicit
--drop list; block drops included), then runs `analysis.drift`: both models decode --steps tokens
from every prompt in one jitted scan, free-running (each feeds back its own tokens) and
teacher-forced (the pruned model is fed the dense tokens), with per-step cos in h, z and p, KL,
1 - cos p with their second-order estimates, and token agreement. `analysis.theorem_check` then
compares the estimates with the exact values. Sampling is greedy at --temperature=0; with
--temperature > 0 both models draw with the same per-step keys from --seed.

Writes into --out (required): run.json (this launcher's marker), drift.json / .csv / .npz and the
figure drift.png, theorem_drift.json / .csv / .npz / .png, and log.txt (everything printed, plus
the library's log records). Prints progress on stderr and, on stdout, the first divergence step
and token agreement per prompt, the metrics at a few steps, the decoded texts, and the
estimate-vs-real statistics.

Every flag is checked before the model is loaded (a refusal is one line on stderr, exit status 2);
the checks that need the model (--drop layers, --n, the prompts' length plus --steps against the
context window) run before pruning. --verbosity=0 shows the library's INFO logs on the console;
they always go to log.txt.
"""

import sys

import numpy as np
from absl import flags

from experiments import _common

PROG = "experiments.drift"
NAME, THEOREM = "drift", "theorem_drift"
OUTPUTS = (_common.MARKER, _common.LOG, *_common.result_files(NAME),
           *_common.result_files(THEOREM))

_common.define_analysis_flags("the sampling of both models (--temperature > 0)")
_common.define_prompt_flags()
flags.DEFINE_integer("steps", 64, "Decoding steps, >= 1 (the prompts plus the steps must fit the "
                     "context window).")
flags.DEFINE_enum("mode", "both", ["free", "teacher", "both"], "free-running, teacher-forced, "
                  "or both in one scan.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature of both models, >= 0 (0: greedy).")
flags.DEFINE_float("analysis_temperature", 1.0, "Temperature T_a of the probability space the "
                   "metrics compare, > 0.")
flags.adopt_module_key_flags(_common)
FLAGS = flags.FLAGS


def check_flags(argv) -> dict:
  """Checks every flag without loading anything heavy; returns the values the run uses."""
  _common.no_arguments(PROG, argv)
  from prunerep_jax import validate

  steps = _common.checked(validate.integer, PROG, "--steps", FLAGS.steps, minimum=1)
  temperature = _common.checked(validate.temperature, PROG, FLAGS.temperature, allow_zero=True,
                                name="--temperature")
  a_temp = _common.checked(validate.temperature, PROG, FLAGS.analysis_temperature,
                           allow_zero=False, name="--analysis_temperature")
  _common.check_prompt_flags(PROG)
  checks = _common.check_analysis_flags(PROG, outputs=OUTPUTS, owned=OUTPUTS)
  return dict(checks, steps=steps, temperature=temperature, analysis_temperature=a_temp)


def shown_steps(steps: int) -> list[int]:
  """0, 1, 2, 4, 8, ... and the last step: a few rows that show the curve's shape."""
  picked = [0] + [2**k for k in range(0, 16) if 2**k < steps]
  return sorted(set(picked + [steps - 1]))


def _clip(text: str, width: int = 110) -> str:
  text = text.replace("\n", "\\n")
  return text if len(text) <= width else text[:width - 3] + "..."


def summary(result, theorem, texts) -> str:
  """The console summary of a drift result and its theorem check."""
  meta = result.meta
  tracks = [t for t in ("free", "teacher") if f"{t}/kl" in result.arrays]
  sampling = "greedy" if not meta["temperature"] else f"sampling at T={meta['temperature']}"
  lines = [f"== drift: {meta['prompts']} prompts, {meta['steps']} steps, {sampling}, metrics at "
           f"T_a={meta['analysis_temperature']}; {_common.pruning_line(meta['pruned'])}"]
  prompts = result.table("prompts")
  rows = []
  for b in range(meta["prompts"]):
    row = [b]
    for t in tracks:
      r = next(r for r in prompts if r["prompt"] == b and r["track"] == t)
      first = r["first_divergence"] if r["diverged"] else f">= {meta['steps']} (never)"
      row += [first, r["token_agreement"], r["mean_kl"]]
    rows.append(row + [_clip(texts[b], 48)])
  headers = ["prompt"]
  for t in tracks:
    headers += [f"{t}: first divergence", f"{t}: agreement", f"{t}: mean KL"]
  lines.append(_common.table(headers + ["prompt text"], rows))
  for t in tracks:
    recs = [r for r in prompts if r["track"] == t]
    first = [r["first_divergence"] for r in recs if r["diverged"]]
    where = (f"first divergence at step {np.median(first):g} (median; min {min(first)}, max "
             f"{max(first)})" if first else "none diverged")
    lines.append(f"{t}: {len(first)} of {len(recs)} prompts diverged within {meta['steps']} "
                 f"steps, {where}; mean token agreement "
                 f"{np.mean([r['token_agreement'] for r in recs]):.3f}")
  per_step = {(r["track"], r["step"]): r for r in result.table("summary")}
  rows = []
  for s in shown_steps(meta["steps"]):
    row = [s]
    for t in tracks:
      r = per_step[(t, s)]
      row += [r["prompts"], r["agree"], r["cos_p"], r["kl"], r["kl_estimate"]]
    rows.append(row)
  headers = ["step"]
  for t in tracks:
    headers += [f"{t}: prompts", "agree", "cos p", "KL", "KL est."]
  lines += ["per step, mean over the prompts still running:", _common.table(headers, rows)]
  by_prompt = {}
  for r in result.table("texts"):
    by_prompt.setdefault(r["prompt"], []).append(r)
  for b, recs in sorted(by_prompt.items()):
    lines.append(f"prompt {b}: {_clip(texts[b], 100)}")
    lines += [f"  {r['track']:>7}: {_clip(r['text'])}" for r in recs]
  lines.append(_common.theorem_summary(theorem))
  return "\n".join(lines)


def main(argv):
  checks = check_flags(argv)
  console = _common.Console(PROG)
  _common.console_logging(console)

  from prunerep_jax import analysis, plots

  mesh = _common.start_devices(PROG, checks["devices"])
  model = _common.load_model(PROG, console, checks, mesh)
  texts, tokens, mask = _common.prompt_batch(PROG, model, checks["steps"], "--steps")
  console.progress(f"{len(texts)} prompts, {int(mask.sum())} tokens (longest {tokens.shape[1]})")
  pruned = _common.prune_model(PROG, console, model, checks["pruning"], mesh)
  with console.stage(f"drift: {checks['steps']} steps x {len(texts)} prompts, mode={FLAGS.mode} "
                     "(one jitted scan)"):
    result = analysis.drift(model.params, pruned.params, model.config, tokens, checks["steps"],
                            pruned_config=pruned.config, mode=FLAGS.mode,
                            temperature=checks["temperature"],
                            analysis_temperature=checks["analysis_temperature"], seed=FLAGS.seed,
                            prompt_mask=mask, tokenizer=model.tokenizer, mesh=mesh)
  result = _common.annotate(result, pruned.report)
  theorem = analysis.theorem_check(result)
  console.show(summary(result, theorem, texts) + "\n")

  def write(out):
    result.save(out, NAME, overwrite=FLAGS.overwrite)
    theorem.save(out, THEOREM, overwrite=FLAGS.overwrite)
    with console.stage("figures"):
      plots.drift(out, NAME, overwrite=FLAGS.overwrite)
      plots.theorem(out, THEOREM, overwrite=FLAGS.overwrite)

  _common.write_run(PROG, console, checks, overwrite=FLAGS.overwrite, owned=OUTPUTS,
                    settings=_common.flag_settings(sys.modules[__name__]), write=write)


if __name__ == "__main__":
  _common.run(main, PROG)
