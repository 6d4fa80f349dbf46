"""Text for calibration and perplexity, offline: built-in samples and local files.

Sources (`load_texts`):
  "wikipedia"  the English Wikipedia sample that the gensim package ships in its test data (about
               a hundred articles of prose after the wiki markup is stripped);
  "news"       gensim's Lee background corpus (one news story per line);
  a path       a ``.txt`` file (documents separated by blank lines), a ``.jsonl`` / ``.json`` file
               of records with a text field, a ``.parquet`` / ``.arrow`` file, a MediaWiki dump
               (``.xml`` / ``.xml.bz2``), or a local Hugging Face datasets directory (a hub snapshot
               or a ``save_to_disk`` output; data files are found recursively).

gensim is only a carrier of data files: it is located with `importlib.util.find_spec` (which runs
no code) and never imported.

Every source is split into a calibration part and a held-out part by document index (every
`HELDOUT_EVERY`-th document is held out), so perplexity is measured on text that calibration never
saw. `calibration_tokens` samples windows the way the Wanda / SparseGPT loaders do;
`heldout_tokens` cuts the held-out stream into non-overlapping windows for perplexity.

Shape letters: N calibration samples, W held-out windows, T tokens per window (seqlen).
"""

from __future__ import annotations

import bz2
import functools
import html
import importlib.util
import json
import os
import re
import weakref
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import numpy as np

from prunerep_jax import validate

BUILTIN_SOURCES = ("wikipedia", "news")
SPLITS = ("calibration", "heldout")
HELDOUT_EVERY = 10  # document i is held out iff i % HELDOUT_EVERY == HELDOUT_EVERY - 1

_GENSIM_FILES = {
    "wikipedia": "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    "news": "lee_background.cor",
}
_DATA_SUFFIXES = {
    "arrow": (".parquet", ".arrow"),
    "json": (".jsonl", ".json"),
    "text": (".txt",),
}
# JSON files that `save_to_disk` and hub snapshots keep next to the data: metadata, not records.
_METADATA_JSON = frozenset({"dataset_info.json", "dataset_infos.json", "state.json",
                            "dataset_dict.json"})
_MIN_ARTICLE_WORDS = 100  # below this a page is a stub, a list or a disambiguation page


# ------------------------------------------------------------------------------ sources

def load_texts(source: str = "wikipedia", text_field: str = "text") -> list[str]:
  """Documents of a source, in a fixed order.

  Args:
    source: "wikipedia", "news", or a path to a local file or dataset directory (see the module
      docstring for the formats).
    text_field: the field holding the text in JSON, JSON lines, Parquet and Arrow records.

  Returns:
    A new list of non-empty strings (the parsed source is cached in-process).

  Raises:
    ValueError: an unknown source name, a path that is neither a regular file nor a directory
      (a FIFO, a device), an unsupported file type, a file that is not UTF-8 text, a record
      without ``text_field``, or a source with no documents.
    FileNotFoundError: a path that does not exist, or gensim not installed.
    ImportError: a Parquet/Arrow source without pyarrow installed.
  """
  return list(_cached_documents(_source_key(source), text_field))


def _source_key(source: str) -> tuple:
  """A hashable key that changes when a local source's files change (so the cache stays fresh)."""
  if not isinstance(source, (str, os.PathLike)):
    raise TypeError(f"source={source!r}: expected a source name {BUILTIN_SOURCES} or a path")
  name = os.fspath(source)
  if name in BUILTIN_SOURCES:
    return ("builtin", name)
  path = os.path.abspath(os.path.expanduser(name))
  if os.path.isdir(path):
    files = _dataset_files(path, name)
    return ("dir", name, tuple((f, _stamp(f)) for f in files))
  if os.path.isfile(path):
    return ("file", name, path, _stamp(path))
  if os.path.exists(path):  # a FIFO, socket or device: reading it could block or never end
    raise ValueError(f"source={name!r}: {path} is not a regular file or directory; expected a "
                     "text or data file, or a dataset directory")
  if os.sep in name or "/" in name or os.path.splitext(name)[1] or name.startswith("~"):
    raise FileNotFoundError(f"source={name!r}: no such file or directory ({path})")
  raise ValueError(f"source={name!r}: unknown source; expected one of {BUILTIN_SOURCES} or a path "
                   "to a local .txt / .jsonl / .json / .parquet / .arrow file, a MediaWiki "
                   ".xml(.bz2) dump, or a Hugging Face datasets directory")


