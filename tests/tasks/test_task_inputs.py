"""Record reading, subsampling and batching shared by the task suites."""

import gzip
import json

import numpy as np
import pytest

from prunerep_jax import progress as progress_lib
from prunerep_jax import batching
from prunerep_jax import validate
from prunerep_jax.tasks import _suite

FN = "suite.load"
RECORDS = [{"q": "one", "a": 1}, {"q": "two", "a": 2}, {"q": "three", "a": 3}]


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  return path


def records_of(out):
  return [r for _, r in out]


def test_jsonl_records_name_their_line(tmp_path):
  out = _suite.read_records(write_jsonl(tmp_path / "x.jsonl", RECORDS), FN)
  assert records_of(out) == RECORDS
  assert [w for w, _ in out] == ["x.jsonl line 1", "x.jsonl line 2", "x.jsonl line 3"]


def test_gzipped_jsonl(tmp_path):
  path = tmp_path / "x.jsonl.gz"
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write("\n".join(json.dumps(r) for r in RECORDS))
  assert records_of(_suite.read_records(path, FN)) == RECORDS


@pytest.mark.parametrize("value", [
    RECORDS,
    {"test": RECORDS},
    {"q": ["one", "two", "three"], "a": [1, 2, 3]},  # a column dict
])
def test_json_shapes(tmp_path, value):
  path = tmp_path / "x.json"
  path.write_text(json.dumps(value))
  assert records_of(_suite.read_records(path, FN)) == RECORDS


def test_invalid_json_line_is_named(tmp_path):
  path = tmp_path / "x.jsonl"
  path.write_text('{"q": "one"}\n{"q": \n')
  with pytest.raises(ValueError, match=r"suite.load: x.jsonl line 2: not valid JSON"):
    _suite.read_records(path, FN)


def test_missing_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"suite.load\(source='.*nope.jsonl'\): expected an "
                     r"existing file or directory; .*nope.jsonl does not exist"):
    _suite.read_records(str(tmp_path / "nope.jsonl"), FN)


def test_unsupported_file_type(tmp_path):
  path = tmp_path / "x.csv"
  path.write_text("q,a\n")
  with pytest.raises(ValueError, match=r"expected a .jsonl, .jsonl.gz, .json, .parquet or .arrow "
                     r"file; 'x.csv' is none of these"):
    _suite.read_records(path, FN)


def test_parquet_without_pyarrow_says_what_to_install(tmp_path):
  try:
    import pyarrow  # noqa: F401
    pytest.skip("pyarrow is installed")
  except ImportError:
    pass
  path = tmp_path / "test-00000-of-00001.parquet"
  path.write_bytes(b"PAR1")
  with pytest.raises(ImportError, match=r"needs pyarrow.*pip install pyarrow"):
    _suite.read_records(path, FN)


def test_dataset_directory_reads_the_requested_split(tmp_path):
  (tmp_path / "main").mkdir()
  write_jsonl(tmp_path / "main" / "test-00000-of-00001.jsonl", RECORDS[:2])
  write_jsonl(tmp_path / "main" / "train-00000-of-00001.jsonl", RECORDS[2:])
  (tmp_path / "dataset_info.json").write_text('{"features": {}}')  # metadata, not records
  assert records_of(_suite.read_records(tmp_path, FN)) == RECORDS[:2]
  assert records_of(_suite.read_records(tmp_path, FN, split="train")) == RECORDS[2:]
  with pytest.raises(validate.ArgumentError, match=r"split='validation'\): expected one of the "
                     r"splits in .*\['test', 'train'\]"):
    _suite.read_records(tmp_path, FN, split="validation")


def test_split_folders_and_unsplit_directories(tmp_path):
  (tmp_path / "a" / "test").mkdir(parents=True)
  write_jsonl(tmp_path / "a" / "test" / "data.jsonl", RECORDS[:1])
  (tmp_path / "a" / "validation").mkdir()
  write_jsonl(tmp_path / "a" / "validation" / "data.jsonl", RECORDS[1:])
  assert records_of(_suite.read_records(tmp_path / "a", FN)) == RECORDS[:1]
  (tmp_path / "b").mkdir()
  write_jsonl(tmp_path / "b" / "part1.jsonl", RECORDS[:1])
  write_jsonl(tmp_path / "b" / "part2.jsonl", RECORDS[1:])
  assert records_of(_suite.read_records(tmp_path / "b", FN)) == RECORDS


def test_directory_without_data_files(tmp_path):
  (tmp_path / "README.md").write_text("hi")
  with pytest.raises(validate.ArgumentError, match=r"a dataset directory with \*.parquet"):
    _suite.read_records(tmp_path, FN)


