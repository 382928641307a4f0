"""A failure after a stream has started ends it with an OpenAI-style error event and ``[DONE]``, logged,
never a cut connection or a traceback (real sidecar over HTTP)."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator

import httpx
import pytest
import torch
from transformers import PreTrainedModel

from blending.decode import SamplingParams
from blending.fused import FusedKV
from server import generation as gen
from tests.server.conftest import chat

INJECTED = "CUDA error: an illegal memory access was encountered"
REQUESTS: dict[str, dict[str, object]] = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Name three colours."}]},
    "/v1/completions": {"prompt": "Three colours are"},
}


def _events(client: httpx.Client, path: str, body: dict[str, object]) -> list[str]:
    """The stream's ``data:`` payloads, as far as the server sent them (a cut stream is not an error here:
    the assertions say what is missing)."""
    lines: list[str] = []
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        with contextlib.suppress(httpx.RemoteProtocolError):  # the connection closed mid-body
            lines.extend(line for line in r.iter_lines() if line)
    assert all(line.startswith("data: ") for line in lines), lines
    return [line[len("data: ") :] for line in lines]


@pytest.mark.parametrize("path", list(REQUESTS))
def test_a_mid_stream_error_ends_with_an_error_event(
    alice: httpx.Client, path: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = gen.generate_tokens

    def failing(model: PreTrainedModel, fused: FusedKV, params: SamplingParams) -> Iterator[tuple[int, torch.Tensor]]:
        # No request makes a healthy engine fail mid-decode (completions stay far inside the model's
        # positions), so the real decoder runs and, after its first token, fails as a device error would.
        steps = real(model, fused, params)
        yield next(steps)
        raise RuntimeError(INJECTED)

    monkeypatch.setattr(gen, "generate_tokens", failing)
    body = {"model": "default", "temperature": 0, "max_tokens": 8, "stream": True, "kvfuse": {"mode": "dense"},
            **REQUESTS[path]}  # fmt: skip
    with caplog.at_level(logging.ERROR, logger="kvfuse.server"):
        events = _events(alice, path, body)
    monkeypatch.undo()
    assert events[-1:] == ["[DONE]"], events
    assert len(events) >= 3  # at least one token's event went out before the failure
    error = json.loads(events[-2])
    assert set(error) == {"error"}, error
    assert error["error"]["type"] == "server_error" and error["error"]["param"] is None
    assert error["error"]["message"] == "internal error during generation: RuntimeError"
    assert not any("Traceback" in e or INJECTED in e for e in events)  # nothing internal reaches the client
    for event in events[:-2]:
        assert "error" not in json.loads(event)
    assert any(INJECTED in r.getMessage() for r in caplog.records if r.name == "kvfuse.server")
    # The service carries on.
    assert chat(alice, "Name a colour.", kvfuse={"mode": "dense"})["choices"][0]["finish_reason"] in ("stop", "length")