def _stamp(path: str) -> tuple[int, int]:
  st = os.stat(path)
  return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=16)
def _cached_documents(key: tuple, text_field: str) -> tuple[str, ...]:
  kind, name = key[0], key[1]
  if kind == "builtin":
    path = _gensim_data_file(name)
    docs = _wiki_dump_articles(path, name) if name == "wikipedia" else _lines(path, name)
  elif kind == "dir":
    docs = [d for f, _ in key[2] for d in _file_documents(f, text_field, name)]
  else:
    docs = _file_documents(key[2], text_field, name)
  docs = tuple(d for d in docs if d.strip())
  if not docs:
    raise ValueError(f"source={name!r}: no documents found (every record or paragraph is empty)")
  return docs


def _gensim_data_file(name: str) -> str:
  spec = importlib.util.find_spec("gensim")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"source={name!r} is read from the gensim package's test data, and gensim is not "
        "installed; install it with `pip install --no-deps gensim` (only its data files are used)")
  for folder in spec.submodule_search_locations:
    path = os.path.join(folder, "test", "test_data", _GENSIM_FILES[name])
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f"source={name!r}: the installed gensim has no test_data/"
                          f"{_GENSIM_FILES[name]}; reinstall it with "
                          "`pip install --no-deps gensim`")


def _dataset_files(root: str, name: str) -> list[str]:
  """Data files under a dataset directory, sorted, in the best format present.

  Parquet/Arrow win over JSON, JSON over plain text: a hub snapshot's data is in the first, and
  its stray .txt / .json files (licences, configs) must not become documents.
  """
  found: dict[str, list[str]] = {kind: [] for kind in _DATA_SUFFIXES}
  for folder, subdirs, files in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))  # .cache, .git
    for f in files:
      if f.startswith(".") or f in _METADATA_JSON:
        continue
      for kind, suffixes in _DATA_SUFFIXES.items():
        if f.endswith(suffixes):
          path = os.path.join(folder, f)
          if not os.path.isfile(path):
            raise ValueError(f"source={name!r}: {path} is not a regular file; expected the data "
                             "files of a dataset directory")
          found[kind].append(path)
  for kind in _DATA_SUFFIXES:
    if found[kind]:
      return sorted(found[kind])
  raise ValueError(f"source={name!r}: directory has no data files; expected *.parquet, *.arrow, "
                   "*.jsonl, *.json or *.txt files (searched recursively)")


def _read_text(path: str, name: str) -> str:
  """The whole file as UTF-8 text; a binary or otherwise encoded file is refused, named."""
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except UnicodeDecodeError as e:
    raise ValueError(f"source={name!r}: {path} is not UTF-8 text (byte {e.start}: {e.reason}); "
                     "expected a UTF-8 encoded text file") from e


def _file_documents(path: str, text_field: str, name: str) -> list[str]:
  lower = path.lower()
  if lower.endswith(".txt"):
    return [p.strip() for p in re.split(r"\n[ \t\r\f\v]*\n", _read_text(path, name))]
  if lower.endswith((".jsonl", ".json")):
    return _json_documents(path, text_field, name)
  if lower.endswith((".parquet", ".arrow")):
    return _arrow_documents(path, text_field, name)
  if lower.endswith((".xml", ".xml.bz2")):
    return _wiki_dump_articles(path, name)
  raise ValueError(f"source={name!r}: unsupported file type {os.path.basename(path)!r}; expected "
                   ".txt, .jsonl, .json, .parquet, .arrow, .xml or .xml.bz2")


def _lines(path: str, name: str) -> list[str]:
  # Text mode already turned \r\n and \r into \n; splitlines would also split at \x0b, \x1c, ...
  return [line.strip() for line in _read_text(path, name).split("\n")]


def _record_text(record: Any, text_field: str, where: str) -> str:
  if isinstance(record, str):
    return record
  if not isinstance(record, dict) or text_field not in record:
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(f"{where}: record has no text_field={text_field!r} (it has {keys}); pass "
                     "text_field= to name the field holding the text")
  text = record[text_field]
  if text is None:
    return ""
  if not isinstance(text, str):
    raise ValueError(f"{where}: text_field={text_field!r} holds {type(text).__name__}, "
                     "expected str")
  return text


