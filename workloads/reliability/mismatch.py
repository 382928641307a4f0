"""Model mismatch: KV of another model (fingerprint), dtype or layout is refused.

- Chunk API: a valid blob re-encoded with another fingerprint, as float16 / bfloat16, or with fewer layers
  is refused with 422 and nothing is stored (HEAD stays 404).
- Store: KV with another fingerprint planted under the keys the engine looks up (as a shared Redis used by
  another model would) is ignored: with the hot prompt cache cleared, the chat hits nothing and answers
  exactly like dense.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from blending.model import LoadedModel
from kvstore import KVChunk, decode, encode
from workloads.reliability.service import DOCS, chat_body, running_service
from workloads.reliability.tally import Tally, ok_json


def run_mismatch(loaded: LoadedModel, root: Path) -> Tally:
    tally = Tally("model / dtype mismatch")
    start = time.perf_counter()
    with running_service(loaded, root) as h, h.client("alice") as c:
        keys = ok_json(tally, c.post("/v1/chunks", json={"texts": DOCS}))["keys"]
        chunk = decode(c.get(f"/v1/chunks/{keys[0]}").content)
        tally.requests += 2
        forged = {
            "other fingerprint": KVChunk(chunk.kv, chunk.positions, "another-model-fingerprint"),
            "float16": KVChunk(chunk.kv.to(torch.float16), chunk.positions, chunk.fingerprint),
            "bfloat16": KVChunk(chunk.kv.to(torch.bfloat16), chunk.positions, chunk.fingerprint),
            "fewer layers": KVChunk(chunk.kv[:-1], chunk.positions, chunk.fingerprint),
        }
        for i, (what, bad) in enumerate(forged.items()):
            key = f"{0xF00D0000 + i:032x}"
            r = c.put(f"/v1/chunks/{key}", content=encode(bad))
            tally.faults += 1
            tally.requests += 2
            tally.check(r.status_code == 422, "wrong", f"{what}: upload answered {r.status_code}, not 422")
            tally.check(c.head(f"/v1/chunks/{key}").status_code == 404, "wrong", f"{what}: the blob was stored")

        dense = ok_json(tally, c.post("/v1/chat/completions", json=chat_body(DOCS, mode="dense")))
        ok_json(tally, c.post("/v1/chat/completions", json=chat_body(DOCS)))
        h.wait_writebacks()
        stored = h.store.tiers[0].keys()
        for stored_key in stored:  # replace every cached chunk by the same KV claiming another model
            got = h.store.get(stored_key)
            if got is not None:
                h.store.put(stored_key, KVChunk(got.kv.clone(), got.positions, "another-model-fingerprint"))
                tally.faults += 1
        h.engine.hot.clear()  # the prompt was just computed: without this its (own, correct) KV could serve it
        reply = ok_json(tally, c.post("/v1/chat/completions", json=chat_body(DOCS)))
        tally.requests += 3
        tally.check(reply["kvfuse"]["chunk_hits"] == 0, "wrong", f"foreign KV was used: {reply['kvfuse']}")
        text, want = reply["choices"][0]["message"]["content"], dense["choices"][0]["message"]["content"]
        tally.check(text == want, "wrong", f"answer {text!r} differs from dense {want!r}")
    tally.seconds = time.perf_counter() - start
    return tally
