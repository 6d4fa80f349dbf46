r"""Wall time and peak memory of Wanda and SparseGPT, ours (JAX) beside PyTorch on the same CPU.

  python -m benchmarks.prune_speed --nsamples=128 --seqlen=512 --methods=wanda,sparsegpt

The calibration windows are drawn once (our default tokenizer, the wikipedia source, seed 0) and
saved to a .npy that every run reads, so both frameworks prune from the same tokens. Each
(framework, method) runs in its own subprocess, so its peak RSS is its own: the table's "load +
pruning" peak is the child's VmHWM after loading the model and pruning once (ours; before the warm
call's reload) or its whole-process ru_maxrss from `os.wait4` (torch, which runs once); the child
also samples its RSS while pruning, which separates the pruning peak from the model loading peak.
The timed span is the pruning call alone, model loading excluded:

  ours   `pj.prune.wanda` / `pj.prune.sparsegpt` (unstructured 50%, batch_size 8) with
         donate=True: the pruned layers go into the loaded model's buffers in place, as the
         PyTorch port prunes its model in place. Timed including jit compilation; then the same
         call again in the same process on a freshly loaded model (the load not timed), with
         every shape already compiled, which gives the time without compilation ("warm").
  ours_copy  the same with the functional default (donate=False): the caller's model is kept
         and the result is a second copy of the block weights (425 MB more).
  torch  `benchmarks/torch_prune.py`, the published algorithms as they are written (window by
         window, hooks on the seven linears), float32, torch.set_num_threads(--threads).

Cross-check on block 0, whose inputs are the same on both sides (both dequantise the same GGUF;
the run prints the dense q_proj difference, 0 here): the fraction of identical pruning-mask entries over its seven linears,
and the relative Frobenius difference of the pruned q_proj weight. Wanda should agree exactly.
SparseGPT's reference prunes one more weight per 128-input block (sorted[k] threshold), which alone
moves q_proj by ~4e-3; with --torch_kth_threshold the torch side thresholds like ours and the two
agree to float32 rounding.

--threads holds every thread pool of both frameworks to the same count. On a shared machine use 1:
BLAS/OpenMP workers that outnumber the free cores spin and slow down several-fold (torch's block
forward and jax's LAPACK calls, which go through scipy's OpenBLAS, both suffer).

Prints a markdown table for BUILD_NOTES.md. Logs of every child (ours logs per-layer times) are
kept in --workdir.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from absl import app, flags, logging
import numpy as np

from benchmarks import memory

flags.DEFINE_integer("nsamples", 128, "Calibration windows.")
flags.DEFINE_integer("seqlen", 512, "Tokens per calibration window.")
flags.DEFINE_list("methods", ["wanda", "sparsegpt"], "Methods to time: wanda, sparsegpt.")
flags.DEFINE_list("frameworks", ["torch", "ours", "ours_copy"],
                  "Frameworks to run: torch, ours (donate=True, in place), ours_copy "
                  "(donate=False).")
flags.DEFINE_float("sparsity", 0.5, "Unstructured sparsity.")
flags.DEFINE_integer("threads", 2, "CPU threads of both frameworks: torch.set_num_threads, XLA's "
                     "CPU thread pool, and OMP/MKL/OpenBLAS thread counts in every child (jax's "
                     "LAPACK calls go through scipy's OpenBLAS).")
flags.DEFINE_boolean("warm", True, "Also time a second call of ours in the same process.")
flags.DEFINE_boolean("torch_kth_threshold", False, "Torch SparseGPT thresholds at the k-th "
                     "smallest score like ours, instead of the reference's sorted[k] (which prunes "
                     "one more weight per block); makes the cross-check exact, not the timing.")
flags.DEFINE_string("workdir", None, "Where tokens, results and child logs go (default: a new "
                    "temporary directory, kept).")
# Internal: a child process runs one (framework, method) and writes its results.
flags.DEFINE_string("child", None, "Internal: 'framework:method' to run in this process.")
flags.DEFINE_string("tokens", None, "Internal: the calibration .npy a child reads.")
flags.DEFINE_string("out", None, "Internal: the .npz a child writes.")
FLAGS = flags.FLAGS

MODEL = "smollm2-135m-instruct"
METHODS = ("wanda", "sparsegpt")
FRAMEWORKS = ("torch", "ours", "ours_copy")
_LABELS = {"torch": "PyTorch port", "ours": "prunerep_jax, in place",
           "ours_copy": "prunerep_jax, copy"}
_RESULT_PREFIX = "RESULT "


# ------------------------------------------------------------------------------ memory

def _hwm_mb() -> float:
  """Peak resident set size of this process so far (VmHWM) in MB."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def _cpu_s() -> float:
  """User + system CPU seconds of this process so far (all its threads)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------------------ children

def _limit_xla_threads(threads: int) -> None:
  """Creates jax's CPU backend with `threads` intra-op threads.

  XLA sizes its CPU thread pool from the CPUs this process may run on when the backend is created
  (XLA_FLAGS such as --xla_cpu_multi_thread_eigen=false leave that pool in use), so the affinity
  is narrowed for the creation and restored afterwards: the pool keeps its size, and the OS may
  still move its threads to whichever core is free.
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


