"""One self-describing, checksummed blob per chunk.

Layout (little endian)::

    magic "KVFB" | version u16 | flags u16 | header_len u32 | header_xxh3_64 u64     (20 bytes)
    msgpack header (header_len bytes)
    zero padding up to a 64-byte boundary
    payload: raw KV bytes, [layers, 2, kv_heads, T, head_dim] row-major (bf16 as its 16-bit pattern)

The header checksum covers the first 12 prefix bytes and the msgpack header; the header carries the
payload length, its segment size and its checksum (:mod:`kvstore.checksum`: per-segment digests, so that
several cores share the hashing and a reader checks each segment as it lands). Version 1 blobs (one
``xxh3_64`` over the whole payload, no segment size) still read. Any corruption raises a
:class:`~kvstore.errors.CodecError`; decode never returns tensors from a bad blob.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import torch
import xxhash

from kvstore.checksum import (
    SEGMENT,
    combine,
    digest,
    segment_bounds,
    segmented_checksum,
    valid_segment,
    whole_checksum,
)
from kvstore.chunk import SUPPORTED_DTYPES, KVChunk, dtype_name
from kvstore.errors import (
    ChecksumError,
    CodecError,
    FingerprintMismatchError,
    MalformedBlobError,
    TruncatedBlobError,
    UnsupportedVersionError,
)
from kvstore.hostmem import empty_host
from kvstore.parallel import share_work

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little endian
    raise ImportError("kvstore.codec needs a little-endian host")

MAGIC = b"KVFB"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
ALIGN = 64
_PREFIX = struct.Struct("<4sHHIQ")
PREFIX_SIZE = _PREFIX.size
MAX_HEADER_BYTES = 64 << 20
_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)
_ELEM_SIZE = {name: torch.empty((), dtype=dt).element_size() for name, dt in SUPPORTED_DTYPES.items()}

Buffer = bytes | bytearray | memoryview

__all__ = [
    "ALIGN",
    "FORMAT_VERSION",
    "MAGIC",
    "PREFIX_SIZE",
    "BlobHeader",
    "CodecError",
    "EncodedBlob",
    "decode",
    "decode_buffer",
    "encode",
    "encode_parts",
    "header_nbytes",
    "peek_header",
    "read_blob",
    "verify",
]


@dataclass(frozen=True)
class BlobHeader:
    """What a blob says about itself, parsed and checksum-verified (payload not checked)."""

    version: int
    fingerprint: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    num_tokens: int
    head_dim: int
    payload_offset: int
    payload_nbytes: int
    payload_checksum: int
    segment: int  # bytes per checksum segment; 0: version 1, one checksum over the whole payload
    positions_data: bytes | tuple[int, ...] = field(repr=False)

    @property
    def total_nbytes(self) -> int:
        """Exact size of the whole blob."""
        return self.payload_offset + self.payload_nbytes

    @property
    def kv_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.num_kv_heads, self.num_tokens, self.head_dim)

    def positions(self) -> torch.Tensor:
        """The rotary positions the chunk was computed at, int64 ``[T]``."""
        if isinstance(self.positions_data, bytes):
            return torch.from_numpy(np.frombuffer(self.positions_data, dtype="<i4").astype(np.int64))
        return torch.tensor(self.positions_data, dtype=torch.int64)


@dataclass(frozen=True)
class EncodedBlob:
    """An encoded blob in two pieces, so writers can send them without joining (zero-copy payload).

    ``payload`` aliases the chunk's CPU tensor memory; keep the object alive while using it.
    """

    head: bytes
    payload: memoryview
    checksum: int

    @property
    def nbytes(self) -> int:
        return len(self.head) + self.payload.nbytes

    def to_bytes(self) -> bytes:
        return b"".join((self.head, self.payload))


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _payload_view(kv: torch.Tensor) -> memoryview:
    kv = kv.detach()
    if kv.device.type != "cpu":
        kv = kv.to("cpu")
    kv = kv.contiguous()
    if kv.numel() == 0:
        return memoryview(b"")
    return kv.view(torch.uint8).reshape(-1).numpy().data


def encode_parts(chunk: KVChunk) -> EncodedBlob:
    """Encode ``chunk`` as header bytes plus a zero-copy view of its payload."""
    payload = _payload_view(chunk.kv)
    checksum = segmented_checksum(payload, SEGMENT)
    pos = chunk.positions.detach().to("cpu")
    pos_field: bytes | list[int]
    if pos.numel() == 0 or (int(pos.min()) >= _INT32[0] and int(pos.max()) <= _INT32[1]):
        pos_field = pos.to(torch.int32).numpy().tobytes()
    else:
        pos_field = pos.tolist()
    header = msgpack.packb(
        {
            "fp": chunk.fingerprint,
            "dt": dtype_name(chunk.dtype),
            "L": chunk.num_layers,
            "H": chunk.num_kv_heads,
            "T": chunk.num_tokens,
            "D": chunk.head_dim,
            "pos": pos_field,
            "n": payload.nbytes,
            "xxh": checksum,
            "seg": SEGMENT,
        },
        use_bin_type=True,
    )
    fixed = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header), 0)[:12]
    hasher = xxhash.xxh3_64(fixed)
    hasher.update(header)
    prefix = fixed + struct.pack("<Q", hasher.intdigest())
    pad = _align(PREFIX_SIZE + len(header)) - PREFIX_SIZE - len(header)
    return EncodedBlob(prefix + header + b"\0" * pad, payload, checksum)


def encode(chunk: KVChunk) -> bytes:
    """Encode ``chunk`` into one blob (one copy of the payload)."""
    return encode_parts(chunk).to_bytes()


def _as_bytes_view(blob: Buffer) -> memoryview:
    mv = memoryview(blob)
    return mv if mv.ndim == 1 and mv.format == "B" else mv.cast("B")


def header_nbytes(prefix: Buffer) -> int:
    """Bytes from the blob start to the payload, given at least :data:`PREFIX_SIZE` bytes."""
    mv = _as_bytes_view(prefix)
    if mv.nbytes < PREFIX_SIZE:
        raise TruncatedBlobError(f"blob is {mv.nbytes} bytes, shorter than its {PREFIX_SIZE}-byte prefix")
    magic, version, flags, header_len, _ = _PREFIX.unpack_from(mv, 0)
    if magic != MAGIC:
        raise MalformedBlobError("not a kvfuse blob (bad magic)")
    if version not in READ_VERSIONS:
        raise UnsupportedVersionError(
            f"blob format version {version}; this build reads {READ_VERSIONS}", newer=version > FORMAT_VERSION
        )
    if flags != 0:
        raise MalformedBlobError(f"unknown flags {flags:#x}")
    if header_len == 0 or header_len > MAX_HEADER_BYTES:
        raise MalformedBlobError(f"implausible header length {header_len}")
    return int(_align(PREFIX_SIZE + header_len))


def _get_int(hdr: dict[str, Any], name: str, low: int = 0, high: int = 2**31 - 1) -> int:
    value = hdr.get(name)
    if type(value) is not int or not low <= value <= high:
        raise MalformedBlobError(f"header field {name!r} is invalid: {value!r}")
    return value


def _parse(mv: memoryview) -> BlobHeader:
    offset = header_nbytes(mv)
    if mv.nbytes < offset:
        raise TruncatedBlobError(f"blob is {mv.nbytes} bytes, its header needs {offset}")
    _, version, _, header_len, header_sum = _PREFIX.unpack_from(mv, 0)
    header = mv[PREFIX_SIZE : PREFIX_SIZE + header_len]
    hasher = xxhash.xxh3_64(mv[:12])
    hasher.update(header)
    if hasher.intdigest() != header_sum:
        raise ChecksumError("header checksum mismatch")
    if any(mv[PREFIX_SIZE + header_len : offset]):
        raise MalformedBlobError("nonzero header padding")
    try:
        hdr = msgpack.unpackb(header, raw=False, strict_map_key=True, use_list=False)
    except Exception as exc:
        raise MalformedBlobError(f"header is not valid msgpack: {exc}") from exc
    if not isinstance(hdr, dict):
        raise MalformedBlobError("header is not a map")
    fingerprint, dt, pos = hdr.get("fp"), hdr.get("dt"), hdr.get("pos")
    if not isinstance(fingerprint, str):
        raise MalformedBlobError("header field 'fp' is invalid")
    if not isinstance(dt, str) or dt not in SUPPORTED_DTYPES:
        raise MalformedBlobError(f"unsupported dtype {dt!r}")
    layers, heads, head_dim = _get_int(hdr, "L", 1), _get_int(hdr, "H", 1), _get_int(hdr, "D", 1)
    tokens = _get_int(hdr, "T")
    nbytes, checksum = _get_int(hdr, "n", 0, 2**62), _get_int(hdr, "xxh", 0, 2**64 - 1)
    segment = hdr.get("seg", 0) if version >= 2 else 0
    if version >= 2 and not valid_segment(segment):
        raise MalformedBlobError(f"header field 'seg' is invalid: {segment!r}")
    if nbytes != layers * 2 * heads * tokens * head_dim * _ELEM_SIZE[dt]:
        raise MalformedBlobError("payload length does not match the KV shape")
    if isinstance(pos, bytes):
        if len(pos) != 4 * tokens:
            raise MalformedBlobError("positions length does not match the token count")
    elif isinstance(pos, tuple):
        if len(pos) != tokens or any(type(p) is not int or not _INT64[0] <= p <= _INT64[1] for p in pos):
            raise MalformedBlobError("positions do not match the token count or are not int64")
    else:
        raise MalformedBlobError("header field 'pos' is invalid")
    return BlobHeader(version, fingerprint, dt, layers, heads, tokens, head_dim, offset, nbytes, checksum, segment, pos)


def peek_header(blob: Buffer) -> BlobHeader:
    """Parse and verify the header only (cheap; works on any prefix that holds the whole header)."""
    return _parse(_as_bytes_view(blob))


def _check_size(hdr: BlobHeader, size: int, expected_fingerprint: str | None) -> None:
    if size < hdr.total_nbytes:
        raise TruncatedBlobError(f"blob is {size} bytes, expected {hdr.total_nbytes}")
    if size > hdr.total_nbytes:
        raise MalformedBlobError(f"{size - hdr.total_nbytes} trailing bytes after the payload")
    if expected_fingerprint is not None and hdr.fingerprint != expected_fingerprint:
        raise FingerprintMismatchError(f"blob is for model {hdr.fingerprint!r}, expected {expected_fingerprint!r}")


def _verify(mv: memoryview, expected_fingerprint: str | None) -> BlobHeader:
    hdr = _parse(mv)
    _check_size(hdr, mv.nbytes, expected_fingerprint)
    payload = mv[hdr.payload_offset :]
    got = segmented_checksum(payload, hdr.segment) if hdr.segment else whole_checksum(payload)
    if got != hdr.payload_checksum:
        raise ChecksumError("payload checksum mismatch")
    return hdr


def verify(blob: Buffer, expected_fingerprint: str | None = None) -> BlobHeader:
    """Fully validate a blob (header, size, fingerprint, payload checksum) without building tensors."""
    return _verify(_as_bytes_view(blob), expected_fingerprint)


def _build(hdr: BlobHeader, payload: torch.Tensor) -> KVChunk:
    dtype = SUPPORTED_DTYPES[hdr.dtype]
    elem = _ELEM_SIZE[hdr.dtype]
    if payload.numel() and payload.data_ptr() % elem:
        payload = payload.clone()
    kv = payload.view(dtype).view(hdr.kv_shape)
    return KVChunk(kv, hdr.positions(), hdr.fingerprint)


def decode(blob: Buffer, expected_fingerprint: str | None = None, *, copy: bool = False) -> KVChunk:
    """Validate and decode a blob.

    A writable buffer (``bytearray``, writable ``memoryview``) is aliased, zero-copy: the returned tensors
    keep it alive, so do not reuse it (or pass ``copy=True``). Immutable ``bytes`` are copied once.
    Raises a :class:`CodecError` subclass on any problem.
    """
    mv = _as_bytes_view(blob)
    hdr = _verify(mv, expected_fingerprint)
    n, off = hdr.payload_nbytes, hdr.payload_offset
    if n == 0:
        payload = torch.empty(0, dtype=torch.uint8)
    elif mv.readonly or copy:
        payload = empty_host(n)
        payload.numpy()[:] = np.frombuffer(mv, dtype=np.uint8, count=n, offset=off)
    else:
        payload = torch.frombuffer(mv, dtype=torch.uint8, count=n, offset=off)
    return _build(hdr, payload)


def decode_buffer(buf: torch.Tensor, expected_fingerprint: str | None = None) -> KVChunk:
    """Decode a blob held in a contiguous CPU uint8 tensor; the KV aliases ``buf`` (zero-copy)."""
    if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.device.type != "cpu" or not buf.is_contiguous():
        raise TypeError("decode_buffer needs a contiguous 1-D CPU uint8 tensor")
    mv = buf.numpy().data if buf.numel() else memoryview(b"")
    hdr = _verify(mv, expected_fingerprint)
    return _build(hdr, buf[hdr.payload_offset : hdr.total_nbytes])


def is_blob(prefix: Buffer) -> bool:
    """Whether ``prefix`` starts with the blob magic (no validation)."""
    return bytes(memoryview(prefix)[: len(MAGIC)]) == MAGIC


ReadAt = Callable[[memoryview, int], None]
"""Fills a view with the blob's bytes from an offset (e.g. ``os.preadv``); raises if the source is short."""

