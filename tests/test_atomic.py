"""The atomic-write discipline: stage, fsync, swap; stale stages cleaned; errors name the target."""

import errno
import logging
import os
import subprocess
import sys

import pytest

from prunerep_jax import atomic
from prunerep_jax.loading import tokenizer as tokenizer_lib


@pytest.fixture
def umask_022():
  old = os.umask(0o022)
  yield
  os.umask(old)


@pytest.fixture(params=["renameat2", "plain_renames"])
def swap_kind(request, monkeypatch):
  """Runs a test with Linux's renameat2 and with the two-rename fallback of other systems."""
  if request.param == "renameat2" and atomic._RENAMEAT2 is None:
    pytest.skip("renameat2 is not available here")
  if request.param == "plain_renames":
    monkeypatch.setattr(atomic, "_RENAMEAT2", None)
  return request.param


def _dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def _fill(stage, text):
  with open(os.path.join(stage, "a.txt"), "w") as f:
    f.write(text)


def _write_dir(path, text, **kwargs):
  with atomic.staged_directory(path, caller="t", **kwargs) as stage:
    _fill(stage, text)


def test_staged_directory_creates_and_replaces(tmp_path, swap_kind):
  target = tmp_path / "out"
  _write_dir(target, "one", overwrite=False)
  assert (target / "a.txt").read_text() == "one"
  with pytest.raises(FileExistsError, match=r"t\(directory='.*out'\): already exists; pass "
                     "overwrite=True"):
    _write_dir(target, "two", overwrite=False)
  _write_dir(target, "two", overwrite=True)
  assert (target / "a.txt").read_text() == "two"
  assert os.listdir(tmp_path) == ["out"]  # neither the stage nor the old content is left


def test_an_exception_leaves_the_destination_untouched(tmp_path, swap_kind):
  _write_dir(tmp_path / "out", "one", overwrite=False)
  with pytest.raises(RuntimeError, match="boom"):
    with atomic.staged_directory(tmp_path / "out", overwrite=True, caller="t") as stage:
      _fill(stage, "two")
      raise RuntimeError("boom")
  assert (tmp_path / "out" / "a.txt").read_text() == "one"
  assert os.listdir(tmp_path) == ["out"]


def test_a_destination_that_appears_meanwhile_is_kept(tmp_path, swap_kind):
  target = tmp_path / "out"
  with pytest.raises(FileExistsError, match=r"t\(directory='.*out'\): appeared while it was "
                     "being written; pass overwrite=True"):
    with atomic.staged_directory(target, overwrite=False, caller="t") as stage:
      _fill(stage, "mine")
      target.mkdir()
      (target / "a.txt").write_text("theirs")
  assert (target / "a.txt").read_text() == "theirs"
  assert os.listdir(tmp_path) == ["out"]
  with pytest.raises(FileExistsError, match="appeared while it was being written"):
    with atomic.staged_directory(tmp_path / "empty", overwrite=False, caller="t") as stage:
      _fill(stage, "mine")
      (tmp_path / "empty").mkdir()  # even an empty directory is not replaced silently
  assert os.listdir(tmp_path / "empty") == []


def test_files_get_the_umask_modes(tmp_path, umask_022):
  with atomic.staged_directory(tmp_path / "out", overwrite=False, caller="t") as stage:
    os.makedirs(os.path.join(stage, "sub"), mode=0o700)
    fd = os.open(os.path.join(stage, "sub", "secret"), os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)
  modes = {p: os.stat(tmp_path / "out" / p).st_mode & 0o777 for p in ("", "sub", "sub/secret")}
  assert modes == {"": 0o755, "sub": 0o755, "sub/secret": 0o644}


def test_clean_stale_removes_only_dead_writers_stages(tmp_path):
  dead, live = _dead_pid(), os.getpid()
  ours_dead = [f".out.tmp-{dead}-0123456789ab", f".out.old-{dead}-0123456789ab"]
  kept = [f".out.tmp-{live}-0123456789ab",  # a writer still running (this process)
          f".other.tmp-{dead}-0123456789ab",  # another destination's stage
          ".out.tmp-notes", "out.tmp-1-0123456789ab"]  # not names this module makes
  (tmp_path / "out").mkdir()
  for name in ours_dead + kept:
    (tmp_path / name).mkdir()
  removed = atomic.clean_stale(tmp_path / "out")
  assert sorted(removed) == sorted(str(tmp_path / n) for n in ours_dead)
  assert sorted(os.listdir(tmp_path)) == sorted(kept + ["out"])


def test_the_next_write_cleans_stale_stages(tmp_path):
  stale = tmp_path / f".out.tmp-{_dead_pid()}-0123456789ab"
  stale.mkdir()
  (stale / "half-written").write_text("x")
  _write_dir(tmp_path / "out", "one", overwrite=False)
  assert os.listdir(tmp_path) == ["out"]


def test_recover_renames_an_interrupted_replacement_back(tmp_path):
  old = tmp_path / f".out.old-{_dead_pid()}-0123456789ab"
  old.mkdir()
  (old / "a.txt").write_text("previous")
  assert atomic.recover(tmp_path / "out") == str(tmp_path / "out")
  assert (tmp_path / "out" / "a.txt").read_text() == "previous"
  assert os.listdir(tmp_path) == ["out"]
  assert atomic.recover(tmp_path / "out") is None  # nothing left to do
  # A live writer's .old sibling is in the middle of its swap: left alone.
  live = tmp_path / f".x.old-{os.getpid()}-0123456789ab"
  live.mkdir()
  assert atomic.recover(tmp_path / "x") is None and live.is_dir()