def _run_ours(method: str, tokens: np.ndarray, donate: bool) -> tuple[dict, dict]:
  """Times our transform; returns (numbers, block-0 arrays in torch [out, in] layout)."""
  _limit_xla_threads(FLAGS.threads)
  import jax
  import prunerep_jax as pj
  from prunerep_jax import layout

  logging.set_verbosity(logging.INFO)
  model = pj.load(MODEL)
  transform = pj.prune.get(method)
  arrays = {"dense/attn/q_proj": np.asarray(model.params["layers"]["attn"]["q_proj"]["kernel"][0]).T}
  numbers = {"rss_after_load_mb": memory.rss_mb(), "hwm_after_load_mb": _hwm_mb()}

  def call(model):
    t0, c0 = time.perf_counter(), _cpu_s()
    result = transform(model.params, model.config, FLAGS.sparsity, calibration=tokens,
                       donate=donate)
    jax.block_until_ready((result.params, result.masks))
    return result, time.perf_counter() - t0, _cpu_s() - c0

  with memory.RssSampler() as sampler:
    result, numbers["wall_s"], numbers["cpu_s"] = call(model)
  numbers["prune_peak_rss_mb"] = sampler.peak_mb
  # The process peak up to here (load + one pruning); the warm call's reload comes after.
  numbers["hwm_first_call_mb"] = _hwm_mb()
  numbers["phases"] = {k: v for k, v in result.report["timings"].items() if k != "total_s"}
  # layout.BLOCK_LINEARS, not torch_prune.LINEARS (the same seven): importing torch here would
  # add its libraries (~120 MB) to this process's RSS.
  for sub, name in layout.BLOCK_LINEARS:
    keep = np.asarray(result.masks["layers"][sub][name]["kernel"])
    arrays[f"pruned/{sub}/{name}"] = ~keep[0].T
    arrays[f"pruned_last/{sub}/{name}"] = ~keep[-1].T
    arrays[f"weight/{sub}/{name}"] = np.asarray(result.params["layers"][sub][name]["kernel"][0]).T
  del result
  if FLAGS.warm:
    if donate:  # the first call consumed the model's block weights
      model = None
      model = pj.load(MODEL)
    with memory.RssSampler() as sampler:
      result, numbers["warm_wall_s"], numbers["warm_cpu_s"] = call(model)
    numbers["warm_prune_peak_rss_mb"] = sampler.peak_mb
    numbers["warm_phases"] = {k: v for k, v in result.report["timings"].items() if k != "total_s"}
  return numbers, arrays


def _run_torch(method: str, tokens: np.ndarray) -> tuple[dict, dict]:
  """Times the PyTorch reference; returns (numbers, block-0 arrays in [out, in] layout)."""
  import torch
  from benchmarks import torch_prune

  logging.set_verbosity(logging.INFO)
  torch.set_num_threads(FLAGS.threads)
  model = torch_prune.load_model()
  block0 = torch_prune.block_linears(model.model.layers[0])
  arrays = {"dense/attn/q_proj": block0[("attn", "q_proj")].weight.detach().numpy().copy()}
  numbers = {"rss_after_load_mb": memory.rss_mb(), "hwm_after_load_mb": _hwm_mb(),
             "threads": torch.get_num_threads()}
  prune = {"wanda": torch_prune.prune_wanda,
           "sparsegpt": functools.partial(torch_prune.prune_sparsegpt,
                                          kth_threshold=FLAGS.torch_kth_threshold)}[method]
  token_tensor = torch.from_numpy(tokens.astype(np.int64))
  with memory.RssSampler() as sampler:
    t0, c0 = time.perf_counter(), _cpu_s()
    recorded, phases = prune(model, token_tensor, FLAGS.sparsity,
                             record_layers=(0, len(model.model.layers) - 1))
    numbers["wall_s"], numbers["cpu_s"] = time.perf_counter() - t0, _cpu_s() - c0
  numbers["prune_peak_rss_mb"] = sampler.peak_mb
  numbers["phases"] = phases
  for (sub, name), pruned in recorded[0].items():
    arrays[f"pruned/{sub}/{name}"] = pruned.numpy()
    arrays[f"pruned_last/{sub}/{name}"] = recorded[len(model.model.layers) - 1][(sub, name)].numpy()
    arrays[f"weight/{sub}/{name}"] = block0[(sub, name)].weight.detach().numpy()
  return numbers, arrays


