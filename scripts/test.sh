#!/usr/bin/env bash
# Installs everything, then runs lint, type checks and the whole test suite (real Redis, real model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
$PY -m ruff check .
$PY -m mypy
$PY -m pytest -q -p no:cacheprovider "$@"
