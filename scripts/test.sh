#!/usr/bin/env bash
# Set up .venv if needed, add what only the tests use (pytest, ruff, llama.cpp's server from the prebuilt
# xllamacpp wheel, and vLLM's CPU build in its own environment, see scripts/vllm-env.sh), then run the linter
# and the test suite, the vLLM tests included (ICM_REQUIRE_VLLM=1: they fail, never skip, without vLLM).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! { .venv/bin/python -c "import pytest, xllamacpp" 2>/dev/null && [ -x .venv/bin/ruff ]; }; then
  .venv/bin/python -m pip -q --disable-pip-version-check install -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import pytest, xllamacpp"
fi
bash scripts/vllm-env.sh
.venv/bin/ruff check .
ICM_REQUIRE_VLLM=1 .venv/bin/python -m pytest -q "$@"
