from __future__ import annotations

import itertools
import struct
import threading

import msgpack
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore import (
    ChecksumError,
    CodecError,
    FingerprintMismatchError,
    KVChunk,
    MalformedBlobError,
    TruncatedBlobError,
    UnsupportedVersionError,
    decode,
    encode,
    peek_header,
    verify,
)
from kvstore.checksum import SEGMENT, combine, segment_bounds
from kvstore.codec import ALIGN, FORMAT_VERSION, PREFIX_SIZE, decode_buffer, encode_parts, read_blob
from tests.kvstore.conftest import FP, assert_same, make_chunk


def test_round_trip(dtype: torch.dtype) -> None:
    chunk = make_chunk(33, dtype, seed=1, start=1000)
    blob = encode(chunk)
    assert isinstance(blob, bytes)
    assert_same(decode(blob, FP), chunk)
    assert_same(decode(bytearray(blob)), chunk)
    assert_same(decode(memoryview(blob)), chunk)
    buf = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    assert_same(decode_buffer(buf), chunk)


def test_bf16_bit_exact() -> None:
    kv = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 1e-40, 3.0]).to(torch.bfloat16)
    chunk = KVChunk(kv.view(1, 2, 1, 3, 1), torch.tensor([7, 8, 9]), FP)
    out = decode(encode(chunk))
    assert torch.equal(out.kv.view(torch.int16), chunk.kv.view(torch.int16))


def test_header_and_layout() -> None:
    chunk = make_chunk(5, torch.float16, start=-3)
    blob = encode(chunk)
    hdr = peek_header(blob[: ALIGN * 4])
    assert (hdr.num_layers, hdr.num_kv_heads, hdr.num_tokens, hdr.head_dim) == (2, 2, 5, 8)
    assert hdr.dtype == "float16" and hdr.fingerprint == FP and hdr.version == FORMAT_VERSION == 2
    assert hdr.payload_offset % ALIGN == 0 and hdr.total_nbytes == len(blob)
    assert torch.equal(hdr.positions(), torch.arange(-3, 2))
    assert verify(blob) == hdr


def test_large_positions_and_empty_chunk() -> None:
    chunk = KVChunk(torch.zeros(1, 2, 1, 2, 4), torch.tensor([2**40, -(2**35)]), FP)
    assert_same(decode(encode(chunk)), chunk)
    empty = KVChunk(torch.zeros(1, 2, 1, 0, 4), torch.zeros(0, dtype=torch.int64), FP)
    assert decode(encode(empty)).num_tokens == 0


def test_decode_zero_copy_and_copy() -> None:
    chunk = make_chunk(8)
    buf = bytearray(encode(chunk))
    aliased, copied = decode(buf), decode(buf, copy=True)
    buf[-1] ^= 0xFF
    assert not torch.equal(aliased.kv, chunk.kv)  # aliases the writable buffer
    assert_same(copied, chunk)
    frozen = decode(bytes(encode(chunk)))
    frozen.kv.add_(1)  # bytes are copied: safe to modify
    assert frozen.kv.is_contiguous()


def test_encode_does_not_modify_noncontiguous_input() -> None:
    base = torch.randn(2, 2, 2, 8, 6)
    kv = base[..., :4]
    chunk = KVChunk(kv, torch.arange(8), FP)
    assert torch.equal(decode(encode(chunk)).kv, kv)
    parts = encode_parts(chunk)
    assert parts.nbytes == len(parts.to_bytes())


