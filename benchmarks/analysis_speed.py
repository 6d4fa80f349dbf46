r"""Speed and memory of the drift and layerwise analyses, against the reference approach.

  python -m benchmarks.analysis_speed                  # full run: ~15-25 min on 2 quiet cores
  python -m benchmarks.analysis_speed --quick          # smoke run with small sizes, ~2-3 min
  python -m benchmarks.analysis_speed --parts=layerwise --layerwise_len=512   # the issue's 8 x 512

Setup (untimed, in its own subprocess): the default model (smollm2-135m-instruct, float32) is
pruned (--pruning: drop_attn = the 4 most redundant attention sublayers by the library's residual
score, or wanda = Wanda unstructured 50%; calibration 16 x 256 tokens of the gensim Wikipedia
sample, seed 0) and both the dense and the pruned model are exported with
`prunerep_jax.export.export_hf` into --workdir. Both sides load those same two directories. Prompts
are windows of --prompt_len tokens of the same Wikipedia sample (seed 1), all of one length, so
the reference needs no padding; layerwise tokens are --layerwise_batch windows of
--layerwise_len tokens (seed 2).

Drift, ours: `pj.analysis.drift(dense, pruned, config, prompts, steps, mode="free",
eos_token_ids=())`: greedy, both models in one jitted scan, all prompts batched. The reference
(`benchmarks/torch_reference.py`): prompt by prompt, two transformers `generate` calls
(LlamaForCausalLM on PyTorch CPU, float32, keeping every step's hidden states and logits), then the
same metrics step by step in Python. EOS is off on both sides, so every run decodes exactly
`steps` tokens. Before any timing, both run a short check (--check_prompts x --check_steps) whose
tokens must be identical and whose metrics must agree to float tolerance (a token split at a
near-tie of the top two logits, which float rounding may decide either way, ends the comparison
of that prompt at that step). Our main runs also time plain `pj.generate` of both models on the
same prompts (drift / generate = what the analysis adds to decoding).

Layerwise: `pj.analysis.layerwise(dense, config, tokens, pruned_params)` against the plain
`pj.forward(dense, config, tokens, capture=False)` on the same tokens. The default is 8 x 128
tokens, not the issue's 8 x 512, to keep the full run within ~25 minutes: layerwise applies the
LM head (and the metric reductions over the vocabulary) 4 times per layer, ~120 times per token,
and its time grows linearly in tokens.

Every measurement runs in its own subprocess (peak RSS = that child's ru_maxrss, from
`os.wait4`, which includes loading; each child also samples its RSS while timing, which gives
the peak of the analysis itself and the peak above the loaded models; the reference's
memory-mapped weights are faulted in before its "after load" reading), all with the same
--threads (torch.set_num_threads, XLA's CPU pool, OMP/MKL/OpenBLAS).
Times are medians over --repeats calls after a first call; our compile time is measured apart
(jax's compile events during the first call: tracing, lowering, XLA compilation). The
weight-streaming floor of a drift run is 2 models x steps x weight bytes / copy bandwidth (the
bandwidth of a large `np.copyto`, read + write bytes, measured in the same run and printed):
batch-1 CPU decoding cannot go faster than reading every weight once per step.

On a shared machine use --threads=1: BLAS/OpenMP workers that outnumber the free cores spin and
slow down several-fold (PyTorch's by far the most), which would flatter our side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags
import numpy as np

from benchmarks import memory

flags.DEFINE_boolean("quick", False, "Small sizes (see QUICK) for a smoke run of ~2-3 minutes; "
                     "size flags given explicitly still win.")
flags.DEFINE_list("parts", ["drift", "scaling", "layerwise"], "What to run: drift (ours vs the "
                  "reference at --prompts x --steps), scaling (ours over --scaling_steps and "
                  "--scaling_prompts), layerwise (vs the plain forward).")
flags.DEFINE_enum("pruning", "drop_attn", ["drop_attn", "wanda"], "The pruned model: drop_attn "
                  "= 4 attention sublayers dropped (zeroed), wanda = Wanda unstructured 50%.")
flags.DEFINE_integer("steps", 128, "Decoding steps of the ours-vs-reference comparison.")
flags.DEFINE_list("prompts", ["1", "8"], "Prompt counts of the ours-vs-reference comparison.")
flags.DEFINE_list("scaling_steps", ["64", "128", "256", "512"], "Steps of the scaling runs "
                  "(1 prompt).")
flags.DEFINE_list("scaling_prompts", ["1", "8", "32"], "Prompt counts of the scaling runs "
                  "(--steps steps).")
flags.DEFINE_integer("prompt_len", 32, "Tokens per prompt.")
flags.DEFINE_integer("repeats", 3, "Timed calls (median): ours after a first call whose compile "
                     "is measured apart, the reference after a short warm-up run.")
flags.DEFINE_integer("check_prompts", 2, "Prompts of the correctness check before timing.")
flags.DEFINE_integer("check_steps", 16, "Steps of the correctness check before timing.")
flags.DEFINE_integer("layerwise_batch", 8, "Rows of the layerwise tokens.")
flags.DEFINE_integer("layerwise_len", 128, "Tokens per row of the layerwise tokens (the issue's "
                     "8 x 512 takes ~4x as long as the default 8 x 128: see the module doc).")
flags.DEFINE_integer("layerwise_repeats", 1, "Calls of layerwise (the first includes compile, "
                     "which is measured and subtracted).")
flags.DEFINE_integer("threads", 2, "CPU threads of every child: torch.set_num_threads, XLA's CPU "
                     "thread pool, OMP/MKL/OpenBLAS.")
flags.DEFINE_integer("copy_mb", 512, "Buffer size of the memory-copy bandwidth test.")
flags.DEFINE_string("workdir", None, "Exported models, tokens and child logs (default: a new "
                    "temporary directory, kept); a workdir whose setup matches is reused.")
flags.DEFINE_string("json", "", "Also write every measurement to this JSON file.")
# Internal: a child process runs one measurement.
flags.DEFINE_string("child", None, "Internal: setup, ours_drift, ref_drift, ours_layerwise or "
                    "ours_forward.")
flags.DEFINE_integer("n_prompts", 1, "Internal: prompts (drift) or rows (layerwise) of a child.")
flags.DEFINE_integer("n_steps", 1, "Internal: steps (drift) or tokens per row (layerwise).")
flags.DEFINE_string("out", "", "Internal: .npz where a drift child saves its last result.")
flags.DEFINE_boolean("baseline", False, "Internal: an ours_drift child also times plain "
                     "generate of both models.")
FLAGS = flags.FLAGS

MODEL = "smollm2-135m-instruct"
CALIBRATION = (16, 256)  # windows x tokens for the pruning's calibration
QUICK = {"steps": 16, "prompts": ["1", "2"], "scaling_steps": ["8", "16"],
         "scaling_prompts": ["1", "2"], "prompt_len": 16, "repeats": 1, "check_prompts": 2,
         "check_steps": 8, "layerwise_batch": 2, "layerwise_len": 32}
# |ours - reference| <= ATOL + RTOL |reference| on the check run: float32 models in two
# frameworks, float64 metrics on the reference side.
RTOL, ATOL = 1e-3, 1e-5
# Top-2 logit gap below which a token split between the frameworks is float rounding (their
# logits differ by ~1e-4 at most on this model).
TIE = 1e-3
_RESULT = "RESULT "


def _size(name: str):
  """The value of a size flag, QUICK's under --quick unless the flag was given."""
  if FLAGS.quick and name in QUICK and not FLAGS[name].present:
    return QUICK[name]
  return FLAGS[name].value


