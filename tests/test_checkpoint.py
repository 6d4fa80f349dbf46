"""orbax checkpoints: bit-identical round trips, atomic overwrites, checksums and clear errors."""

import errno
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import prunerep_jax as pj
from prunerep_jax import checkpoint
from prunerep_jax.checkpoint import CorruptCheckpointError
from prunerep_jax.prune.result import PruneResult

# A failed orbax read leaves a callback for its closed event loop; Python reports it later.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = pj.Config(family="qwen2", vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True, tie_word_embeddings=True,
                eos_token_ids=(1, 2))


@pytest.fixture(scope="module")
def params():
  return pj.init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def other_params():
  return pj.init_params(CFG, jax.random.key(1))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, params):
  """A pristine checkpoint; tests that damage one copy it first."""
  return checkpoint.save(tmp_path_factory.mktemp("saved") / "ck", params, CFG,
                         extra={"note": "x"})


def _copy(src, tmp_path, name="ck"):
  return shutil.copytree(src, tmp_path / name)


def _assert_bit_identical(a, b):
  flat_a, tree_a = jax.tree_util.tree_flatten(a)
  flat_b, tree_b = jax.tree_util.tree_flatten(b)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    x, y = np.ascontiguousarray(x), np.ascontiguousarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8))


def _meta(directory):
  with open(os.path.join(directory, "config.json")) as f:
    return json.load(f)


def _masks(params):
  rng = np.random.default_rng(3)
  kernel = params["layers"]["attn"]["q_proj"]["kernel"]
  return {"layers": {"attn": {"q_proj": {"kernel": rng.random(kernel.shape) < 0.5}}}}


def _dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


# --------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_round_trip_is_bit_identical(tmp_path, params, dtype):
  params = pj.cast(params, dtype)
  checkpoint.save(tmp_path / "ck", params, CFG, extra={"note": "x", "sparsity": 0.5})
  restored, config, extra = checkpoint.restore(tmp_path / "ck")
  assert config == CFG and extra == {"note": "x", "sparsity": 0.5}
  _assert_bit_identical(restored, params)


