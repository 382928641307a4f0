#!/usr/bin/env bash
# Optional: tests kvfuse's SGLang / vLLM / LMCache adapters against the engines' REAL interface code.
# Builds a test-only venv (default /tmp/engines-venv, reusing this Python's torch through
# --system-site-packages) with sglang, vllm and lmcache installed --no-deps plus the light packages their
# interface modules import, then runs tests/connectors/test_*interface*.py, test_lmcache*.py and the hash
# vector tests. The CUDA stacks are never installed; nothing here runs a model on an engine.
#   REGEN=1 scripts/test-engines.sh   also re-records tests/connectors/data/*.json from the engines' own hashes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${ENGINES_VENV:-/tmp/engines-venv}
PIP="$VENV/bin/pip install -q --disable-pip-version-check"
if [ ! -x "$VENV/bin/python" ]; then
    $PY -m venv --system-site-packages "$VENV"
fi
$PIP --no-deps "sglang==0.5.23" "vllm==0.33.0" "lmcache==0.5.6"
# SGLang's hicache_storage imports sglang.srt.utils (triton, zmq, ...); vLLM's connector base ~25 light deps.
$PIP orjson pybase64 pillow starlette msgspec pyzmq ipython aiohttp triton \
    packaging psutil urllib3 regex numpy cbor2 requests openai-harmony openai cachetools cloudpickle uvloop \
    py-cpuinfo prometheus-client xgrammar fastapi partial-json-parser llguidance
if [ "${REGEN:-0}" = "1" ]; then
    "$VENV/bin/python" scripts/gen_engine_hash_vectors.py
fi
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -rs \
    tests/connectors/test_sglang_interface.py tests/connectors/test_vllm_interface.py \
    tests/connectors/test_lmcache_storage.py tests/connectors/test_sglang_hashes.py \
    tests/connectors/test_vllm_hashes.py "$@"
