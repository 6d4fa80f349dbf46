"""Runs the launchers in a subprocess, as a user would, and builds the tiny inputs they need."""

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORDS = ("the river runs past old stone mills while farmers carry grain to market and children "
         "watch boats drift slowly under bridges near quiet villages in early autumn light").split()
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def launch(module: str, *args: str, timeout: float = 300, env: dict = None):
  """(CompletedProcess, seconds) of `python -m module args` from the repository root, offline
  (with `env` added to the environment)."""
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", **(env or {}))
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)
  return proc, time.perf_counter() - t0


def launch_all(module: str, cases: dict, timeout: float = 300) -> dict:
  """{name: (CompletedProcess, seconds)} of every `python -m module *cases[name]`, run a few at a
  time: each refusal costs a Python start-up and a JAX import, and they need not wait in line."""
  workers = min(8, max(2, len(os.sched_getaffinity(0))))
  with ThreadPoolExecutor(max_workers=workers) as pool:
    futures = {name: pool.submit(launch, module, *args, timeout=timeout)
               for name, args in cases.items()}
    return {name: f.result() for name, f in futures.items()}


def error_line(proc) -> str:
  """The refusal: the last line of stderr (the launcher writes exactly one)."""
  lines = proc.stderr.strip().splitlines()
  return lines[-1] if lines else ""


def snapshot(root: Path) -> dict:
  """path -> (bytes, mtime_ns) of every file under root, and every directory entry."""
  out = {}
  for path in sorted(root.rglob("*")):
    rel = str(path.relative_to(root))
    out[rel] = (path.read_bytes(), path.stat().st_mtime_ns) if path.is_file() else "dir"
  return out


def decoy_model(path: Path) -> Path:
  """A directory that passes the launcher's pre-load --model check but that `pj.load` refuses: a
  refusal naming another flag proves that flag was checked before the model was loaded."""
  path.mkdir(parents=True)
  (path / "config.json").write_text("{}")
  return path


def text_file(path: Path, documents: int = 40, words: int = 24) -> Path:
  """Paragraph-separated text (one document per paragraph) drawn from WORDS."""
  docs = [" ".join(WORDS[(7 * d + 3 * i) % len(WORDS)] for i in range(words))
          for d in range(documents)]
  path.write_text("\n\n".join(docs) + "\n")
  return path


def tiny_model(path: Path) -> Path:
  """A 2-layer random llama in a Hugging Face directory, with a word-level tokenizer over WORDS."""
  import jax
  import prunerep_jax as pj
  from prunerep_jax.export import export_hf
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {w: i for i, w in enumerate(["<unk>", "</s>"] + sorted(set(WORDS) | {"user:",
                                                                             "assistant:"}))}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
  tokenizer.chat_template = CHAT_TEMPLATE
  cfg = pj.Config(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, eos_token_ids=(1,),
                  max_position_embeddings=128)
  assert len(vocab) <= cfg.vocab_size
  params = pj.init_params(cfg, jax.random.key(0))
  export_hf(str(path), params, cfg, tokenizer)
  return path
