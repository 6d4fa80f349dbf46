r"""The representation hierarchy, layer by layer: each sublayer pruned alone in the dense context.

  python -m experiments.hierarchy --model=smollm2-135m-instruct --method=drop_sublayers \
      --kind=attn --n=4 --nsamples=16 --seqlen=128 --num_prompts=4 --decode_steps=32 \
      --out=runs/hierarchy_drop4attn
  python -m experiments.hierarchy --drop=attn:3,mlp:5 --lens=raw --out=runs/hierarchy_listed

Prunes the model (--method and its options, as experiments.prune takes them, or an explicit
--drop list), then for every lens in --lens runs `analysis.layerwise` on the prompts' positions
and, with --decode_steps=N > 0, on the N positions the dense model decodes greedily after them:
every attention and MLP sublayer replaced by its pruned version alone, cos / 1 - cos in h, z and p,
KL and its estimate. `analysis.theorem_check` then compares the second-order estimates with the
exact values. Block drops change the number of layers and are refused (see experiments.drift).

Writes into --out (required): run.json (this launcher's marker), for each analysed set NAME
(layerwise_<lens>, and layerwise_<lens>_decode with --decode_steps) NAME.json / .csv / .npz and
the figure NAME.png, the same for theorem_NAME, and log.txt (everything printed, plus the
library's log records). Prints progress on stderr and, per set, a table of each changed
sublayer's 1 - cos ranges in the three spaces and the estimate-vs-real statistics on stdout.

Every flag is checked before the model is loaded (a refusal is one line on stderr, exit status 2);
the checks that need the model (--drop layers, --n, the prompts' length plus --decode_steps
against the context window) run before pruning. --verbosity=0 shows the library's INFO logs on
the console; they always go to log.txt.
"""

import sys

from absl import flags

from experiments import _common

PROG = "experiments.hierarchy"
LENSES = ("final_norm", "raw")

_common.define_analysis_flags("nothing else (the dense model decodes greedily)")
_common.define_prompt_flags()
flags.DEFINE_list("lens", list(LENSES), "Logit lenses to analyse, any of final_norm (the LM head "
                  "after the final norm) and raw (the LM head on the raw residual).")
flags.DEFINE_float("temperature", 1.0, "Temperature T of the probability space p = "
                   "softmax(z / T), > 0.")
flags.DEFINE_integer("decode_steps", 0, "Also analyse this many greedy decoding positions after "
                     "the prompts, >= 0 (0: the prompt positions only).")
flags.adopt_module_key_flags(_common)
FLAGS = flags.FLAGS


def set_names(lenses, decode_steps: int) -> list[tuple[str, str, int]]:
  """(name, lens, decode_steps) of every analysed set, in run order."""
  names = [(f"layerwise_{lens}", lens, 0) for lens in lenses]
  if decode_steps:
    names += [(f"layerwise_{lens}_decode", lens, decode_steps) for lens in lenses]
  return names


def owned() -> tuple[str, ...]:
  entries = [_common.MARKER, _common.LOG]
  for name, _, _ in set_names(LENSES, 1):
    entries += [*_common.result_files(name), *_common.result_files(f"theorem_{name}")]
  return tuple(entries)


def check_flags(argv) -> dict:
  """Checks every flag without loading anything heavy; returns the values the run uses."""
  _common.no_arguments(PROG, argv)
  from prunerep_jax import validate

  lenses = tuple(FLAGS.lens)
  if not lenses or len(set(lenses)) != len(lenses) or not set(lenses) <= set(LENSES):
    raise _common.usage(f"{PROG}(--lens={','.join(lenses)!r}): expected a comma-separated list "
                        f"of one or both of {LENSES}, each once")
  temperature = _common.checked(validate.temperature, PROG, FLAGS.temperature, allow_zero=False,
                                name="--temperature")
  decode_steps = _common.checked(validate.integer, PROG, "--decode_steps", FLAGS.decode_steps,
                                 minimum=0)
  _common.check_prompt_flags(PROG)
  if FLAGS.drop is None and FLAGS.method == "drop_blocks":
    raise _common.usage(f"{PROG}(--method=drop_blocks): a layerwise counterfactual needs the "
                        "dense model's layers; dropped blocks remove them. Use experiments.drift "
                        "for block drops, or --method=drop_sublayers / an intra-layer method here")
  sets = set_names(lenses, decode_steps)
  outputs = [_common.MARKER, _common.LOG]
  for name, _, _ in sets:
    outputs += [*_common.result_files(name), *_common.result_files(f"theorem_{name}")]
  checks = _common.check_analysis_flags(PROG, outputs=outputs, owned=owned())
  return dict(checks, sets=sets, temperature=temperature, decode_steps=decode_steps)