def _ints(name: str) -> list[int]:
  try:
    values = [int(v) for v in _size(name)]
  except ValueError:
    raise app.UsageError(f"--{name}: expected comma-separated integers, got {_size(name)}")
  if not values or min(values) < 1:
    raise app.UsageError(f"--{name}: expected positive integers, got {values}")
  return values


# ------------------------------------------------------------------------- measuring

def _release_free_memory() -> None:
  """Returns the C heap's free pages to the OS (glibc malloc_trim), so that memory freed after
  loading (copies made while converting weights) no longer counts as resident: "RSS after load"
  is then the loaded models plus the runtime, and later peaks are real growth. The same call as
  `prunerep_jax.hostmem.release_free_memory`, kept here because the PyTorch child must not import
  the library (it would load jax into the process whose memory is measured)."""
  import ctypes
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc: RSS keeps the freed pages, nothing else changes
    pass


class _CompileClock:
  """Sums jax's compile-phase events (tracing, lowering to MLIR, XLA compilation) while active."""

  def __init__(self):
    import jax
    self.seconds, self.active = 0.0, False
    jax.monitoring.register_event_duration_secs_listener(self._event)

  def _event(self, name, seconds, **_):
    if self.active and name.startswith("/jax/core/compile/"):
      self.seconds += seconds


