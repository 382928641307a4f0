from __future__ import annotations

import itertools

import numpy as np
import pytest

from kvstore import ChunkKey, KeySpace


def test_hex_round_trip() -> None:
    k = KeySpace("fp", "l2:float32").chunk_key([1, 2, 3])
    assert len(k.hex) == 32 and str(k) == k.hex
    assert ChunkKey.from_hex(k.hex) == k
    for bad in ("", "zz" * 16, k.hex[:-1], k.hex + "0"):
        with pytest.raises(ValueError):
            ChunkKey.from_hex(bad)
    with pytest.raises(ValueError):
        ChunkKey(b"short")


def test_deterministic_and_input_types() -> None:
    ks = KeySpace("fp", "layout")
    assert ks.chunk_key([5, 6, 7]) == ks.chunk_key(np.array([5, 6, 7], dtype=np.int32))
    assert ks.chunk_key([5, 6, 7]) != ks.chunk_key([5, 6, 8])
    assert ks.chunk_key([1, 2]) != ks.chunk_key([2, 1])
    with pytest.raises(ValueError):
        ks.chunk_key([[1, 2]])
    with pytest.raises(ValueError):
        ks.chunk_key([2**31])


def test_spaces_never_collide() -> None:
    tokens = [10, 20, 30, 40]
    spaces = [
        KeySpace(fp, layout, ns)
        for fp, layout, ns in itertools.product(
            ["m1", "m2"], ["l30:float32", "l30:bfloat16"], ["a", "b", "default"]
        )
    ]
    keys = {ks.chunk_key(tokens) for ks in spaces}
    assert len(keys) == len(spaces)
    # separator ambiguity: fields are delimited, so shifting text between them changes the key
    assert KeySpace("ab", "c").chunk_key(tokens) != KeySpace("a", "bc").chunk_key(tokens)
    # chunk keys and prefix keys live in different domains
    ks = spaces[0]
    assert ks.chunk_key(tokens) not in set(ks.prefix_keys(tokens, 4))


def test_tenant_namespaces_isolated() -> None:
    a, b = KeySpace("m", "l", "tenant-a"), KeySpace("m", "l", "tenant-b")
    for n in range(1, 50):
        toks = list(range(n))
        assert a.chunk_key(toks) != b.chunk_key(toks)
        assert set(a.prefix_keys(toks, 4)).isdisjoint(b.prefix_keys(toks, 4))


def test_prefix_chaining() -> None:
    ks = KeySpace("fp", "layout")
    toks = list(range(100, 110))
    keys = ks.prefix_keys(toks, 4)
    assert len(keys) == 2  # trailing partial page gets no key
    assert ks.prefix_keys(toks[:8], 4) == keys
    # a page's key depends on everything before it
    changed = ks.prefix_keys([999, *toks[1:]], 4)
    assert changed[0] != keys[0] and changed[1] != keys[1]
    # a change in page 2 leaves page 1 alone
    later = ks.prefix_keys([*toks[:5], 0, *toks[6:]], 4)
    assert later[0] == keys[0] and later[1] != keys[1]
    # same page content after a different prefix gets a different key
    assert ks.prefix_keys(toks[4:8], 4)[0] != keys[1]
    with pytest.raises(ValueError):
        ks.prefix_keys(toks, 0)


def test_engine_keys() -> None:
    """Keys of pages an engine names by its own hash: length-prefixed fields, so no two differ only in where
    a field ends; the key space (model, layout with dtype, tenant), the engine and the scope all count."""
    ks = KeySpace("fp", "l2:bfloat16", "t")
    k = ks.engine_key("sglang", "ab" * 32)
    assert k == ks.engine_key("sglang", "ab" * 32) and isinstance(k, ChunkKey)
    assert ks.engine_key("sglang", "ab") == ks.engine_key("sglang", b"ab")  # str hashes are UTF-8
    assert ks.engine_key("ab", "c") != ks.engine_key("a", "bc")
    assert ks.engine_key("e", "h", scope="s") != ks.engine_key("e", "sh")
    assert ks.engine_key("e", "h", scope="") != ks.engine_key("e", "h", scope="prepared:1")
    others = [KeySpace("fp2", "l2:bfloat16", "t"), KeySpace("fp", "l2:float16", "t"), KeySpace("fp", "l2:bfloat16")]
    assert len({o.engine_key("sglang", "ab" * 32) for o in others} | {k}) == 4
    assert k not in {ks.chunk_key([1, 2]), *ks.prefix_keys([1, 2, 3, 4], 2)}