def test_errors_are_specific() -> None:
    blob = bytearray(encode(make_chunk(8)))
    hdr = peek_header(blob)
    with pytest.raises(FingerprintMismatchError):
        decode(bytes(blob), expected_fingerprint="other-model")
    bad = bytearray(blob)
    bad[-1] ^= 1
    with pytest.raises(ChecksumError):
        decode(bytes(bad))
    bad = bytearray(blob)
    bad[PREFIX_SIZE + 3] ^= 1
    with pytest.raises(ChecksumError):
        decode(bytes(bad))
    with pytest.raises(TruncatedBlobError):
        decode(bytes(blob[:-1]))
    with pytest.raises(TruncatedBlobError):
        decode(bytes(blob[:10]))
    with pytest.raises(MalformedBlobError):
        decode(bytes(blob) + b"\0")
    bad = bytearray(blob)
    struct.pack_into("<H", bad, 4, 99)
    with pytest.raises(UnsupportedVersionError):
        decode(bytes(bad))
    for garbage in (b"", b"hello world", b"\0" * 200, b"KVFB" + b"\xff" * 100):
        with pytest.raises(CodecError):
            decode(garbage)
    assert hdr.payload_nbytes == 2 * 2 * 2 * 8 * 8 * 4


def _forge(header: dict[str, object], payload: bytes = b"", version: int = 1) -> bytes:
    """A blob with a valid header checksum but arbitrary header content."""
    raw = msgpack.packb(header, use_bin_type=True)
    fixed = struct.pack("<4sHHI", b"KVFB", version, 0, len(raw))
    h = xxhash.xxh3_64(fixed)
    h.update(raw)
    head = fixed + struct.pack("<Q", h.intdigest()) + raw
    pad = -len(head) % ALIGN
    return head + b"\0" * pad + payload


def test_inconsistent_headers_rejected() -> None:
    good = {"fp": FP, "dt": "float32", "L": 1, "H": 1, "T": 1, "D": 1, "pos": b"\0" * 4, "n": 8, "xxh": 0}
    payload = b"\0" * 8
    good["xxh"] = xxhash.xxh3_64_intdigest(payload)
    assert decode(_forge(good, payload)).num_tokens == 1
    bad_fields = [("dt", "int8"), ("L", 0), ("T", -1), ("n", 16), ("pos", b"\0" * 8), ("pos", "x")]
    for field, value in [*bad_fields, ("fp", 5), ("D", 1.5)]:
        with pytest.raises(MalformedBlobError):
            decode(_forge({**good, field: value}, payload))
    with pytest.raises(MalformedBlobError):
        decode(_forge([1, 2, 3], payload))  # type: ignore[arg-type]


_BLOBS = [encode(make_chunk(3, dt, seed=i, layers=1, heads=1, head_dim=4)) for i, dt in enumerate(
    [torch.float32, torch.float16, torch.bfloat16])]  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.integers(0, len(_BLOBS) - 1), pos=st.integers(0, 10**6), delta=st.integers(1, 255))
def test_any_single_byte_mutation_rejected(which: int, pos: int, delta: int) -> None:
    blob = bytearray(_BLOBS[which])
    i = pos % len(blob)
    blob[i] = (blob[i] + delta) % 256
    with pytest.raises(CodecError):
        decode(bytes(blob))


@settings(max_examples=200, deadline=None)
@given(which=st.integers(0, len(_BLOBS) - 1), cut=st.integers(0, 10**6))
def test_any_truncation_rejected(which: int, cut: int) -> None:
    blob = _BLOBS[which]
    with pytest.raises(CodecError):
        decode(blob[: cut % len(blob)])


def test_every_byte_flip_rejected_exhaustively() -> None:
    blob = _BLOBS[2]
    for i in range(len(blob)):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(blob)
            bad[i] ^= mask
            with pytest.raises(CodecError):
                decode(bytes(bad))


def _read(blob: bytes, expected_fingerprint: str | None = None, stripe: int = 1 << 30) -> KVChunk:
    """Decode ``blob`` with :func:`read_blob`, each read returning at most ``stripe`` bytes at a time."""
    reads: list[tuple[int, int]] = []

    def read_at(view: memoryview, offset: int) -> None:
        reads.append((offset, view.nbytes))
        end = offset + view.nbytes
        if end > len(blob):
            raise EOFError("source shrank")
        for lo in range(offset, end, stripe):
            hi = min(end, lo + stripe)
            view[lo - offset : hi - offset] = blob[lo:hi]

    chunk = read_blob(len(blob), read_at, expected_fingerprint=expected_fingerprint)
    covered = sorted(reads)
    assert covered[0][0] == 0 and all(a + n == b for (a, n), (b, _) in itertools.pairwise(covered))
    return chunk


