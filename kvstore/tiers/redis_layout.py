"""How the Redis tier names its keys and describes striped blobs (manifests)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch
import xxhash

from kvstore.errors import CodecError
from kvstore.keys import ChunkKey

MANIFEST_MAGIC = b"KVFM"
PART_ALIGN = 4096


def is_manifest(value: bytes) -> bool:
    return value[: len(MANIFEST_MAGIC)] == MANIFEST_MAGIC


def stripe_plan(payload_nbytes: int, stripe_bytes: int) -> tuple[int, int]:
    """(part count, part size): the fewest parts of at most ``stripe_bytes``, of equal 4 KiB-multiple size."""
    n = max(1, math.ceil(payload_nbytes / stripe_bytes))
    size = max(PART_ALIGN, -(-math.ceil(payload_nbytes / n) // PART_ALIGN) * PART_ALIGN)
    return max(1, math.ceil(payload_nbytes / size)), size


@dataclass(frozen=True)
class KeyLayout:
    """``{prefix}{<hex>}`` holds a blob or manifest; ``{prefix}{<hex>}:<gen>:<i>`` holds part ``i``.

    The hash tag ``{<hex>}`` puts all keys of one blob in one cluster slot.
    """

    prefix: str

    def main_key(self, key: ChunkKey) -> bytes:
        return f"{self.prefix}{{{key.hex}}}".encode()

    def part_names(self, key: ChunkKey, gen: str, n: int) -> list[bytes]:
        main = self.main_key(key)
        return [main + f":{gen}:{i}".encode() for i in range(n)]

    @property
    def scan_pattern(self) -> str:
        """A SCAN pattern matching main keys only (part names do not end in ``}``)."""
        return f"{self.prefix}{{*}}"

    def key_of(self, name: bytes | str) -> ChunkKey | None:
        """The chunk key of a main key name, or ``None`` for anything else."""
        text = name.decode() if isinstance(name, bytes) else name
        if not (text.startswith(self.prefix + "{") and text.endswith("}")):
            return None
        try:
            return ChunkKey.from_hex(text[len(self.prefix) + 1 : -1])
        except ValueError:
            return None


@dataclass(frozen=True)
class Manifest:
    """Describes a striped blob: its codec head and where the payload parts are.

    Stored as ``KVFM`` + xxh3_64 of the body (u64 LE) + msgpack body: a corrupted manifest (say, a changed
    generation that would point at absent parts) is detected as corrupt, not mistaken for a lost part.
    """

    gen: str
    nparts: int
    part_size: int
    payload_nbytes: int
    head: bytes

    def to_bytes(self) -> bytes:
        body = {
            "g": self.gen,
            "n": self.nparts,
            "ps": self.part_size,
            "pl": self.payload_nbytes,
            "h": self.head,
        }
        packed = msgpack.packb(body, use_bin_type=True)
        return MANIFEST_MAGIC + xxhash.xxh3_64_intdigest(packed).to_bytes(8, "little") + packed

    @classmethod
    def parse(cls, value: bytes) -> Manifest:
        """Raises :class:`CodecError` when ``value`` is not a well-formed manifest."""
        if not is_manifest(value):
            raise CodecError("not a manifest")
        body = value[len(MANIFEST_MAGIC) + 8 :]
        if int.from_bytes(value[len(MANIFEST_MAGIC) : len(MANIFEST_MAGIC) + 8], "little") != xxhash.xxh3_64_intdigest(
            body
        ):
            raise CodecError("manifest checksum mismatch")
        try:
            m = msgpack.unpackb(body, raw=False)
            gen, n, ps, pl, head = m["g"], m["n"], m["ps"], m["pl"], m["h"]
        except Exception as exc:
            raise CodecError(f"malformed manifest: {exc}") from exc
        ok = isinstance(gen, str) and gen.isalnum() and isinstance(head, bytes)
        ok = ok and all(type(v) is int and v >= 0 for v in (n, ps, pl)) and ps > 0
        if not ok or n != math.ceil(pl / ps):
            raise CodecError("malformed manifest")
        return cls(gen, n, ps, pl, head)


@dataclass
class StripedRead:
    """A manifest being read: where its parts go, and what went wrong fetching them."""

    index: int
    key: ChunkKey
    names: list[bytes]
    part_size: int
    head_len: int
    buf: torch.Tensor
    value: bytes = b""  # the manifest as read (cleanup deletes the main key only if it still holds this)
    missing: bool = False
    bad_parts: list[int] = field(default_factory=list)  # parts absent or of the wrong size


def parts_wrong_size(client: Any, job: StripedRead) -> bool:
    """Whether a part that failed to load exists with a size other than its slot's (truncated or padded:
    corrupt). Absent parts, or parts present at the right size (a read racing a write), are a miss."""
    payload = job.buf.numel() - job.head_len
    expected = [min(job.part_size, payload - i * job.part_size) for i in job.bad_parts]
    with contextlib.suppress(Exception):
        pipe = client.pipeline(transaction=False)
        for i in job.bad_parts:
            pipe.strlen(job.names[i])
        sizes = [int(n) for n in pipe.execute()]
        return any(0 < n != want for n, want in zip(sizes, expected, strict=True))
    return False