def summary(result, theorem) -> str:
  """The console summary of one layerwise result and its theorem check."""
  from prunerep_jax.analysis.results import summarize

  meta = result.meta
  stats = {(r["layer"], r["sublayer"], r["metric"]): r for r in result.table("summary")}
  where = (f"{meta['decode_steps']} decoding positions" if meta["decode_steps"]
           else "prompt positions")
  lines = [f"== layerwise, lens={meta['lens']}, T={meta['temperature']}: {meta['batch']} prompts, "
           f"{where}; each sublayer pruned alone in the dense context",
           "1 - cos between the dense and the counterfactual state: mean [min, max] over "
           "positions"]
  rows, unchanged, changed = [], [], []
  for l in range(meta["num_layers"]):
    for sub in ("attn", "mlp"):
      if not stats[(l, sub, "one_minus_cos_h")]["max"]:  # exactly 0 (or no position): untouched
        unchanged.append(f"{sub} {l}")
        continue
      changed.append((l, sub))
      rows.append([l, sub] + [_common.span(stats[(l, sub, f"one_minus_cos_{s}")])
                              for s in ("h", "z", "p")]
                  + [stats[(l, sub, "kl")]["mean"], stats[(l, sub, "top1_agree")]["mean"]])
  lines.append(_common.table(["layer", "sublayer", "1 - cos h", "1 - cos z", "1 - cos p",
                              "KL mean", "top-1 kept"], rows))
  if unchanged:
    lines.append(f"{len(unchanged)} sublayers unchanged by the pruning (1 - cos = 0 exactly), "
                 "not listed")
  if changed:
    valid = result.arrays["valid"]
    ranges = []
    for s in ("h", "z", "p"):
      values = result.arrays[f"cos_{s}"]
      st = [summarize(values[l, ("attn", "mlp").index(sub)], valid) for l, sub in changed]
      lo = min(x["min"] for x in st if x["min"] is not None)
      hi = max(x["max"] for x in st if x["max"] is not None)
      ranges.append(f"cos {s} [{lo:.6f}, {hi:.6f}]")
    lines.append("over the changed sublayers: " + ", ".join(ranges))
  lines.append(_common.theorem_summary(theorem))
  return "\n".join(lines)


def main(argv):
  checks = check_flags(argv)
  console = _common.Console(PROG)
  _common.console_logging(console)

  from prunerep_jax import analysis, plots

  mesh = _common.start_devices(PROG, checks["devices"])
  model = _common.load_model(PROG, console, checks, mesh)
  texts, tokens, mask = _common.prompt_batch(PROG, model, checks["decode_steps"],
                                             "--decode_steps")
  console.progress(f"{len(texts)} prompts, {int(mask.sum())} tokens (longest {tokens.shape[1]})")
  result = _common.prune_model(PROG, console, model, checks["pruning"], mesh)

  done = {}
  console.progress(f"layerwise: {len(checks['sets'])} sets ("
                   + ", ".join(name for name, _, _ in checks["sets"]) + ")")
  report = console.units("layerwise", len(checks["sets"]))
  for i, (name, lens, steps) in enumerate(checks["sets"], 1):
    lw = analysis.layerwise(model.params, model.config, tokens, result, lens=lens,
                            temperature=checks["temperature"], decode_steps=steps,
                            attention_mask=mask, mesh=mesh)
    lw = _common.annotate(lw, result.report)
    done[name] = (lw, analysis.theorem_check(lw))
    report(i, name)
  for lw, theorem in done.values():
    console.show(summary(lw, theorem) + "\n")

  def write(out):
    for name, (lw, theorem) in done.items():
      lw.save(out, name, overwrite=FLAGS.overwrite)
      theorem.save(out, f"theorem_{name}", overwrite=FLAGS.overwrite)
    with console.stage("figures"):
      for name in done:
        plots.layerwise(out, name, overwrite=FLAGS.overwrite)
        plots.theorem(out, f"theorem_{name}", overwrite=FLAGS.overwrite)

  _common.write_run(PROG, console, checks, overwrite=FLAGS.overwrite, owned=owned(),
                    settings=_common.flag_settings(sys.modules[__name__]), write=write)


if __name__ == "__main__":
  _common.run(main, PROG)