def _json_documents(path: str, text_field: str, name: str) -> list[str]:
  """JSON lines, or one JSON value: a list of records, a column dict, or {split: [records]}."""
  raw = _read_text(path, name)
  where = f"source={name!r} ({path})"
  try:
    value = json.loads(raw) if raw.strip() else []
  except json.JSONDecodeError:
    value = None  # `Dataset.to_json` writes JSON lines even under a .json name
  if value is None or (path.lower().endswith(".jsonl") and isinstance(value, dict)):
    docs = []
    for i, line in enumerate(raw.splitlines(), 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where} line {i}: not valid JSON ({e.msg})") from e
      docs.append(_record_text(record, text_field, f"{where} line {i}"))
    return docs
  if isinstance(value, dict):
    if isinstance(value.get(text_field), list):
      value = value[text_field]
    else:
      lists = [v for v in value.values() if isinstance(v, list)]
      if len(lists) != 1:
        raise ValueError(f"{where}: a JSON object must hold a list under text_field="
                         f"{text_field!r} or exactly one list of records; got keys {sorted(value)}")
      value = lists[0]
  if not isinstance(value, list):
    raise ValueError(f"{where}: expected JSON lines, a list of records or an object of lists; "
                     f"got a {type(value).__name__}")
  return [_record_text(r, text_field, f"{where} record {i}") for i, r in enumerate(value)]


def _arrow_documents(path: str, text_field: str, name: str) -> list[str]:
  try:
    import pyarrow as pa
    import pyarrow.parquet as pq
  except ImportError as e:
    raise ImportError(f"source={name!r}: reading {os.path.basename(path)!r} needs pyarrow, "
                      "which is not installed; install it with `pip install pyarrow`") from e
  if path.lower().endswith(".parquet"):
    columns = pq.read_schema(path).names
    if text_field not in columns:
      raise ValueError(f"source={name!r} ({path}): no column text_field={text_field!r} (columns: "
                       f"{columns}); pass text_field= to name the text column")
    table = pq.read_table(path, columns=[text_field])  # C4-sized shards: skip the other columns
  else:
    # `save_to_disk` writes the Arrow IPC stream format; plain Arrow files use the file format.
    try:
      with pa.memory_map(path) as source:
        table = pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
      with pa.memory_map(path) as source:
        table = pa.ipc.open_file(source).read_all()
  if text_field not in table.column_names:
    raise ValueError(f"source={name!r} ({path}): no column text_field={text_field!r} (columns: "
                     f"{table.column_names}); pass text_field= to name the text column")
  return [t or "" for t in table.column(text_field).to_pylist()]


# ------------------------------------------------------------------------- MediaWiki

def _wiki_dump_articles(path: str, name: str) -> list[str]:
  """Plain-text articles of a MediaWiki XML dump: main namespace, no redirects, no stubs."""
  docs = []
  try:
    for ns, redirect, text in _wiki_pages(path):
      if ns != "0" or redirect or re.match(r"\s*#redirect", text, re.IGNORECASE):
        continue
      plain = strip_wiki_markup(text)
      if len(plain.split()) >= _MIN_ARTICLE_WORDS:
        docs.append(plain)
  except (ET.ParseError, EOFError, OSError) as e:  # bad XML; truncated or non-bz2 compression
    raise ValueError(f"source={name!r}: {path} is not a readable MediaWiki XML dump "
                     f"({type(e).__name__}: {e})") from e
  return docs


def _wiki_pages(path: str) -> Iterator[tuple[str, bool, str]]:
  """(namespace, is_redirect, text of the last revision) for each <page>, streaming."""
  opener = bz2.open if path.lower().endswith(".bz2") else open
  with opener(path, "rb") as f:
    ns, redirect, text = "0", False, ""
    for event, elem in ET.iterparse(f, events=("end",)):
      tag = elem.tag.rsplit("}", 1)[-1]  # the export schema namespace changes between versions
      if tag == "ns":
        ns = (elem.text or "").strip()
      elif tag == "redirect":
        redirect = True
      elif tag == "text":
        text = elem.text or ""  # revisions come oldest first: the last one wins
      elif tag == "page":
        yield ns, redirect, text
        ns, redirect, text = "0", False, ""
        elem.clear()  # keeps memory flat over a large dump


_DROP_LINK_PREFIXES = ("file", "image", "media", "category")
_DROP_SECTIONS = frozenset({"references", "external links", "see also", "further reading", "notes",
                            "bibliography", "sources", "footnotes", "citations",
                            "notes and references"})
