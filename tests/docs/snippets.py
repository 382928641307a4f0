"""The fenced code blocks of README.md and docs/*.md, and a small parser for their shell commands.

A block is skipped only when the markdown says so right before it, visibly, with a reason::

    <!-- snippet: skip a diagram, not code -->
    ```text
    ...
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
SKIP = re.compile(r"^\s*<!--\s*snippet:\s*skip\b(?P<reason>.*?)-->\s*$")
SEPARATORS = {"&&", "||", ";", "|"}


@dataclass(frozen=True)
class Snippet:
    """One fenced block: where it starts (the line of the opening fence, 1-based), its language and text."""

    path: str  # relative to the repository root
    line: int
    lang: str
    code: str
    skip: str | None = None  # the reason given by a skip marker right before the block; "" when none given

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


class MarkdownError(ValueError):
    """A fence that never closes, or a skip marker that is not right before a block."""


def markdown_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def extract(text: str, path: str) -> list[Snippet]:
    """Every fenced block of ``text`` (CommonMark fences: 3+ backticks or tildes, closed by a fence of the same
    character at least as long). A skip marker must be followed, after blank lines only, by a block."""
    lines = text.splitlines()
    out: list[Snippet] = []
    pending: tuple[int, str] | None = None  # (line, reason) of a skip marker waiting for its block
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        marker = SKIP.match(lines[i])
        if marker is not None:
            if pending is not None:
                raise MarkdownError(f"{path}:{pending[0]}: skip marker not followed by a code block")
            pending = (i + 1, marker.group("reason").strip())
        elif m is None:
            if pending is not None and lines[i].strip():
                raise MarkdownError(f"{path}:{pending[0]}: skip marker not followed by a code block")
        else:
            fence, start = m.group("fence"), i
            close = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
            i += 1
            while i < len(lines) and not close.match(lines[i]):
                i += 1
            if i == len(lines):
                raise MarkdownError(f"{path}:{start + 1}: code block never closed")
            indent = len(m.group("indent"))
            body = [line[min(indent, len(line) - len(line.lstrip(" "))) :] for line in lines[start + 1 : i]]
            info = m.group("info").strip()
            lang = info.split()[0].lower() if info else ""
            out.append(Snippet(path, start + 1, lang, "\n".join(body) + "\n", pending[1] if pending else None))
            pending = None
        i += 1
    if pending is not None:
        raise MarkdownError(f"{path}:{pending[0]}: skip marker not followed by a code block")
    return out


def all_snippets(root: Path = ROOT) -> list[Snippet]:
    return [s for f in markdown_files(root) for s in extract(f.read_text(encoding="utf-8"), str(f.relative_to(root)))]


def logical_lines(script: str) -> list[str]:
    """``script`` split into the lines a shell reads: backslash-newline joined, newlines inside quotes kept,
    comments (``#`` at the start of a word, outside quotes) dropped, blank lines dropped."""
    out: list[str] = []
    cur: list[str] = []
    quote: str | None = None
    i = 0
    while i < len(script):
        c = script[i]
        if quote is not None:
            cur.append(c)
            if c == quote:
                quote = None
            elif c == "\\" and quote == '"' and i + 1 < len(script):
                cur.append(script[i + 1])
                i += 1
        elif c == "\\" and script[i + 1 : i + 2] == "\n":
            cur.append(" ")
            i += 1
        elif c == "\\" and i + 1 < len(script):
            cur.append(script[i : i + 2])
            i += 1
        elif c in "'\"":
            quote = c
            cur.append(c)
        elif c == "#" and (not cur or cur[-1].isspace()):
            while i + 1 < len(script) and script[i + 1] != "\n":
                i += 1
        elif c == "\n":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    if quote is not None:
        raise ValueError(f"unterminated {quote} quote")
    out.append("".join(cur))
    return [line.strip() for line in out if line.strip()]


def commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script as argv lists (``&&``, ``||``, ``;`` and ``|`` separate them).
    Leading ``NAME=value`` words stay in the argv; :func:`split_assignments` takes them off."""
    out: list[list[str]] = []
    for line in logical_lines(script):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = ""
        cmd: list[str] = []
        for token in lexer:
            if token in SEPARATORS:
                if cmd:
                    out.append(cmd)
                cmd = []
            elif set(token) <= set(";&|"):
                raise ValueError(f"unsupported shell operator {token!r} in {line!r}")
            else:
                cmd.append(token)
        if cmd:
            out.append(cmd)
    return out


ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def split_assignments(argv: list[str]) -> tuple[list[str], list[str]]:
    """``["A=1", "B=2", "cmd", "x"]`` -> (``["A=1", "B=2"]``, ``["cmd", "x"]``)."""
    n = 0
    while n < len(argv) and ASSIGNMENT.match(argv[n]):
        n += 1
    return argv[:n], argv[n:]