def test_unwritable_destinations_are_named(tmp_path, monkeypatch):
  (tmp_path / "file").write_text("x")
  with pytest.raises(NotADirectoryError, match=r"t\(directory='.*file/out'\): cannot be "
                     "created, .*file is a file"):
    _write_dir(tmp_path / "file" / "out", "one", overwrite=False)
  with pytest.raises(FileExistsError, match="exists and is a file; refusing to replace it even "
                     "with overwrite=True"):
    _write_dir(tmp_path / "file", "one", overwrite=True)
  (tmp_path / "link").symlink_to(tmp_path / "file")
  with pytest.raises(FileExistsError, match="exists and is a symlink"):
    _write_dir(tmp_path / "link", "one", overwrite=True)
  with pytest.raises(TypeError, match=r"t\(directory=''\): expected a non-empty path"):
    _write_dir("", "one", overwrite=False)
  with pytest.raises(ValueError, match=r"t\(directory='/'\): expected a path below the "
                     "filesystem root"):
    _write_dir("/", "one", overwrite=True)
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match="holds the current working directory; refusing to "
                     "replace it"):
    _write_dir(".", "one", overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["file", "link"]

  real_mkdir = os.mkdir

  def refuse_stage(path, *args, **kwargs):
    if ".tmp-" in os.fspath(path):
      raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
    return real_mkdir(path, *args, **kwargs)

  monkeypatch.setattr(os, "mkdir", refuse_stage)
  with pytest.raises(PermissionError, match=r"t\(directory='.*ro'\): cannot write \(Permission "
                     r"denied\)") as info:
    _write_dir(tmp_path / "ro", "one", overwrite=False)
  assert ".tmp-" not in str(info.value) and info.value.errno == errno.EACCES


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only directories")
def test_a_read_only_parent_is_refused_before_any_work(tmp_path):
  (tmp_path / "ro").mkdir(mode=0o555)
  with pytest.raises(PermissionError, match=r"cannot be created, .*ro is not writable"):
    _write_dir(tmp_path / "ro" / "out", "one", overwrite=False)


def test_write_json_is_atomic_and_refuses_to_overwrite(tmp_path, umask_022):
  path = tmp_path / "sub" / "r.json"
  atomic.write_json(path, {"a": 1}, overwrite=False, caller="t")
  assert path.read_text() == '{\n  "a": 1\n}\n' and os.stat(path).st_mode & 0o777 == 0o644
  with pytest.raises(FileExistsError, match=r"t\(path='.*r.json'\): already exists"):
    atomic.write_json(path, {"a": 2}, overwrite=False, caller="t")
  atomic.write_json(path, {"a": 2}, overwrite=True, caller="t")
  assert path.read_text() == '{\n  "a": 2\n}\n' and os.listdir(path.parent) == ["r.json"]
  with pytest.raises(ValueError, match=r"t\(report=...\): expected JSON-serialisable data "
                     "without NaN/Inf"):
    atomic.write_json(tmp_path / "nan.json", {"x": float("nan")}, overwrite=False, caller="t",
                      name="report")
  assert not (tmp_path / "nan.json").exists()


# --------------------------------------------------------------- the tokenizer cache

class _FakeTokenizer:
  def __init__(self, text, before_return=None):
    self.text, self.before_return = text, before_return

  def save_pretrained(self, directory):
    with open(os.path.join(directory, "tokenizer.json"), "w") as f:
      f.write(self.text)
    if self.before_return:
      self.before_return()


def test_tokenizer_cache_is_written_through_a_stage(tmp_path):
  cache = tmp_path / "tokenizers" / "tok-1"
  tokenizer_lib._save_atomically(_FakeTokenizer("new"), str(cache))
  assert (cache / "tokenizer.json").read_text() == "new"
  assert os.listdir(cache.parent) == ["tok-1"]


def test_tokenizer_cache_replaces_a_damaged_entry(tmp_path):
  cache = tmp_path / "tok-1"
  cache.mkdir()
  (cache / "tokenizer.json").write_text("damaged")
  tokenizer_lib._save_atomically(_FakeTokenizer("new"), str(cache))
  assert (cache / "tokenizer.json").read_text() == "new"
  assert os.listdir(tmp_path) == ["tok-1"]


def test_tokenizer_cache_keeps_an_entry_a_concurrent_process_wrote(tmp_path):
  cache = tmp_path / "tok-1"

  def other_process_wins():
    cache.mkdir()
    (cache / "tokenizer.json").write_text("theirs")

  tokenizer_lib._save_atomically(_FakeTokenizer("mine", other_process_wins), str(cache))
  assert (cache / "tokenizer.json").read_text() == "theirs"
  assert os.listdir(tmp_path) == ["tok-1"]


def test_an_unwritable_tokenizer_cache_only_warns(tmp_path, caplog):
  (tmp_path / "file").write_text("x")
  with caplog.at_level(logging.WARNING, logger=tokenizer_lib.log.name):
    tokenizer_lib._save_atomically(_FakeTokenizer("new"), str(tmp_path / "file" / "tok-1"))
  assert "cannot cache tokenizer in" in caplog.text and "is a file" in caplog.text
  assert os.listdir(tmp_path) == ["file"]