def _child(spec: str) -> None:
  framework, method = spec.split(":")
  tokens = np.load(FLAGS.tokens)
  run = {"ours": functools.partial(_run_ours, donate=True),
         "ours_copy": functools.partial(_run_ours, donate=False), "torch": _run_torch}[framework]
  numbers, arrays = run(method, tokens)
  np.savez(FLAGS.out, **arrays)
  logging.warning("%s: %s", spec, json.dumps(numbers))
  # The parent reads this line from stdout; logs go to stderr.
  print(_RESULT_PREFIX + json.dumps(numbers), flush=True)


def _thread_env(threads: int) -> dict:
  """Environment that holds every thread pool of a child to `threads`.

  On a shared machine, spinning BLAS/OpenMP workers that outnumber the free cores slow down by
  large factors, so both frameworks get the same count.
  """
  # XLA's own pool is sized in the child (`_limit_xla_threads`).
  return {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                          "OPENBLAS_NUM_THREADS")}


def _launch(framework: str, method: str, tokens_path: str, workdir: str) -> dict:
  """Runs one child; returns its numbers plus its whole-process peak RSS and the paths."""
  out = os.path.join(workdir, f"{framework}_{method}.npz")
  log = os.path.join(workdir, f"{framework}_{method}.log")
  cmd = [sys.executable, "-m", "benchmarks.prune_speed", f"--child={framework}:{method}",
         f"--tokens={tokens_path}", f"--out={out}", f"--sparsity={FLAGS.sparsity}",
         f"--threads={FLAGS.threads}", "--warm" if FLAGS.warm else "--nowarm",
         "--torch_kth_threshold" if FLAGS.torch_kth_threshold else "--notorch_kth_threshold"]
  env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
  env.update(_thread_env(FLAGS.threads))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(log, "w") as err:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, cwd=root, text=True)
    stdout = proc.stdout.read()
    # wait4 rather than Popen.wait: it returns this child's own rusage (RUSAGE_CHILDREN would be
    # the maximum over every child so far).
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode != 0:
    raise RuntimeError(f"{framework} {method} failed (exit {proc.returncode}); see {log}")
  lines = [l for l in stdout.splitlines() if l.startswith(_RESULT_PREFIX)]
  if not lines:
    raise RuntimeError(f"{framework} {method} printed no result; see {log}")
  numbers = json.loads(lines[-1][len(_RESULT_PREFIX):])
  # ru_maxrss is in KB on Linux.
  numbers["peak_rss_mb"] = usage.ru_maxrss / 1024
  numbers["npz"], numbers["log"] = out, log
  return numbers


# ------------------------------------------------------------------------------ report

def _cross_check(ours_npz: str, torch_npz: str) -> dict:
  """Block-0 agreement between our result and the torch one."""
  a, b = np.load(ours_npz), np.load(torch_npz)

  def agreement(prefix):
    keys = [k for k in a.files if k.startswith(prefix) and k in b.files]
    if not keys:
      return float("nan")
    return sum(int(np.sum(a[k] == b[k])) for k in keys) / sum(a[k].size for k in keys)

  wq_a, wq_b = a["weight/attn/q_proj"], b["weight/attn/q_proj"]
  dq_a, dq_b = a["dense/attn/q_proj"], b["dense/attn/q_proj"]
  return {"mask_agreement": agreement("pruned/"),
          # The last block sees the outputs of every pruned block before it: agreement there
          # checks the whole sequential pipeline, not one block.
          "last_mask_agreement": agreement("pruned_last/"),
          "q_proj_rel_diff": float(np.linalg.norm(wq_a - wq_b) / np.linalg.norm(wq_b)),
          "dense_q_proj_max_abs_diff": float(np.max(np.abs(dq_a - dq_b)))}


def _phases(numbers: dict, key: str = "phases") -> str:
  return ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in numbers.get(key, {}).items())


