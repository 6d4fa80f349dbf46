"""Speed of prunerep_jax against transformers on PyTorch on one accelerator, side by side.

    python -m benchmarks.accelerator [--shape llama-3.2-1b] [--forward 8x512,32x512]
        [--decode_tokens 32] [--nsamples 64] [--seqlen 512] [--methods wanda,sparsegpt]
        [--skip_torch] [--skip_torch_prune] [--budget_s 390] [--json FILE]
    python -m benchmarks.accelerator --shape tiny --forward 2x32 --decode_tokens 4 --repeats 1 \
        --nsamples 4 --seqlen 32 --copy_mb 16       # a CPU smoke run in well under a minute

Builds a random-weight Llama of --shape with transformers on the device (`random_llama.build`;
weights drawn in bf16, `save_pretrained` into a temporary directory), loads that checkpoint on our
side with `pj.load(path, dtype=)`, and measures both in the same dtype on the same device (bf16
on an accelerator, fp32 on the CPU, unless --dtype says otherwise; the fp32 copy holds the same
bf16-rounded weights on both sides):

  * forward tokens/s at each --forward BxT (all logits, no cache), median of --repeats;
  * greedy decode ms/token at B=1 after a 16-token prompt, prefill excluded by the difference
    method of `benchmarks.model_speed` (time(N + 4 tokens) - time(4 tokens)) / N;
  * the weight-streaming floor of decoding: bytes of all weights / the device's copy bandwidth,
    measured in JAX as a jitted x + 1 over a --copy_mb buffer (read + write bytes per second);
  * Wanda and SparseGPT, unstructured --sparsity, calibrated on --nsamples x --seqlen random
    token windows (seed 0; a random-weight model has no text to prefer), wall time of the whole
    call (calibration forward + pruning) with jit compilation (the first call of that method in
    the process; a block forward an earlier method compiled is reused), then the same call again
    with every shape compiled; the calibration forward and pruning phases are the call's own
    timings;
  * the PyTorch port of the published pruning code (`benchmarks/torch_prune.py`, window by
    window with hooks, as the reference scripts run) on the same device and dtype, last.

Each part runs in its own subprocess, one after the other (torch: build, save, forward, decode;
jax: bandwidth, load, forward, decode, pruning; torch pruning), so none holds device memory or
warms caches for another. A part prints its measurements after each one, and the whole run is
held to --budget_s: a part still running when the budget is spent is stopped and keeps what it
had measured, an optional step (a warm pruning call) that would not fit is left out, and later
parts are skipped; the table says which. Then it prints one table and issue 10's accelerator
targets as MET / MISS lines (the targets are for llama-3.2-1b in bf16 with 64 x 512 calibration;
other settings are measured and compared all the same, and the header says so).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import model_speed as ms
from benchmarks import random_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PROG = "benchmarks.accelerator"
METHODS = ("wanda", "sparsegpt")
# Issue 10, item 3: the accelerator targets and the settings they are stated for.
TARGET_FLOOR_RATIO = 1.5
TARGET_FORWARD_SPEEDUP = 1.2
TARGET_PRUNE_S = {"wanda": 8.0, "sparsegpt": 30.0}
TARGET_SETTINGS = {"shape": "llama-3.2-1b", "dtype": "bfloat16", "nsamples": 64, "seqlen": 512,
                   "forward": [[8, 512], [32, 512]]}


def _parse_args(argv) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
  p.add_argument("--shape", choices=sorted(random_llama.SHAPES), default="llama-3.2-1b",
                 help="model shape (tiny: a CPU smoke test)")
  p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                 help="both frameworks' dtype; auto: bfloat16 on an accelerator, float32 on CPU")
  p.add_argument("--forward", default="8x512,32x512", help="forward shapes BxT, comma-separated")
  p.add_argument("--decode_tokens", type=int, default=32,
                 help="N: decoded tokens whose time is measured at B=1, prefill excluded")
  p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median)")
  p.add_argument("--copy_mb", type=int, default=1024, help="buffer size of the bandwidth test")
  p.add_argument("--methods", default="wanda,sparsegpt",
                 help="pruning methods, comma-separated (wanda, sparsegpt; empty: none)")
  p.add_argument("--sparsity", type=float, default=0.5, help="unstructured sparsity")
  p.add_argument("--nsamples", type=int, default=64, help="calibration windows")
  p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
  p.add_argument("--prune_batch_size", type=int, default=8,
                 help="calibration windows per batch on our side")
  p.add_argument("--no_warm", action="store_true",
                 help="time each pruning call once (compile included) instead of twice")
  p.add_argument("--skip_torch", action="store_true",
                 help="no transformers forward / decode (the model is still built with it)")
  p.add_argument("--skip_torch_prune", action="store_true", help="no PyTorch pruning part")
  p.add_argument("--budget_s", type=float, default=390.0,
                 help="wall-clock budget of the whole run; parts past it are stopped or skipped")
  p.add_argument("--json", default="", help="also write all measurements to this new file")
  p.add_argument("--overwrite", action="store_true", help="let --json replace an existing file")
  # Internal: the subprocess that measures one part.
  p.add_argument("--part", choices=("torch", "jax", "torch_prune"), default=None,
                 help=argparse.SUPPRESS)
  p.add_argument("--path", default="", help=argparse.SUPPRESS)
  p.add_argument("--deadline", type=float, default=math.inf, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  try:
    _check_args(args)
  except (ValueError, TypeError, OSError) as e:
    p.error(str(e))
  return args


def _check_args(args: argparse.Namespace) -> None:
  """Checks the flags on the host before anything is built; turns list flags into tuples."""
  from prunerep_jax import atomic, validate

  for name in ("decode_tokens", "repeats", "copy_mb", "nsamples", "seqlen", "prune_batch_size"):
    validate.integer(PROG, f"--{name}", getattr(args, name), minimum=1)
  validate.number(PROG, "--sparsity", args.sparsity, minimum=0.0, maximum=1.0, max_open=True)
  validate.number(PROG, "--budget_s", args.budget_s, minimum=0.0, min_open=True)
  args.forward = _forward_shapes(args.forward)
  args.methods = validate.names(PROG, "--methods", [m for m in args.methods.split(",") if m],
                                METHODS)
  if args.json and args.part is None:
    args.json = atomic.check_destination(args.json, overwrite=args.overwrite, caller=PROG,
                                         name="--json", want_dir=False)


def _forward_shapes(text: str) -> tuple[tuple[int, int], ...]:
  from prunerep_jax import validate

  shapes = []
  for item in (s for s in text.split(",") if s):
    b, _, t = item.partition("x")
    if not (b.isdigit() and t.isdigit() and int(b) > 0 and int(t) > 0):
      raise validate.fail(PROG, "--forward", text, "comma-separated BxT with positive B and T, "
                          "e.g. 8x512,32x512")
    shapes.append((int(b), int(t)))
  if not shapes:
    raise validate.fail(PROG, "--forward", text, "at least one BxT shape, e.g. 8x512")
  return tuple(shapes)


# ------------------------------------------------------------------------------ the parts

def _emit(out: dict) -> None:
  """Prints everything measured so far; the parent keeps the last such line, so a part stopped
  by the budget still reports what it finished."""
  print(ms._RESULT + json.dumps(out), flush=True)


def _calibration_tokens(args, vocab: int) -> np.ndarray:
  return ms._tokens(args.nsamples, args.seqlen, vocab)


def _weight_bytes(leaves) -> int:
  return int(sum(x.nbytes for x in leaves))


def _bench_torch(args, out: dict) -> None:
  """Builds and saves the checkpoint, then times transformers' forward and greedy decoding."""
  import torch
  import transformers

  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = args.dtype if args.dtype != "auto" else ("float32" if device == "cpu" else "bfloat16")
  t0 = time.perf_counter()
  model = random_llama.build(args.shape, device=device, dtype="bfloat16", seed=ms.SEED)
  model.save_pretrained(args.path)
  out.update(framework="transformers", device=device, dtype=dtype,
             device_name=torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
             torch_version=torch.__version__, transformers_version=transformers.__version__,
             build_save_s=time.perf_counter() - t0)
  _emit(out)
  if args.skip_torch:
    return
  model = model.to(getattr(torch, dtype))
  out["weight_bytes"] = _weight_bytes(p.detach() for p in model.parameters())
  vocab = model.config.vocab_size
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  with torch.inference_mode():
    for b, t in args.forward:
      tokens = torch.from_numpy(ms._tokens(b, t, vocab)).long().to(device)

      def forward(tokens=tokens):
        model(input_ids=tokens, use_cache=False)
        sync()

      forward()  # warm-up (allocator, kernels)
      out[f"forward_tok_s_{b}x{t}"] = b * t / ms._median_s(forward, args.repeats)
      _emit(out)
    prompt = torch.from_numpy(ms._tokens(1, ms.PROMPT_LEN, vocab)).long().to(device)

    def run(steps):
      model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                     min_new_tokens=steps, max_new_tokens=steps,
                     pad_token_id=model.config.eos_token_id)
      sync()

    run(ms.SHORT_RUN)  # warm-up
    out["decode_ms_tok_b1"] = ms._decode_ms_per_token(run, args.decode_tokens, args.repeats)
  if device == "cuda":
    out["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20


def device_copy_bandwidth(mb: int, repeats: int) -> float:
  """GB/s of a jitted x + 1 over a float32 buffer of `mb` MB on JAX's default device.

  Counts bytes read + bytes written, like `model_speed.memory_copy_bandwidth` on the host: one
  elementwise pass is bound by memory traffic alone, so this is the streaming rate the decode
  floor divides the weight bytes by.
  """
  import jax
  import jax.numpy as jnp

  x = jnp.zeros(mb * 2**20 // 4, jnp.float32)
  bump = jax.jit(lambda x: x + 1)
  bump(x).block_until_ready()
  seconds = ms._median_s(lambda: bump(x).block_until_ready(), max(repeats, 10))
  return 2 * x.nbytes / seconds / 1e9


def _device_info() -> dict:
  """What JAX says about its backend and first device (no nvidia-smi on the device machine)."""
  import jax
  import jaxlib

  dev = jax.devices()[0]
  stats = dev.memory_stats() or {}
  info = {"backend": jax.default_backend(), "device_kind": dev.device_kind,
          "device_count": jax.device_count(), "jax_version": jax.__version__,
          "jaxlib_version": jaxlib.__version__,
          "platform_version": getattr(getattr(dev, "client", None), "platform_version", None),
          # What JAX's allocator may use (by default 75% of an accelerator's memory).
          "device_memory_gb": stats["bytes_limit"] / 1e9 if "bytes_limit" in stats else None}
  capability = getattr(dev, "compute_capability", None)
  if capability is not None:
    info["compute_capability"] = str(capability)
  return info


def _bench_jax(args, out: dict) -> None:
  """Our side: bandwidth, load, forward, decode, then each pruning method cold and warm."""
  import jax
  import jax.numpy as jnp

  import prunerep_jax as pj

  out.update(framework="prunerep_jax", dtype=args.dtype, **_device_info())
  out["copy_gb_s"] = device_copy_bandwidth(args.copy_mb, args.repeats)
  t0 = time.perf_counter()
  model = pj.load(args.path, dtype=args.dtype)
  params, config = jax.block_until_ready(model.params), model.config
  out["load_s"] = time.perf_counter() - t0
  out["weight_bytes"] = _weight_bytes(jax.tree_util.tree_leaves(params))
  _emit(out)

  for b, t in args.forward:
    tokens = jnp.asarray(ms._tokens(b, t, config.vocab_size))
    forward = lambda tokens=tokens: pj.forward(params, config, tokens,
                                               capture=False).logits.block_until_ready()
    first = ms._first_call_s(forward)
    steady = ms._median_s(forward, args.repeats)
    out[f"forward_tok_s_{b}x{t}"] = b * t / steady
    out[f"compile_s_forward_{b}x{t}"] = first - steady
    _emit(out)

  prompt = jnp.asarray(ms._tokens(1, ms.PROMPT_LEN, config.vocab_size))

  def run(steps):
    pj.generate(params, config, prompt, steps, eos_token_ids=()).tokens.block_until_ready()

  first = ms._first_call_s(lambda: run(ms.SHORT_RUN + args.decode_tokens))
  run(ms.SHORT_RUN)  # compile the short length too
  out["compile_s_generate"] = first - ms._median_s(
      lambda: run(ms.SHORT_RUN + args.decode_tokens), args.repeats)
  out["decode_ms_tok_b1"] = ms._decode_ms_per_token(run, args.decode_tokens, args.repeats)
  _emit(out)

  calibration = _calibration_tokens(args, config.vocab_size)

  def prune(method: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    result = pj.prune.get(method)(params, config, args.sparsity, calibration=calibration,
                                  batch_size=args.prune_batch_size)
    jax.block_until_ready((result.params, result.masks))
    return time.perf_counter() - t0, result.report["timings"]

  # Cold calls of every method first: they carry the targets; warm calls only where they fit.
  for method in args.methods:
    if time.time() >= args.deadline:
      break
    out[f"{method}_s"], phases = prune(method)
    out[f"{method}_phases"] = {k: v for k, v in phases.items() if k != "total_s"}
    _emit(out)
  for method in args.methods if not args.no_warm else ():
    if f"{method}_s" in out and time.time() + out[f"{method}_s"] < args.deadline:
      out[f"{method}_warm_s"], phases = prune(method)
      out[f"{method}_warm_phases"] = {k: v for k, v in phases.items() if k != "total_s"}
      _emit(out)
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["peak_device_mb"] = stats["peak_bytes_in_use"] / 2**20


def _bench_torch_prune(args, out: dict) -> None:
  """The PyTorch port of the published Wanda / SparseGPT code, on the checkpoint just built."""
  import torch
  import transformers

  from benchmarks import torch_prune

  device = "cuda" if torch.cuda.is_available() else "cpu"
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  out.update(framework="torch_prune", device=device, dtype=args.dtype)
  run = {"wanda": torch_prune.prune_wanda, "sparsegpt": torch_prune.prune_sparsegpt}
  for method in args.methods:
    if time.time() >= args.deadline:
      break
    model = transformers.LlamaForCausalLM.from_pretrained(args.path).to(
        device=device, dtype=getattr(torch, args.dtype)).eval()
    model.config.use_cache = False
    tokens = torch.from_numpy(_calibration_tokens(args, model.config.vocab_size).astype(np.int64))
    t0 = time.perf_counter()
    run[method](model, tokens, args.sparsity, record_layers=())
    sync()
    out[f"{method}_s"] = time.perf_counter() - t0
    del model
    _emit(out)


# ----------------------------------------------------------------------------- the driver

def _run_part(part: str, argv: list, path: str, dtype: str, deadline: float) -> dict:
  """One part in a fresh interpreter, stopped at the deadline; returns its last RESULT line
  (with "error" set when it failed or ran out of time, {} when it reported nothing)."""
  cmd = [sys.executable, "-m", PROG, *argv, "--part", part, "--path", path, "--dtype", dtype,
         "--deadline", repr(deadline)]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
  print(f"running {part} ...", file=sys.stderr, flush=True)
  t0, error = time.perf_counter(), None
  try:
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                          timeout=max(deadline - time.time(), 1.0))
    stdout, stderr = proc.stdout, proc.stderr
    if proc.returncode != 0:
      error = f"exit status {proc.returncode}"
  except subprocess.TimeoutExpired as e:
    # On POSIX the output read before the kill comes back as bytes.
    stdout, stderr = (s.decode(errors="replace") if isinstance(s, bytes) else s or ""
                      for s in (e.stdout, e.stderr))
    error = "stopped at the budget"
  lines = [l for l in stdout.splitlines() if l.startswith(ms._RESULT)]
  result = json.loads(lines[-1][len(ms._RESULT):]) if lines else {}
  if error is not None:
    sys.stderr.write(stderr[-4000:])
    result["error"] = error
  result["part_s"] = time.perf_counter() - t0
  print(f"  {part}: {result['part_s']:.0f} s" + (f" ({error})" if error else ""), file=sys.stderr,
        flush=True)
  return result


def _speedup(ours, theirs, higher_is_better: bool):
  if ours is None or theirs is None:
    return None
  return ours / theirs if higher_is_better else theirs / ours


def _floor_ms(part: dict, bandwidth) -> float | None:
  if bandwidth is None or part.get("weight_bytes") is None:
    return None
  return part["weight_bytes"] / (bandwidth * 1e9) * 1e3


def _rows(args, ours: dict, torch_: dict, pruned: dict, bandwidth) -> list:
  """(label, ours, torch, speed-up of ours, digits) for every line of the table."""
  rows = []
  for b, t in args.forward:
    key = f"forward_tok_s_{b}x{t}"
    rows.append((f"forward tok/s {b}x{t}", ours.get(key), torch_.get(key),
                 _speedup(ours.get(key), torch_.get(key), True), 0))
  for b, t in args.forward:
    rows.append((f"jit compile s forward {b}x{t}", ours.get(f"compile_s_forward_{b}x{t}"), None,
                 None, 1))
  ours_ms, torch_ms = ours.get("decode_ms_tok_b1"), torch_.get("decode_ms_tok_b1")
  rows.append(("decode ms/token B=1", ours_ms, torch_ms, _speedup(ours_ms, torch_ms, False), 2))
  rows.append((f"jit compile s generate B=1 ({args.decode_tokens + ms.SHORT_RUN} tok)",
               ours.get("compile_s_generate"), None, None, 1))
  floors = [_floor_ms(p, bandwidth) for p in (ours, torch_)]
  rows.append(("weight-streaming floor ms/token", *floors, None, 2))
  rows.append(("decode B=1 / floor", *(None if m is None or f is None else m / f
                                       for m, f in zip((ours_ms, torch_ms), floors)), None, 2))
  rows.append(("weights MB", *(None if "weight_bytes" not in p else p["weight_bytes"] / 1e6
                               for p in (ours, torch_)), None, 1))
  for method in args.methods:
    cold, theirs = ours.get(f"{method}_s"), pruned.get(f"{method}_s")
    rows.append((f"{method} s (torch: port of the published code)", cold, theirs,
                 _speedup(cold, theirs, False), 1))
    rows.append((f"{method} s warm (compiled)", ours.get(f"{method}_warm_s"), None,
                 _speedup(ours.get(f"{method}_warm_s"), theirs, False), 1))
    for phase in ("calibration_forward_s", "prune_s"):
      rows.append((f"  {phase.removesuffix('_s').replace('_', ' ')} s (cold / warm)",
                   _pair(ours, method, phase), None, None, 1))
  rows.append(("peak device memory MB", ours.get("peak_device_mb"), torch_.get("peak_device_mb"),
               None, 0))
  rows.append(("load s / build+save s", ours.get("load_s"), torch_.get("build_save_s"), None, 1))
  return rows


def _pair(ours: dict, method: str, phase: str) -> str | None:
  cold = ours.get(f"{method}_phases", {}).get(phase)
  warm = ours.get(f"{method}_warm_phases", {}).get(phase)
  if cold is None:
    return None
  return f"{cold:.1f} / {'-' if warm is None else f'{warm:.1f}'}"


def _cell(value, digits: int) -> str:
  if isinstance(value, str):
    return value
  return ms._fmt(value, digits)


def _table(rows: list) -> str:
  width = max(len(r[0]) for r in rows) + 2
  head = "".ljust(width) + "".join(c.rjust(16) for c in ("prunerep_jax", "transformers",
                                                         "ours speed-up"))
  lines = [head]
  for label, ours, theirs, speedup, digits in rows:
    lines.append(label.ljust(width) + _cell(ours, digits).rjust(16) + _cell(theirs, digits).rjust(16)
                 + ("-" if speedup is None else f"{speedup:.2f}x").rjust(16))
  return "\n".join(lines)


def _targets(args, ours: dict, torch_: dict, bandwidth) -> list:
  """Issue 10's accelerator targets as (MET | MISS, name, value, goal); a measurement this run
  did not make gives no line."""
  lines = []
  floor = _floor_ms(ours, bandwidth)
  if ours.get("decode_ms_tok_b1") is not None and floor is not None:
    r = ours["decode_ms_tok_b1"] / floor
    # Noise can make the difference of two short runs negative; that measures nothing.
    name = "decode B=1 / weight-streaming floor" + (
        "" if r > 0 else " (time difference <= 0: raise --decode_tokens)")
    lines.append((0 < r <= TARGET_FLOOR_RATIO, name, f"{r:.2f}x", f"<= {TARGET_FLOOR_RATIO}x"))
  for b, t in args.forward:
    r = _speedup(ours.get(f"forward_tok_s_{b}x{t}"), torch_.get(f"forward_tok_s_{b}x{t}"), True)
    if r is not None:
      lines.append((r >= TARGET_FORWARD_SPEEDUP, f"forward {b}x{t} speed-up over PyTorch",
                    f"{r:.2f}x", f">= {TARGET_FORWARD_SPEEDUP}x"))
  for method in args.methods:
    if ours.get(f"{method}_s") is not None:
      s = ours[f"{method}_s"]
      lines.append((s <= TARGET_PRUNE_S[method],
                    f"{method} {args.sparsity:g}, {args.nsamples} x {args.seqlen} calibration, "
                    "compile included", f"{s:.1f} s", f"<= {TARGET_PRUNE_S[method]:g} s"))
  return [{"met": bool(ok), "name": name, "value": value, "target": goal}
          for ok, name, value, goal in lines]


def _settings_note(args, dtype: str) -> str:
  ours = {"shape": args.shape, "dtype": dtype, "nsamples": args.nsamples, "seqlen": args.seqlen,
          "forward": [list(s) for s in args.forward]}
  differ = [f"{k}={ours[k]} (issue: {v})" for k, v in TARGET_SETTINGS.items() if ours[k] != v]
  return ("settings as in the issue" if not differ
          else "settings differ from the issue's: " + ", ".join(differ))


def _header(args, ours: dict, torch_: dict, dtype: str, load: tuple) -> list:
  mem = ours.get("device_memory_gb")
  cc = f", compute capability {ours['compute_capability']}" if "compute_capability" in ours else ""
  return [
      f"{args.shape} (random weights), {dtype}; jax {ours.get('jax_version', '-')} "
      f"(jaxlib {ours.get('jaxlib_version', '-')}, backend {ours.get('backend', '-')}, "
      f"{ours.get('platform_version') or '-'}), torch {torch_.get('torch_version', '-')}, "
      f"transformers {torch_.get('transformers_version', '-')}",
      f"jax device: {ours.get('device_kind', '-')} x{ours.get('device_count', '-')}"
      + (f", {mem:.1f} GB for JAX's allocator" if mem else "") + cc
      + f"; torch device: {torch_.get('device', '-')} ({torch_.get('device_name') or '-'})",
      f"repeats={args.repeats} (medians), decode_tokens={args.decode_tokens} after a "
      f"{ms.PROMPT_LEN}-token prompt, calibration {args.nsamples} x {args.seqlen} random windows "
      f"(seed {ms.SEED}); host load average {load[0]:.1f} before, {load[1]:.1f} after",
  ]


def main(argv=None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = _parse_args(argv)
  if args.part is not None:  # a measuring subprocess
    out = {}
    {"torch": _bench_torch, "jax": _bench_jax, "torch_prune": _bench_torch_prune}[args.part](
        args, out)
    _emit(out)
    return

  start, load_before = time.time(), os.getloadavg()[0]
  deadline = start + args.budget_s
  workdir = tempfile.mkdtemp(prefix="accelerator_")
  path = os.path.join(workdir, "model")
  notes = []
  try:
    torch_ = _run_part("torch", argv, path, args.dtype, deadline)
    if "dtype" not in torch_:
      raise SystemExit(f"{PROG}: building the model failed ({torch_.get('error')})")
    dtype = torch_["dtype"]
    ours, pruned = {}, {}
    if time.time() < deadline:
      ours = _run_part("jax", argv, path, dtype, deadline)
    if args.methods and not args.skip_torch_prune and time.time() < deadline:
      pruned = _run_part("torch_prune", argv, path, dtype, deadline)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  for name, part, wanted in (("transformers", torch_, True), ("prunerep_jax", ours, True),
                             ("torch pruning", pruned, bool(args.methods)
                              and not args.skip_torch_prune)):
    if wanted and not part:
      notes.append(f"{name}: not run (budget of {args.budget_s:g} s spent)")
    elif "error" in part:
      notes.append(f"{name}: {part['error']} after {part['part_s']:.0f} s; measured before that "
                   "are kept")
  for method in args.methods:
    if ours and f"{method}_s" in ours and f"{method}_warm_s" not in ours and not args.no_warm:
      notes.append(f"{method} warm call left out: it would not fit in the budget")
  if ours.get("backend") and (ours["backend"] == "cpu") != (torch_["device"] == "cpu"):
    notes.append(f"jax runs on {ours['backend']} but torch on {torch_['device']}: not comparable")

  bandwidth = ours.get("copy_gb_s")
  rows = _rows(args, ours, torch_, pruned, bandwidth)
  targets = _targets(args, ours, torch_, bandwidth)
  print("\n".join(_header(args, ours, torch_, dtype, (load_before, os.getloadavg()[0]))))
  print(_table(rows))
  if bandwidth is not None:
    print(f"\ndevice copy bandwidth: {bandwidth:,.1f} GB/s (jitted x + 1 over {args.copy_mb} MB, "
          "read + write bytes, median); floor = bytes of all weights / bandwidth")
  print(f"\ntargets (issue 10, item 3; {_settings_note(args, dtype)}):")
  for t in targets:
    print(f"  {'MET ' if t['met'] else 'MISS'} {t['name']}: {t['value']} (target {t['target']})")
  for note in notes:
    print(f"note: {note}")
  print(f"total {time.time() - start:.0f} s of a {args.budget_s:g} s budget")
  if args.json:
    from prunerep_jax import atomic
    settings = {k: v for k, v in vars(args).items() if k not in ("part", "path", "deadline")}
    atomic.write_json(args.json, {"settings": settings, "dtype": dtype, "copy_gb_s": bandwidth,
                                  "parts": {"transformers": torch_, "prunerep_jax": ours,
                                            "torch_prune": pruned},
                                  "targets": targets, "notes": notes},
                      overwrite=args.overwrite, caller=PROG, name="--json")


if __name__ == "__main__":
  main()
