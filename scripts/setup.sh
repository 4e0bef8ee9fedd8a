#!/usr/bin/env bash
# Create .venv and install fedmeta with its pinned stack; a no-op when pyproject.toml has not changed.
# The stack is about 6 GB (torch's CUDA build pulls NVIDIA's libraries), so it is installed by uv, which unpacks and
# byte-compiles in parallel where pip uses one core (docs/performance.md has both times); where uv cannot be
# installed, pip does the same install.
set -euo pipefail
cd "$(dirname "$0")/.."
export DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true PIP_DISABLE_PIP_VERSION_CHECK=1
PYTHON=${PYTHON:-python3.11}
UV_VERSION=0.13.9
command -v "$PYTHON" >/dev/null || PYTHON=python3
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  if .venv/bin/pip install --quiet "uv==$UV_VERSION" 2>/dev/null; then
    # byte-compiled as pip does: otherwise every process would compile the stack's modules again on import
    .venv/bin/uv pip install --quiet --python .venv/bin/python --compile-bytecode -e ".[dev]"
  else
    echo "setup: uv $UV_VERSION could not be installed; installing with pip" >&2
    .venv/bin/pip install --quiet --upgrade pip
    .venv/bin/pip install --quiet -e ".[dev]" 2>&1 | grep -v "is ignored" || true
  fi
  .venv/bin/python -c "import fedmeta, torch, torchvision, dvc, mlflow, typer, yaml, matplotlib, pytest, pydantic, flwr, sklearn" \
    || { echo "setup: installation failed" >&2; exit 1; }
  rm -f .venv/.installed-* && touch "$stamp"
fi
