#!/usr/bin/env bash
# Optional: tests kvfuse's LMCache remote-storage plugin inside a REAL, fully installed LMCache (CPU is enough).
# Builds a separate venv (default /tmp/lmcache-venv; the main environment is not touched): torch==2.13.0,
# then lmcache with all its dependencies (cupy-cuda13x, cuda-python, ... ~1.5 GB; it pins numpy<=2.2.6),
# then kvfuse (editable) with its own dependencies resolved against LMCache's. LMCache picks its CPU stub
# device when no GPU is present. Runs tests/connectors/test_lmcache_storage.py and test_lmcache_real.py
# (LMCache's loader, RemoteBackend and two LMCacheEngines on kvfuse; needs redis-server on PATH).
# Also runs the store bench with --peer lmcache (LMCache's backends measured next to kvfuse's tiers).
#   LMCACHE_VERSION=0.5.6   the LMCache release to install (default below)
#   LMCACHE_VENV=/path      where the venv lives (reused when present)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LMCACHE_VENV:-/tmp/lmcache-venv}
LMCACHE_VERSION=${LMCACHE_VERSION:-0.5.6}
PIP="$VENV/bin/pip install -q --disable-pip-version-check"
if [ ! -x "$VENV/bin/python" ]; then
    $PY -m venv "$VENV"
fi
$PIP "torch==2.13.0"
$PIP "lmcache==$LMCACHE_VERSION"
$PIP -e . pytest pytest-timeout hypothesis
"$VENV/bin/pip" check
export LMCACHE_TRACK_USAGE=false DO_NOT_TRACK=1  # LMCache's anonymous usage telemetry: off
"$VENV/bin/python" -c "import lmcache, torch; print('lmcache', lmcache.__version__, 'torch', torch.__version__)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -rs \
    tests/connectors/test_lmcache_storage.py tests/connectors/test_lmcache_real.py tests/workloads/test_bench_store.py "$@"