def _timed_calls(call, repeats: int, clock=None) -> dict:
  """First call (compile time apart when `clock` is given), then `repeats` timed calls.

  Returns first_s (wall of the first call), compile_s, median_s (median of the repeats, or the
  first call less compile when repeats is 0), times, first_peak_mb (RSS peak of the first call,
  compilation included) and peak_mb (RSS peak of the repeats; of the first call without any).
  """
  with memory.RssSampler() as first_sampler:
    if clock is not None:
      clock.active = True
    t0 = time.perf_counter()
    result = call()
    first = time.perf_counter() - t0
    if clock is not None:
      clock.active = False
  compile_s = clock.seconds if clock is not None else 0.0
  times = []
  with memory.RssSampler() as sampler:
    for _ in range(repeats):
      t0 = time.perf_counter()
      result = call()
      times.append(time.perf_counter() - t0)
  return {"first_s": first, "compile_s": compile_s,
          "median_s": float(np.median(times)) if times else first - compile_s, "times": times,
          "first_peak_mb": first_sampler.peak_mb,
          "peak_mb": sampler.peak_mb if times else first_sampler.peak_mb, "result": result}


def memory_copy_bandwidth(mb: int, repeats: int = 5) -> float:
  """GB/s of np.copyto between two preallocated buffers, counting bytes read + bytes written.

  A decoding step reads every weight once and writes almost nothing, so the read + write rate of
  a large copy is the rate the memory system streams weights at; the floor divides by it.
  """
  src = np.ones(mb * 2**20 // 8, np.float64)
  dst = np.empty_like(src)
  np.copyto(dst, src)  # fault the pages in
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    np.copyto(dst, src)
    times.append(time.perf_counter() - t0)
  return 2 * src.nbytes / float(np.median(times)) / 1e9


# ---------------------------------------------------------------------------- children

def _limit_xla_threads(threads: int) -> None:
  """Creates jax's CPU backend with `threads` intra-op threads.

  XLA sizes its CPU pool from the CPUs this process may run on when the backend is created, so
  the affinity is narrowed for the creation and restored afterwards: the pool keeps its size and
  the OS may still move its threads to whichever core is free.
  """
  allowed = os.sched_getaffinity(0)
  if threads >= len(allowed):
    return
  os.sched_setaffinity(0, sorted(allowed)[:threads])
  try:
    import jax
    jax.devices()
  finally:
    os.sched_setaffinity(0, allowed)


def _setup(workdir: str) -> dict:
  """Prunes, exports dense and pruned models and draws the tokens; returns the setup record."""
  import jax
  import prunerep_jax as pj
  from prunerep_jax import data, export

  model = pj.load(MODEL)
  calib = pj.prune.calibration(model.tokenizer, "wikipedia", *CALIBRATION, seed=0)
  if FLAGS.pruning == "drop_attn":
    pruned = pj.prune.drop_sublayers(model.params, model.config, 4, kind="attn",
                                     calibration=calib)
    what = "drop 4 attention sublayers " + ", ".join(
        str(d["layer"]) for d in pruned.report["dropped"])
  else:
    pruned = pj.prune.wanda(model.params, model.config, 0.5, calibration=calib)
    what = "wanda unstructured 50%"
  for name, params, config in (("dense", model.params, model.config),
                               ("pruned", pruned.params, pruned.config)):
    export.export_hf(os.path.join(workdir, name), params, config, model.tokenizer,
                     overwrite=True)
  prompts, _ = data.calibration_tokens(model.tokenizer, "wikipedia", FLAGS.n_prompts,
                                       FLAGS.prompt_len, seed=1)
  np.save(os.path.join(workdir, "prompts.npy"), prompts)
  layer_tokens, _ = data.calibration_tokens(model.tokenizer, "wikipedia", FLAGS.layerwise_batch,
                                            FLAGS.layerwise_len, seed=2)
  np.save(os.path.join(workdir, "layer_tokens.npy"), layer_tokens)
  weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(model.params))
  return {"pruned": what, "weight_bytes": int(weights)}