def main(argv):
  del argv
  if FLAGS.child:
    _child(FLAGS.child)
    return
  for m in FLAGS.methods:
    if m not in METHODS:
      raise app.UsageError(f"--methods: {m!r} is not one of {METHODS}")
  for f in FLAGS.frameworks:
    if f not in FRAMEWORKS:
      raise app.UsageError(f"--frameworks: {f!r} is not one of {FRAMEWORKS}")
  import prunerep_jax as pj
  from prunerep_jax import data

  logging.set_verbosity(logging.WARNING)
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="prune_speed_")
  os.makedirs(workdir, exist_ok=True)
  tokenizer = pj.load(MODEL).tokenizer
  tokens, info = data.calibration_tokens(tokenizer, "wikipedia", FLAGS.nsamples, FLAGS.seqlen,
                                         seed=0)
  tokens_path = os.path.join(workdir, "tokens.npy")
  np.save(tokens_path, tokens)
  print(f"model {MODEL}; calibration {info['source']} {FLAGS.nsamples} x {FLAGS.seqlen} (seed 0); "
        f"unstructured {FLAGS.sparsity:g}; CPU cores {os.cpu_count()}, threads per run "
        f"{FLAGS.threads}; load average at the start (1, 5, 15 min) "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}; logs in {workdir}", flush=True)

  results = {}
  for method in FLAGS.methods:
    for framework in FLAGS.frameworks:
      print(f"running {framework} {method} ...", flush=True)
      results[(framework, method)] = r = _launch(framework, method, tokens_path, workdir)
      print(f"  {r['wall_s']:.1f} s ({_phases(r)})"
            + (f"; warm {r['warm_wall_s']:.1f} s ({_phases(r, 'warm_phases')})"
               if "warm_wall_s" in r else "")
            + f"; peak RSS {r['peak_rss_mb']:.0f} MB (pruning {r['prune_peak_rss_mb']:.0f}"
            + (f", warm {r['warm_prune_peak_rss_mb']:.0f}" if "warm_prune_peak_rss_mb" in r
               else "") + f"); load average {os.getloadavg()[0]:.1f}",
            flush=True)

  print(f"load average at the end (1, 5, 15 min): "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
  print()
  print("| method | framework | wall s | wall s without compile | CPU s | peak RSS MB (load + "
        "pruning) | "
        "RSS MB after load | peak RSS MB (pruning) | ours/torch wall | ours/torch CPU | "
        "block-0 mask agreement | block-0 q_proj rel. diff |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for method in FLAGS.methods:
    theirs = results.get(("torch", method))
    for framework in FRAMEWORKS:
      r = results.get((framework, method))
      if r is None:
        continue
      check = (_cross_check(r["npz"], theirs["npz"]) if framework != "torch" and theirs
               else None)
      warm = f"{r['warm_wall_s']:.1f}" if "warm_wall_s" in r else "-"
      cpu = f"{r['cpu_s']:.1f}" + (f" (warm {r['warm_cpu_s']:.1f})" if "warm_cpu_s" in r else "")
      ratio = cpu_ratio = agree = rel = "-"
      if check:
        ratio = f"{r['wall_s'] / theirs['wall_s']:.2f}"
        cpu_ratio = f"{r['cpu_s'] / theirs['cpu_s']:.2f}"
        if "warm_wall_s" in r:
          ratio += f" (warm {r['warm_wall_s'] / theirs['wall_s']:.2f})"
          cpu_ratio += f" (warm {r['warm_cpu_s'] / theirs['cpu_s']:.2f})"
        agree, rel = f"{check['mask_agreement']:.6f}", f"{check['q_proj_rel_diff']:.2e}"
      # Ours: the peak of load + one pruning (VmHWM before the warm call's reload); torch runs
      # once, so its whole-process peak is the same quantity.
      peak = r.get("hwm_first_call_mb", r["peak_rss_mb"])
      print(f"| {method} | {_LABELS[framework]} | {r['wall_s']:.1f} | {warm} | {cpu} | "
            f"{peak:.0f} | {r['rss_after_load_mb']:.0f} | "
            f"{r['prune_peak_rss_mb']:.0f} | {ratio} | {cpu_ratio} | {agree} | {rel} |")
  print()
  for method in FLAGS.methods:
    for framework in FRAMEWORKS:
      r = results.get((framework, method))
      if r:
        print(f"{method} {framework} phases (s): {_phases(r)}"
              + (f"; warm: {_phases(r, 'warm_phases')}" if "warm_phases" in r else ""))
    theirs = results.get(("torch", method))
    for framework in ("ours", "ours_copy"):
      if (framework, method) in results and theirs:
        check = _cross_check(results[(framework, method)]["npz"], theirs["npz"])
        print(f"{method} {framework}: dense block-0 q_proj max |ours - torch| = "
              f"{check['dense_q_proj_max_abs_diff']:.1e}; last-block mask agreement "
              f"{check['last_mask_agreement']:.6f}")
  for method in FLAGS.methods:
    a, b = results.get(("ours", method)), results.get(("ours_copy", method))
    if a and b:
      same = all(np.array_equal(x[k], y[k]) for x, y in [(np.load(a["npz"]), np.load(b["npz"]))]
                 for k in x.files)
      print(f"{method}: in-place and copy results identical (block 0 and last-block masks, "
            f"block-0 weights): {same}")


if __name__ == "__main__":
  app.run(main)
