"""The validation layer at the public boundary: one place that turns user input into checked values.

Every public function and launcher checks its arguments here, on the host, before any tracing,
compilation or heavy work; code inside `jax.jit` re-checks nothing. Each check either returns the
value in its canonical form (a Python int or float, an int32 NumPy array) or raises with a message
that names the function, the argument, the value received and what was expected::

  ValueError: generate(seed=-1): expected an integer in [0, 2**32)

Values that are JAX tracers (a public function called inside the user's own `jax.jit`) are
checked for shape and dtype only: their values do not exist yet, and fetching them would be a host
round trip per call. Everything else (Python scalars, NumPy scalars and arrays, concrete JAX
arrays) is checked by value.

Shape letters: B batch, T positions, P kept positions, V vocab.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

SEED_LIMIT = 2**32


class ArgumentError(ValueError):
  """A public function received an argument it cannot use. A ValueError, so callers that catch
  ValueError keep working; the message names the function, the argument, the value and what was
  expected."""


def _short(value: Any) -> str:
  """repr of a value, shortened for arrays (shape and dtype rather than every element)."""
  if isinstance(value, jax.core.Tracer):
    return f"<traced {value.dtype}{list(value.shape)}>"
  if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) > 0:
    return f"<array {value.dtype}{list(np.shape(value))}>"
  text = repr(value)
  return text if len(text) <= 80 else text[:77] + "..."


def fail(fn: str, name: str, value: Any, expected: str, *, error=ArgumentError) -> Exception:
  """The error for `fn(name=value)`: returned, so callers write ``raise fail(...)``."""
  return error(f"{fn}({name}={_short(value)}): expected {expected}")


def field_error(owner: str, name: str, value: Any, expected: str) -> ArgumentError:
  """The error for a bad field of a value type: `Config.sliding_window=-1: expected ...`."""
  return ArgumentError(f"{owner}.{name}={_short(value)}: expected {expected}")


def is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


# ------------------------------------------------------------------------------- scalars

def _scalar(value: Any) -> Any:
  """Unwraps NumPy scalars and 0-d concrete arrays to Python numbers; other values unchanged."""
  if isinstance(value, (np.generic,)):
    return value.item()
  if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0 and not is_traced(value):
    return np.asarray(value).item()
  return value


def integer(fn: str, name: str, value: Any, *, minimum: Optional[int] = None,
            maximum: Optional[int] = None, expected: Optional[str] = None) -> int:
  """A Python int in [minimum, maximum] from an int, a NumPy integer or a 0-d integer array.

  bool, floats (even 2.0), strings and None are refused: a count given as 2.5 or "4" is a bug in
  the caller, not something to round.
  """
  v = _scalar(value)
  if isinstance(v, bool) or not isinstance(v, numbers.Integral):
    raise fail(fn, name, value, expected or _range_text("an integer", minimum, maximum))
  v = int(v)
  if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
    raise fail(fn, name, value, expected or _range_text("an integer", minimum, maximum))
  return v


def number(fn: str, name: str, value: Any, *, minimum: Optional[float] = None,
           maximum: Optional[float] = None, min_open: bool = False, max_open: bool = False,
           expected: Optional[str] = None) -> float:
  """A finite Python float in the given interval, from any real scalar (NumPy and 0-d included)."""
  v = _scalar(value)
  text = expected or _interval_text(minimum, maximum, min_open, max_open)
  if isinstance(v, bool) or not isinstance(v, numbers.Real):
    raise fail(fn, name, value, text)
  v = float(v)
  if not math.isfinite(v):
    raise fail(fn, name, value, text)
  if minimum is not None and (v < minimum or (min_open and v == minimum)):
    raise fail(fn, name, value, text)
  if maximum is not None and (v > maximum or (max_open and v == maximum)):
    raise fail(fn, name, value, text)
  return v


def _range_text(what: str, minimum, maximum) -> str:
  if minimum is not None and maximum is not None:
    return f"{what} in [{minimum}, {maximum}]"
  if minimum is not None:
    return f"{what} >= {minimum}"
  if maximum is not None:
    return f"{what} <= {maximum}"
  return what


def _interval_text(minimum, maximum, min_open, max_open) -> str:
  if minimum is None and maximum is None:
    return "a finite number"
  lo = "(" if min_open else "["
  hi = ")" if max_open else "]"
  if maximum is None:
    return f"a finite number {'>' if min_open else '>='} {minimum}"
  if minimum is None:
    return f"a finite number {'<' if max_open else '<='} {maximum}"
  return f"a number in {lo}{minimum}, {maximum}{hi}"


def boolean(fn: str, name: str, value: Any) -> bool:
  v = _scalar(value)
  if not isinstance(v, (bool, np.bool_)):
    raise fail(fn, name, value, "True or False")
  return bool(v)


def seed(fn: str, value: Any, name: str = "seed") -> int:
  """A PRNG seed: an integer in [0, 2**32) (what `jax.random.key` takes without wrapping).

  A traced seed (inside the user's jit) must be an integer scalar and is returned unchanged.
  """
  expected = "an integer in [0, 2**32)"
  if is_traced(value):
    if value.ndim != 0 or not jnp.issubdtype(value.dtype, jnp.integer):
      raise fail(fn, name, value, f"{expected} (a traced seed must be an integer scalar)")
    return value
  return integer(fn, name, value, minimum=0, maximum=SEED_LIMIT - 1, expected=expected)


def temperature(fn: str, value: Any, *, allow_zero: bool, name: str = "temperature") -> float:
  """A sampling temperature (allow_zero: 0 means greedy) or an analysis temperature (> 0).

  A traced temperature (inside the user's jit) is returned unchanged.
  """
  if is_traced(value):
    return value
  if allow_zero:
    return number(fn, name, value, minimum=0.0,
                  expected="a finite number >= 0 (0 means greedy decoding)")
  return number(fn, name, value, minimum=0.0, min_open=True,
                expected="a finite number > 0 (greedy decoding is analysed at T = 1)")


def choice(fn: str, name: str, value: Any, options: Sequence[str]) -> str:
  if not isinstance(value, str) or value not in options:
    raise fail(fn, name, value, f"one of {tuple(options)}")
  return value


def token_id(fn: str, name: str, value: Any, vocab_size: int) -> int:
  return integer(fn, name, value, minimum=0, maximum=vocab_size - 1,
                 expected=f"a token id in [0, {vocab_size})")


def token_ids(fn: str, name: str, value: Any, vocab_size: int) -> tuple[int, ...]:
  """A tuple of token ids from one id or an iterable of ids (a string is refused, not split)."""
  if isinstance(value, (str, bytes)) or value is None:
    raise fail(fn, name, value, f"a token id or a sequence of token ids in [0, {vocab_size})")
  v = _scalar(value)
  if isinstance(v, numbers.Integral) and not isinstance(v, bool):
    return (token_id(fn, name, v, vocab_size),)
  try:
    items = list(value)
  except TypeError:
    raise fail(fn, name, value,
               f"a token id or a sequence of token ids in [0, {vocab_size})") from None
  return tuple(token_id(fn, f"{name}[{i}]", t, vocab_size) for i, t in enumerate(items))


def names(fn: str, name: str, value: Any, options: Sequence[str]) -> tuple[str, ...]:
  """A tuple of names, each one of `options`; a single string is refused rather than split into
  characters (capture="logits" would otherwise mean ("l", "o", ...))."""
  if isinstance(value, str):
    raise fail(fn, name, value, f"a tuple of names from {tuple(options)}, e.g. ({value!r},)")
  try:
    items = tuple(value)
  except TypeError:
    raise fail(fn, name, value, f"a tuple of names from {tuple(options)}") from None
  bad = [v for v in items if not isinstance(v, str) or v not in options]
  if bad:
    raise fail(fn, name, value, f"names from {tuple(options)}; {bad!r} are not")
  return items


# -------------------------------------------------------------------------------- arrays

def _integer_array(fn: str, name: str, value: Any, what: str):
  """value as an array (NumPy, or the tracer itself), refusing non-integer dtypes."""
  if is_traced(value):
    arr = value
  else:
    try:
      arr = np.asarray(value)
    except Exception:
      raise fail(fn, name, value, what) from None
  if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
    raise fail(fn, name, value, f"{what}; got dtype {arr.dtype}")
  return arr


def tokens(fn: str, value: Any, vocab_size: int, *, name: str = "tokens"):
  """Token ids [B, T] with T >= 1, every id in [0, vocab_size), as int32.

  The range is checked in the input's own dtype, before any cast: an int64 id of 2**32 + 5 is
  refused, not wrapped to 5; a negative id is refused, not wrapped to V - 1.

  Returns an int32 NumPy array, or an int32 tracer (shape and dtype checked only) under jit.
  """
  what = f"integer token ids [B, T] in [0, {vocab_size})"
  arr = _integer_array(fn, name, value, what)
  if arr.ndim != 2:
    raise fail(fn, name, value, f"{what}; got shape {tuple(arr.shape)}")
  if arr.shape[0] == 0 or arr.shape[1] == 0:
    raise fail(fn, name, value, f"{what} with B >= 1 and T >= 1; got shape {tuple(arr.shape)}")
  if is_traced(arr):
    return arr.astype(jnp.int32)
  lo, hi = arr.min(), arr.max()
  if lo < 0 or hi >= vocab_size:
    bad = np.argwhere((arr < 0) | (arr >= vocab_size))[0]
    raise ArgumentError(
        f"{fn}({name}=...): token id {arr[tuple(bad)]} at position {tuple(int(i) for i in bad)} "
        f"is outside the vocabulary; expected ids in [0, {vocab_size}) (ids span [{lo}, {hi}])")
  return arr.astype(np.int32)


def mask(fn: str, name: str, value: Any, shape: tuple[int, ...], *,
         require_real_token: bool = True):
  """A 0/1 mask of `shape` (bool or integer dtype) as int32; None means all ones.

  Float masks are refused (0.5 would be padding to one function and a token to another), and so
  are integer values other than 0 and 1. With require_real_token, every row needs a 1: an
  all-padding row has no meaningful output.
  """
  if value is None:
    return np.ones(shape, np.int32)
  what = f"a 0/1 mask of shape {tuple(shape)} (bool or integer dtype, 1 = real token)"
  if is_traced(value):
    arr = value
  else:
    try:
      arr = np.asarray(value)
    except Exception:
      raise fail(fn, name, value, what) from None
  if arr.dtype != np.bool_ and not np.issubdtype(arr.dtype, np.integer):
    raise fail(fn, name, value, f"{what}; got dtype {arr.dtype}")
  if tuple(arr.shape) != tuple(shape):
    raise fail(fn, name, value, f"{what}; got shape {tuple(arr.shape)}")
  if is_traced(arr):
    return arr.astype(jnp.int32)
  if arr.dtype != np.bool_ and not np.isin(arr, (0, 1)).all():
    bad = sorted(set(np.unique(arr).tolist()) - {0, 1})[:5]
    raise fail(fn, name, value, f"{what}; it holds {bad}")
  arr = arr.astype(np.int32)
  if require_real_token and arr.ndim == 2:
    empty = np.flatnonzero(arr.sum(axis=1) == 0)
    if empty.size:
      raise fail(fn, name, value, f"{what} with at least one real token per row; rows "
                 f"{empty.tolist()[:10]} are all padding")
  return arr


def positions(fn: str, name: str, value: Any, batch: int, length: int):
  """Integer positions [B, P] or [P] inside [0, length), as int32 [B, P]."""
  what = f"integer positions [B={batch}, P] or [P] in [0, {length})"
  arr = _integer_array(fn, name, value, what)
  if arr.ndim == 1:
    arr = (jnp if is_traced(arr) else np).broadcast_to(arr, (batch,) + tuple(arr.shape))
  if arr.ndim != 2 or arr.shape[0] != batch or arr.shape[1] == 0:
    raise fail(fn, name, value, f"{what}; got shape {tuple(np.shape(value))}")
  if is_traced(arr):
    return arr.astype(jnp.int32)
  if arr.min() < 0 or arr.max() >= length:
    raise fail(fn, name, value, f"{what}; they span [{arr.min()}, {arr.max()}]")
  return arr.astype(np.int32)


# -------------------------------------------------------------------------------- params

def params(fn: str, value: Any, config, *, finite: bool = False) -> None:
  """params match `config`'s layout (every path and shape); with finite, hold no NaN/Inf.

  The layout check reads shapes only; the finiteness check is one jitted reduction over the whole
  tree (one device call, one small result), skipped for traced params.
  """
  from prunerep_jax import layout  # layout imports config only; keep this module import-light

  from prunerep_jax.config import Config
  if not isinstance(config, Config):
    raise fail(fn, "config", config, "a prunerep_jax Config", error=TypeError)
  if not isinstance(value, dict):
    raise fail(fn, "params", value, "a params pytree (nested dict) in the layout of "
               "prunerep_jax.layout", error=TypeError)
  layout.check_params(value, config, source=f"{fn}(params)")
  if finite:
    check_finite(fn, value)


@jax.jit
def _all_finite(leaves):
  # sum(x - x) is 0 for finite x and NaN as soon as one entry is NaN or Inf: one fused reduction
  # with no temporary. all(isfinite(x)) could keep a bool per weight; sum(x * 0) made XLA:CPU
  # (jax 0.10) materialise the zero broadcast to the leaf's shape (+420 MB of peak RSS while
  # loading the default model); max(|x|) misses NaN in XLA:CPU's fused max reduction.
  return jnp.stack([jnp.isfinite(jnp.sum(x - x, dtype=jnp.float32)) for x in leaves])


def first_nonfinite(tree: Any) -> Optional[str]:
  """Path ('layers/attn/q_proj/kernel') of the first leaf holding NaN or Inf, else None.

  One jitted reduction over the whole tree and one small transfer; traced trees give None.
  """
  from prunerep_jax import layout

  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  # dtype read in place: jnp.asarray here would copy every host array to the device twice
  leaves = [(p, x) for p, x in flat
            if jnp.issubdtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype,
                              jnp.inexact)]
  if not leaves or any(is_traced(x) for _, x in leaves):
    return None
  ok = np.asarray(_all_finite([x for _, x in leaves]))
  if ok.all():
    return None
  return layout.path_str(leaves[int(np.argmin(ok))][0])


def check_finite(fn: str, tree: Any, name: Optional[str] = "params") -> None:
  """Raises naming the first leaf of `tree` that holds NaN or Inf (one jitted reduction).

  The message starts `fn(name): ...`, or `fn: ...` with name=None (fn a file path, say).
  """
  path = first_nonfinite(tree)
  if path is not None:
    where = fn if name is None else f"{fn}({name})"
    raise ArgumentError(f"{where}: tensor {path} contains NaN or Inf values; expected finite "
                        "weights")


# --------------------------------------------------------------------------------- paths

def output_path(fn: str, name: str, value: Any) -> str:
  """An absolute path the caller can create: its nearest existing ancestor is a writable
  directory (not a file). Checked before any heavy work, so a run never computes a result it
  cannot save."""
  if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
    raise fail(fn, name, value, "a non-empty path", error=TypeError)
  path = os.path.abspath(os.path.expanduser(os.fspath(value)))
  ancestor = os.path.dirname(path)
  while not os.path.lexists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    raise fail(fn, name, value, f"a path under a directory; {ancestor} is a file")
  if not os.access(ancestor, os.W_OK | os.X_OK):
    raise fail(fn, name, value, f"a writable location; {ancestor} is not writable",
               error=PermissionError)
  return path

