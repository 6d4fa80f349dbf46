"""Runs the multi-device checks in child interpreters, so this process keeps its one device."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def child_env(devices: int) -> dict:
  """The environment of a child with `devices` forced CPU devices, importing this checkout."""
  flags = os.environ.get("XLA_FLAGS", "")
  flags = " ".join(f for f in flags.split() if "xla_force_host_platform_device_count" not in f)
  return dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}",
              JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
              PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def run_child(script: str, args: list, devices: int) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, str(HERE / script), *map(str, args)], cwd=ROOT,
                          env=child_env(devices), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float) -> str:
  """The child's output; raises AssertionError with it if the child failed or hung."""
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, _ = proc.communicate()
    raise AssertionError(f"child timed out after {timeout}s:\n{out[-4000:]}") from None
  assert proc.returncode == 0, f"child exited with {proc.returncode}:\n{out[-4000:]}"
  return out


def read_json(path) -> dict:
  with open(path) as f:
    return json.load(f)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]