def _big_chunk(seed: int = 0) -> KVChunk:
    """About 3.4 MB of float32 KV: four checksum segments."""
    return make_chunk(400, torch.float32, seed=seed, layers=8, heads=4, head_dim=33)


def test_read_blob_round_trip(dtype: torch.dtype) -> None:
    chunk = make_chunk(33, dtype, seed=2, start=7)
    blob = encode(chunk)
    got = _read(blob, FP, stripe=7)
    assert_same(got, chunk)
    assert_same(decode_buffer(torch.frombuffer(bytearray(blob), dtype=torch.uint8)), got)
    big = _big_chunk()
    assert peek_header(encode(big)).payload_nbytes > 3 * SEGMENT
    assert_same(_read(encode(big), FP), big)


def test_read_blob_rejects_what_decode_rejects() -> None:
    blob = encode(make_chunk(8))
    with pytest.raises(FingerprintMismatchError):
        _read(blob, "other-model")
    with pytest.raises(TruncatedBlobError):
        _read(blob[:-1])
    with pytest.raises(MalformedBlobError):
        _read(blob + b"\0")
    for garbage in (b"", b"hello world", b"\0" * 200, b"KVFB" + b"\xff" * 100):
        with pytest.raises(CodecError):
            _read(garbage)


def test_read_blob_wrong_size_fails_before_the_payload_is_read() -> None:
    blob = encode(_big_chunk())
    reads: list[int] = []

    def read_at(view: memoryview, offset: int) -> None:
        reads.append(offset)
        view[:] = blob[offset : offset + view.nbytes]

    with pytest.raises(MalformedBlobError):
        read_blob(len(blob) + 64, lambda v, o: read_at(v, o) if o < len(blob) else None)
    assert reads == [0]  # the header only


@pytest.mark.parametrize("segment_index", [0, 1, 2, 3])
def test_each_segment_is_checked(segment_index: int) -> None:
    blob = bytearray(encode(_big_chunk(seed=segment_index)))
    hdr = peek_header(blob)
    lo, hi = segment_bounds(hdr.payload_nbytes, hdr.segment)[segment_index]
    blob[hdr.payload_offset + (lo + hi) // 2] ^= 0x01
    with pytest.raises(ChecksumError):
        _read(bytes(blob))
    with pytest.raises(ChecksumError):
        decode(bytes(blob))


def test_segments_are_read_and_hashed_by_helpers_too() -> None:
    blob = encode(_big_chunk())
    caller = threading.current_thread()
    threads: set[str] = set()
    helper_came = threading.Event()

    def read_at(view: memoryview, offset: int) -> None:
        if offset:  # a payload segment (offset 0 is the header): the caller waits until a helper read one too
            threads.add(threading.current_thread().name)
            if threading.current_thread() is caller:
                helper_came.wait(timeout=10)
            else:
                helper_came.set()
        view[:] = blob[offset : offset + view.nbytes]

    assert_same(read_blob(len(blob), read_at), _big_chunk())
    assert len(threads) == 2  # the caller and a helper each read part of the payload


def test_read_blob_passes_read_errors_through() -> None:
    blob = encode(_big_chunk())

    def read_at(view: memoryview, offset: int) -> None:
        if offset > len(blob) // 2:
            raise OSError(5, "Input/output error")
        view[:] = blob[offset : offset + view.nbytes]

    with pytest.raises(OSError, match="Input/output"):
        read_blob(len(blob), read_at)


def test_version_1_blobs_still_read() -> None:
    chunk = make_chunk(6, torch.float16, seed=4)
    payload = bytes(chunk.kv.contiguous().view(torch.uint8).reshape(-1).numpy())
    header = {"fp": FP, "dt": "float16", "L": 2, "H": 2, "T": 6, "D": 8,
              "pos": chunk.positions.to(torch.int32).numpy().tobytes(), "n": len(payload),
              "xxh": xxhash.xxh3_64_intdigest(payload)}  # fmt: skip
    blob = _forge(header, payload)
    hdr = peek_header(blob)
    assert (hdr.version, hdr.segment) == (1, 0)
    assert_same(decode(blob), chunk)
    assert_same(_read(blob, FP, stripe=5), chunk)
    bad = bytearray(blob)
    bad[-1] ^= 0x01
    with pytest.raises(ChecksumError):
        _read(bytes(bad))


@pytest.mark.parametrize("segment", [None, 0, 3, 1000, 1 << 31, "1M"])
def test_version_2_needs_a_valid_segment(segment: object) -> None:
    good = {"fp": FP, "dt": "float32", "L": 1, "H": 1, "T": 1, "D": 1, "pos": b"\0" * 4, "n": 8}
    payload = b"\0" * 8
    good["xxh"] = combine([xxhash.xxh3_64_intdigest(payload)])
    assert decode(_forge({**good, "seg": 1 << 20}, payload, version=2)).num_tokens == 1
    fields = good if segment is None else {**good, "seg": segment}
    with pytest.raises(MalformedBlobError):
        decode(_forge(fields, payload, version=2))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.integers(0, len(_BLOBS) - 1), pos=st.integers(0, 10**6), delta=st.integers(1, 255),
       stripe=st.integers(1, 300), cut=st.integers(0, 10**6))
