"""Resident-memory measurements shared by the benchmarks (Linux /proc; no heavy imports, so a
child process that must not count torch or jax against its memory can import it first)."""

import os
import threading


def rss_mb() -> float:
  """Current resident set size of this process in MB."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssSampler:
  """Polls this process's RSS in a thread: the peak of one phase, where ru_maxrss / VmHWM only
  hold the process-wide peak (which loading or compiling may set)."""

  def __init__(self, interval_s: float = 0.02):
    self.interval_s = interval_s
    self.peak_mb = rss_mb()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.wait(self.interval_s):
      self.peak_mb = max(self.peak_mb, rss_mb())

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak_mb = max(self.peak_mb, rss_mb())
