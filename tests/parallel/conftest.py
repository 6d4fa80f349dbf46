"""Starts every multi-device child interpreter at once, so the machine's cores work on all of
them together; each test module then waits for its own."""

import pytest

from _subprocess import free_port, run_child


@pytest.fixture(scope="session")
def children(tmp_path_factory):
  """{"multi_device": (Popen, result path), "multi_host": [(Popen, result path)] * 2}."""
  tmp = tmp_path_factory.mktemp("children")
  port = free_port()
  launched = {
      "multi_device": (run_child("_multi_device.py", [tmp / "device.json"], devices=4),
                       tmp / "device.json"),
      "multi_host": [(run_child("_multi_host.py", [i, port, tmp / f"host{i}.json"], devices=2),
                      tmp / f"host{i}.json") for i in range(2)],
  }
  yield launched
  for proc, _ in [launched["multi_device"], *launched["multi_host"]]:
    if proc.poll() is None:  # a module that failed early never waited for its child
      proc.kill()
      proc.communicate()
