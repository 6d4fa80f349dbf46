"""Text sources, wiki markup stripping, calibration windows and held-out windows."""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from prunerep_jax import data

GENSIM_DATA = os.path.join(importlib.util.find_spec("gensim").submodule_search_locations[0],
                           "test", "test_data")


@pytest.fixture(scope="module")
def wiki_docs():
  return data.load_texts("wikipedia")


@pytest.fixture(scope="module")
def tokenizer(wiki_docs):
  """A word-level tokenizer trained on the built-in text: fast, and windows differ in content."""
  tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator(wiki_docs[:30], trainers.WordLevelTrainer(
      vocab_size=3000, special_tokens=["[UNK]", "</s>"]))
  return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")


def contains(haystack: np.ndarray, needle: np.ndarray) -> bool:
  windows = np.lib.stride_tricks.sliding_window_view(haystack, len(needle))
  return bool((windows == needle).all(axis=1).any())


def write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding="utf-8")
  return str(path)


def words(n, start=0):
  return " ".join(f"w{i}" for i in range(start, start + n))


# ------------------------------------------------------------------------ built-in sources

def test_wikipedia_gives_many_documents_of_clean_prose(wiki_docs):
  assert len(wiki_docs) > 50
  for doc in wiki_docs:
    for markup in ("{{", "}}", "[[", "]]", "<ref", "</", "'''", "{|", "==", "&nbsp;"):
      assert markup not in doc
  assert wiki_docs[0].startswith("Anarchism is a political philosophy that advocates")


def test_wikipedia_skips_redirects_and_stubs(wiki_docs):
  assert all(len(doc.split()) >= 100 for doc in wiki_docs)
  assert not any(doc.lower().startswith("#redirect") for doc in wiki_docs)


def test_wikipedia_drops_reference_sections(wiki_docs):
  paragraphs = {p.strip() for doc in wiki_docs for p in doc.split("\n")}
  assert not paragraphs & {"References", "External links", "See also", "Further reading"}


def test_news_is_one_document_per_line():
  with open(os.path.join(GENSIM_DATA, "lee_background.cor"), encoding="utf-8") as f:
    lines = [line.strip() for line in f if line.strip()]
  docs = data.load_texts("news")
  assert docs == lines
  assert len(docs) == 300


def test_load_texts_returns_a_fresh_list():
  first = data.load_texts("news")
  first.clear()
  assert data.load_texts("news")


# -------------------------------------------------------------------------- wiki markup

def test_strip_wiki_markup_keeps_text_and_drops_markup():
  wikitext = """{{Infobox person|name={{nowrap|A B}}|born=1900}}
'''Ada''' was a [[mathematician]] and [[Writer|author]].<ref name="x">Cited, p. 1.</ref> She
wrote notes<ref name="y" /> on the [[Analytical Engine#Design|engine]]. <!-- hidden -->
[[File:Ada.jpg|thumb|Portrait of [[Ada Lovelace|Ada]], [c. 1840] by Chalon]]
{| class="wikitable"
|-
| cell || cell
|}
== Later life ==
* She died in [https://example.org 1852].
[[Category:Mathematicians]]
[[de:Ada Lovelace]]
== References ==
{{reflist}}
* A book.
"""
  assert data.strip_wiki_markup(wikitext) == (
      "Ada was a mathematician and author. She\nwrote notes on the engine.\n\nLater life\n"
      "She died in 1852.")


def test_strip_wiki_markup_drops_an_unclosed_template_at_a_truncated_end():
  assert data.strip_wiki_markup("Kept text. {{cite book|title=Cut off") == "Kept text."


def test_a_local_mediawiki_dump_loses_its_tables():
  docs = data.load_texts(os.path.join(GENSIM_DATA, "enwiki-table-markup.xml.bz2"))
  assert docs
  for doc in docs:
    assert "{|" not in doc and "|-" not in doc and "style=" not in doc


# --------------------------------------------------------------------------- local files

def test_txt_documents_are_separated_by_blank_lines(tmp_path):
  path = write(tmp_path / "a.txt", "first doc\nstill first\n\n  \nsecond doc\n\n\nthird doc\n")
  assert data.load_texts(path) == ["first doc\nstill first", "second doc", "third doc"]