def _ours_drift(workdir: str) -> dict:
  _limit_xla_threads(FLAGS.threads)
  import jax
  import prunerep_jax as pj

  dense, pruned = pj.load(os.path.join(workdir, "dense")), pj.load(os.path.join(workdir, "pruned"))
  prompts = np.load(os.path.join(workdir, "prompts.npy"))[:FLAGS.n_prompts]
  jax.block_until_ready((dense.params, pruned.params))
  _release_free_memory()
  numbers = {"rss_after_load_mb": memory.rss_mb()}
  clock = _CompileClock()

  def call():
    return pj.analysis.drift(dense.params, pruned.params, dense.config, prompts, FLAGS.n_steps,
                             pruned_config=pruned.config, mode="free", eos_token_ids=())

  timed = _timed_calls(call, FLAGS.repeats, clock)
  if FLAGS.out:
    result = timed["result"]
    np.savez(FLAGS.out, **{k: result.arrays[k] for k in result.arrays
                           if k == "dense/tokens" or k.startswith("free/")})
  numbers.update({k: v for k, v in timed.items() if k != "result"})
  if FLAGS.baseline:
    # The same decoding without the analysis: each model's own greedy `generate`, one after the
    # other; what drift adds on top of it is its own cost.
    def generate_both():
      for m in (dense, pruned):
        pj.generate(m.params, m.config, prompts, FLAGS.n_steps,
                    eos_token_ids=()).tokens.block_until_ready()

    base = _timed_calls(generate_both, FLAGS.repeats, _CompileClock())
    numbers["generate_s"], numbers["generate_compile_s"] = base["median_s"], base["compile_s"]
  return numbers


def _ref_drift(workdir: str) -> dict:
  import torch
  from benchmarks import torch_reference

  torch.set_num_threads(FLAGS.threads)
  dense = torch_reference.load_model(os.path.join(workdir, "dense"))
  pruned = torch_reference.load_model(os.path.join(workdir, "pruned"))
  with torch.inference_mode():  # fault the memory-mapped weights in: RSS after load counts them
    for model in (dense, pruned):
      for p in model.parameters():
        p.sum()
  prompts = list(np.load(os.path.join(workdir, "prompts.npy"))[:FLAGS.n_prompts])
  _release_free_memory()
  numbers = {"rss_after_load_mb": memory.rss_mb(), "threads": torch.get_num_threads()}
  # The first call warms the allocator and kernels: a short run, not timed as compile.
  warm = _timed_calls(lambda: torch_reference.drift(dense, pruned, prompts[:1], 2), 0)
  numbers["warmup_s"] = warm["first_s"]
  timed = _timed_calls(lambda: torch_reference.drift(dense, pruned, prompts, FLAGS.n_steps),
                       max(FLAGS.repeats - 1, 0))
  # After the warm-up the first timed call is a steady one too.
  timed["median_s"] = float(np.median([timed["first_s"]] + timed["times"]))
  timed["peak_mb"] = max(timed["peak_mb"], timed["first_peak_mb"])
  if FLAGS.out:
    np.savez(FLAGS.out, **timed["result"])
  numbers.update({k: v for k, v in timed.items() if k != "result"})
  return numbers


def _ours_layerwise(workdir: str, analysis: bool) -> dict:
  _limit_xla_threads(FLAGS.threads)
  import jax
  import prunerep_jax as pj

  dense = pj.load(os.path.join(workdir, "dense"))
  tokens = np.load(os.path.join(workdir, "layer_tokens.npy"))[:FLAGS.n_prompts, :FLAGS.n_steps]
  jax.block_until_ready(dense.params)
  if analysis:
    pruned = jax.block_until_ready(pj.load(os.path.join(workdir, "pruned")).params)
    call = lambda: pj.analysis.layerwise(dense.params, dense.config, tokens, pruned)
    repeats = FLAGS.layerwise_repeats - 1
  else:
    tokens = jax.numpy.asarray(tokens)
    call = lambda: pj.forward(dense.params, dense.config, tokens,
                              capture=False).logits.block_until_ready()
    repeats = FLAGS.repeats
  _release_free_memory()
  numbers = {"rss_after_load_mb": memory.rss_mb()}
  timed = _timed_calls(call, repeats, _CompileClock())
  numbers.update({k: v for k, v in timed.items() if k != "result"})
  return numbers


