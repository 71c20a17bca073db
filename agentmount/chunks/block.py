"""Block object format: a small header then the (zstd-compressed) payload.

Layout (little endian):
  magic  b"AMB" | version u8 (1) | codec u8 (0 raw, 1 zstd) | reserved 3 bytes
  plain_len u32 | xxh3-128 digest of the plain bytes (16 bytes) | payload
A block decodes only if the magic, version, length and checksum all match;
anything else raises CorruptBlock. Encoding never stores a compressed payload
that is not smaller than the plain bytes.
"""
from __future__ import annotations

import struct
import threading
from typing import Sequence, Union

import xxhash
import zstandard

from backend.store import CorruptObject

MAGIC = b"AMB"
VERSION = 1
CODEC_RAW = 0
CODEC_ZSTD = 1
_HEADER = struct.Struct("<3sBB3xI16s")
HEADER_SIZE = _HEADER.size

_local = threading.local()


class CorruptBlock(CorruptObject):
    """A block object failed its format or checksum verification."""


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "c", None)
    if cache is None:
        cache = _local.c = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


Buffer = Union[bytes, bytearray, memoryview]


def as_parts(data: "Buffer | Sequence[Buffer]") -> list[Buffer]:
    """One buffer or a sequence of buffers, as a list of buffers."""
    return [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)


def checksum(data: "Buffer | Sequence[Buffer]") -> bytes:
    """xxh3-128 of the bytes, or of the concatenation of a sequence of buffers."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return xxhash.xxh3_128_digest(data)
    h = xxhash.xxh3_128()
    for part in data:
        h.update(part)
    return h.digest()


_SAMPLE = 64 << 10


def _middle_sample(parts: list[Buffer], total: int) -> memoryview:
    mid = total // 2
    for part in parts:
        if mid < len(part):
            return memoryview(part)[mid:mid + _SAMPLE]
        mid -= len(part)
    return memoryview(b"")


def encode_parts(plain: "Buffer | Sequence[Buffer]", level: int = 1,
                 compress: bool = True) -> tuple[bytes, list[Buffer]]:
    """Return (header, payload buffers) of the block object for `plain`.

    `plain` is one buffer or a sequence of buffers to concatenate; raw payloads
    come back as those same buffers, never copied. `compress=False`: always raw.
    Call from a worker thread for big blocks.
    """
    parts = as_parts(plain)
    total = sum(len(p) for p in parts)
    digest = checksum(parts)
    raw = _HEADER.pack(MAGIC, VERSION, CODEC_RAW, total, digest), parts
    if not compress:
        return raw
    comp = _compressor(level)
    if total > 4 * _SAMPLE:
        # Incompressible data (media, archives, random bytes) is common: a sample from the
        # middle tells, and skips compressing megabytes that would be stored raw anyway.
        sample = _middle_sample(parts, total)
        if len(sample) >= _SAMPLE // 4 and len(comp.compress(sample)) > len(sample) * 0.97:
            return raw
    if len(parts) == 1:
        packed = comp.compress(parts[0])
    else:
        co = comp.compressobj(size=total)
        packed = b"".join([co.compress(p) for p in parts] + [co.flush()])
    if len(packed) < total:
        return _HEADER.pack(MAGIC, VERSION, CODEC_ZSTD, total, digest), [packed]
    return raw


def encode(plain: "Buffer | Sequence[Buffer]", level: int = 1, compress: bool = True) -> bytes:
    """Return the block object for `plain` as one bytes object."""
    header, payload = encode_parts(plain, level, compress)
    return b"".join([header, *payload])


def decode(obj: bytes) -> bytes | memoryview:
    """Return the verified plain bytes of a block object or raise CorruptBlock.

    A raw block comes back as a memoryview into `obj` (no copy of megabytes).
    """
    if len(obj) < HEADER_SIZE:
        raise CorruptBlock("short block")
    magic, ver, codec, plain_len, digest = _HEADER.unpack_from(obj)
    if magic != MAGIC or ver != VERSION:
        raise CorruptBlock("bad block header")
    payload = memoryview(obj)[HEADER_SIZE:]
    if codec == CODEC_RAW:
        plain = payload
    elif codec == CODEC_ZSTD:
        try:
            plain = _decompressor().decompress(payload, max_output_size=plain_len)
        except zstandard.ZstdError as e:
            raise CorruptBlock(f"zstd: {e}") from None
    else:
        raise CorruptBlock(f"unknown codec {codec}")
    if len(plain) != plain_len:
        raise CorruptBlock("length mismatch")
    if checksum(plain) != digest:
        raise CorruptBlock("checksum mismatch")
    return plain