def test_config_json_records_a_checksum_of_every_array(saved, params):
  meta = _meta(saved)
  assert meta["format"] == "prunerep_jax.checkpoint/2" and set(meta["checksums"]) == {"params"}
  flat = {pj.layout.path_str(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert set(meta["checksums"]["params"]) == set(flat)
  for path, x in flat.items():
    assert meta["checksums"]["params"][path] == {
        "sha256": hashlib.sha256(x.tobytes()).hexdigest(), "dtype": "float32",
        "shape": list(x.shape)}


# ------------------------------------------------------------------------ overwriting

def test_save_refuses_to_overwrite_unless_asked(tmp_path, params, other_params):
  checkpoint.save(tmp_path / "ck", params, CFG)
  with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
    checkpoint.save(tmp_path / "ck", other_params, CFG)
  _assert_bit_identical(checkpoint.restore(tmp_path / "ck")[0], params)
  checkpoint.save(tmp_path / "ck", other_params, CFG, overwrite=True)
  _assert_bit_identical(checkpoint.restore(tmp_path / "ck")[0], other_params)
  assert os.listdir(tmp_path) == ["ck"]  # no staging or backup directory left


def test_save_over_a_pruned_checkpoint_drops_its_masks(tmp_path, params, other_params):
  checkpoint.save_pruned(tmp_path / "ck", PruneResult(params, _masks(params), {"m": 1}, CFG))
  assert (tmp_path / "ck" / "masks").is_dir()
  checkpoint.save(tmp_path / "ck", other_params, CFG, overwrite=True)
  assert sorted(os.listdir(tmp_path / "ck")) == ["config.json", "params"]
  assert set(_meta(tmp_path / "ck")["checksums"]) == {"params"}
  with pytest.raises(ValueError, match="written by save_pruned"):
    checkpoint.restore_pruned(tmp_path / "ck")
  _assert_bit_identical(checkpoint.restore(tmp_path / "ck")[0], other_params)


def test_save_pruned_round_trips_masks_and_checks_them(tmp_path, params):
  result = PruneResult(params, _masks(params), {"method": "magnitude", "sparsity": 0.5}, CFG)
  checkpoint.save_pruned(tmp_path / "ck", result)
  back = checkpoint.restore_pruned(tmp_path / "ck")
  assert back.config == CFG and back.report == result.report
  _assert_bit_identical(back.params, params)
  _assert_bit_identical(back.masks, result.masks)
  # A mask that does not match its recorded checksum is refused, naming it.
  meta = _meta(tmp_path / "ck")
  meta["checksums"]["masks"]["layers/attn/q_proj/kernel"]["sha256"] = "0" * 64
  (tmp_path / "ck" / "config.json").write_text(json.dumps(meta))
  with pytest.raises(CorruptCheckpointError, match=r"the checkpoint data is corrupt: tensor "
                     r"layers/attn/q_proj/kernel read from .*ck/masks"):
    checkpoint.restore_pruned(tmp_path / "ck")


# --------------------------------------------------------- validation before the disk

def test_a_non_json_extra_writes_nothing_and_the_retry_succeeds(tmp_path, params):
  with pytest.raises(ValueError, match=r"save\(extra=...\): expected JSON-serialisable"):
    checkpoint.save(tmp_path / "ck", params, CFG, extra={"x": object()})
  with pytest.raises(ValueError, match=r"save\(extra=...\): expected JSON-serialisable data "
                     "without NaN"):
    checkpoint.save(tmp_path / "ck", params, CFG, extra={"x": float("nan")})
  with pytest.raises(ValueError, match=r"save\(extra=\['a'\]\): expected a JSON-serialisable "
                     "dict or None"):
    checkpoint.save(tmp_path / "ck", params, CFG, extra=["a"])
  assert os.listdir(tmp_path) == []
  checkpoint.save(tmp_path / "ck", params, CFG, extra={"x": 1})
  assert checkpoint.restore(tmp_path / "ck")[2] == {"x": 1}


def test_save_rejects_params_that_do_not_fit_the_config(tmp_path, params):
  with pytest.raises(ValueError, match=r"save\(params\): tensor layers/attn/o_proj/kernel has "
                     r"shape \(2, 32, 32\), expected \(2, 16, 32\)"):
    checkpoint.save(tmp_path / "ck", params, CFG.replace(num_heads=2))
  assert os.listdir(tmp_path) == []


def test_save_rejects_non_finite_and_float64_params(tmp_path, params):
  nan = {**params, "final_norm": {"scale": params["final_norm"]["scale"].at[3].set(jnp.inf)}}
  with pytest.raises(ValueError, match=r"save\(params\): tensor final_norm/scale contains NaN "
                     "or Inf"):
    checkpoint.save(tmp_path / "ck", nan, CFG)
  f64 = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
  with pytest.raises(ValueError, match=r"save\(params\): tensor embed/embedding has dtype "
                     r"float64; expected one of \('float32', 'bfloat16', 'float16'\)"):
    checkpoint.save(tmp_path / "ck", f64, CFG)
  with pytest.raises(ValueError, match=r"save_pruned\(params\): tensor final_norm/scale "
                     "contains NaN"):
    checkpoint.save_pruned(tmp_path / "ck", PruneResult(nan, None, {}, CFG))
  assert os.listdir(tmp_path) == []


def test_save_pruned_rejects_bad_masks_and_reports(tmp_path, params):
  masks = _masks(params)
  float_masks = jax.tree_util.tree_map(lambda m: m.astype(np.float32), masks)
  with pytest.raises(ValueError, match=r"save_pruned\(result.masks\): leaf "
                     "layers/attn/q_proj/kernel has dtype float32"):
    checkpoint.save_pruned(tmp_path / "p", PruneResult(params, float_masks, {}, CFG))
  with pytest.raises(ValueError, match=r"save_pruned\(result.masks\): leaf \['layers'\]\[0\]\S* "
                     "is not under string keys"):
    checkpoint.save_pruned(tmp_path / "p", PruneResult(params, {"layers": [masks]}, {}, CFG))
  with pytest.raises(ValueError, match=r"save_pruned\(result.masks=dict\): expected None"):
    checkpoint.save_pruned(tmp_path / "p", PruneResult(params, {}, {}, CFG))
  with pytest.raises(ValueError, match=r"save_pruned\(result.report=...\): expected "
                     "JSON-serialisable"):
    checkpoint.save_pruned(tmp_path / "p", PruneResult(params, None, {"x": object()}, CFG))
  with pytest.raises(TypeError, match=r"save_pruned\(result=dict\): expected a PruneResult"):
    checkpoint.save_pruned(tmp_path / "p", {"params": params})
  assert os.listdir(tmp_path) == []


# ------------------------------------------------------------- unwritable destinations

def test_a_path_under_a_file_is_refused_naming_it(tmp_path, params):
  (tmp_path / "file").write_text("x")
  target = tmp_path / "file" / "ck"
  where = re.escape(str(target))
  with pytest.raises(NotADirectoryError, match=rf"save\(directory='{where}'\): cannot be created, "
                     ".*file is a file"):
    checkpoint.save(target, params, CFG)
  with pytest.raises(FileExistsError, match="exists and is a file; refusing to replace it"):
    checkpoint.save(tmp_path / "file", params, CFG, overwrite=True)
  assert (tmp_path / "file").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only directories")
def test_a_read_only_directory_is_refused_naming_it(tmp_path, params):
  (tmp_path / "ro").mkdir(mode=0o555)
  with pytest.raises(PermissionError, match=r"save\(directory='.*ro/ck'\): cannot be created, "
                     ".*ro is not writable"):
    checkpoint.save(tmp_path / "ro" / "ck", params, CFG)


def test_a_write_error_names_the_destination_not_the_stage(tmp_path, params, monkeypatch):
  checkpoint.save(tmp_path / "ck", params, CFG)

  def disk_full(self, path, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))

  monkeypatch.setattr(ocp.StandardCheckpointer, "save", disk_full)
  with pytest.raises(OSError, match=r"save\(directory='.*ck'\): cannot write \(No space left "
                     r"on device\)") as info:
    checkpoint.save(tmp_path / "ck", params, CFG, overwrite=True)
  assert info.value.errno == errno.ENOSPC and ".tmp-" not in str(info.value)
  assert os.listdir(tmp_path) == ["ck"]
  _assert_bit_identical(checkpoint.restore(tmp_path / "ck")[0], params)


# ------------------------------------------------------------------ interrupted saves

_CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
import jax
import numpy as np
import orbax.checkpoint as ocp
import prunerep_jax as pj
from prunerep_jax import atomic, checkpoint


def block(*args, **kwargs):
  print("blocked", flush=True)  # the parent kills us now
  time.sleep(600)


if {point!r} == "orbax":  # the params item is on disk, config.json is not
  original = ocp.StandardCheckpointer.save

  def save_then_block(self, *args, **kwargs):
    original(self, *args, **kwargs)
    self.wait_until_finished()
    block()

  ocp.StandardCheckpointer.save = save_then_block
else:  # the whole stage is written, just before the swap
  atomic.fsync_tree = block
config = pj.Config.from_dict(json.loads({config!r}))
params = jax.tree_util.tree_map(lambda s: np.full(s, 0.5, np.float32),
                                pj.layout.param_shapes(config),
                                is_leaf=lambda x: isinstance(x, tuple))  # no init to compile
checkpoint.save({directory!r}, params, config, overwrite=True)
print("finished", flush=True)
"""


@pytest.mark.parametrize("point", ["orbax", "swap"])
def test_a_save_killed_midway_keeps_the_previous_checkpoint(tmp_path, params, other_params,
                                                           point):
  directory = checkpoint.save(tmp_path / "ck", params, CFG)
  script = _CHILD.format(root=ROOT, point=point, config=json.dumps(CFG.to_dict()),
                         directory=directory)
  log = tmp_path / "child.log"
  with open(log, "w") as stderr:
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=stderr, text=True, cwd=ROOT,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
  watchdog = threading.Timer(120, proc.kill)  # never hang the suite
  watchdog.start()
  try:
    assert proc.stdout.readline().strip() == "blocked", log.read_text()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
  finally:
    watchdog.cancel()
    proc.stdout.close()
  log.unlink()
  stale = [e for e in os.listdir(tmp_path) if e != "ck"]
  assert len(stale) == 1 and stale[0].startswith(f".ck.tmp-{proc.pid}-")
  assert (tmp_path / stale[0] / "params").is_dir()
  restored, config, _ = checkpoint.restore(directory)
  assert config == CFG
  _assert_bit_identical(restored, params)
  # The next write to the same place removes what the killed writer left.
  checkpoint.save(directory, other_params, CFG, overwrite=True)
  assert os.listdir(tmp_path) == ["ck"]
  _assert_bit_identical(checkpoint.restore(directory)[0], other_params)


def test_restore_recovers_a_swap_interrupted_between_its_renames(tmp_path, saved, params):
  # Without renameat2 a replacement renames the old directory aside first; a crash right then
  # leaves only the hidden .old sibling of a dead writer.
  old = _copy(saved, tmp_path, f".ck.old-{_dead_pid()}-0123456789ab")
  restored, _, _ = checkpoint.restore(tmp_path / "ck")
  _assert_bit_identical(restored, params)
  assert os.listdir(tmp_path) == ["ck"] and not os.path.exists(old)


# ----------------------------------------------------------------- corrupt checkpoints

def test_a_flipped_bit_in_the_data_is_refused(tmp_path, saved):
  data = glob.glob(os.path.join(saved, "params", "**", "d", "*"), recursive=True)
  largest = max(data, key=os.path.getsize)
  size = os.path.getsize(largest)
  messages = []
  for k, offset in enumerate((size // 3, size // 2, 2 * size // 3)):
    damaged = _copy(saved, tmp_path, f"ck{k}")
    with open(os.path.join(damaged, os.path.relpath(largest, saved)), "r+b") as f:
      f.seek(offset)
      byte = f.read(1)[0]
      f.seek(offset)
      f.write(bytes([byte ^ 0x08]))
    where = re.escape(str(damaged))
    with pytest.raises(CorruptCheckpointError, match=rf"restore\(directory='{where}'\): (the "
                       "checkpoint data is corrupt|corrupt or incomplete checkpoint)") as e:
      checkpoint.restore(damaged)
    messages.append(str(e.value))
  # The data is zstd-compressed: most flips inside it decode to other weights, which only the
  # checksum catches; a flip in a frame header makes orbax fail, reported as corrupt too.
  assert any(re.search(r"the checkpoint data is corrupt: tensor [a-z_/]+ read from .*/params "
                       r"has sha256 [0-9a-f]{16}\.\.\. \(float32\[[0-9, ]+\]\), but config.json "
                       r"records", m) for m in messages), messages


def test_valid_orbax_data_of_another_model_is_refused(tmp_path, saved, other_params):
  damaged = _copy(saved, tmp_path)
  checkpoint.save(tmp_path / "other", other_params, CFG)
  shutil.rmtree(damaged / "params")
  shutil.copytree(tmp_path / "other" / "params", damaged / "params")
  with pytest.raises(CorruptCheckpointError, match=r"the checkpoint data is corrupt: tensor "
                     "embed/embedding"):
    checkpoint.restore(damaged)


def test_lost_orbax_metadata_is_not_needed_the_checksums_vouch_for_the_data(tmp_path, saved):
  # The restore target (shapes, dtypes, shardings) comes from config.json, and every array is
  # verified against its checksum, so orbax's own metadata file is not needed to read it right.
  damaged = _copy(saved, tmp_path)
  (damaged / "params" / "_METADATA").unlink()
  params, _, _ = checkpoint.restore(damaged)
  expected, _, _ = checkpoint.restore(saved)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("remove", ["params/manifest.ocdbt", "params/d", "params"])
def test_damaged_orbax_data_is_reported_as_a_corrupt_checkpoint(tmp_path, saved, remove):
  damaged = _copy(saved, tmp_path)
  target = damaged / remove
  shutil.rmtree(target) if target.is_dir() else target.unlink()
  where = re.escape(str(damaged))
  with pytest.raises(CorruptCheckpointError, match=rf"restore\(directory='{where}'\): corrupt or "
                     "incomplete checkpoint: "):
    checkpoint.restore(damaged)


# ------------------------------------------------------------------ malformed metadata

def _with_meta(change):
  def edit(meta):
    change(meta)
    return meta
  return edit


MALFORMED = {
    "not_json": (lambda m: "{", r"is not valid JSON"),
    "a_list": (lambda m: [m], r"holds a JSON list; expected an object"),
    "no_config": (_with_meta(lambda m: m.pop("config")), r"missing fields \['config'\]"),
    "unknown_top_field": (_with_meta(lambda m: m.update(notes=1)), r"unknown fields \['notes'\]"),
    "config_a_list": (_with_meta(lambda m: m.update(config=[1])), r"field 'config' is malformed"),
    "unknown_config_field": (_with_meta(lambda m: m["config"].update(rope_type="yarn")),
                             r"field 'config.rope_type' is malformed; expected only fields"),
    "missing_config_field": (_with_meta(lambda m: m["config"].pop("num_heads")),
                             r"field 'config.num_heads' is malformed; expected present"),
    "bad_rope_keys": (_with_meta(lambda m: m["config"].update(rope_scaling={"factor": 8.0})),
                      r"field 'config.rope_scaling' is malformed; expected null or an object "
                      r"with exactly the keys \['factor'"),
    "bad_config_value": (_with_meta(lambda m: m["config"].update(vocab_size=-1)),
                         r"field 'config' is malformed; expected a valid prunerep_jax.Config "
                         r"\(.*vocab_size"),
    "bad_eos": (_with_meta(lambda m: m["config"].update(eos_token_ids=5)),
                r"field 'config.eos_token_ids' is malformed; expected a list"),
    "extra_a_list": (_with_meta(lambda m: m.update(extra=[])), r"field 'extra' is malformed"),
    "no_checksums": (_with_meta(lambda m: m.update(checksums={})),
                     r"field 'checksums' is malformed"),
    "bad_digest": (_with_meta(lambda m: m["checksums"]["params"]["embed/embedding"].update(
        sha256="xyz")), r"field 'checksums.params.embed/embedding.sha256' is malformed"),
    "bad_dtype": (_with_meta(lambda m: m["checksums"]["params"]["embed/embedding"].update(
        dtype="int8")), r"field 'checksums.params.embed/embedding.dtype' is malformed"),
    "shape_not_config": (_with_meta(lambda m: m["config"].update(num_layers=3)),
                         r"field 'checksums.params' is malformed; expected the tensors its config "
                         r"implies; tensor layers/attn/k_proj/bias is recorded with shape "
                         r"\(2, 16\), but the config implies shape \(3, 16\)"),
    "old_format": (_with_meta(lambda m: m.update(format="prunerep_jax.checkpoint/1")),
                   r"format='prunerep_jax.checkpoint/1', written by another version of "
                   r"prunerep_jax; this version reads only 'prunerep_jax.checkpoint/2'"),
    "foreign_format": (_with_meta(lambda m: m.update(format="other/9")),
                       r"format='other/9'; expected 'prunerep_jax.checkpoint/2', not a "
                       "prunerep_jax checkpoint"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_config_json_names_the_file_and_field(tmp_path, saved, case):
  change, message = MALFORMED[case]
  (tmp_path / "ck").mkdir()
  meta = change(_meta(saved))
  (tmp_path / "ck" / "config.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
  meta_path = tmp_path / "ck" / "config.json"
  with pytest.raises(ValueError, match=rf"restore: {re.escape(str(meta_path))}.*{message}"):
    checkpoint.restore(tmp_path / "ck")


def test_restore_of_a_missing_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"restore\(directory='.*missing'\): no "
                     "config.json; not a prunerep_jax checkpoint"):
    checkpoint.restore(tmp_path / "missing")
  with pytest.raises(TypeError, match=r"restore\(directory=3\): expected a non-empty path"):
    checkpoint.restore(3)
