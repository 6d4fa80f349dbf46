"""One atomic-write discipline for every file and directory the library writes.

Stage, fsync, swap: a writer fills a hidden staging sibling of the destination (same filesystem,
so the final rename is atomic), flushes it to disk, then swaps it into place. A process killed at
any moment leaves either the previous content or the new one at the destination, never a mixture
and never nothing; what it leaves behind is a hidden ``.NAME.tmp-PID-XXXXXXXXXXXX`` sibling,
removed by the next write to the same destination once its writer process is gone.

Replacing a directory uses Linux's ``renameat2(RENAME_EXCHANGE)``, which swaps the staged and the
existing directory in one step. Where that is unavailable (other systems, some filesystems) the
old directory is first renamed aside to ``.NAME.old-PID-XXXXXXXXXXXX`` and the stage renamed in;
a crash between the two renames leaves no destination, and `recover` (run by the next write and
by readers such as `checkpoint.restore`) renames the old directory back.

Rules every writer follows:
  * refuse to replace an existing destination unless the caller passed overwrite=True, and
    without it never replace one that appears while the stage is being written;
  * validate everything before touching the disk (bad input leaves no trace);
  * never delete anything the library did not create: only the destination being replaced (at
    the caller's explicit request) and our own staging siblings are ever removed;
  * files get the usual umask permissions (0644 under the common umask 022), never 0600.

Errors name the destination the caller gave, never the hidden staging path.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import sys
import uuid
from typing import Any, Iterator, Optional

_STAGE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{12}$")

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _load_renameat2():
  if not sys.platform.startswith("linux"):
    return None
  try:
    fn = ctypes.CDLL(None, use_errno=True).renameat2
  except (OSError, AttributeError):  # no libc symbol (glibc < 2.28, musl): plain renames
    return None
  fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
  fn.restype = ctypes.c_int
  return fn


_RENAMEAT2 = _load_renameat2()


def _renameat2(src: str, dst: str, flags: int) -> bool:
  """renameat2(src, dst, flags); False where the kernel or filesystem does not support it."""
  if _RENAMEAT2 is None:
    return False
  if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
    return False
  raise OSError(err, os.strerror(err), src, None, dst)


def _rename_noreplace(src: str, dst: str) -> None:
  """Renames `src` to `dst`, raising FileExistsError if `dst` exists (even if it appeared a
  moment ago: with renameat2 the check and the rename are one step)."""
  if _renameat2(src, dst, _RENAME_NOREPLACE):
    return
  if os.path.lexists(dst):
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
  try:
    os.rename(src, dst)
  except OSError as e:
    if e.errno in (errno.ENOTEMPTY, errno.EEXIST):  # a directory appeared in between
      raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst) from e
    raise


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def default_file_mode() -> int:
  """The mode a plain `open(path, "w")` would give a new file (0o644 under umask 022)."""
  return 0o666 & ~_umask()


def fsync_path(path: str) -> None:
  """Flushes a file, or a directory entry table, to disk."""
  flags = os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0)
  fd = os.open(path, flags)
  try:
    os.fsync(fd)
  except OSError as e:  # some filesystems cannot fsync a directory; the data is still written
    if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
      raise
  finally:
    os.close(fd)


def fsync_tree(root: str) -> None:
  """fsyncs every file and directory under `root`, and `root` itself (files first)."""
  for folder, _, files in os.walk(root, topdown=False):
    for f in files:
      p = os.path.join(folder, f)
      if not os.path.islink(p):
        fsync_path(p)
    fsync_path(folder)


def normalize_modes(root: str) -> None:
  """Gives files under `root` the default file mode (libraries that write through mkstemp leave
  0600) and directories, `root` included, the default directory mode."""
  file_mode = default_file_mode()
  dir_mode = 0o777 & ~_umask()
  os.chmod(root, dir_mode)
  for folder, dirs, files in os.walk(root):
    for d in dirs:
      p = os.path.join(folder, d)
      if not os.path.islink(p):
        os.chmod(p, dir_mode)
    for f in files:
      p = os.path.join(folder, f)
      if not os.path.islink(p):
        os.chmod(p, file_mode)


def _pid_alive(pid: int) -> bool:
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _dead_siblings(destination: str) -> list[tuple[str, str]]:
  """(kind, path) of the staging siblings of `destination` whose writer process is gone."""
  parent, name = os.path.split(os.path.abspath(destination))
  try:
    entries = os.listdir(parent)
  except (FileNotFoundError, NotADirectoryError):
    return []
  found = []
  for entry in sorted(entries):
    m = _STAGE.match(entry)
    if m and m.group("name") == name and not _pid_alive(int(m.group("pid"))):
      found.append((m.group("kind"), os.path.join(parent, entry)))
  return found


def recover(destination: str) -> Optional[str]:
  """Undoes a replacement interrupted between its two renames (see the module docstring).

  When `destination` is missing and a dead writer left the previous content as a ``.old``
  sibling, renames it back. Returns the recovered path, or None when there was nothing to do.
  """
  destination = os.path.abspath(destination)
  if os.path.lexists(destination):
    return None
  for kind, path in _dead_siblings(destination):
    if kind == "old":
      with contextlib.suppress(FileExistsError, FileNotFoundError):  # another process won
        _rename_noreplace(path, destination)
        return destination
  return None


def clean_stale(destination: str) -> list[str]:
  """Recovers an interrupted replacement (`recover`), then removes the staging siblings of
  `destination` left by writers that no longer run.

  Only hidden ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` entries whose PID is dead are removed:
  they can only have been made by this module. Returns the removed paths.
  """
  recover(destination)
  removed = []
  for _, path in _dead_siblings(destination):
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    removed.append(path)
  return removed


def _sibling(destination: str, kind: str) -> str:
  parent, name = os.path.split(destination)
  return os.path.join(parent, f".{name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def check_destination(destination: str, *, overwrite: bool, caller: str,
                      name: str = "directory", want_dir: bool = True) -> str:
  """Checks, before any work, that `destination` can be written; returns it absolute.

  Raises:
    TypeError: `destination` is not a non-empty path.
    ValueError: it is the filesystem root, or (with overwrite) the working directory or above.
    FileExistsError: it exists and overwrite is False, or it exists with the wrong kind (a file
      where a directory is wanted, a symlink), which is never replaced.
    NotADirectoryError: an ancestor is a file.
    PermissionError: the nearest existing ancestor is not writable.
  """
  if not isinstance(destination, (str, os.PathLike)) or not os.fspath(destination):
    raise TypeError(f"{caller}({name}={destination!r}): expected a non-empty path")
  path = os.path.abspath(os.path.expanduser(os.fspath(destination)))
  if os.path.dirname(path) == path:
    raise ValueError(f"{caller}({name}={path!r}): expected a path below the filesystem root")
  if os.path.lexists(path):
    if overwrite and os.path.commonpath([path, os.getcwd()]) == path:
      raise ValueError(f"{caller}({name}={path!r}): holds the current working directory; "
                       "refusing to replace it even with overwrite=True")
    if not overwrite:
      raise FileExistsError(f"{caller}({name}={path!r}): already exists; pass overwrite=True "
                            "to replace it")
    if os.path.islink(path) or os.path.isdir(path) != want_dir:
      kind = "a symlink" if os.path.islink(path) else ("a directory" if os.path.isdir(path)
                                                      else "a file")
      raise FileExistsError(f"{caller}({name}={path!r}): exists and is {kind}; refusing to "
                            "replace it even with overwrite=True")
  ancestor = os.path.dirname(path)
  while not os.path.lexists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    raise NotADirectoryError(f"{caller}({name}={path!r}): cannot be created, {ancestor} is a "
                             "file")
  if not os.access(ancestor, os.W_OK | os.X_OK):
    raise PermissionError(f"{caller}({name}={path!r}): cannot be created, {ancestor} is not "
                          "writable")
  return path


def _named_error(e: OSError, caller: str, name: str, destination: str) -> OSError:
  """`e` re-described with the caller's destination instead of a staging path."""
  text = f"{caller}({name}={destination!r}): cannot write ({e.strerror or e})"
  # OSError(errno, text) picks the matching subclass (PermissionError for EACCES, ...).
  return OSError(e.errno, text) if e.errno is not None else OSError(text)


def _appeared(caller: str, name: str, destination: str) -> FileExistsError:
  return FileExistsError(f"{caller}({name}={destination!r}): appeared while it was being "
                         "written; pass overwrite=True to replace it")


def _swap_in(stage: str, directory: str, overwrite: bool) -> bool:
  """Puts the filled `stage` at `directory` (see the module docstring for the crash cases).

  Returns False, leaving everything as it was, when overwrite is False and `directory` exists.
  """
  parent = os.path.dirname(directory)
  if not overwrite or not os.path.lexists(directory):
    try:
      _rename_noreplace(stage, directory)
    except FileExistsError:
      return False
  elif not _renameat2(stage, directory, _RENAME_EXCHANGE):
    old = _sibling(directory, "old")
    os.rename(directory, old)
    try:
      os.rename(stage, directory)
    except BaseException:
      os.rename(old, directory)
      raise
    fsync_path(parent)
    shutil.rmtree(old, ignore_errors=True)
    return True
  # After an exchange `stage` holds the previous content; the caller's cleanup removes it.
  fsync_path(parent)
  return True


@contextlib.contextmanager
def staged_directory(directory: str, *, overwrite: bool, caller: str,
                     name: str = "directory") -> Iterator[str]:
  """Yields an empty staging directory to fill; on success it atomically becomes `directory`.

  On exit without an exception the stage's modes are normalised, it is fsynced and swapped into
  place (the replaced content, when overwrite=True, is deleted only after the swap). On an
  exception the stage is removed and `directory` is untouched.

  Raises (naming `directory`, never the stage):
    FileExistsError: `directory` exists (or appeared while the stage was written) and overwrite
      is False; or it is a file or symlink.
    NotADirectoryError, PermissionError, OSError: `directory` cannot be written.
  """
  directory = check_destination(directory, overwrite=overwrite, caller=caller, name=name)
  try:
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    clean_stale(directory)
    stage = _sibling(directory, "tmp")
    os.mkdir(stage)  # not mkdtemp: that gives 0700
  except OSError as e:
    raise _named_error(e, caller, name, directory) from e
  try:
    yield stage
    normalize_modes(stage)
    fsync_tree(stage)
    swapped = _swap_in(stage, directory, overwrite)
  except OSError as e:
    raise _named_error(e, caller, name, directory) from e
  finally:
    if os.path.lexists(stage):
      shutil.rmtree(stage, ignore_errors=True)
  if not swapped:
    raise _appeared(caller, name, directory)


def write_bytes(path: str, data: bytes, *, overwrite: bool, caller: str,
                name: str = "path") -> str:
  """Writes `data` to `path` atomically (temporary sibling, fsync, rename); returns the path."""
  path = check_destination(path, overwrite=overwrite, caller=caller, name=name, want_dir=False)
  parent = os.path.dirname(path)
  tmp = None
  try:
    os.makedirs(parent, exist_ok=True)
    clean_stale(path)
    tmp = _sibling(path, "tmp")
    with open(tmp, "xb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    if overwrite:
      os.replace(tmp, path)
    else:
      _rename_noreplace(tmp, path)
    fsync_path(parent)
  except FileExistsError:
    raise _appeared(caller, name, path) from None
  except OSError as e:
    raise _named_error(e, caller, name, path) from e
  finally:
    if tmp is not None and os.path.lexists(tmp):
      os.remove(tmp)
  return path


def write_text(path: str, text: str, *, overwrite: bool, caller: str, name: str = "path") -> str:
  return write_bytes(path, text.encode("utf-8"), overwrite=overwrite, caller=caller, name=name)


def json_text(value: Any, *, caller: str, name: str, allow_nan: bool = False) -> str:
  """`value` as indented JSON, or a ValueError naming the argument (checked before any write)."""
  try:
    return json.dumps(value, indent=2, allow_nan=allow_nan) + "\n"
  except (TypeError, ValueError) as e:
    raise ValueError(f"{caller}({name}=...): expected JSON-serialisable data without NaN/Inf "
                     f"({e})") from None


def write_json(path: str, value: Any, *, overwrite: bool, caller: str, name: str = "path") -> str:
  text = json_text(value, caller=caller, name=name)
  return write_text(path, text, overwrite=overwrite, caller=caller, name=name)
