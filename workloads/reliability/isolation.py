"""Tenant isolation and log hygiene behind a running service.

- Two tenants with identical documents never share KV: their stored keys differ, and bob's first chat over
  alice's warmed documents hits nothing.
- A tenant cannot read, probe, overwrite or delete another's chunk by key: bob's GET/HEAD/DELETE of alice's
  public keys answer 404, and bob's PUT to them leaves alice's blobs bit-identical.
- Keys and KV never appear in logs: every log record of the scenario (access log at INFO, everything else at
  DEBUG, a corrupt blob included) is free of 32-hex-digit keys, API keys and blob bytes.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from blending.model import LoadedModel
from workloads.reliability.service import API_KEYS, DOCS, Harness, chat_body, running_service
from workloads.reliability.tally import Tally, ok_json

CLIENT_LOGGERS = ("httpx", "httpcore", "hpack", "urllib3")
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


def _cross_tenant(h: Harness, tally: Tally) -> None:
    with h.client("alice") as alice, h.client("bob") as bob:
        a_keys = ok_json(tally, alice.post("/v1/chunks", json={"texts": DOCS}))["keys"]
        ok_json(tally, alice.post("/v1/chat/completions", json=chat_body(DOCS)))
        h.wait_writebacks()
        first = ok_json(tally, bob.post("/v1/chat/completions", json=chat_body(DOCS)))["kvfuse"]
        tally.check(first["chunk_hits"] == 0, "wrong", f"bob's first chat hit alice's KV: {first}")
        b_keys = ok_json(tally, bob.post("/v1/chunks", json={"texts": DOCS}))["keys"]
        tally.requests += 4
        stored_a = {h.state.keys.stored("alice", k) for k in a_keys}
        stored_b = {h.state.keys.stored("bob", k) for k in b_keys}
        tally.check(not stored_a & stored_b, "wrong", "identical documents share stored KV across tenants")
        tally.check(not set(a_keys) & set(b_keys), "wrong", "identical documents got the same public key")
        originals = {k: alice.get(f"/v1/chunks/{k}").content for k in a_keys}
        tally.requests += len(a_keys)
        for k in a_keys:
            tally.faults += 4  # four cross-tenant attempts per key
            tally.requests += 4
            tally.check(bob.get(f"/v1/chunks/{k}").status_code == 404, "wrong", "bob read alice's chunk")
            tally.check(bob.head(f"/v1/chunks/{k}").status_code == 404, "wrong", "bob probed alice's chunk")
            r = bob.put(f"/v1/chunks/{k}", content=_other(originals, k))
            tally.check(r.status_code == 200, "errors", f"bob's upload was refused: {r.status_code}")
            tally.check(bob.delete(f"/v1/chunks/{k}").status_code == 200, "errors", "bob cannot delete his own key")
        for k in a_keys:
            tally.requests += 1
            r = alice.get(f"/v1/chunks/{k}")
            tally.check(r.status_code == 200 and r.content == originals[k], "wrong", "bob changed alice's chunk")


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
            _cross_tenant(h, tally)
            ssd = h.tier("ssd")  # make the corrupt-blob path log too
            victim = ssd.keys()[0]
            Path(ssd.path_of(victim)).write_bytes(b"KVFB-not-a-blob")
            h.clear_memory()
            tally.faults += 1
            tally.check(h.store.get(victim) is None, "wrong", "a corrupt blob was served")
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
    tally.notes = {"log_lines": len(capture.lines), "leaks": len(leaks)}
    tally.seconds = time.perf_counter() - start
    return tally
