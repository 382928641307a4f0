"""Errors of the store: codec errors (a blob is bad) and tier errors (a tier cannot serve)."""

from __future__ import annotations


class CodecError(ValueError):
    """A blob cannot be decoded; no tensors are returned."""


class MalformedBlobError(CodecError):
    """Not a kvfuse blob, or its header is inconsistent."""


class TruncatedBlobError(CodecError):
    """The blob ends before its header or payload does."""


class ChecksumError(CodecError):
    """The header or payload checksum does not match: the bytes were corrupted."""


class UnsupportedVersionError(CodecError):
    """The blob was written in a format version this build does not read. ``newer``: a version above this
    build's: a newer build's blob, which tiers leave in place (a miss, not corruption), so that builds of
    two versions can share a directory or a Redis namespace during an upgrade or a rollback."""

    def __init__(self, message: str, newer: bool = False) -> None:
        super().__init__(message)
        self.newer = newer


def from_newer_build(exc: BaseException) -> bool:
    """Whether ``exc`` says a blob is in a newer format than this build reads (leave it, do not remove it)."""
    return isinstance(exc, UnsupportedVersionError) and exc.newer


class FingerprintMismatchError(CodecError):
    """The blob holds KV of another model than the one expected."""


class TierError(RuntimeError):
    """A tier failed an operation (disk full, read-only directory, server error).

    The tier stays usable for other operations; the store logs the reason and skips it for this call.
    """


class TierUnavailableError(TierError):
    """The tier cannot be reached at all (e.g. Redis down); the store backs off and retries it later."""
