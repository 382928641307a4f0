"""Property checks (Hypothesis) of the codec and of key derivation, runnable from tests and the report.

- codec: any mutation of a valid blob (bit flips, overwritten ranges, truncation, appended, inserted or
  deleted bytes) is rejected with a ``CodecError`` by ``decode`` and ``verify``; never decoded into tensors.
  The unmutated blob round-trips bit-exactly.
- keys: chunk keys are deterministic, and differ whenever any of (fingerprint, layout, namespace, tokens)
  differs; prefix keys chain (changing a token changes its page's key and every later one); the
  tenant-scoped public-key mapping is a bijection per tenant that differs between tenants.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from kvstore import CodecError, KeySpace, KVChunk, decode, encode, verify
from server.tenancy import KeyMapper
from workloads.reliability.tally import Tally

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def chunks(draw: st.DrawFn) -> KVChunk:
    layers, heads, tokens, dim = (draw(st.integers(1, n)) for n in (3, 2, 6, 8))
    dtype = draw(st.sampled_from(DTYPES))
    start = draw(st.integers(0, 2**40))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    kv = torch.randn(layers, 2, heads, tokens, dim, generator=gen).to(dtype)
    return KVChunk(kv, torch.arange(start, start + tokens), draw(st.text(max_size=24)))


@st.composite
def mutations(draw: st.DrawFn, blob: bytes) -> tuple[str, bytes]:
    """A named mutation of ``blob``; the result always differs from ``blob``."""
    n = len(blob)
    kind = draw(st.sampled_from(["flip", "flips", "overwrite", "truncate", "append", "insert", "delete"]))
    out = bytearray(blob)
    if kind in ("flip", "flips"):
        for _ in range(1 if kind == "flip" else draw(st.integers(2, 16))):
            i = draw(st.integers(0, n - 1))
            out[i] ^= draw(st.integers(1, 255))
        if bytes(out) == blob:  # flips that cancelled out
            out[0] ^= 0xFF
    elif kind == "overwrite":
        i = draw(st.integers(0, n - 1))
        data = draw(st.binary(min_size=1, max_size=min(64, n - i)))
        out[i : i + len(data)] = data
        if bytes(out) == blob:
            out[i] ^= 0x01
    elif kind == "truncate":
        out = out[: draw(st.integers(0, n - 1))]
    elif kind == "append":
        out += draw(st.binary(min_size=1, max_size=64))
    elif kind == "insert":
        i = draw(st.integers(0, n))
        out[i:i] = draw(st.binary(min_size=1, max_size=64))
    else:
        i = draw(st.integers(0, n - 1))
        del out[i : i + draw(st.integers(1, 64))]
    return kind, bytes(out)


def _run(test: Callable[..., None], examples: int, seed_value: int) -> None:
    configured = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    seed(seed_value)(configured(test))()


def codec_properties(examples: int = 1000, seed_value: int = 0) -> Tally:
    tally = Tally("codec properties")
    start = time.perf_counter()
    kinds: dict[str, int] = {}

    @given(chunk=chunks(), data=st.data())
    def prop(chunk: KVChunk, data: st.DataObject) -> None:
        blob = encode(chunk)
        back = decode(blob)
        tally.requests += 1
        same = torch.equal(back.kv.view(torch.uint8), chunk.kv.contiguous().view(torch.uint8))
        tally.check(same and torch.equal(back.positions, chunk.positions) and back.fingerprint == chunk.fingerprint,
                    "lost", "a valid blob did not round-trip bit-exactly")  # fmt: skip
        kind, bad = data.draw(mutations(blob))
        kinds[kind] = kinds.get(kind, 0) + 1
        tally.faults += 1
        for fn in (decode, verify):
            tally.requests += 1
            try:
                fn(bad)
            except CodecError:
                continue
            except Exception as exc:  # any other exception is a codec bug (callers only catch CodecError)
                tally.fail("errors", f"{kind}: {fn.__name__} raised {type(exc).__name__}: {exc}")
                continue
            tally.fail("wrong", f"{kind}: {fn.__name__} accepted a mutated blob ({len(blob)} -> {len(bad)} bytes)")

    _run(prop, examples, seed_value)
    tally.seconds = time.perf_counter() - start
    tally.notes = {"mutations": kinds}
    return tally


_FIELD = st.text(max_size=12)  # includes separators and control characters
_TOKENS = st.lists(st.integers(-(2**31), 2**31 - 1), max_size=12)


def key_properties(examples: int = 500, seed_value: int = 0) -> Tally:
    tally = Tally("key properties")
    start = time.perf_counter()
    mapper = KeyMapper(b"reliability-property-secret")

    def same_key(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
        return KeySpace(*a[:3]).chunk_key(a[3]) == KeySpace(*b[:3]).chunk_key(b[3])

    space = st.tuples(_FIELD, _FIELD, _FIELD, _TOKENS)

    @given(a=space, b=space, page=st.integers(1, 4), tenants=st.tuples(_FIELD, _FIELD))
    def prop(a: tuple[Any, ...], b: tuple[Any, ...], page: int, tenants: tuple[str, str]) -> None:
        tally.requests += 4
        tally.check(same_key(a, a), "wrong", f"key of {a!r} is not deterministic")
        if a != b:
            tally.faults += 1
            tally.check(not same_key(a, b), "wrong", f"different inputs share a key: {a!r} vs {b!r}")
        k = KeySpace(*a[:3]).chunk_key(a[3])
        for t in tenants:
            tally.check(mapper.stored(t, mapper.public(t, k)) == k, "wrong", f"public key of {t!r} not invertible")
        if tenants[0] != tenants[1]:
            tally.check(mapper.public(tenants[0], k) != mapper.public(tenants[1], k), "wrong",
                        f"tenants {tenants!r} share a public key")  # fmt: skip
        tokens = list(a[3])
        if len(tokens) >= 2 * page:
            ks = KeySpace(*a[:3])
            before = ks.prefix_keys(tokens, page)
            tokens[0] ^= 1
            after = ks.prefix_keys(tokens, page)
            tally.check(all(x != y for x, y in zip(before, after, strict=True)), "wrong",
                        "changing the first token left a later prefix page key unchanged")  # fmt: skip

    # Field contents that mimic a separator (a past bug: fields were joined with 0x1f).
    example = (("fp", "lay", "alice\x1f\x01\x00\x00", [5, 6]), ("fp", "lay", "alice", [0x1F000001, 5, 6]))
    from hypothesis import example as explicit

    prop = explicit(a=example[0], b=example[1], page=1, tenants=("a", "b"))(prop)
    _run(prop, examples, seed_value)
    tally.seconds = time.perf_counter() - start
    return tally
