"""Corruption: bytes flipped and blobs truncated on SSD and in Redis, behind a running service.

Each round warms the documents, lets a blended chat write its KV back, drops the memory tier, then damages
every blob on SSD and in Redis (flipped bytes in one round, truncation in the next; for striped Redis
blobs alternately the manifest or a payload part). Then the damaged store is read three ways: the chunk API
(``GET /v1/chunks/{key}``), blended ``/v1/logprobs`` and chat requests, and a sweep over every damaged key.
The engine's hot prompt cache is cleared with the memory tier, so every chunk hit must come from the damaged
blobs. Required: every damaged blob is detected (the tiers' ``corrupt`` counters grow by exactly the number of
damaged blobs), nothing but the original bytes is ever served, and the answers equal the dense answers.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from blending.model import LoadedModel
from kvstore import ChunkKey, RedisTier, SSDTier, TieredStore
from kvstore.tiers.redis_layout import Manifest, is_manifest
from workloads.reliability.service import DOCS, Harness, chat_body, logprobs_body, running_service
from workloads.reliability.tally import Tally, ok_json

CONTINUATION = " The Eiffel Tower in Paris is the tallest."


def corrupt_total(store: TieredStore) -> int:
    return int(store.stats().as_dict()["totals"]["corrupt"])


def damage_ssd(tier: SSDTier, keys: list[ChunkKey], how: str, rng: random.Random) -> int:
    """Flip one byte of, or truncate, the file of every key; returns how many files were damaged."""
    n = 0
    for key in keys:
        path = tier.path_of(key)
        size = os.path.getsize(path)
        if how == "flip":
            with open(path, "r+b") as f:
                i = rng.randrange(size)
                f.seek(i)
                byte = f.read(1)[0]
                f.seek(i)
                f.write(bytes([byte ^ (1 << rng.randrange(8))]))
        else:
            os.truncate(path, rng.randrange(size))
        n += 1
    return n


def _damage_value(value: bytes, how: str, rng: random.Random) -> bytes:
    if how == "flip":
        i = rng.randrange(len(value))
        return value[:i] + bytes([value[i] ^ (1 << rng.randrange(8))]) + value[i + 1 :]
    return value[: rng.randrange(len(value))]


def damage_redis(tier: RedisTier, keys: list[ChunkKey], how: str, rng: random.Random) -> int:
    """Damage every blob: a plain blob's value, or alternately a striped blob's manifest or one part."""
    n = 0
    for j, key in enumerate(keys):
        name = tier.main_key(key)
        value = tier.client.get(name)
        if value is None:
            continue
        value = bytes(value)  # type: ignore[arg-type]
        if is_manifest(value) and j % 2:
            m = Manifest.parse(value)
            name = rng.choice(tier.layout.part_names(key, m.gen, m.nparts))
            value = bytes(tier.client.get(name))  # type: ignore[arg-type]
        tier.client.set(name, _damage_value(value, how, rng))
        n += 1
    return n


def _round(h: Harness, tally: Tally, how: str, rng: random.Random, ref: dict[str, Any]) -> None:
    with h.client("alice") as alice:
        warmed = ok_json(tally, alice.post("/v1/chunks", json={"texts": DOCS}))["keys"]
        blended = ok_json(tally, alice.post("/v1/chat/completions", json=chat_body(DOCS)))
        tally.requests += 2
        tally.check(blended["kvfuse"]["chunk_hits"] > 0, "bound", "the warmed chunks did not hit before damage")
        h.wait_writebacks()
        ssd, redis = h.tier("ssd"), next((t for t in h.store.tiers if isinstance(t, RedisTier)), None)
        keys = ssd.keys()
        h.clear_memory()
        # and the hot prompt cache: its (correct) KV of earlier prompts would serve the reads below exactly,
        # so every chunk hit after the damage would have to come from the damaged store
        h.engine.hot.clear()
        damaged = damage_ssd(ssd, keys, how, rng)
        if redis is not None:
            rkeys = redis.keys()
            damaged += damage_redis(redis, rkeys, how, rng)
            keys = sorted(set(keys) | set(rkeys))
        tally.faults += damaged
        before = corrupt_total(h.store)
        config = h.engine.config  # no writebacks while damaged: every damaged key stays in place for the sweep
        h.engine.config = replace(config, writeback=False)

        for key in warmed:  # the chunk API serves the original blob or nothing
            r = alice.get(f"/v1/chunks/{key}")
            tally.requests += 1
            tally.check(r.status_code == 404, "wrong", f"GET of a damaged chunk answered {r.status_code}")
        lp = ok_json(tally, alice.post("/v1/logprobs", json=logprobs_body(DOCS, CONTINUATION, "blend")))
        chat = ok_json(tally, alice.post("/v1/chat/completions", json=chat_body(DOCS)))
        tally.requests += 2
        tally.check(lp["kvfuse"]["chunk_hits"] == 0, "wrong", f"damaged KV was used: {lp['kvfuse']}")
        tally.check(_tokens(lp) == ref["tokens"], "wrong", f"logprobs differ from dense: {_tokens(lp)}")
        text = chat["choices"][0]["message"]["content"]
        tally.check(text == ref["text"], "wrong", f"answer {text!r} differs from dense {ref['text']!r}")
        h.wait_writebacks()
        h.clear_memory()
        for chunk in h.store.get_many(keys):  # the sweep: nothing rewrote these keys, so all must be misses
            tally.requests += 1
            tally.check(chunk is None, "wrong", f"a damaged blob was served ({how})")
        h.engine.config = config
        detected = corrupt_total(h.store) - before
        tally.check(detected == damaged, "bound", f"{how}: {damaged} blobs damaged, {detected} detected")
        tally.notes[f"{how}_damaged"] = damaged
        tally.notes[f"{how}_detected"] = detected


def _tokens(lp: dict[str, Any]) -> list[tuple[int, float]]:
    return [(int(t["id"]), round(float(t["logprob"]), 4)) for t in lp["tokens"]]


def run_corruption(loaded: LoadedModel, root: Path, redis_url: str | None, seed_value: int = 0) -> Tally:
    tally = Tally("corruption (SSD + Redis)" if redis_url else "corruption (SSD)")
    start = time.perf_counter()
    rng = random.Random(seed_value)
    with running_service(loaded, root, redis_url=redis_url) as h, h.client("alice") as alice:
        dense_lp = ok_json(tally, alice.post("/v1/logprobs", json=logprobs_body(DOCS, CONTINUATION, "dense")))
        dense_chat = ok_json(tally, alice.post("/v1/chat/completions", json=chat_body(DOCS, mode="dense")))
        tally.requests += 2
        ref = {"tokens": _tokens(dense_lp), "text": dense_chat["choices"][0]["message"]["content"]}
        for how in ("flip", "truncate"):
            _round(h, tally, how, rng, ref)
    tally.seconds = time.perf_counter() - start
    return tally