def test_txt_without_blank_lines_is_one_document(tmp_path):
  path = write(tmp_path / "a.txt", "line one\nline two\n")
  assert data.load_texts(path) == ["line one\nline two"]


def test_jsonl_reads_the_text_field_and_skips_empty_records(tmp_path):
  rows = [{"text": "alpha", "id": 1}, {"text": ""}, {"text": "beta"}]
  path = write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
  assert data.load_texts(path) == ["alpha", "beta"]


def test_jsonl_with_another_text_field(tmp_path):
  path = write(tmp_path / "a.jsonl", json.dumps({"content": "gamma"}) + "\n")
  assert data.load_texts(path, text_field="content") == ["gamma"]


def test_json_list_of_records(tmp_path):
  path = write(tmp_path / "a.json", json.dumps([{"text": "one"}, {"text": "two"}]))
  assert data.load_texts(path) == ["one", "two"]


def test_json_that_is_really_json_lines(tmp_path):
  path = write(tmp_path / "a.json", '{"text": "one"}\n{"text": "two"}\n')
  assert data.load_texts(path) == ["one", "two"]


def test_dataset_directory_is_searched_recursively_and_metadata_is_skipped(tmp_path):
  write(tmp_path / "data" / "train-00001.jsonl", json.dumps({"text": "second file"}) + "\n")
  write(tmp_path / "data" / "train-00000.jsonl", json.dumps({"text": "first file"}) + "\n")
  write(tmp_path / "dataset_info.json", json.dumps({"features": {"text": "string"}}))
  write(tmp_path / ".cache" / "x.jsonl", json.dumps({"text": "cache"}) + "\n")
  assert data.load_texts(str(tmp_path)) == ["first file", "second file"]


