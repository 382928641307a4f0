"""A checked request mix for fault and load scenarios: chat, chunk upload/download, warm, prefetch.

Every answer is checked, not only its status:

- chat: greedy answers are deterministic for a given KV. With every keyed segment a hit the answer must be
  the all-hit reference, with none a hit the dense reference; partial hits are counted as unchecked.
- uploads: a blob ``PUT`` under a fresh key is an acknowledged write once answered 200; it must read back
  bit-exactly (``GET``) whenever read, and in :meth:`Ops.verify_acked` at the end.
"""

from __future__ import annotations

import random
import threading
from typing import Any

import httpx

from workloads.reliability.service import DOCS, Harness, chat_body
from workloads.reliability.tally import Tally, ok_json

PROMPTS = [DOCS, DOCS[::-1], DOCS[:2], [DOCS[2], DOCS[0]]]


class Ops:
    def __init__(self, harness: Harness, tally: Tally, tenant: str = "alice") -> None:
        self.h, self.tally, self.tenant = harness, tally, tenant
        self.lock = threading.Lock()
        self.refs: list[dict[str, str]] = []
        self.blobs: list[bytes] = []
        self.acked: dict[str, bytes] = {}
        self.counts = dict.fromkeys(("chat", "anchor_chat", "upload", "download", "warm", "prefetch", "unchecked"), 0)

    # -- setup ------------------------------------------------------------------------------------------
    def prepare(self, prompts: int = len(PROMPTS)) -> None:
        """Warm the documents; record the dense and all-hit answers of the first ``prompts`` prompts and the
        warmed blobs."""
        with self.h.client(self.tenant) as c:
            keys = ok_json(self.tally, c.post("/v1/chunks", json={"texts": DOCS}))["keys"]
            for docs in PROMPTS[:prompts]:
                dense = ok_json(self.tally, c.post("/v1/chat/completions", json=chat_body(docs, mode="dense")))
                ok_json(self.tally, c.post("/v1/chat/completions", json=chat_body(docs)))
                self.h.wait_writebacks()
                hit = ok_json(self.tally, c.post("/v1/chat/completions", json=chat_body(docs)))
                if hit["kvfuse"]["chunk_misses"]:
                    self.tally.fail("errors", f"warmed prompt still misses: {hit['kvfuse']}")
                self.refs.append({"dense": _text(dense), "hit": _text(hit)})
            self.blobs = [c.get(f"/v1/chunks/{k}").content for k in keys]
            self.tally.requests += 1 + 3 * prompts + len(keys)

    # -- operations ---------------------------------------------------------------------------------------
    def _record(self, op: str) -> None:
        with self.lock:
            self.tally.requests += 1
            self.counts[op] += 1

    def _status(self, r: httpx.Response, op: str, ok: tuple[int, ...] = (200,)) -> bool:
        self._record(op)
        if r.status_code in ok:
            return True
        with self.lock:
            self.tally.fail("errors", f"{op}: {r.status_code} {r.text[:160]}")
        return False

    def chat(self, c: httpx.Client, rng: random.Random) -> None:
        i = rng.randrange(len(self.refs))
        r = c.post("/v1/chat/completions", json=chat_body(PROMPTS[i]))
        if not self._status(r, "chat"):
            return
        body = r.json()
        info, text = body["kvfuse"], _text(body)
        with self.lock:
            if info["chunk_misses"] == 0:
                self.tally.check(text == self.refs[i]["hit"], "wrong", f"all-hit answer {text!r} != {self.refs[i]}")
            elif info["chunk_hits"] == 0:
                self.tally.check(text == self.refs[i]["dense"], "wrong", f"no-hit answer {text!r} != {self.refs[i]}")
            else:
                self.counts["unchecked"] += 1

    def anchor_chat(self, c: httpx.Client, rng: random.Random) -> None:
        """Anchor mode (exercises the anchor pool); checked when it falls back to a dense prefill."""
        i = rng.randrange(len(self.refs))
        r = c.post("/v1/chat/completions", json=chat_body(PROMPTS[i], mode="anchor"))
        if not self._status(r, "anchor_chat"):
            return
        body = r.json()
        with self.lock:
            if body["kvfuse"]["mode"] == "dense":
                text = _text(body)
                self.tally.check(text == self.refs[i]["dense"], "wrong", f"dense fallback {text!r} != {self.refs[i]}")
            else:
                self.counts["unchecked"] += 1

    def upload(self, c: httpx.Client, rng: random.Random) -> None:
        key, blob = f"{rng.getrandbits(128):032x}", rng.choice(self.blobs)
        if self._status(c.put(f"/v1/chunks/{key}", content=blob), "upload"):
            with self.lock:
                self.acked[key] = blob

    def download(self, c: httpx.Client, rng: random.Random) -> None:
        with self.lock:
            if not self.acked:
                return
            key = rng.choice(list(self.acked))
            want = self.acked[key]
        r = c.get(f"/v1/chunks/{key}")
        self._record("download")
        with self.lock:
            if r.status_code == 404:
                self.tally.fail("lost", f"acknowledged upload {key[:8]}… is gone")
            elif r.status_code != 200:
                self.tally.fail("errors", f"download: {r.status_code} {r.text[:160]}")
            else:
                self.tally.check(r.content == want, "wrong", "a download differs from the uploaded blob")

    def warm(self, c: httpx.Client, rng: random.Random) -> None:
        text = f"Note {rng.getrandbits(32)}: the archive in room {rng.randrange(100)} holds {rng.randrange(999)} maps."
        self._status(c.post("/v1/chunks", json={"texts": [text]}), "warm")

    def prefetch(self, c: httpx.Client, rng: random.Random) -> None:
        with self.lock:
            keys = list(self.acked)[-8:] or ["0" * 32]
        self._status(c.post("/v1/prefetch", json={"keys": keys, "wait": rng.random() < 0.5}), "prefetch")

    def mixed(self, c: httpx.Client, rng: random.Random, weights: dict[str, float]) -> None:
        op = rng.choices(list(weights), weights=list(weights.values()))[0]
        getattr(self, op)(c, rng)

    def verify_acked(self) -> None:
        """Every acknowledged upload reads back bit-exactly."""
        with self.h.client(self.tenant) as c:
            for key, want in list(self.acked.items()):
                r = c.get(f"/v1/chunks/{key}")
                self.tally.requests += 1
                if r.status_code != 200:
                    self.tally.fail("lost", f"acknowledged upload {key[:8]}… answered {r.status_code}")
                else:
                    self.tally.check(r.content == want, "wrong", "an acknowledged upload reads back different bytes")


def _text(body: dict[str, Any]) -> str:
    return str(body["choices"][0]["message"]["content"])


def start_clients(
    ops: Ops, clients: int, stop: threading.Event, weights: dict[str, float], seed_value: int
) -> list[threading.Thread]:
    """Start ``clients`` threads, each with its own connection, running the mix until ``stop`` is set."""

    def worker(n: int) -> None:
        rng = random.Random(seed_value * 1000 + n)
        with ops.h.client(ops.tenant, timeout=300) as c:
            while not stop.is_set():
                try:
                    ops.mixed(c, rng, weights)
                except httpx.HTTPError as exc:
                    with ops.lock:
                        ops.tally.requests += 1
                        ops.tally.fail("errors", f"transport error: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(n,), name=f"rel-client-{n}") for n in range(clients)]
    for t in threads:
        t.start()
    return threads
