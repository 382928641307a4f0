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
    """The blob was written in a format version this build does not read."""


class FingerprintMismatchError(CodecError):
    """The blob holds KV of another model than the one expected."""


class TierError(RuntimeError):
    """A tier failed an operation (disk full, read-only directory, server error).

    The tier stays usable for other operations; the store logs the reason and skips it for this call.
    """


class TierUnavailableError(TierError):
    """The tier cannot be reached at all (e.g. Redis down); the store backs off and retries it later."""
