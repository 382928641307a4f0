"""scripts/gen_engine_hash_vectors.py must record SGLang's own namespace seeds, or stop: never its own recipe."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gen_engine_hash_vectors.py"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_engine_hash_vectors_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_sglang(monkeypatch: pytest.MonkeyPatch, utils: ModuleType | None) -> list[object]:
    calls: list[object] = []
    native = ModuleType("sglang.srt.mem_cache.cpp_utils.native_hash")
    native.get_native_hash = lambda tokens, prior, page: calls.append(prior) or ["00" * 32]  # type: ignore[attr-defined]
    for name in ("sglang", "sglang.srt", "sglang.srt.mem_cache", "sglang.srt.mem_cache.cpp_utils"):
        monkeypatch.setitem(sys.modules, name, ModuleType(name))
    monkeypatch.setitem(sys.modules, native.__name__, native)
    monkeypatch.setitem(sys.modules, "sglang.srt.mem_cache.utils", utils)  # None: importing it fails
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0-test")
    return calls


def test_fails_loudly_when_sglangs_seed_function_is_not_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_sglang(monkeypatch, None)
    with pytest.raises(SystemExit, match="storage_namespace_seed"):
        _load_script().sglang_vectors()
    assert calls == []  # nothing was hashed with a home-made seed


def test_uses_sglangs_seed_function(monkeypatch: pytest.MonkeyPatch) -> None:
    utils = ModuleType("sglang.srt.mem_cache.utils")
    seeds: list[tuple[str | None, str | None]] = []

    def storage_namespace_seed(extra_key: str | None, cache_salt: str | None) -> str | None:
        seeds.append((extra_key, cache_salt))
        return None if extra_key is None and cache_salt is None else "ab" * 32

    utils.storage_namespace_seed = storage_namespace_seed  # type: ignore[attr-defined]
    calls = _fake_sglang(monkeypatch, utils)
    data = _load_script().sglang_vectors()
    assert ("tenant-a", None) in seeds and (None, "salt") in seeds
    assert bytes.fromhex("ab" * 32) in calls
    assert {v["seed"] for v in data["vectors"] if "seed" in v} == {None, "ab" * 32}
