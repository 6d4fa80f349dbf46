"""Result: save/load round trips through JSON, CSV and NPZ, written atomically."""

import csv
import json
import os

import numpy as np
import pytest

from prunerep_jax.analysis import Result


def sample() -> Result:
  arrays = {"kl": np.array([[0.5, np.nan], [1e-9, 2.0]], np.float32),
            "valid": np.array([[True, False], [True, True]]),
            "free/tokens": np.arange(6, dtype=np.int32).reshape(2, 3)}
  meta = {"lens": "raw", "temperature": np.float32(0.5), "steps": np.int64(3),
          "nested": {"dropped": [(1, "attn")], "nan": float("nan")}}
  tables = {"summary": [{"layer": 0, "metric": "kl", "mean": 0.25, "max": float("inf")},
                        {"layer": 1, "metric": "kl", "mean": np.float64(np.nan), "extra": True}],
            "items": [{"item": 0, "text": "a, \"quoted\"\nline"}]}
  return Result("layerwise", meta, arrays, tables)


def test_save_writes_three_files_and_load_returns_the_same_result(tmp_path):
  r = sample()
  paths = r.save(str(tmp_path), "run")
  assert paths == {ext: str(tmp_path / f"run.{ext}") for ext in ("json", "csv", "npz")}
  assert sorted(os.listdir(tmp_path)) == ["run.csv", "run.json", "run.npz"]  # no staging files
  back = Result.load(str(tmp_path), "run")
  assert (back.kind, back.main_table) == ("layerwise", "summary")
  assert set(back.arrays) == set(r.arrays)
  for k, v in r.arrays.items():
    np.testing.assert_array_equal(back.arrays[k], v)  # NaN included
    assert back.arrays[k].dtype == v.dtype
  assert back.meta == {"lens": "raw", "temperature": 0.5, "steps": 3,
                       "nested": {"dropped": [[1, "attn"]], "nan": None}}
  assert back.tables["items"] == r.tables["items"]
  assert back.table() == [{"layer": 0, "metric": "kl", "mean": 0.25, "max": None},
                          {"layer": 1, "metric": "kl", "mean": None, "extra": True}]


def test_json_is_strict_nan_and_inf_become_null(tmp_path):
  sample().save(str(tmp_path), "run")
  text = (tmp_path / "run.json").read_text()

  def refuse(constant):
    raise AssertionError(f"non-standard JSON constant {constant}")

  doc = json.loads(text, parse_constant=refuse)
  assert doc["meta"]["nested"]["nan"] is None
  assert doc["tables"]["summary"][0]["max"] is None


def test_csv_holds_the_main_table_with_the_union_of_its_columns(tmp_path):
  sample().save(str(tmp_path), "run")
  with open(tmp_path / "run.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ["layer", "metric", "mean", "max", "extra"]
  assert rows == [{"layer": "0", "metric": "kl", "mean": "0.25", "max": "", "extra": ""},
                  {"layer": "1", "metric": "kl", "mean": "", "max": "", "extra": "True"}]


def test_default_name_is_the_kind_and_overwrite_replaces(tmp_path):
  r = sample()
  r.save(str(tmp_path))
  r.meta["lens"] = "final_norm"
  r.save(str(tmp_path))
  assert Result.load(str(tmp_path), "layerwise").meta["lens"] == "final_norm"
  assert sorted(os.listdir(tmp_path)) == ["layerwise.csv", "layerwise.json", "layerwise.npz"]


def test_a_refused_overwrite_writes_nothing(tmp_path):
  (tmp_path / "run.npz").write_bytes(b"not ours")
  with pytest.raises(FileExistsError, match=r"Result.save\(directory=.*run.npz'\): already "
                                            r"exists; pass overwrite=True"):
    sample().save(str(tmp_path), "run", overwrite=False)
  assert sorted(os.listdir(tmp_path)) == ["run.npz"]
  assert (tmp_path / "run.npz").read_bytes() == b"not ours"


def test_an_unserialisable_result_leaves_no_trace(tmp_path):
  r = sample()
  r.meta["model"] = object()
  target = tmp_path / "out"
  with pytest.raises(ValueError, match=r"Result.save\(self=\.\.\.\): expected JSON-serialisable"):
    r.save(str(target), "run")
  assert not target.exists()
