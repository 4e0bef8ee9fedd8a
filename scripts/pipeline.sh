#!/usr/bin/env bash
# Set up, then reproduce the paper's pipeline (dvc repro); extra arguments go to dvc repro.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true PATH="$PWD/.venv/bin:$PATH"
git rev-parse --git-dir >/dev/null 2>&1 || { echo "pipeline: run it inside the git clone of fedmeta" >&2; exit 1; }
dvc repro "$@"
