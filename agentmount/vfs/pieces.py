"""`PieceBuffer`: buffered write bytes kept as a list of buffers, not one growing array.

Each FUSE write arrives as a fresh immutable `bytes` object. Big writes are
kept by reference (a memoryview of that object: no copy at all), small ones
coalesce into bytearrays we own. Blocks leave the buffer as lists of buffers
that are hashed, compressed and written with writev without ever being
joined, so a sequential writer's bytes are copied once in user space (by
pyfuse3) instead of three or four times.

Invariants: buffers handed out by `take` are never mutated afterwards; a
bytearray part is mutated in place only while it is still in `parts`.
"""
from __future__ import annotations

from typing import Sequence, Union

Buffer = Union[bytes, bytearray, memoryview]

_KEEP = 64 << 10       # writes at least this big are kept by reference
_COALESCE = 256 << 10  # small writes fill one bytearray up to this size


def nbytes(parts: Sequence[Buffer]) -> int:
    return sum(len(p) for p in parts)


def gather(parts: Sequence[Buffer], off: int, n: int) -> bytes:
    """Bytes [off, off+n) of the concatenation of `parts` (clipped at its end)."""
    out = []
    for p in parts:
        if n <= 0:
            break
        if off >= len(p):
            off -= len(p)
            continue
        piece = memoryview(p)[off:off + n]
        out.append(piece)
        n -= len(piece)
        off = 0
    return b"".join(out)


class PieceBuffer:
    """A byte string under construction; see module docstring."""

    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: list[Buffer] = []
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def __bool__(self) -> bool:
        return self.size > 0

    def append(self, data: memoryview) -> None:
        n = len(data)
        if not n:
            return
        if n >= _KEEP and isinstance(data.obj, bytes):
            self.parts.append(data)
        else:
            last = self.parts[-1] if self.parts else None
            if isinstance(last, bytearray) and len(last) + n <= _COALESCE:
                last += data
            else:
                self.parts.append(bytearray(data))
        self.size += n

    def write_at(self, rel: int, data: memoryview) -> int:
        """Write `data` at offset `rel` (<= size); return how many existing bytes it replaced."""
        if rel == self.size:
            self.append(data)
            return 0
        n = len(data)
        overlap = min(self.size - rel, n)
        pos = 0
        for i, p in enumerate(self.parts):
            if rel < pos + len(p):
                if isinstance(p, bytearray) and rel + n <= pos + len(p):
                    p[rel - pos:rel - pos + n] = data   # inside one part we own: in place
                    return overlap
                break
            pos += len(p)
        flat = bytearray().join(self.parts)
        flat[rel:rel + n] = data
        self.parts = [flat]
        self.size = len(flat)
        return overlap

    def take(self, n: int) -> list[Buffer]:
        """Remove the first `n` bytes and return them as buffers (no copy of big parts)."""
        out: list[Buffer] = []
        need = min(n, self.size)
        self.size -= need
        while need:
            p = self.parts[0]
            if len(p) <= need:
                out.append(self.parts.pop(0))
                need -= len(p)
            else:
                out.append(memoryview(p)[:need])
                rest = memoryview(p)[need:]
                # A bytearray that is exported cannot be resized: the small rest becomes its own copy.
                self.parts[0] = bytearray(rest) if isinstance(p, bytearray) else rest
                need = 0
        return out

    def read(self, rel: int, n: int) -> bytes:
        return gather(self.parts, rel, n)

    def tobytes(self) -> bytes:
        return b"".join(self.parts)

    def clear(self) -> None:
        self.parts = []
        self.size = 0