def _child(kind: str) -> None:
  workdir = FLAGS.workdir
  if kind == "setup":
    numbers = _setup(workdir)
  elif kind == "ours_drift":
    numbers = _ours_drift(workdir)
  elif kind == "ref_drift":
    numbers = _ref_drift(workdir)
  elif kind in ("ours_layerwise", "ours_forward"):
    numbers = _ours_layerwise(workdir, kind == "ours_layerwise")
  else:
    raise app.UsageError(f"--child: unknown {kind!r}")
  print(_RESULT + json.dumps(numbers), flush=True)


def _launch(kind: str, n_prompts: int, n_steps: int, out: str = "", repeats=None,
            extra: tuple = ()) -> dict:
  """Runs one child; returns its numbers plus its own peak RSS (ru_maxrss via wait4)."""
  workdir = FLAGS.workdir
  tag = kind if kind == "setup" else f"{kind}_{n_prompts}x{n_steps}" + ("_check" if out else "")
  log = os.path.join(workdir, f"{tag}.log")
  cmd = [sys.executable, "-m", "benchmarks.analysis_speed", f"--child={kind}",
         f"--workdir={workdir}", f"--n_prompts={n_prompts}", f"--n_steps={n_steps}",
         f"--out={out}", f"--threads={FLAGS.threads}", f"--pruning={FLAGS.pruning}",
         f"--repeats={_size('repeats') if repeats is None else repeats}",
         f"--layerwise_repeats={FLAGS.layerwise_repeats}", *extra]
  env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
  env.update({name: str(FLAGS.threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                    "OPENBLAS_NUM_THREADS")})
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
  print(f"  {tag} ...", end="", flush=True)
  with open(log, "w") as err:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, cwd=root, text=True)
    stdout = proc.stdout.read()
    # wait4, not Popen.wait: it returns this child's own rusage.
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
  lines = [l for l in stdout.splitlines() if l.startswith(_RESULT)]
  if proc.returncode != 0 or not lines:
    print(flush=True)
    raise RuntimeError(f"child {tag} failed (exit {proc.returncode}); see {log}")
  numbers = json.loads(lines[-1][len(_RESULT):])
  numbers["peak_rss_mb"] = usage.ru_maxrss / 1024  # KB on Linux
  numbers["log"] = log
  if "median_s" in numbers:
    print(f" {numbers['median_s']:.2f} s (compile {numbers.get('compile_s', 0):.1f} s); RSS MB "
          f"after load {numbers['rss_after_load_mb']:.0f}, timed peak {numbers['peak_mb']:.0f}, "
          f"process peak {numbers['peak_rss_mb']:.0f}; load average {os.getloadavg()[0]:.1f}",
          flush=True)
  else:
    print(f" done; load average {os.getloadavg()[0]:.1f}", flush=True)
  return numbers


# ------------------------------------------------------------------------------ driver

def _setup_record() -> dict:
  """Reuses the workdir's setup when it was made with the same pruning and token sizes."""
  # Every size may be asked for, whichever parts run: prompts are cheap to draw.
  prompts = max(_ints("prompts") + _ints("scaling_prompts") + [_size("check_prompts")])
  key = {"pruning": FLAGS.pruning, "prompts": prompts, "prompt_len": _size("prompt_len"),
         "layer_tokens": f"{_size('layerwise_batch')}x{_size('layerwise_len')}"}
  path = os.path.join(FLAGS.workdir, "setup.json")
  if os.path.exists(path):
    with open(path) as f:
      record = json.load(f)
    if record.get("key") == key:
      print(f"setup reused from {path}", flush=True)
      return record
  record = _launch("setup", key["prompts"], 0, extra=(
      f"--prompt_len={key['prompt_len']}", f"--layerwise_batch={_size('layerwise_batch')}",
      f"--layerwise_len={_size('layerwise_len')}"))
  record["key"] = key
  with open(path, "w") as f:
    json.dump(record, f, indent=1)
  return record