_HEADING = re.compile(r"^(=+)[ \t]*(.*?)[ \t]*\1[ \t]*$", re.MULTILINE)
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]")
_INTERWIKI = re.compile(r"^:?[a-z]{2,3}(?:-[a-z]+)?:")
# Elements whose content is not prose: self-closing, or up to the matching closing tag.
_DROP_ELEMENTS = re.compile(
    r"<(ref|math|gallery|timeline|score|syntaxhighlight|source|imagemap|chem)\b"
    r"[^>]*?(?:/>|>.*?</\1\s*>)", re.IGNORECASE | re.DOTALL)


def strip_wiki_markup(text: str) -> str:
  """Wikitext -> readable plain text, paragraphs separated by blank lines.

  Drops templates (nested), tables, references, comments, file/category/interlanguage links,
  HTML tags and the reference-like sections (References, External links, See also, ...); keeps
  link labels, heading titles and the text of bold, italic and list items.
  """
  text = re.sub(r"<!--.*?(?:-->|$)", "", text, flags=re.DOTALL)
  text = _DROP_ELEMENTS.sub("", text)
  text = re.sub(r"<ref\b[^>]*>", "", text, flags=re.IGNORECASE)  # unclosed, in truncated pages
  text = _drop_nested(text, "{{", "}}")
  text = _drop_nested(text, "{|", "|}")
  text = _EXTERNAL_LINK.sub(r"\1", text)
  text = _replace_links(text)
  text = re.sub(r"</?[a-zA-Z][^>]*>", "", text)
  text = html.unescape(text)  # &nbsp; &ndash; ... arrive escaped once more inside <text>
  text = text.replace("\u00a0", " ")
  text = re.sub(r"'{2,}", "", text)
  text = re.sub(r"__[A-Z]+__", "", text)  # __TOC__, __NOTOC__
  text = _drop_sections(text)
  return _tidy(text)


def _drop_nested(text: str, open_: str, close: str) -> str:
  """Removes balanced open_..close spans, nested ones included; an unclosed span runs to the end."""
  out, depth, start = [], 0, 0
  for m in re.finditer(re.escape(open_) + "|" + re.escape(close), text):
    if m.group() == open_:
      if depth == 0:
        out.append(text[start:m.start()])
      depth += 1
    elif depth:
      depth -= 1
      if depth == 0:
        start = m.end()
  if depth == 0:
    out.append(text[start:])
  return "".join(out)


def _replace_links(text: str) -> str:
  """[[target|label]] -> label; file, category and interlanguage links -> "".

  A stack of buffers rather than a regex: image captions hold links of their own and stray single
  brackets, and the caption must go with its image.
  """
  stack = [[]]
  pos = 0
  for m in re.finditer(r"\[\[|\]\]", text):
    stack[-1].append(text[pos:m.start()])
    pos = m.end()
    if m.group() == "[[":
      stack.append([])
    elif len(stack) > 1:
      inner = "".join(stack.pop())
      stack[-1].append(_link_text(inner))
  stack[-1].append(text[pos:])
  while len(stack) > 1:  # unclosed at the end of a truncated page
    inner = "".join(stack.pop())
    stack[-1].append(_link_text(inner))
  return "".join(stack[0])


def _link_text(inner: str) -> str:
  target, _, label = inner.partition("|")
  target = target.strip()
  prefix = target.lstrip(":").split(":", 1)[0].lower()
  if ":" in target and (prefix in _DROP_LINK_PREFIXES or _INTERWIKI.match(target)):
    return ""
  if label:
    return label.rsplit("|", 1)[-1]
  return target.lstrip(":").split("#", 1)[0] or target.lstrip(":#")


def _drop_sections(text: str) -> str:
  """Removes sections whose heading is reference-like; keeps other headings as plain lines."""
  out, skip_level = [], 0
  pos = 0
  for m in _HEADING.finditer(text):
    if not skip_level:
      out.append(text[pos:m.start()])
    level, title = len(m.group(1)), m.group(2).strip()
    if skip_level and level > skip_level:
      pos = m.end()
      continue  # a subsection of a dropped section
    skip_level = level if title.lower() in _DROP_SECTIONS else 0
    if not skip_level:
      out.append(title)
    pos = m.end()
  if not skip_level:
    out.append(text[pos:])
  return "".join(out)


def _tidy(text: str) -> str:
  lines = []
  for line in text.splitlines():
    line = line.strip()
    if line.startswith(("|", "!")) or line in ("}", "{", "-"):  # debris of a broken table
      line = ""
    line = re.sub(r"^[*#:;]+\s*", "", line)  # list and indent markers
    line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # parentheses a template used to fill
    line = re.sub(r"[ \t]{2,}", " ", line)
    lines.append(re.sub(r" ([,.;:])", r"\1", line).strip())
  return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# ------------------------------------------------------------------------------ tokens

