#!/usr/bin/env bash
# Set up, then lint (ruff check, configured in pyproject.toml) and run the test suite; extra arguments go to pytest.
# A lint error fails the command before any test runs; "no tests ran" counts as a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
export DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true PATH="$PWD/.venv/bin:$PATH"
.venv/bin/ruff check . || { echo "test: ruff check found lint errors (see above)" >&2; exit 1; }
.venv/bin/python -m pytest "$@"
rc=$?
[ "$rc" -eq 5 ] && { echo "test: pytest collected no tests" >&2; exit 1; }
exit "$rc"