def _check(record: dict) -> list[str]:
  """Ours and the reference on a short run: same tokens, metrics within tolerance.

  Greedy decoding in two frameworks may split a near-tie differently (the top two logits within
  float rounding of each other); the trajectories then go separate ways and nothing after that
  step is comparable. So each prompt is compared up to its first token difference, which must be
  a near-tie (reference top-2 gap < TIE): the metrics of that step, computed from a context both
  sides still share, must agree too, all but `agree`.
  """
  from benchmarks.torch_reference import STEP_METRICS

  n, s = _size("check_prompts"), _size("check_steps")
  paths = {side: os.path.join(FLAGS.workdir, f"check_{side}.npz") for side in ("ours", "ref")}
  _launch("ours_drift", n, s, out=paths["ours"], repeats=0)
  _launch("ref_drift", n, s, out=paths["ref"], repeats=0)
  ours, ref = np.load(paths["ours"]), np.load(paths["ref"])
  lines = [f"check before timing ({n} prompts x {s} steps, {record['pruned']}): same tokens, "
           f"metrics |ours - reference| <= {ATOL:g} + {RTOL:g} |reference|"]
  failures = []
  steps = np.arange(s)
  compared = np.ones((n, s), bool)
  split = np.full((n, 1), -1)  # the step where a prompt's tokens split, -1 for none
  for b in range(n):
    mismatch = {k: ours[f"{k}/tokens"][b] != ref[f"{k}/tokens"][b] for k in ("dense", "free")}
    differ = [(int(np.argmax(v)), k) for k, v in mismatch.items() if v.any()]
    if not differ:
      continue
    step, track = min(differ)
    gap = float(ref[f"{track}/margin"][b, step])
    tie = gap < TIE
    lines.append(f"  prompt {b}: {track} tokens split at step {step}, reference top-2 logit gap "
                 f"{gap:.1e} ({'a near-tie: compared up to that step' if tie else 'NOT A TIE'})")
    if not tie:
      failures.append(f"prompt {b} tokens")
    compared[b], split[b] = steps <= step, step
  lines.append(f"  tokens: {'identical' if compared.all() else 'identical up to the splits'}")
  for m in STEP_METRICS:
    mine, theirs = ours[f"free/{m}"].astype(np.float64), ref[f"free/{m}"]
    keep = compared & (steps != split) if m == "agree" else compared
    diff = np.where(keep, np.abs(mine - theirs), 0.0)
    ok = bool(np.all(diff <= ATOL + RTOL * np.abs(theirs)))
    span = f"[{theirs[keep].min():.3g}, {theirs[keep].max():.3g}]" if keep.any() else "-"
    lines.append(f"  free/{m:17s} max |diff| {diff.max():.1e}  max rel "
                 f"{np.max(diff / np.maximum(np.abs(theirs), 1e-30)):.1e}  range {span}  "
                 f"{'ok' if ok else 'OUT OF TOLERANCE'}")
    if not ok:
      failures.append(m)
  print("\n".join(lines), flush=True)
  if failures:
    raise SystemExit(f"check failed for {failures}: ours and the reference do not compute the "
                     "same thing; nothing was timed")
  return lines


def _fmt(x, digits=2) -> str:
  return "-" if x is None else f"{x:,.{digits}f}"


def _floor_s(record: dict, steps: int, bandwidth: float) -> float:
  return 2 * steps * record["weight_bytes"] / (bandwidth * 1e9)