# tokenizer -> {(source key, text_field): token id arrays of every document}. Weakly keyed so an
# entry dies with its tokenizer: keying by id() would hand a new tokenizer that reuses a freed
# object's id the old tokenizer's tokens.
_TOKEN_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _document_tokens(tokenizer, source: str, text_field: str) -> list[np.ndarray]:
  """Each document of `source` tokenized once (no special tokens), cached per tokenizer."""
  key = (_source_key(source), text_field)
  try:
    per_tokenizer = _TOKEN_CACHE.setdefault(tokenizer, {})
  except TypeError:  # not weak-referenceable or not hashable: no cache
    per_tokenizer = {}
  if key not in per_tokenizer:
    docs = list(_cached_documents(*key))
    # verbose=False: documents are longer than model_max_length on purpose, we cut windows.
    ids = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
    per_tokenizer[key] = [np.asarray(row, np.int32) for row in ids]
  return per_tokenizer[key]


def split_indices(num_documents: int, split: str) -> list[int]:
  """Indices of the documents in a split: every `HELDOUT_EVERY`-th is held out.

  With fewer than `HELDOUT_EVERY` documents the last one is held out (if there are two or more), so
  small local sources still get a held-out part.
  """
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: expected one of {SPLITS}")
  heldout = {i for i in range(num_documents) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1}
  if not heldout and num_documents >= 2:
    heldout = {num_documents - 1}
  wanted = split == "heldout"
  return [i for i in range(num_documents) if (i in heldout) == wanted]


def _split_tokens(tokenizer, source: str, split: str, text_field: str) -> list[np.ndarray]:
  docs = _document_tokens(tokenizer, source, text_field)
  indices = split_indices(len(docs), split)
  if not indices:
    raise ValueError(f"source={os.fspath(source)!r} has {len(docs)} document(s): its {split!r} "
                     "split is empty (a held-out split needs at least 2 documents)")
  return [docs[i] for i in indices]


def _separator(tokenizer) -> np.ndarray:
  """Between documents in a stream: the EOS token, or the tokens of a blank line without one."""
  eos = getattr(tokenizer, "eos_token_id", None)
  if eos is not None:
    return np.asarray([eos], np.int32)
  return np.asarray(tokenizer("\n\n", add_special_tokens=False)["input_ids"], np.int32)


def _stream(tokenizer, docs: Sequence[np.ndarray]) -> np.ndarray:
  sep = _separator(tokenizer)
  parts = []
  for i, d in enumerate(docs):
    if i:
      parts.append(sep)
    parts.append(d)
  return np.concatenate(parts).astype(np.int32)


def require_tokenizer(fn: str, tokenizer: Any, instead: str) -> None:
  """Refuses a missing tokenizer with what to pass instead (a model loaded from a Hugging Face
  directory without tokenizer files has ``tokenizer=None``)."""
  if tokenizer is None:
    raise validate.fail(fn, "tokenizer", tokenizer,
                        f"a tokenizer; the model has no tokenizer, so encode text elsewhere and "
                        f"pass {instead} instead")
  if not callable(tokenizer):
    raise validate.fail(fn, "tokenizer", tokenizer,
                        "a transformers tokenizer (callable on a list of texts)", error=TypeError)


def check_calibration_arguments(fn: str, tokenizer: Any, *, nsamples: Any, seqlen: Any,
                                seed: Any) -> dict:
  """Validates what `calibration_tokens` needs before any text is read; returns the canonical
  nsamples, seqlen and seed. `fn` names the public function the user called."""
  require_tokenizer(fn, tokenizer, "calibration token ids [N, T] (calibration=... of the pruning "
                    "transform)")
  return {"nsamples": validate.integer(fn, "nsamples", nsamples, minimum=1),
          "seqlen": validate.integer(fn, "seqlen", seqlen, minimum=2),
          "seed": validate.seed(fn, seed)}


