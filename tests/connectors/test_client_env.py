"""The client and the framework adapters take the sidecar's URL and API key from the environment, read when
they are built (as ``kvfuse stats``/``warm`` do), and an explicit argument wins."""

from __future__ import annotations

import pytest

from connectors.client import AsyncKVFuseClient, KVFuseClient


def test_url_and_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVFUSE_URL", "http://10.1.2.3:9000/")
    monkeypatch.setenv("KVFUSE_API_KEY", "sk-env")
    for cls in (KVFuseClient, AsyncKVFuseClient):
        client = cls()
        assert client.base_url == "http://10.1.2.3:9000"
        assert client._kwargs()["headers"] == {"Authorization": "Bearer sk-env"}
        explicit = cls("http://127.0.0.1:1", api_key="sk-arg")
        assert explicit.base_url == "http://127.0.0.1:1" and explicit.api_key == "sk-arg"


def test_no_key_sends_no_header(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVFUSE_API_KEY", raising=False)
    monkeypatch.delenv("KVFUSE_URL", raising=False)
    client = KVFuseClient()
    assert client.base_url == "http://127.0.0.1:8000" and client._kwargs()["headers"] == {}


def test_adapters_read_the_environment_when_built(monkeypatch: pytest.MonkeyPatch) -> None:
    langchain = pytest.importorskip("connectors.langchain")
    llamaindex = pytest.importorskip("connectors.llamaindex")
    monkeypatch.setenv("KVFUSE_URL", "http://10.9.8.7:1234")
    monkeypatch.setenv("KVFUSE_API_KEY", "sk-env")
    chat = langchain.ChatKVFuse()
    assert chat.base_url == "http://10.9.8.7:1234"
    assert chat.client.api_key == "sk-env"
    llm = llamaindex.KVFuseLLM()
    assert llm.base_url == "http://10.9.8.7:1234"
