"""Output for people: one line per finished unit of work with an ETA, transient progress inside a
unit, and a log that keeps everything for the output directory.

`Console.line` prints a permanent line; `Console.status` shows a transient line (on a terminal
it is overwritten by the next one; elsewhere it is not printed). Both go to the console's
`LogBuffer`, which the launcher also attaches to the root logger, so third-party log records
(absl, orbax, jax) land there too instead of on the console. `LogBuffer.flush_to` writes it
atomically, so the log obeys the same write discipline as every other output (a killed run keeps
the log up to its last flush, which happens after every unit of work).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Optional, TextIO

from prunerep_jax import atomic

def clock(seconds: Optional[float]) -> str:
  """1:05, 12:00, 1:02:03; "?" when unknown."""
  if seconds is None:
    return "?"
  seconds = int(round(max(seconds, 0.0)))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Console:
  """Progress lines on `stream` (default stdout), everything also into `log` when given."""

  def __init__(self, stream: Optional[TextIO] = None, log: Optional["LogBuffer"] = None):
    self.stream = stream or sys.stdout
    self.log = log
    self.live = hasattr(self.stream, "isatty") and self.stream.isatty()
    self._transient = False

  def line(self, text: str) -> None:
    self._clear()
    self.stream.write(text + "\n")
    self.stream.flush()
    if self.log is not None:
      self.log.add(text)

  def status(self, text: str) -> None:
    if self.log is not None:
      self.log.add(text)
    if self.live:
      width = max(20, _columns() - 1)
      self.stream.write("\r\033[K" + text[:width])
      self.stream.flush()
      self._transient = True

  def _clear(self) -> None:
    if self._transient:
      self.stream.write("\r\033[K")
      self._transient = False


def _columns() -> int:
  try:
    return os.get_terminal_size().columns
  except OSError:
    return 100


class Eta:
  """Remaining time of units of work, from the durations of the finished ones.

  A unit's kind is a string ("cell:wanda", "analysis"); `weights` gives each kind's relative cost.
  A kind already seen is estimated by its mean duration; an unseen kind by its weight times the
  seconds per unit of weight of everything finished so far (or `prior` before anything has).
  """

  def __init__(self, prior: float, weights: dict[str, float]):
    self.prior = prior
    self.weights = weights
    self.done: dict[str, list[float]] = {}

  def record(self, kind: str, seconds: float) -> None:
    self.done.setdefault(kind, []).append(seconds)

  def estimate(self, kind: str) -> float:
    if self.done.get(kind):
      return sum(self.done[kind]) / len(self.done[kind])
    weight = sum(self.weights.get(k, 1.0) * len(v) for k, v in self.done.items())
    rate = sum(sum(v) for v in self.done.values()) / weight if weight else self.prior
    return rate * self.weights.get(kind, 1.0)

  def remaining(self, kinds) -> float:
    return sum(self.estimate(k) for k in kinds)


class Progress:
  """The numbered lines of a run of units: "[ 3/28] NAME   12.3 s  NOTE  | elapsed 1:02, ETA 4:10"
  when a unit finishes (or "cached"), and "[ 4/28] NAME: what" status lines while one runs.

  Args:
    console: where the lines go.
    eta: the Eta that records each finished unit's seconds.
    pending: kinds of the units still to compute (each finished computed unit removes its kind).
    total: number of units, computed or cached.
    started: time.perf_counter() at the start of the run (for "elapsed").
    width: column width of the names.
    after: called after every finished line (e.g. to flush the log).
  """

  def __init__(self, console: Console, eta: Eta, pending: list, total: int, started: float, *,
               width: int, after=None):
    self.console, self.eta, self.pending, self.total = console, eta, pending, total
    self.started, self.width, self.after = started, width, after
    self.done = 0

  def finished(self, kind: str, name: str, seconds: Optional[float], note: str = "") -> None:
    self.done += 1
    head = f"[{self.done:>2}/{self.total}] {name:<{self.width}}"
    if seconds is None:
      text = f"{head} cached"
    else:
      self.eta.record(kind, seconds)
      self.pending.remove(kind)
      text = (f"{head} {seconds:6.1f} s  {note}".rstrip()
              + f"  | elapsed {clock(time.perf_counter() - self.started)}, "
              f"ETA {clock(self.eta.remaining(self.pending))}")
    self.console.line(text)
    if self.after is not None:
      self.after()

  def status(self, name: str, what: str = "") -> None:
    """A transient line for the unit now running."""
    self.console.status(f"[{self.done + 1:>2}/{self.total}] {name}" + (f": {what}" if what else ""))

  def reporter(self, name: str):
    """A progress callback (line -> None) for the unit now running."""
    return lambda line: self.status(name, line)


class LogBuffer(logging.Handler):
  """Keeps the console's lines and formatted log records in memory; `flush_to` writes them
  (after `header`) atomically."""

  def __init__(self, header: str = ""):
    super().__init__(logging.INFO)
    self.lines = [header] if header else []
    self.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s",
                                        "%H:%M:%S"))

  def add(self, text: str) -> None:
    self.lines.append(f"{time.strftime('%H:%M:%S')} {text}")

  def emit(self, record: logging.LogRecord) -> None:
    try:
      self.lines.append(self.format(record))
    except Exception:  # a logging handler must never raise into the program
      self.handleError(record)

  def flush_to(self, path: str) -> None:
    atomic.write_text(path, "\n".join(self.lines) + "\n", overwrite=True,
                      caller="prunerep_jax.study", name="log")
