"""The chunk API over real HTTP: warm, blob round trip, validation, prefetch, tenant isolation."""

from __future__ import annotations

import httpx
import torch

from kvstore import KVChunk
from kvstore.codec import encode
from tests.server.conftest import DOCS, Service, assert_error, chat, wait_writebacks

TEXTS = ["Chunk API test text: the quick brown fox jumps over the lazy dog near the river bank."]


def test_round_trip(alice: httpx.Client) -> None:
    r = alice.post("/v1/chunks", json={"texts": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    (key,) = body["keys"]
    assert len(key) == 32 and body["tokens"][0] > 8 and body["prefix_tokens"] > 0
    assert alice.post("/v1/chunks", json={"texts": TEXTS}).json()["keys"] == [key]  # content addressed

    blob = alice.get(f"/v1/chunks/{key}")
    assert blob.status_code == 200 and blob.headers["content-type"] == "application/octet-stream"
    assert blob.content[:4] == b"KVFB"
    assert alice.head(f"/v1/chunks/{key}").status_code == 200

    assert alice.delete(f"/v1/chunks/{key}").json() == {"key": key, "deleted": True}
    assert alice.head(f"/v1/chunks/{key}").status_code == 404
    assert_error(alice.get(f"/v1/chunks/{key}"), 404)
    assert_error(alice.delete(f"/v1/chunks/{key}"), 404)

    put = alice.put(f"/v1/chunks/{key}", content=blob.content)
    assert put.status_code == 200, put.text
    assert put.json()["tokens"] == body["tokens"][0] and put.json()["bytes"] == len(blob.content)
    assert alice.head(f"/v1/chunks/{key}").status_code == 200
    assert alice.get(f"/v1/chunks/{key}").content == blob.content

    prefetch = alice.post("/v1/prefetch", json={"keys": [key, "0" * 32], "wait": True})
    assert prefetch.json() == {"scheduled": 2, "found": 1}
    assert alice.post("/v1/prefetch", json={"keys": [key]}).json() == {"scheduled": 1}


def test_bad_blobs_are_refused_and_change_nothing(alice: httpx.Client, service: Service) -> None:
    key = alice.post("/v1/chunks", json={"texts": TEXTS}).json()["keys"][0]
    good = alice.get(f"/v1/chunks/{key}").content
    flipped = bytearray(good)
    flipped[-3] ^= 0x40
    engine = service.engine
    n_layers = engine.adapter.shape.num_layers if engine.adapter else 1
    foreign = KVChunk(torch.zeros(n_layers, 2, 3, 4, 64), torch.arange(4), "not-this-model")
    wrong_shape = KVChunk(torch.zeros(2, 2, 3, 4, 64), torch.arange(4), engine.fingerprint)
    for bad, reason in [
        (bytes(flipped), "Checksum"),
        (good[: len(good) // 2], "Truncated"),
        (b"not a blob at all", ""),
        (b"", ""),
        (encode(foreign), "Fingerprint"),
        (encode(wrong_shape), "layout"),
    ]:
        error = assert_error(alice.put(f"/v1/chunks/{key}", content=bad), 422)
        assert reason in error["message"]
        assert alice.get(f"/v1/chunks/{key}").content == good  # what is stored is untouched
    fresh = "f" * 32
    assert_error(alice.put(f"/v1/chunks/{fresh}", content=bytes(flipped)), 422)
    assert alice.head(f"/v1/chunks/{fresh}").status_code == 404  # nothing stored on error


def test_bad_keys(alice: httpx.Client) -> None:
    for key in ("xyz", "0" * 31, "g" * 32):
        assert_error(alice.get(f"/v1/chunks/{key}"), 400)
    assert_error(alice.post("/v1/prefetch", json={"keys": ["nope"]}), 400)
    assert_error(alice.post("/v1/chunks", json={"texts": []}), 400)
    assert_error(alice.post("/v1/chunks", json={"texts": [""]}), 400)
    assert_error(alice.post("/v1/chunks", json={"texts": ["x"] * 5}), 400)  # over max_documents


def test_tenant_isolation(alice: httpx.Client, bob: httpx.Client, service: Service) -> None:
    key = alice.post("/v1/chunks", json={"texts": TEXTS}).json()["keys"][0]
    blob = alice.get(f"/v1/chunks/{key}").content
    assert bob.head(f"/v1/chunks/{key}").status_code == 404
    assert_error(bob.get(f"/v1/chunks/{key}"), 404)
    assert_error(bob.delete(f"/v1/chunks/{key}"), 404)
    bob_key = bob.post("/v1/chunks", json={"texts": TEXTS}).json()["keys"][0]
    assert bob_key != key  # the same text has another key (and stored KV) per tenant
    assert bob.put(f"/v1/chunks/{key}", content=blob).status_code == 200  # lands in bob's own space
    assert bob.delete(f"/v1/chunks/{key}").status_code == 200
    assert alice.get(f"/v1/chunks/{key}").content == blob  # alice's chunk is untouched

    docs = [DOCS[0], DOCS[2]]
    messages = [{"role": "system", "content": "Isolation test."}, {"role": "user", "content": "Where is Paris?"}]
    chat(alice, "", messages=messages, documents=docs, max_tokens=1)
    wait_writebacks(alice)
    again = chat(alice, "", messages=messages, documents=docs[::-1], max_tokens=1)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    with service.client("sk-carol") as carol:  # a tenant with no KV of its own: nothing may hit
        other = chat(carol, "", messages=messages, documents=docs[::-1], max_tokens=1)
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert other["kvfuse"]["chunk_hits"] == 0


def test_warm_chunks_hit_later_chat(bob: httpx.Client) -> None:
    docs = ["Warm-up document one: lighthouses guide ships along dangerous rocky coasts at night.",
            "Warm-up document two: bees collect nectar from flowers and turn it into honey in the hive."]  # fmt: skip
    assert bob.post("/v1/chunks", json={"texts": docs}).status_code == 200
    body = chat(bob, "What do bees make?", documents=docs[::-1], max_tokens=1)
    assert body["kvfuse"]["chunk_hits"] >= 2 and body["kvfuse"]["cached_tokens"] > 0
    system = "You are terse."
    assert bob.post("/v1/chunks", json={"texts": docs, "prefix": system}).status_code == 200
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "What guides ships?"}]
    body = chat(bob, "", max_tokens=1, documents=docs, messages=messages)
    assert body["kvfuse"]["chunk_hits"] >= 2