def test_parquet_without_pyarrow_says_how_to_install_it(tmp_path, monkeypatch):
  write(tmp_path / "data" / "train-00000-of-00001.parquet", "not read")
  monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` fail
  with pytest.raises(ImportError, match=r"pip install pyarrow"):
    data.load_texts(str(tmp_path))


def test_parquet_and_arrow_directories(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  (tmp_path / "hub" / "data").mkdir(parents=True)
  pq.write_table(pa.table({"text": ["p one", "p two"]}),
                 str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
  assert data.load_texts(str(tmp_path / "hub")) == ["p one", "p two"]
  (tmp_path / "disk" / "train").mkdir(parents=True)
  table = pa.table({"text": ["a one", "a two"]})
  with pa.OSFile(str(tmp_path / "disk" / "train" / "data-00000-of-00001.arrow"), "wb") as sink:
    with pa.ipc.new_stream(sink, table.schema) as writer:  # the save_to_disk format
      writer.write_table(table)
  assert data.load_texts(str(tmp_path / "disk")) == ["a one", "a two"]


# ------------------------------------------------------------------------------- errors

def test_missing_file_is_named(tmp_path):
  missing = str(tmp_path / "nope.jsonl")
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    data.load_texts(missing)


@pytest.mark.parametrize("filename", ["binary.txt", "binary.jsonl"])
def test_a_binary_file_is_refused_as_not_utf8_naming_the_file(tmp_path, filename):
  path = tmp_path / filename
  path.write_bytes(b"caf\xe9 \x00\xff\xfe binary")
  with pytest.raises(ValueError, match=rf"{filename}.* is not UTF-8 text \(byte 3: ") as e:
    data.load_texts(str(path))
  assert type(e.value) is ValueError  # not a bare UnicodeDecodeError


def test_a_corrupt_wiki_dump_is_refused_naming_the_file(tmp_path):
  path = tmp_path / "dump.xml.bz2"
  path.write_bytes(b"not bzip2 at all")
  with pytest.raises(ValueError, match=r"dump\.xml\.bz2 is not a readable MediaWiki XML dump"):
    data.load_texts(str(path))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_is_refused_as_not_a_regular_file(tmp_path):
  fifo = tmp_path / "pipe.txt"
  os.mkfifo(fifo)
  with pytest.raises(ValueError, match=r"pipe\.txt is not a regular file or directory"):
    data.load_texts(str(fifo))
  write(tmp_path / "ok.txt", "text")
  with pytest.raises(ValueError, match=r"pipe\.txt is not a regular file; expected the data "
                                       "files of a dataset directory"):
    data.load_texts(str(tmp_path))


def test_unknown_source_name_lists_the_known_ones():
  with pytest.raises(ValueError, match=r"source='wikitext2'.*unknown.*'wikipedia', 'news'"):
    data.load_texts("wikitext2")


def test_empty_file_has_no_documents(tmp_path):
  path = write(tmp_path / "empty.txt", "\n \n")
  with pytest.raises(ValueError, match=r"empty\.txt.*no documents"):
    data.load_texts(path)


def test_record_without_the_text_field_is_named(tmp_path):
  path = write(tmp_path / "a.jsonl", json.dumps({"body": "x"}) + "\n")
  with pytest.raises(ValueError, match=r"line 1.*text_field='text'.*\['body'\]"):
    data.load_texts(path)


def test_directory_without_data_files(tmp_path):
  write(tmp_path / "README.md", "# nothing")
  with pytest.raises(ValueError, match="no data files"):
    data.load_texts(str(tmp_path))


def test_unsupported_file_type(tmp_path):
  path = write(tmp_path / "a.csv", "text\nx\n")
  with pytest.raises(ValueError, match=r"unsupported file type 'a\.csv'"):
    data.load_texts(path)


@pytest.mark.parametrize("kwargs, message", [
    ({"nsamples": 0}, r"calibration_tokens\(nsamples=0\): expected an integer >= 1"),
    ({"seqlen": 1}, r"calibration_tokens\(seqlen=1\): expected an integer >= 2"),
    ({"split": "train"}, r"split='train'"),
])
def test_calibration_argument_errors(tokenizer, kwargs, message):
  with pytest.raises(ValueError, match=message):
    data.calibration_tokens(tokenizer, "news", **kwargs)


def test_seqlen_longer_than_the_whole_stream(tokenizer, tmp_path):
  path = write(tmp_path / "small.txt", f"{words(5)}\n\n{words(5)}\n\n{words(5)}")
  with pytest.raises(ValueError, match=r"small\.txt.*seqlen=100.*only 11 tokens"):
    data.calibration_tokens(tokenizer, path, nsamples=1, seqlen=100)


def test_heldout_of_a_single_document_is_empty(tokenizer, tmp_path):
  path = write(tmp_path / "one.txt", words(50))
  with pytest.raises(ValueError, match=r"one\.txt.*1 document.*'heldout' split is empty"):
    data.heldout_tokens(tokenizer, path, seqlen=4)


# ------------------------------------------------------------------------------- splits

@pytest.mark.parametrize("n", [1, 2, 5, 10, 23, 104])
def test_splits_partition_the_documents(n):
  calibration = data.split_indices(n, "calibration")
  heldout = data.split_indices(n, "heldout")
  assert sorted(calibration + heldout) == list(range(n))
  assert not set(calibration) & set(heldout)
  assert calibration
  assert heldout or n == 1


def test_every_tenth_document_is_held_out():
  assert data.split_indices(25, "heldout") == [9, 19]


# ---------------------------------------------------------------------- calibration windows

def test_calibration_shapes_and_info(tokenizer):
  tokens, info = data.calibration_tokens(tokenizer, "wikipedia", nsamples=6, seqlen=32, seed=3)
  assert tokens.shape == (6, 32) and tokens.dtype == np.int32
  assert info["source"] == "wikipedia" and info["split"] == "calibration"
  assert (info["nsamples"], info["seqlen"], info["seed"]) == (6, 32, 3)
  assert info["documents"] == len(data.split_indices(len(data.load_texts("wikipedia")),
                                                     "calibration"))
  assert info["tokens_available"] > 100_000
  assert info["sampled_from"] == "documents"


def test_same_seed_same_windows_different_seed_different_windows(tokenizer):
  a, _ = data.calibration_tokens(tokenizer, "wikipedia", nsamples=4, seqlen=32, seed=0)
  b, _ = data.calibration_tokens(tokenizer, "wikipedia", nsamples=4, seqlen=32, seed=0)
  c, _ = data.calibration_tokens(tokenizer, "wikipedia", nsamples=4, seqlen=32, seed=1)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_calibration_windows_come_only_from_calibration_documents(tokenizer):
  docs = data.load_texts("news")
  encoded = [np.asarray(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docs]
  calibration = set(data.split_indices(len(docs), "calibration"))
  tokens, _ = data.calibration_tokens(tokenizer, "news", nsamples=8, seqlen=48)
  for window in tokens:
    sources = {i for i, e in enumerate(encoded) if len(e) > 48 and contains(e, window)}
    assert sources and sources <= calibration


def test_heldout_split_windows_come_from_heldout_documents(tokenizer):
  docs = data.load_texts("news")
  heldout = [np.asarray(tokenizer(docs[i], add_special_tokens=False)["input_ids"])
             for i in data.split_indices(len(docs), "heldout")]
  tokens, info = data.calibration_tokens(tokenizer, "news", nsamples=4, seqlen=48,
                                         split="heldout")
  assert info["split"] == "heldout" and info["documents"] == len(heldout)
  for window in tokens:
    assert any(contains(e, window) for e in heldout)


def test_short_documents_fall_back_to_one_stream(tokenizer, tmp_path):
  path = write(tmp_path / "short.txt", "\n\n".join(words(6, 10 * i) for i in range(12)))
  tokens, info = data.calibration_tokens(tokenizer, path, nsamples=5, seqlen=20)
  assert tokens.shape == (5, 20)
  assert info["sampled_from"] == "stream"
  assert info["documents"] == 11 and info["tokens_available"] == 66


def test_documents_are_tokenized_once(tokenizer):
  calls = []

  class Counting:
    eos_token_id = tokenizer.eos_token_id

    def __call__(self, texts, **kwargs):
      calls.append(len(texts))
      return tokenizer(texts, **kwargs)

  counting = Counting()
  for seed in range(3):
    data.calibration_tokens(counting, "news", nsamples=2, seqlen=16, seed=seed)
  data.heldout_tokens(counting, "news", seqlen=16)
  assert calls == [300]


# ------------------------------------------------------------------------ held-out windows

def test_heldout_windows_cut_the_joined_stream(tokenizer, tmp_path):
  docs = [words(7, 100 * i) for i in range(20)]
  path = write(tmp_path / "docs.txt", "\n\n".join(docs))
  tokens, info = data.heldout_tokens(tokenizer, path, seqlen=4)
  eos = tokenizer.eos_token_id
  stream = np.concatenate([
      tokenizer(docs[9], add_special_tokens=False)["input_ids"], [eos],
      tokenizer(docs[19], add_special_tokens=False)["input_ids"]])
  assert info["tokens_available"] == 15 and info["windows"] == 3 and info["documents"] == 2
  np.testing.assert_array_equal(tokens, stream[:12].reshape(3, 4))


def test_heldout_max_windows(tokenizer):
  all_windows, _ = data.heldout_tokens(tokenizer, "wikipedia", seqlen=64)
  some, info = data.heldout_tokens(tokenizer, "wikipedia", seqlen=64, max_windows=3)
  assert some.shape == (3, 64) and info["windows"] == 3
  np.testing.assert_array_equal(some, all_windows[:3])


def test_heldout_and_calibration_documents_are_disjoint(tokenizer):
  _, calibration = data.calibration_tokens(tokenizer, "wikipedia", nsamples=1, seqlen=16)
  _, heldout = data.heldout_tokens(tokenizer, "wikipedia", seqlen=16)
  assert calibration["documents"] + heldout["documents"] == len(data.load_texts("wikipedia"))
  assert heldout["documents"] >= 10


def test_heldout_argument_errors(tokenizer):
  with pytest.raises(ValueError,
                     match=r"heldout_tokens\(max_windows=0\): expected an integer >= 1"):
    data.heldout_tokens(tokenizer, "news", seqlen=16, max_windows=0)
  with pytest.raises(ValueError, match=r"seqlen=10000000.*fewer than one window"):
    data.heldout_tokens(tokenizer, "news", seqlen=10_000_000)
