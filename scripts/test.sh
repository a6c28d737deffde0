#!/usr/bin/env bash
# Set up .venv if needed, add what only the tests use (pytest, ruff, llama.cpp's server from the prebuilt
# xllamacpp wheel, and vLLM's CPU build in its own environment, see scripts/vllm-env.sh), then run the linter
# and the test suite, the vLLM tests included (ICM_REQUIRE_VLLM=1: they fail, never skip, without vLLM).
# With no arguments the vLLM environment is built (first run only: mostly downloads and unpacking) while the
# other tests run, and the vLLM tests run last; arguments go to pytest, after the environment is ready.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! { .venv/bin/python -c "import pytest, xllamacpp" 2>/dev/null && [ -x .venv/bin/ruff ]; }; then
  .venv/bin/python -m pip -q --disable-pip-version-check install -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import pytest, xllamacpp"
fi
.venv/bin/ruff check .
export ICM_REQUIRE_VLLM=1
if [ $# -gt 0 ]; then
  bash scripts/vllm-env.sh
  exec .venv/bin/python -m pytest -q "$@"
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
bash scripts/vllm-env.sh >"$log" 2>&1 &
env_pid=$!
status=0
.venv/bin/python -m pytest -q -m "not vllm" || status=$?
wait "$env_pid" || { cat "$log" >&2; echo "error: scripts/vllm-env.sh failed" >&2; exit 1; }
.venv/bin/python -m pytest -q -m vllm || status=$?
exit "$status"
