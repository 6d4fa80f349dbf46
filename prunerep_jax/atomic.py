"""One atomic-write discipline for every file and directory the library writes.

Stage, fsync, swap: a writer fills a hidden staging sibling of the destination (same filesystem,
so the final `os.rename` is atomic), flushes it to disk, then renames it into place. A process
killed at any moment leaves either the previous content or the new one at the destination, never
a mixture; what it leaves behind is a hidden ``.NAME.tmp-PID-XXXX`` sibling, removed by the next
write to the same destination once its writer process is gone.

Rules every writer follows:
  * refuse to replace an existing destination unless the caller passed overwrite=True;
  * validate everything before touching the disk (bad input leaves no trace);
  * never delete anything the library did not create: only the destination being replaced (at
    the caller's explicit request) and our own staging siblings are ever removed;
  * files get the usual umask permissions (0644 under the common umask 022), never 0600.

Errors name the destination the caller gave, never the hidden staging path.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import uuid
from typing import Any, Iterator

_STAGE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]{12}$")


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
  0600) and directories the default directory mode."""
  file_mode = default_file_mode()
  dir_mode = 0o777 & ~_umask()
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


def clean_stale(destination: str) -> list[str]:
  """Removes staging siblings of `destination` left by writers that no longer run.

  Only hidden ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` entries whose PID is dead are removed:
  they can only have been made by this module. Returns the removed paths.
  """
  parent, name = os.path.split(os.path.abspath(destination))
  removed = []
  try:
    entries = os.listdir(parent)
  except FileNotFoundError:
    return removed
  for entry in entries:
    m = _STAGE.match(entry)
    if not m or m.group("name") != name or _pid_alive(int(m.group("pid"))):
      continue
    path = os.path.join(parent, entry)
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
    FileExistsError: it exists and overwrite is False, or it exists with the wrong kind (a file
      where a directory is wanted, a symlink), which is never replaced.
    NotADirectoryError: an ancestor is a file.
    PermissionError: the nearest existing ancestor is not writable.
  """
  if not isinstance(destination, (str, os.PathLike)) or not os.fspath(destination):
    raise TypeError(f"{caller}({name}={destination!r}): expected a non-empty path")
  path = os.path.abspath(os.path.expanduser(os.fspath(destination)))
  if os.path.lexists(path):
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


def _reraise_naming(e: OSError, caller: str, name: str, destination: str):
  raise type(e)(e.errno, f"{caller}({name}={destination!r}): cannot write "
                f"({e.strerror or e})") from e


@contextlib.contextmanager
def staged_directory(directory: str, *, overwrite: bool, caller: str,
                     name: str = "directory") -> Iterator[str]:
  """Yields an empty staging directory to fill; on success it atomically becomes `directory`.

  On exit without an exception the stage is fsynced, its modes normalised, and renamed into
  place; a replaced directory is first renamed aside and deleted only after the new one is in
  place (a crash in between leaves it as a hidden ``.old`` sibling, cleaned up later). On an
  exception the stage is removed and `directory` is untouched.
  """
  directory = check_destination(directory, overwrite=overwrite, caller=caller, name=name)
  parent = os.path.dirname(directory)
  try:
    os.makedirs(parent, exist_ok=True)
    clean_stale(directory)
    stage = _sibling(directory, "tmp")
    os.mkdir(stage)  # not mkdtemp: that gives 0700
  except OSError as e:
    _reraise_naming(e, caller, name, directory)
  try:
    yield stage
    normalize_modes(stage)
    fsync_tree(stage)
    if os.path.lexists(directory):
      old = _sibling(directory, "old")
      os.rename(directory, old)
      try:
        os.rename(stage, directory)
      except BaseException:
        os.rename(old, directory)
        raise
      fsync_path(parent)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(stage, directory)
      fsync_path(parent)
  except OSError as e:
    _reraise_naming(e, caller, name, directory)
  finally:
    if os.path.lexists(stage):
      shutil.rmtree(stage, ignore_errors=True)


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
    os.replace(tmp, path)
    fsync_path(parent)
  except OSError as e:
    _reraise_naming(e, caller, name, path)
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
