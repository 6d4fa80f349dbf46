"""Peak host memory of `pj.load` on a Llama-3.2-1B-shaped bf16 checkpoint, against its size.

    python -m benchmarks.load_memory [--dtypes bfloat16,float32] [--workdir DIR] [--json FILE]

Builds a random-weight LlamaForCausalLM with the Llama-3.2-1B shapes (16 layers, hidden 2048,
intermediate 8192, 32 query / 8 kv heads, vocabulary 128,256, tied embeddings; 1.24 B params)
with transformers, saves it in bf16 with `save_pretrained` (a 2.5 GB safetensors file), then
loads it with `pj.load(path, dtype=...)` in a fresh subprocess per dtype and reads the process's
peak resident set (VmHWM of /proc/self/status) after the load. The target for the bf16 load is a
peak of at most 1.3x the checkpoint's size: the loader streams tensor by tensor into one leaf
buffer at a time and never maps the file. The peak includes the interpreter with JAX imported
(the "baseline" column) and, on the CPU backend, the loaded params themselves (CPU device
memory is host memory). Resident memory is per process, so other load on the machine does not
change the figures; the times do depend on it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TARGET = 1.3
_RESULT = "RESULT "


def _parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--dtypes", default="bfloat16",
                 help="comma-separated dtypes to load the checkpoint in (bfloat16, float32)")
  p.add_argument("--workdir", default="",
                 help="where to write the checkpoint (default: a temporary directory, removed "
                      "afterwards); an existing checkpoint there is reused")
  p.add_argument("--json", default="", help="also write the measurements to this new file")
  # Internal: the subprocesses that build the checkpoint and measure one load.
  p.add_argument("--part", choices=("build", "load"), default=None, help=argparse.SUPPRESS)
  p.add_argument("--path", default="", help=argparse.SUPPRESS)
  p.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def _status_kib(field: str) -> int:
  """A memory field of /proc/self/status (VmRSS, VmHWM), in KiB."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise RuntimeError(f"/proc/self/status has no {field}")


def _build(path: str) -> None:
  """Saves a random-weight Llama-3.2-1B-shaped model in bf16 (see `random_llama.build`)."""
  from benchmarks import random_llama

  random_llama.build("llama-3.2-1b").save_pretrained(path)


def _load(path: str, dtype: str) -> dict:
  """One load in this fresh process: peak RSS and the time it took."""
  import jax

  import prunerep_jax as pj

  baseline = _status_kib("VmRSS")
  t0 = time.perf_counter()
  model = pj.load(path, dtype=dtype)
  jax.block_until_ready(jax.tree_util.tree_leaves(model.params))
  seconds = time.perf_counter() - t0
  params_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(model.params))
  return {"dtype": dtype, "baseline_bytes": baseline * 1024, "peak_bytes": _status_kib("VmHWM") *
          1024, "params_bytes": params_bytes, "load_s": seconds}


def _run(*args: str) -> str:
  proc = subprocess.run([sys.executable, "-m", "benchmarks.load_memory", *args],
                        capture_output=True, text=True,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if proc.returncode:
    raise RuntimeError(f"benchmarks.load_memory {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
  return proc.stdout


def _checkpoint_bytes(path: str) -> int:
  return sum(os.path.getsize(f) for f in glob.glob(os.path.join(path, "*.safetensors")))


def main(argv=None) -> None:
  args = _parse_args(argv)
  if args.part == "build":
    _build(args.path)
    return
  if args.part == "load":
    print(_RESULT + json.dumps(_load(args.path, args.dtype)), flush=True)
    return

  dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
  made_here = not args.workdir
  workdir = args.workdir or tempfile.mkdtemp(prefix="load_memory_")
  path = os.path.join(workdir, "llama-3.2-1b-shaped-bf16")
  try:
    if not glob.glob(os.path.join(path, "*.safetensors")):
      t0 = time.perf_counter()
      _run("--part", "build", "--path", path)
      print(f"built {path} in {time.perf_counter() - t0:.0f} s", flush=True)
    size = _checkpoint_bytes(path)
    rows = []
    for dtype in dtypes:
      out = _run("--part", "load", "--path", path, "--dtype", dtype)
      rows.append(json.loads(out.strip().splitlines()[-1][len(_RESULT):]))
  finally:
    if made_here:
      shutil.rmtree(workdir, ignore_errors=True)

  gib = 2.0 ** 30
  print(f"\ncheckpoint: {size / gib:.2f} GiB of bf16 safetensors (Llama-3.2-1B shapes); target "
        f"peak RSS <= {TARGET}x checkpoint for the bf16 load\n")
  print("| dtype | params GiB | baseline RSS GiB | peak RSS GiB | peak / checkpoint | load s |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['dtype']} | {r['params_bytes'] / gib:.2f} | {r['baseline_bytes'] / gib:.2f} | "
          f"{r['peak_bytes'] / gib:.2f} | {r['peak_bytes'] / size:.2f}x | {r['load_s']:.1f} |")
  if args.json:
    from prunerep_jax import atomic
    atomic.write_json(args.json, {"checkpoint_bytes": size, "loads": rows}, overwrite=False,
                      caller="load_memory", name="--json")


if __name__ == "__main__":
  main()
