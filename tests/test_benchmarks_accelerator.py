"""benchmarks/accelerator.py end to end on the CPU at the tiny shape, as the device run will go.

One run at the smallest sizes exercises every part (build and save with transformers, our load,
forward, decode, both pruning methods, the PyTorch pruning port) and the report; the device run
differs only in shape, sizes and device.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import accelerator

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ("--shape=tiny", "--forward=1x16", "--decode_tokens=4", "--repeats=1", "--nsamples=2",
         "--seqlen=16", "--copy_mb=8", "--methods=wanda,sparsegpt", "--no_warm")
ROWS = ("forward tok/s 1x16", "decode ms/token B=1", "weight-streaming floor ms/token",
        "decode B=1 / floor", "wanda s (torch: port of the published code)",
        "sparsegpt s (torch: port of the published code)")
TARGETS = ("decode B=1 / weight-streaming floor", "forward 1x16 speed-up over PyTorch",
           "wanda 0.5, 2 x 16 calibration, compile included",
           "sparsegpt 0.5, 2 x 16 calibration, compile included")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(stdout, the --json report) of one tiny run; CPU only, one thread per pool (spinning
  OpenMP workers on a busy 2-core machine slow torch down a hundredfold)."""
  out = tmp_path_factory.mktemp("accelerator") / "report.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
             HF_HUB_OFFLINE="1")
  proc = subprocess.run([sys.executable, "-m", "benchmarks.accelerator", *FLAGS, f"--json={out}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout, json.loads(out.read_text())


def _cells(stdout: str, label: str) -> list:
  """The three value cells of the table row `label` (ours, transformers, speed-up)."""
  for line in stdout.splitlines():
    if line.startswith(label + "  "):
      return line[len(label):].split()
  raise AssertionError(f"no row {label!r} in:\n{stdout}")


def test_table_rows_hold_finite_numbers_for_both_frameworks(run):
  stdout, _ = run
  for label in ROWS:
    ours, theirs, _ = _cells(stdout, label)
    for cell in (ours, theirs):
      assert math.isfinite(float(cell.replace(",", ""))), (label, cell)


def test_every_target_is_judged(run):
  stdout, report = run
  for name in TARGETS:
    assert re.search(rf"^  (MET |MISS) {re.escape(name)}", stdout, re.M), name
  # A two-token decode difference can come out <= 0 under load; the line then says so after the
  # name, and still counts as judged.
  names = [t["name"] for t in report["targets"]]
  assert len(names) == len(TARGETS)
  assert all(n.startswith(t) for n, t in zip(names, TARGETS)), names


def test_both_sides_measure_the_same_weights_on_the_same_device(run):
  _, report = run
  ours, theirs = report["parts"]["prunerep_jax"], report["parts"]["transformers"]
  # The tiny shape: 2 blocks (7 linears, 2 norms each), the final norm and one tied 512 x 64
  # embedding (counted once on both sides), in fp32.
  assert ours["weight_bytes"] == theirs["weight_bytes"] == 106816 * 4
  assert (ours["backend"], theirs["device"], report["dtype"]) == ("cpu", "cpu", "float32")
  assert report["notes"] == []
  assert report["copy_gb_s"] > 0
  for part, keys in (("prunerep_jax", ("wanda_s", "sparsegpt_s", "forward_tok_s_1x16")),
                     ("torch_prune", ("wanda_s", "sparsegpt_s"))):
    for key in keys:
      assert report["parts"][part][key] > 0, (part, key)


def test_a_malformed_forward_shape_is_refused_before_any_work(capsys):
  with pytest.raises(SystemExit) as exit_:
    accelerator._parse_args(["--forward=8by512"])
  assert exit_.value.code == 2
  assert ("benchmarks.accelerator(--forward='8by512'): expected comma-separated BxT with positive "
          "B and T" in capsys.readouterr().err)