def test_empty_file(tmp_path):
  (tmp_path / "x.jsonl").write_text("\n")
  with pytest.raises(validate.ArgumentError, match=r"at least one record; it holds none"):
    _suite.read_records(tmp_path / "x.jsonl", FN)


def test_field_errors_name_the_record():
  with pytest.raises(ValueError, match=r"suite.load: x line 4: record has no field 'question' "
                     r"\(it has \['q'\]\)"):
    _suite.field({"q": "?"}, "x line 4", FN, ("question",))
  with pytest.raises(ValueError, match=r"suite.load: x line 4: field 'q' holds 3, expected str"):
    _suite.field({"q": 3}, "x line 4", FN, ("q",))
  with pytest.raises(ValueError, match=r"x line 4: expected a JSON object \(a record\), got list"):
    _suite.field([1], "x line 4", FN, ("q",))


def test_missing_package_gives_the_pip_command():
  with pytest.raises(FileNotFoundError, match=r"'no_such_pkg_xyz', which is not installed; "
                     r"install it with `pip install --no-deps no-such`"):
    _suite.package_file("no_such_pkg_xyz", "data/x.jsonl", "pip install --no-deps no-such", FN)


# ------------------------------------------------------------------------------ subsample

def test_subsample_is_deterministic_and_keeps_order():
  items = list(range(100))
  a = _suite.subsample(items, 10, 3, FN)
  assert a == _suite.subsample(items, 10, 3, FN)
  assert a != _suite.subsample(items, 10, 4, FN)
  assert a == sorted(a) and len(set(a)) == 10
  assert _suite.subsample(items, None, 0, FN) == items
  assert _suite.subsample(items, 500, 0, FN) == items


def test_stratified_subsample_keeps_group_proportions():
  labels = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
  picked = _suite.subsample(list(range(100)), 10, 0, FN, strata=labels)
  counts = [sum(labels[i] == g for i in picked) for g in "abc"]
  assert counts == [6, 3, 1]
  small = _suite.subsample(list(range(100)), 4, 0, FN, strata=labels)  # 2.4, 1.2, 0.4
  assert [sum(labels[i] == g for i in small) for g in "abc"] == [2, 1, 1]


@pytest.mark.parametrize("n, seed, message", [
    (0, 0, r"suite.load\(n=0\): expected an integer >= 1"),
    (2.5, 0, r"suite.load\(n=2.5\): expected an integer >= 1"),
    (3, -1, r"suite.load\(seed=-1\): expected an integer in \[0, 2\*\*32\)"),
])
def test_subsample_argument_errors(n, seed, message):
  with pytest.raises(validate.ArgumentError, match=message):
    _suite.subsample([1, 2, 3, 4], n, seed, FN)


# -------------------------------------------------------------------------------- batches

def test_bucket_lengths():
  assert [batching.bucket_length(n) for n in (1, 16, 17, 24, 25, 33, 49, 65, 97, 129, 200)] == [
      16, 16, 24, 24, 32, 48, 64, 96, 128, 192, 256]


def test_batches_are_fixed_size_left_padded_and_cover_every_row_once():
  rows = [[1] * n for n in (3, 20, 5, 17, 9)]
  batches = list(batching.token_batches(rows, 2, pad_id=0))
  assert [b.tokens.shape for b in batches] == [(2, 24), (2, 16), (2, 16)]
  assert sorted(np.concatenate([b.rows for b in batches]).tolist()) == [0, 1, 2, 3, 4]
  for b in batches:
    for j, i in enumerate(b.rows):  # each real row sits at the right end of its line
      assert b.mask[j].tolist() == [0] * (b.tokens.shape[1] - len(rows[i])) + [1] * len(rows[i])
    for j in range(len(b.rows), 2):  # dummy rows: exactly one real token
      assert b.mask[j].sum() == 1
  assert [len(b.rows) for b in batches] == [2, 2, 1]


def test_batches_never_exceed_the_number_of_rows_or_the_length_cap():
  (only,) = list(batching.token_batches([[4, 5, 6]], 8, pad_id=9, max_length=10))
  assert only.tokens.tolist() == [[9] * 7 + [4, 5, 6]]
  assert only.rows.tolist() == [0]


def test_reporter_lines():
  lines = []
  report = progress_lib.Reporter("mmlu", 4, "items", lines.append)
  report(2)
  report(4)
  assert lines[0].startswith("mmlu: 2/4 items (50%), ") and "ETA" in lines[0]
  assert lines[1].startswith("mmlu: 4/4 items (100%), ")