def _drift_tables(record, bandwidth, ours, ref, main, scaling) -> list[str]:
  lines = []
  if main:
    lines += ["", "drift, ours vs reference: time (s, median; our compile apart)", "",
              "| prompts | steps | ours | ours compile | ours 2 x generate | drift / generate | "
              "reference | speed-up | floor | ours / floor |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for p, s in main:
      o, r = ours[(p, s)], ref[(p, s)]
      floor = _floor_s(record, s, bandwidth)
      gen = o.get("generate_s")
      lines.append(
          f"| {p} | {s} | {o['median_s']:.2f} | {o['compile_s']:.1f} | {_fmt(gen)} | "
          f"{_fmt(gen and o['median_s'] / gen)} | {r['median_s']:.2f} | "
          f"{r['median_s'] / o['median_s']:.2f}x | {floor:.2f} | {o['median_s'] / floor:.2f} |")
    lines += ["", "drift, ours vs reference: memory (RSS MB; process = the child's ru_maxrss, "
              "timed = sampled peak during the timed calls, above load = timed - RSS after "
              "loading both models)", "",
              "| prompts | steps | ours process | reference process | ours / reference | "
              "ours timed | reference timed | ours / reference | ours above load | "
              "reference above load |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p, s in main:
      o, r = ours[(p, s)], ref[(p, s)]
      lines.append(
          f"| {p} | {s} | {o['peak_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
          f"{o['peak_rss_mb'] / r['peak_rss_mb']:.2f} | {o['peak_mb']:.0f} | {r['peak_mb']:.0f} | "
          f"{o['peak_mb'] / r['peak_mb']:.2f} | {o['peak_mb'] - o['rss_after_load_mb']:.0f} | "
          f"{r['peak_mb'] - r['rss_after_load_mb']:.0f} |")
  if scaling:
    lines += ["", "drift scaling, ours (wall s: median; RSS MB)", "",
              "| prompts | steps | s | compile s | ms / step | floor s | s / floor | peak RSS | "
              "RSS after load | above load |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p, s in scaling:
      o = ours[(p, s)]
      floor = _floor_s(record, s, bandwidth)
      lines.append(f"| {p} | {s} | {o['median_s']:.2f} | {o['compile_s']:.1f} | "
                   f"{1e3 * o['median_s'] / s:.1f} | {floor:.2f} | {o['median_s'] / floor:.2f} | "
                   f"{o['peak_rss_mb']:.0f} | {o['rss_after_load_mb']:.0f} | "
                   f"{o['peak_mb'] - o['rss_after_load_mb']:.0f} |")
  return lines


def _targets(record, bandwidth, ours, ref, main) -> list[str]:
  lines = ["", "targets (issue 7, item 9):"]

  def check(name, value, goal, ok):
    lines.append(f"  {'MET ' if ok else 'MISS'} {name}: {value} (target {goal})")

  for p, s in main:
    o, r = ours[(p, s)], ref[(p, s)]
    speedup = r["median_s"] / o["median_s"]
    if p == 1:
      check(f"1 prompt x {s} steps, speed-up over the reference", f"{speedup:.2f}x", ">= 1.7x",
            speedup >= 1.7)
      ratio = o["median_s"] / _floor_s(record, s, bandwidth)
      check(f"1 prompt x {s} steps, ours / weight-streaming floor", f"{ratio:.2f}x", "<= 1.3x",
            ratio <= 1.3)
    else:
      check(f"{p} prompts x {s} steps, speed-up over the reference", f"{speedup:.2f}x",
            ">= 5x (stated for 8 prompts)", speedup >= 5)
    mem = o["peak_rss_mb"] / r["peak_rss_mb"]
    check(f"{p} prompt(s) x {s} steps, ours / reference peak RSS (process)", f"{mem:.2f}",
          "<= 0.5", mem <= 0.5)
    mem = o["peak_mb"] / r["peak_mb"]
    check(f"{p} prompt(s) x {s} steps, ours / reference peak RSS (timed calls)", f"{mem:.2f}",
          "<= 0.5", mem <= 0.5)
  return lines


def _layerwise_table(lw: dict, fw: dict, rows: int, length: int) -> list[str]:
  lines = ["", f"layerwise vs the plain forward ({rows} x {length} tokens; s: median, compile "
           "apart; RSS MB)", "",
           "| run | s | compile s | peak RSS | RSS after load | above load |",
           "|---|---|---|---|---|---|"]
  for name, r in (("pj.forward(capture=False)", fw), ("pj.analysis.layerwise", lw)):
    lines.append(f"| {name} | {r['median_s']:.2f} | {r['compile_s']:.1f} | "
                 f"{r['peak_rss_mb']:.0f} | {r['rss_after_load_mb']:.0f} | "
                 f"{r['peak_mb'] - r['rss_after_load_mb']:.0f} |")
  above = [r["peak_mb"] - r["rss_after_load_mb"] for r in (lw, fw)]
  lines.append(f"layerwise / forward: time {lw['median_s'] / fw['median_s']:.1f}x, peak RSS "
               f"{lw['peak_rss_mb'] / fw['peak_rss_mb']:.2f}x (target <= 3x; the layerwise "
               f"process also holds the pruned model), above load {above[0] / above[1]:.2f}x")
  return lines


def main(argv):
  del argv
  if FLAGS.child:
    _child(FLAGS.child)
    return
  for part in FLAGS.parts:
    if part not in ("drift", "scaling", "layerwise"):
      raise app.UsageError(f"--parts: {part!r} is not one of drift, scaling, layerwise")
  steps, prompts = _size("steps"), _ints("prompts")
  main_runs = [(p, steps) for p in prompts] if "drift" in FLAGS.parts else []
  scaling = ([(1, s) for s in _ints("scaling_steps")]
             + [(p, steps) for p in _ints("scaling_prompts")]) if "scaling" in FLAGS.parts else []
  scaling = sorted(set(scaling), key=lambda c: (c[0] != 1, c[0], c[1]))
  FLAGS.workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="analysis_speed_")
  os.makedirs(FLAGS.workdir, exist_ok=True)

  load_before = os.getloadavg()
  bandwidth_before = memory_copy_bandwidth(FLAGS.copy_mb)
  print(f"{MODEL} float32; CPU cores {os.cpu_count()}, threads per run {FLAGS.threads}; "
        f"repeats {_size('repeats')}{' (quick)' if FLAGS.quick else ''}; 1/5/15-min load "
        f"average before {load_before[0]:.1f}/{load_before[1]:.1f}/{load_before[2]:.1f}; "
        f"memory copy bandwidth {bandwidth_before:.1f} GB/s (np.copyto of {FLAGS.copy_mb} MB, "
        f"read + write bytes, median of 5); workdir {FLAGS.workdir}", flush=True)
  record = _setup_record()
  print(f"pruned model: {record['pruned']}; weights {record['weight_bytes'] / 1e6:.0f} MB per "
        f"model; prompts of {_size('prompt_len')} tokens", flush=True)

  out = {"setup": record, "load_before": load_before}
  ours, ref = {}, {}
  if main_runs or scaling:
    out["check"] = _check(record)
    for p, s in main_runs:  # reference and ours back to back, under the same load
      ref[(p, s)] = _launch("ref_drift", p, s)
      ours[(p, s)] = _launch("ours_drift", p, s, extra=("--baseline",))
    for p, s in scaling:
      if (p, s) not in ours:
        ours[(p, s)] = _launch("ours_drift", p, s)
  if "layerwise" in FLAGS.parts:
    rows, length = _size("layerwise_batch"), _size("layerwise_len")
    out["forward"] = _launch("ours_forward", rows, length)
    out["layerwise"] = _launch("ours_layerwise", rows, length)
  load_after = os.getloadavg()
  # Other processes can only slow the copy down: the faster of the two is the better estimate of
  # what the memory system sustains, and gives the lower (stricter) floor.
  bandwidth_after = memory_copy_bandwidth(FLAGS.copy_mb)
  bandwidth = max(bandwidth_before, bandwidth_after)

  lines = []
  if ours:
    lines += _drift_tables(record, bandwidth, ours, ref, main_runs, scaling)
  if main_runs:
    lines += _targets(record, bandwidth, ours, ref, main_runs)
  if "layerwise" in FLAGS.parts:
    lines += _layerwise_table(out["layerwise"], out["forward"], rows, length)
  lines.append(f"\nfloor = 2 models x steps x {record['weight_bytes'] / 1e6:.0f} MB of weights / "
               f"{bandwidth:.1f} GB/s (memory copy bandwidth {bandwidth_before:.1f} GB/s before, "
               f"{bandwidth_after:.1f} GB/s after the runs; the faster one); 1/5/15-min load "
               f"average after {load_after[0]:.1f}/{load_after[1]:.1f}/{load_after[2]:.1f} "
               "(other processes skew times)")
  print("\n".join(lines), flush=True)
  if FLAGS.json:
    out.update(load_after=load_after, bandwidth_gb_s=[bandwidth_before, bandwidth_after],
               drift={f"ours {p}x{s}": v for (p, s), v in ours.items()}
               | {f"reference {p}x{s}": v for (p, s), v in ref.items()})
    with open(FLAGS.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  app.run(main)
