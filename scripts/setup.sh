#!/usr/bin/env bash
# Create .venv and install fedmeta with its pinned stack; a no-op when pyproject.toml has not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
export DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true PIP_DISABLE_PIP_VERSION_CHECK=1
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -e ".[dev]" 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -c "import fedmeta, torch, torchvision, dvc, mlflow, typer, yaml, matplotlib, pytest, pydantic, flwr, sklearn" \
    || { echo "setup: installation failed" >&2; exit 1; }
  rm -f .venv/.installed-* && touch "$stamp"
fi