def calibration_tokens(tokenizer, source: str = "wikipedia", nsamples: int = 128,
                       seqlen: int = 512, seed: int = 0, split: str = "calibration",
                       text_field: str = "text") -> tuple[np.ndarray, dict]:
  """Random token windows for pruning calibration, reproducible from `seed`.

  As in the Wanda / SparseGPT loaders: each sample picks a random document whose tokenization is
  longer than `seqlen` and a random window of `seqlen` tokens inside it. If no document of the
  split is that long, windows are drawn from the split's documents joined into one stream
  (separated by EOS).

  Args:
    tokenizer: a transformers tokenizer (documents are encoded without special tokens); None,
      the tokenizer of a model loaded without one, is refused with what to pass instead.
    source: see `load_texts`.
    nsamples: N, the number of windows.
    seqlen: T, tokens per window.
    seed: an integer in [0, 2**32), seeding a `numpy.random.Generator`; the same seed gives the
      same windows.
    split: "calibration" (default) or "heldout" (the documents `heldout_tokens` uses).
    text_field: see `load_texts`.

  Returns:
    (tokens int32 [N, T], info) with info keys source, split, nsamples, seqlen, seed, documents
    (in the split), tokens_available (the split's document tokens) and sampled_from ("documents"
    or "stream").
  """
  fn = "calibration_tokens"
  args = check_calibration_arguments(fn, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed)
  nsamples, seqlen, seed = args["nsamples"], args["seqlen"], args["seed"]
  split = validate.choice(fn, "split", split, SPLITS)
  docs = _split_tokens(tokenizer, source, split, text_field)
  rng = np.random.default_rng(seed)
  long_docs = [d for d in docs if len(d) > seqlen]
  sampled_from = "documents"
  if not long_docs:
    stream = _stream(tokenizer, docs)
    if len(stream) < seqlen + 1:
      raise ValueError(
          f"source={os.fspath(source)!r}, seqlen={seqlen}: the {split} split has only "
          f"{len(stream)} tokens ({len(docs)} documents joined), fewer than seqlen + 1 = "
          f"{seqlen + 1}; use a smaller seqlen or a larger source")
    long_docs, sampled_from = [stream], "stream"
  lengths = np.asarray([len(d) for d in long_docs], np.int64)
  picks = rng.integers(len(long_docs), size=nsamples)
  starts = rng.integers(0, lengths[picks] - seqlen)  # window start in [0, len - seqlen - 1]
  tokens = np.stack([long_docs[p][s:s + seqlen] for p, s in zip(picks, starts)]).astype(np.int32)
  info = {"source": os.fspath(source), "split": split, "nsamples": int(nsamples),
          "seqlen": int(seqlen), "seed": seed, "documents": len(docs),
          "tokens_available": int(sum(len(d) for d in docs)), "sampled_from": sampled_from}
  return tokens, info


def heldout_tokens(tokenizer, source: str = "wikipedia", seqlen: int = 512,
                   max_windows: Optional[int] = None,
                   text_field: str = "text") -> tuple[np.ndarray, dict]:
  """The held-out split as non-overlapping windows, the usual perplexity protocol.

  The held-out documents are joined into one stream (EOS between documents) and cut into
  ``len(stream) // seqlen`` consecutive windows; the remainder is dropped.

  Args:
    tokenizer: a transformers tokenizer (documents are encoded without special tokens).
    source: see `load_texts`.
    seqlen: T, tokens per window.
    max_windows: keep only the first this many windows (None: all).
    text_field: see `load_texts`.

  Returns:
    (tokens int32 [W, T], info) with info keys source, split ("heldout"), seqlen, windows,
    documents and tokens_available (the stream length).
  """
  fn = "heldout_tokens"
  require_tokenizer(fn, tokenizer, "token ids [W, T] to the perplexity functions")
  seqlen = validate.integer(fn, "seqlen", seqlen, minimum=2)
  if max_windows is not None:
    max_windows = validate.integer(fn, "max_windows", max_windows, minimum=1)
  docs = _split_tokens(tokenizer, source, "heldout", text_field)
  stream = _stream(tokenizer, docs)
  windows = len(stream) // seqlen
  if windows == 0:
    raise ValueError(f"source={os.fspath(source)!r}, seqlen={seqlen}: the heldout split has only "
                     f"{len(stream)} tokens ({len(docs)} documents joined), fewer than one window "
                     "of seqlen tokens")
  if max_windows is not None:
    windows = min(windows, int(max_windows))
  tokens = stream[:windows * seqlen].reshape(windows, seqlen)
  info = {"source": os.fspath(source), "split": "heldout", "seqlen": int(seqlen),
          "windows": int(windows), "documents": len(docs), "tokens_available": int(len(stream))}
  return tokens, info
