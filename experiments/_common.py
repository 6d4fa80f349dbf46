"""What the absl launchers share: one-line errors, flag checks that run before any heavy work, and
the --out discipline (a marker in every output directory, no overwrite without --overwrite, and
nothing deleted that a launcher did not write).

Every refusal is one line on stderr and exit status 2, never a traceback: flag parsing errors
(an unknown flag, --nsamples=abc), `app.UsageError` raised by a launcher's own checks, and the
ValueError / OSError the library raises for input it refuses while the run goes on.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import sys
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

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
              owned: Sequence[str], model_path: Optional[str], name: str = "--out") -> str:
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
            name=name, want_dir=not entry.endswith(".json"))
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
