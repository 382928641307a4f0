"""Rendering requests into prompt segments (``prefix`` / ``chunk`` / ``text``) for the engine.

Chat requests go through the tokenizer's own chat template. Every reusable chunk (a content part with
``cache_control`` or a top-level document) is replaced by a per-request random sentinel, the messages are
rendered to one string (``add_generation_prompt=True``) and the string is split at the sentinels, so the
template's own glue (role headers, end-of-turn tokens) is plain text and each chunk is exactly its text.
The engine tokenizes every segment separately, so a chunk has the same token ids wherever it occurs.

The leading ``prefix`` segment is the system part of the conversation: the rendered text up to where the
first non-system turn starts (found by rendering the same system messages before a probe user turn and a
probe assistant turn and taking the common prefix, cut back to a token-safe boundary). It depends only on
the system messages, so requests (and ``POST /v1/chunks`` warm-ups) with the same system prompt share it.

Documents template (inserted at the start of the last user message)::

    Document [1]:\\n<document 1 text>\\n\\nDocument [2]:\\n<document 2 text>\\n\\n<the user's text>

``[i]`` is the 1-based position, or the document's ``id`` when it has one. The header and the blank line
are glue text, never part of the chunk, so a document is the same chunk under any header. Content given as
a list of parts is joined with ``"\\n"`` between parts.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from transformers import PreTrainedTokenizerBase

from blending.planner import PromptSegment


class RenderError(ValueError):
    """The request cannot be rendered into a prompt (bad roles, template failure, no user message)."""


@dataclass(frozen=True)
class Chunk:
    """A reusable piece of text inside a message."""

    text: str


Piece = str | Chunk


@dataclass(frozen=True)
class Message:
    role: str
    pieces: tuple[Piece, ...]


def document_pieces(documents: Sequence[tuple[str | None, str]]) -> list[Piece]:
    """The documents template: a ``Document [i]:`` header, the document as a chunk, a blank line."""
    out: list[Piece] = []
    for i, (doc_id, text) in enumerate(documents, start=1):
        out += [f"Document [{doc_id if doc_id else i}]:\n", Chunk(text), "\n\n"]
    return out


def _merge(pieces: Sequence[Piece]) -> list[Piece]:
    """Join adjacent strings and drop empty ones (chunks are kept as they are)."""
    out: list[Piece] = []
    for p in pieces:
        if isinstance(p, str):
            if not p:
                continue
            if out and isinstance(out[-1], str):
                out[-1] = out[-1] + p
                continue
        out.append(p)
    return out


def segments_from_pieces(prefix: str, pieces: Sequence[Piece]) -> list[PromptSegment]:
    """``prefix`` (may be empty) as the prefix segment, then text and chunk segments."""
    segs = [PromptSegment(prefix, "prefix")] if prefix else []
    for p in _merge(pieces):
        segs.append(PromptSegment(p.text, "chunk") if isinstance(p, Chunk) else PromptSegment(p, "text"))
    return segs


class Renderer:
    """Turns chat messages or a plain prompt plus documents into :class:`PromptSegment` lists."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
        specials |= {str(t) for t in (getattr(tokenizer, "added_tokens_encoder", {}) or {})}
        self._specials = tuple(sorted((s for s in specials if s), key=len, reverse=True))
        self.system_prefix = lru_cache(maxsize=256)(self._system_prefix)

    def _apply(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            out = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja raises its own errors (e.g. roles must alternate)
            raise RenderError(f"the chat template rejected the messages: {exc}") from exc
        if not isinstance(out, str):
            raise RenderError("the chat template did not render to text")
        return out

    def _safe_cut(self, text: str) -> str:
        """Cut ``text`` back to end after a newline or a special token (a token boundary)."""
        if text.endswith(self._specials):
            return text
        best = text.rfind("\n") + 1
        for s in self._specials:
            i = text.rfind(s)
            if i >= 0:
                best = max(best, i + len(s))
        return text[:best]

    def _system_prefix(self, system: tuple[str, ...]) -> str:
        probe = f"kvfuse-probe-{secrets.token_hex(8)}"
        sys_msgs = [{"role": "system", "content": s} for s in system]
        try:
            a = self._apply([*sys_msgs, {"role": "user", "content": probe}], False)
            b = self._apply([*sys_msgs, {"role": "assistant", "content": probe}], False)
        except RenderError:
            return ""
        n = 0
        for x, y in zip(a, b, strict=False):
            if x != y:
                break
            n += 1
        return self._safe_cut(a[:n])

    def chat_prefix(self, system: str | None) -> str:
        """The prefix segment of a chat whose only system message is ``system`` (none when None)."""
        return self.system_prefix(() if system is None else (system,))

    def chat(self, messages: Sequence[Message]) -> list[PromptSegment]:
        """Render chat messages through the chat template and split them into segments."""
        if not messages:
            raise RenderError("messages must not be empty")
        nonce = secrets.token_hex(8)
        chunks: list[str] = []
        rendered_msgs: list[dict[str, str]] = []
        for m in messages:
            parts: list[str] = []
            for p in m.pieces:
                if isinstance(p, Chunk):
                    parts.append(f"\u27e6kvfuse-{nonce}-{len(chunks)}\u27e7")
                    chunks.append(p.text)
                else:
                    parts.append(p)
            rendered_msgs.append({"role": m.role, "content": "".join(parts)})
        text = self._apply(rendered_msgs, True)
        pieces: list[Piece] = []
        rest = text
        for i, chunk in enumerate(chunks):
            sentinel = f"\u27e6kvfuse-{nonce}-{i}\u27e7"
            if text.count(sentinel) != 1:
                raise RenderError("the chat template dropped or repeated a chunk; send it as plain text")
            before, rest = rest.split(sentinel, 1)
            pieces += [before, Chunk(chunk)]
        pieces.append(rest)
        lead: list[str] = []
        for m in messages:
            if m.role != "system":
                break
            lead.append(rendered_msgs[len(lead)]["content"])
        prefix = self.system_prefix(tuple(lead))
        first = pieces[0]
        assert isinstance(first, str)
        if not prefix or "\u27e6kvfuse-" in prefix or not first.startswith(prefix):
            prefix = first if chunks else ""  # text before the first chunk is the prefix
        pieces[0] = first[len(prefix) :]
        return segments_from_pieces(prefix, pieces)

    @staticmethod
    def completion(prompt: str, documents: Sequence[tuple[str | None, str]]) -> list[PromptSegment]:
        """A plain prompt: the documents template, then the prompt text (no chat template, no prefix)."""
        return segments_from_pieces("", [*document_pieces(documents), prompt])
