"""The sidecar the docs' snippets talk to: the server tests' ``service`` (tests/server/conftest.py: the session's
SmolLM2 model, CPU + SSD store, API keys configured), one for the whole package.

Snippets run the way a user runs them: a separate process from the repository root, told where the sidecar is
and which key to use only by the environment variables the docs name (``KVFUSE_URL``, ``KVFUSE_API_KEY``).
``kvfuse`` on the ``PATH`` is this working tree's command line.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.docs.snippets import ROOT
from tests.server.conftest import KEYS, Service, service, single_thread_torch

__all__ = ["service", "single_thread_torch"]  # fixtures reused from the server tests

API_KEY = next(key for key, tenant in KEYS.items() if tenant == "alice")


@pytest.fixture(scope="package")
def snippet_env(service: Service, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a snippet's process."""
    bin_dir = tmp_path_factory.mktemp("docs-bin")
    shim = bin_dir / "kvfuse"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m workloads.cli "$@"\n')
    shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVFUSE_", "OPENAI_"))}
    env.update(
        KVFUSE_URL=service.url,
        KVFUSE_API_KEY=API_KEY,
        PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    return env


def error_responses(url: str) -> Counter[tuple[str, str]]:
    """The sidecar's responses with status >= 400 so far, by (route, status), from its Prometheus metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).raise_for_status().text
    out: Counter[tuple[str, str]] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "kvfuse_requests_total" and int(sample.labels["status"]) >= 400:
                out[(sample.labels["route"], sample.labels["status"])] += int(sample.value)
    return out