def test_read_blob_rejects_any_mutation_or_truncation(which: int, pos: int, delta: int, stripe: int,
                                                      cut: int) -> None:
    blob = bytearray(_BLOBS[which])
    i = pos % len(blob)
    blob[i] = (blob[i] + delta) % 256
    with pytest.raises(CodecError):
        _read(bytes(blob), stripe=stripe)
    with pytest.raises(CodecError):
        _read(_BLOBS[which][: cut % len(blob)], stripe=stripe)


def test_read_blob_every_byte_flip_rejected_exhaustively() -> None:
    blob = _BLOBS[0]
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x10
        with pytest.raises(CodecError):
            _read(bytes(bad), stripe=5)


def test_positions_beyond_int64_are_malformed() -> None:
    payload = b"\0" * 8
    header = {"fp": FP, "dt": "float32", "L": 1, "H": 1, "T": 1, "D": 1, "pos": (2**63,), "n": 8,
              "xxh": xxhash.xxh3_64_intdigest(payload)}  # fmt: skip
    with pytest.raises(MalformedBlobError):
        decode(_forge(header, payload))
    with pytest.raises(MalformedBlobError):
        _read(_forge(header, payload))


def test_read_blob_checks_the_header_before_allocating() -> None:
    blob = encode(make_chunk(8))
    sizes: list[int] = []

    def alloc(n: int) -> torch.Tensor:
        sizes.append(n)
        return torch.empty(n, dtype=torch.uint8)

    def read_at(view: memoryview, offset: int) -> None:  # the blob, then zeros (a sparse file)
        view[:] = (blob + bytes(view.nbytes))[offset : offset + view.nbytes]

    with pytest.raises(MalformedBlobError, match="trailing"):
        read_blob(4 << 40, read_at, alloc)  # a 4 TiB file starting with this blob's header
    assert sizes == []


def test_read_blob_with_a_larger_buffer() -> None:
    for blob in (encode(_big_chunk()), _forge({"fp": FP, "dt": "float32", "L": 1, "H": 1, "T": 1, "D": 1,
                                              "pos": b"\0" * 4, "n": 8, "xxh": xxhash.xxh3_64_intdigest(b"\1" * 8)},
                                             b"\1" * 8)):  # fmt: skip
        got = read_blob(len(blob), lambda v, o, b=blob: v.__setitem__(slice(None), b[o : o + v.nbytes]),
                        lambda n: torch.zeros(n + 64, dtype=torch.uint8))  # fmt: skip
        assert_same(got, decode(blob))
