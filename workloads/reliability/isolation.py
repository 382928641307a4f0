"""Tenant isolation and log hygiene behind a running service.

- Two tenants with identical documents never share KV: their stored keys differ, and bob's first chat over
  alice's warmed documents hits nothing.
- A tenant cannot read, probe, overwrite or delete another's chunk by key: bob's GET/HEAD of alice's public
  keys answer 404; bob's PUT to them lands in his own space (he reads back what he planted) and his DELETE
  removes only that, while alice's blobs stay bit-identical.
- Anchors are per tenant: after alice's own anchor-mode traffic, bob's anchor-mode completion is what it is on
  a server where alice never ran (a dense fallback, the dense logprobs).
- Faults are counted as observed: one per cross-tenant request answered and checked, one for alice's learned
  anchors being present, one for the corrupt blob; ``notes`` says how many of each were contained.
- Keys and KV never appear in logs: every log record of the scenario (access log at INFO, everything else at
  DEBUG, a corrupt blob included) is free of 32-hex-digit keys, API keys and blob bytes.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

import httpx

from blending.model import LoadedModel
from workloads.reliability.service import API_KEYS, DOCS, QUESTION, Harness, chat_body, running_service
from workloads.reliability.tally import Tally, ok_json

CLIENT_LOGGERS = ("httpx", "httpcore", "hpack", "urllib3")
ANCHOR_DOCS = (  # bob's X and Y, alice's private P and Q
    "The lighthouse on the northern cape was built in 1871 and is painted red and white.",
    "The ferry to the island leaves every morning at seven from the old harbour pier.",
    "Our quarterly revenue grew by twelve percent, driven by the new subscription plan.",
    "The merger talks with the logistics company stay confidential until the board meets.",
)
HEX_KEY = re.compile(r"(?i)(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])")


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".")[0] in CLIENT_LOGGERS:  # the test's own HTTP client, not the service
            return
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.lines.append(f"{record.name}: {text}")


def _cross_tenant(h: Harness, tally: Tally) -> dict[str, int]:
    """Bob's attempts on alice's KV. Returns what was observed: each count must equal the attempts made."""
    seen = {"keys": 0, "attempts": 0, "refused": 0, "writes_contained": 0, "deletes_contained": 0}
    with h.client("alice") as alice, h.client("bob") as bob:
        a_keys = ok_json(tally, alice.post("/v1/chunks", json={"texts": DOCS}))["keys"]
        warm = ok_json(tally, alice.post("/v1/chat/completions", json=chat_body(DOCS)))["kvfuse"]
        # Only KV that alice can hit makes bob's miss meaningful.
        tally.check(warm["chunk_hits"] > 0, "wrong", f"alice's chat over her warmed documents hit nothing: {warm}")
        h.wait_writebacks()
        first = ok_json(tally, bob.post("/v1/chat/completions", json=chat_body(DOCS)))["kvfuse"]
        tally.check(first["chunk_hits"] == 0, "wrong", f"bob's first chat hit alice's KV: {first}")
        b_keys = ok_json(tally, bob.post("/v1/chunks", json={"texts": DOCS}))["keys"]
        tally.requests += 4
        stored_a = {h.state.keys.stored("alice", k) for k in a_keys}
        stored_b = {h.state.keys.stored("bob", k) for k in b_keys}
        tally.check(not stored_a & stored_b, "wrong", "identical documents share stored KV across tenants")
        tally.check(not set(a_keys) & set(b_keys), "wrong", "identical documents got the same public key")
        originals = {k: ok_get(tally, alice, k) for k in a_keys}  # each target exists for its owner
        tally.requests += len(a_keys)
        for k in a_keys:
            seen["keys"] += 1
            planted = _other(originals, k)
            statuses = [bob.get(f"/v1/chunks/{k}").status_code, bob.head(f"/v1/chunks/{k}").status_code]
            seen["refused"] += sum(st == 404 for st in statuses)
            tally.check(statuses[0] == 404, "wrong", "bob read alice's chunk")
            tally.check(statuses[1] == 404, "wrong", "bob probed alice's chunk")
            put = bob.put(f"/v1/chunks/{k}", content=planted)
            tally.check(put.status_code == 200, "errors", f"bob's upload was refused: {put.status_code}")
            mine, hers = bob.get(f"/v1/chunks/{k}"), alice.get(f"/v1/chunks/{k}")
            # The write landed in bob's own space: he reads back what he planted, alice still her original.
            contained = mine.content == planted and hers.content == originals[k]
            seen["writes_contained"] += contained
            tally.check(contained, "wrong", "bob's upload under alice's key reached alice's chunk")
            deleted = bob.delete(f"/v1/chunks/{k}").status_code
            tally.check(deleted == 200, "errors", "bob cannot delete his own key")
            gone, kept = bob.head(f"/v1/chunks/{k}").status_code, alice.get(f"/v1/chunks/{k}")
            # The delete removed bob's copy only.
            contained = deleted == 200 and gone == 404 and kept.status_code == 200 and kept.content == originals[k]
            seen["deletes_contained"] += contained
            tally.check(contained, "wrong", "bob's delete under alice's key reached alice's chunk")
            seen["attempts"] += 4  # get, head, put and delete, each answered and checked above
            tally.requests += 8
    tally.faults += seen["attempts"]
    return seen


def ok_get(tally: Tally, client: httpx.Client, key: str) -> bytes:
    r = client.get(f"/v1/chunks/{key}")
    tally.check(r.status_code == 200 and len(r.content) > 0, "errors", f"owner cannot read her chunk: {r.status_code}")
    return r.content


def _completion(client: httpx.Client, tally: Tally, docs: list[str], mode: str) -> dict[str, Any]:
    body = {"model": "default", "prompt": QUESTION, "documents": docs, "temperature": 0, "max_tokens": 4,
            "logprobs": 1, "kvfuse": {"mode": mode}}
    tally.requests += 1
    return ok_json(tally, client.post("/v1/completions", json=body))


def _anchor_tenancy(h: Harness, tally: Tally) -> dict[str, int]:
    """Issue #11: bob's [Y, X] in anchor mode, after alice's own documents in two orders, must be what it is on a
    server where alice never ran: a dense fallback (bob has no anchor for that context), the dense answer."""
    seen = {"alice_anchors": 0, "bob_unaffected": 0}
    pool = h.engine.anchor_pool
    if pool is None:
        return seen
    x, y, p, q = ANCHOR_DOCS
    with h.client("alice") as alice, h.client("bob") as bob:
        _completion(bob, tally, [x], "anchor")  # bob's base for X
        h.wait_writebacks()
        added = int(pool.stats()["added"])  # type: ignore[call-overload]
        for _ in range(3):
            for docs in ([p, q], [q, p]):
                _completion(alice, tally, docs, "anchor")
                h.wait_writebacks()
        seen["alice_anchors"] = int(pool.stats()["added"]) - added  # type: ignore[call-overload]
        tally.check(seen["alice_anchors"] > 0, "bound", "alice's traffic learned no anchors: nothing was tested")
        got = _completion(bob, tally, [y, x], "anchor")
        dense = _completion(bob, tally, [y, x], "dense")
    ok = got["kvfuse"]["mode"] == "dense" and got["choices"][0]["logprobs"] == dense["choices"][0]["logprobs"]
    tally.check(ok, "wrong", f"alice's anchors changed bob's answer: {got['kvfuse']}")
    seen["bob_unaffected"] = int(ok)
    tally.faults += seen["alice_anchors"] > 0  # alice's anchors were there to leak
    return seen


def _other(originals: dict[str, bytes], key: str) -> bytes:
    """A valid blob that is not ``key``'s (what bob tries to plant under alice's key)."""
    return next(v for k, v in originals.items() if k != key)


def run_isolation(loaded: LoadedModel, root: Path) -> Tally:
    tally = Tally("tenant isolation + logs")
    start = time.perf_counter()
    capture = _Capture()
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.addHandler(capture)
    root_logger.setLevel(logging.DEBUG)
    try:
        with running_service(loaded, root, log_level="debug") as h:
            tally.notes["cross_tenant"] = _cross_tenant(h, tally)
            tally.notes["anchors"] = _anchor_tenancy(h, tally)
            ssd = h.tier("ssd")  # make the corrupt-blob path log too
            victim = ssd.keys()[0]
            Path(ssd.path_of(victim)).write_bytes(b"KVFB-not-a-blob")
            h.clear_memory()
            tally.faults += 1
            refused = h.store.get(victim) is None
            tally.check(refused, "wrong", "a corrupt blob was served")
            tally.notes["corrupt_refused"] = int(refused)
            blobs = [ssd.get_blob(k) or b"" for k in ssd.keys()[:3]]
    finally:
        root_logger.removeHandler(capture)
        root_logger.setLevel(level)
    leaks = [line for line in capture.lines if HEX_KEY.search(line)]
    leaks += [line for line in capture.lines if any(k in line for k in API_KEYS)]
    leaks += [line for line in capture.lines for b in blobs if b and b[200:232].hex() in line]
    for line in leaks[:5]:
        tally.fail("wrong", f"a key or KV in the logs: {line[:200]}")
    tally.check(any("kvfuse.access" in line for line in capture.lines), "bound", "no access log was captured")
    tally.notes.update({"log_lines": len(capture.lines), "leaks": len(leaks)})
    tally.seconds = time.perf_counter() - start
    return tally
