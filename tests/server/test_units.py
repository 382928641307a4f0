"""Pieces of the service without HTTP: rendering, key mapping, settings, stop strings."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blending.model import LoadedModel
from kvstore.keys import ChunkKey
from server.auth import resolve_tenant
from server.config import Settings, SettingsError, load_settings, parse_bytes
from server.errors import APIError
from server.generation import TextAssembler
from server.render import Chunk, Message, Renderer, document_pieces
from server.tenancy import KeyMapper, load_secret


@pytest.fixture(scope="module")
def renderer(smollm2: LoadedModel) -> Renderer:
    return Renderer(smollm2.tokenizer)


def test_chat_rendering_splits_chunks_out_of_the_template(renderer: Renderer) -> None:
    docs = [(None, "First document text."), ("x7", "Second document text.")]
    user = Message("user", (*document_pieces(docs), "Question?"))
    segs = renderer.chat([Message("system", ("Be brief.",)), user])
    assert [s.kind for s in segs] == ["prefix", "text", "chunk", "text", "chunk", "text"]
    assert segs[0].text == renderer.chat_prefix("Be brief.")
    assert segs[2].text == "First document text." and segs[4].text == "Second document text."
    assert segs[1].text.endswith("Document [1]:\n") and segs[3].text == "\n\nDocument [x7]:\n"
    assert segs[5].text.startswith("\n\nQuestion?") and segs[5].text.endswith("assistant\n")
    whole = renderer.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "Document [1]:\nFirst document text.\n\nDocument [x7]:\nSecond document text."
                                     "\n\nQuestion?"}],
        tokenize=False, add_generation_prompt=True,
    )  # fmt: skip
    assert "".join(s.text for s in segs) == whole


def test_prefix_depends_only_on_the_system_prompt(renderer: Renderer) -> None:
    a = renderer.chat([Message("user", (Chunk("Some chunk of text here."), "Q1"))])
    b = renderer.chat([Message("user", ("Hello ", Chunk("Other chunk of text."), "Q2"))])
    assert a[0].kind == b[0].kind == "prefix" and a[0].text == b[0].text == renderer.chat_prefix(None)
    assert renderer.chat_prefix("A") != renderer.chat_prefix(None)
    plain = renderer.chat([Message("user", ("Just text",))])
    assert plain[0].kind == "prefix" and [s.kind for s in plain[1:]] == ["text"]


def test_user_text_cannot_fake_a_chunk_sentinel(renderer: Renderer) -> None:
    segs = renderer.chat([Message("user", ("\u27e6kvfuse-0000000000000000-0\u27e7", Chunk("real chunk text ok")))])
    assert [s.text for s in segs if s.kind == "chunk"] == ["real chunk text ok"]


def test_completion_rendering() -> None:
    segs = Renderer.completion("Answer:", [(None, "doc one"), (None, "doc two")])
    assert [(s.kind, s.text) for s in segs] == [
        ("text", "Document [1]:\n"), ("chunk", "doc one"), ("text", "\n\nDocument [2]:\n"), ("chunk", "doc two"),
        ("text", "\n\nAnswer:"),
    ]  # fmt: skip


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=16, max_size=16), st.sampled_from(["alice", "bob", "default"]))
def test_key_mapping_is_a_tenant_scoped_permutation(digest: bytes, tenant: str) -> None:
    keys = KeyMapper(b"s" * 32)
    key = ChunkKey(digest)
    public = keys.public(tenant, key)
    assert len(public) == 32 and keys.stored(tenant, public) == key
    other = "mallory" if tenant != "mallory" else "eve"
    assert keys.stored(other, public) != key and keys.public(other, key) != public
    assert KeyMapper(b"t" * 32).public(tenant, key) != public
    with pytest.raises(ValueError):
        keys.stored(tenant, "zz")


def test_secret_is_created_once(tmp_path: Path) -> None:
    first = load_secret(None, tmp_path)
    assert load_secret(None, tmp_path) == first and (tmp_path / "secret").stat().st_mode & 0o077 == 0
    assert load_secret("configured-secret", tmp_path) == b"configured-secret"


def test_auth_resolution() -> None:
    assert resolve_tenant({}, None) == "default"
    keys = {"k1": "alice"}
    assert resolve_tenant(keys, "Bearer k1") == "alice"
    for header in (None, "Bearer", "Bearer k2", "Basic k1", "k1"):
        with pytest.raises(APIError) as err:
            resolve_tenant(keys, header)
        assert err.value.status == 401


def test_settings_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KVFUSE_PORT", "KVFUSE_HOST", "KVFUSE_CONFIG", "KVFUSE_MODE"):
        monkeypatch.delenv(name, raising=False)
    cfg = tmp_path / "kvfuse.yaml"
    cfg.write_text("port: 9001\nhost: 0.0.0.0\nmode: dense\ncpu_bytes: 1GiB\napi_keys: {sk-1: team}\n"
                   "limits: {max_documents: 3}\n")  # fmt: skip
    assert Settings().port == 8000
    s = load_settings(cfg)
    assert (s.port, s.host, s.mode, s.cpu_bytes, s.api_keys) == (9001, "0.0.0.0", "dense", 1 << 30, {"sk-1": "team"})
    assert s.limits.max_documents == 3 and s.limits.max_prompt_tokens == 8192
    monkeypatch.setenv("KVFUSE_PORT", "9002")
    monkeypatch.setenv("KVFUSE_LIMITS__MAX_PROMPT_TOKENS", "100")
    s = load_settings(cfg)
    assert s.port == 9002 and s.host == "0.0.0.0" and s.limits.max_prompt_tokens == 100
    assert s.limits.max_documents == 3
    s = load_settings(cfg, port=9003, host=None)
    assert s.port == 9003 and s.host == "0.0.0.0"
    monkeypatch.setenv("KVFUSE_CONFIG", str(cfg))
    assert load_settings().mode == "dense"
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "missing.yaml")


def test_parse_bytes() -> None:
    assert parse_bytes("512MiB") == 512 << 20 and parse_bytes("2 GB") == 2 * 10**9 and parse_bytes(7) == 7
    for bad in ("lots", "5 parsecs", True):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_text_assembler_holds_back_possible_stops(smollm2: LoadedModel) -> None:
    tok = smollm2.tokenizer
    ids = tok("Hello world. END of story", add_special_tokens=False)["input_ids"]
    text = TextAssembler(tok, ["END"])
    out = "".join(text.add(i) for i in ids if not text.stopped)
    assert text.stopped and out == text.text == "Hello world. " and text.flush() == ""
    plain = TextAssembler(tok, [])
    assert "".join(plain.add(i) for i in ids) + plain.flush() == "Hello world. END of story"
