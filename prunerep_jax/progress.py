"""Progress of long loops: one line per step with the elapsed time and an ETA.

Every long loop of the library (task suites, analyses over batches, the study's cells) reports
through a `Reporter`; a caller passes `progress=` a callable receiving each line (a console, a
log), or None for absl INFO logging.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from absl import logging

from prunerep_jax import validate

Progress = Optional[Callable[[str], Any]]


class Reporter:
  """`reporter(done)` emits `name: done/total unit (pct), elapsed, ETA` to `callback` (None: absl
  INFO)."""

  def __init__(self, name: str, total: int, unit: str, callback: Progress):
    self.name, self.total, self.unit = name, total, unit
    self.callback = callback or logging.info
    self.start = time.perf_counter()

  def __call__(self, done: int) -> None:
    elapsed = time.perf_counter() - self.start
    eta = elapsed / done * (self.total - done) if done else float("nan")
    self.callback(f"{self.name}: {done}/{self.total} {self.unit} ({100 * done / self.total:.0f}%)"
                  f", {elapsed:.1f} s elapsed, ETA {eta:.0f} s")


def check_progress(fn: str, progress: Any) -> None:
  if progress is not None and not callable(progress):
    raise validate.fail(fn, "progress", progress, "None or a callable taking one str",
                        error=TypeError)