_HEAD_READ = 4096


def read_blob(
    size: int,
    read_at: ReadAt,
    alloc: Callable[[int], torch.Tensor] = empty_host,
    expected_fingerprint: str | None = None,
) -> KVChunk:
    """Read a blob of ``size`` bytes through ``read_at`` into a buffer from ``alloc``, verifying it as it lands.

    The header is read into a small buffer and checked first (a size that disagrees with it fails before
    the blob's buffer is allocated or its payload read).
    A version-2 payload is then read segment by segment, by this thread and helpers together, each segment
    hashed right after it lands, while it is in the CPU cache; version 1 is read, then hashed. The same
    checks as :func:`decode_buffer` (a problem raises a :class:`CodecError`); the KV aliases the buffer.
    """
    if size < PREFIX_SIZE:
        raise TruncatedBlobError(f"blob is {size} bytes, shorter than its {PREFIX_SIZE}-byte prefix")
    head = memoryview(bytearray(min(size, _HEAD_READ)))  # checked before the whole size is allocated
    read_at(head, 0)
    need = header_nbytes(head)
    if need > size:
        raise TruncatedBlobError(f"blob is {size} bytes, its header needs {need}")
    if need > head.nbytes:
        grown = bytearray(need)
        grown[: head.nbytes] = head
        head = memoryview(grown)
        read_at(head[_HEAD_READ:], _HEAD_READ)
    hdr = _parse(head[:need])
    _check_size(hdr, size, expected_fingerprint)
    buf = alloc(size)
    mv = buf.numpy().data[:size]
    have = head.nbytes
    mv[:have] = head
    off = hdr.payload_offset
    if not hdr.segment:
        if size > have:
            read_at(mv[have:], have)
        got = whole_checksum(mv[off:])
    else:
        bounds = [(off + lo, off + hi) for lo, hi in segment_bounds(hdr.payload_nbytes, hdr.segment)]

        def read_and_hash(i: int) -> int:
            lo, hi = bounds[i]
            if hi > (start := max(lo, have)):
                read_at(mv[start:hi], start)
            return digest(mv[lo:hi])

        got = combine(share_work(len(bounds), read_and_hash))
    if got != hdr.payload_checksum:
        raise ChecksumError("payload checksum mismatch")
    return _build(hdr, buf[off:size])
