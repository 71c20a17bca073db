"""Pure logic of the data layout: slices inside chunks and their resolution.

A file is cut into chunks of `chunk_size` bytes of file offset. Each write
committed to a chunk is a Slice: bytes [off, off+len) of a stored object
sequence `sid` (split into blocks of `bsize`) placed at `pos` in the chunk.
Slices are kept oldest first; reading resolves newest-wins; gaps are holes
and read as zeros. Nothing here does I/O.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Slice:
    sid: str        # unique, never reused id of the stored data
    size: int       # total bytes stored under sid
    bsize: int      # block size the stored data was cut into
    pos: int        # position of the visible part inside the chunk
    off: int        # offset of the visible part inside the stored data
    len: int        # visible length

    @property
    def end(self) -> int:
        return self.pos + self.len

    def to_tuple(self) -> tuple:
        return (self.sid, self.size, self.bsize, self.pos, self.off, self.len)

    @staticmethod
    def from_tuple(t) -> "Slice":
        return Slice(t[0], t[1], t[2], t[3], t[4], t[5])

    def nblocks(self) -> int:
        return (self.size + self.bsize - 1) // self.bsize

    def clip(self, start: int, end: int) -> "Slice | None":
        """The part of this slice visible in [start, end) of the chunk, or None."""
        s = max(start, self.pos)
        e = min(end, self.end)
        if s >= e:
            return None
        return Slice(self.sid, self.size, self.bsize, s, self.off + (s - self.pos), e - s)


def block_key(ws: str, sid: str, index: int) -> str:
    return f"ws/{ws}/blocks/{sid[:2]}/{sid}_{index}"


def slice_block_keys(ws: str, s: Slice) -> list[str]:
    return [block_key(ws, s.sid, i) for i in range(s.nblocks())]


@dataclass(frozen=True, slots=True)
class Segment:
    """A visible run [pos, pos+len) of the chunk served by `slice` (None: a hole)."""
    pos: int
    len: int
    slice: Slice | None


def resolve(slices: list[Slice], start: int, end: int) -> list[Segment]:
    """Segments covering [start, end) exactly, newest slice wins, gaps as holes."""
    # Paint from newest to oldest, keeping the list of still-uncovered intervals.
    uncovered = [(start, end)]
    found: list[Segment] = []
    for s in reversed(slices):
        if not uncovered:
            break
        if s.end <= start or s.pos >= end:
            continue
        nxt = []
        for a, b in uncovered:
            lo, hi = max(a, s.pos), min(b, s.end)
            if lo >= hi:
                nxt.append((a, b))
                continue
            found.append(Segment(lo, hi - lo, s.clip(lo, hi)))
            if a < lo:
                nxt.append((a, lo))
            if hi < b:
                nxt.append((hi, b))
        uncovered = nxt
    for a, b in uncovered:
        found.append(Segment(a, b - a, None))
    found.sort(key=lambda g: g.pos)
    return found


def truncate_slices(slices: list[Slice], keep: int) -> tuple[list[Slice], list[Slice]]:
    """Clip slices to chunk bytes [0, keep); return (kept, dropped_entirely)."""
    kept, dropped = [], []
    for s in slices:
        if s.pos >= keep:
            dropped.append(s)
        elif s.end > keep:
            kept.append(s.clip(0, keep))
        else:
            kept.append(s)
    return kept, dropped


def fully_hidden(slices: list[Slice]) -> list[Slice]:
    """Slices no byte of which is visible any more (newer slices cover them)."""
    hidden = []
    for i, s in enumerate(slices):
        segs = resolve(slices[i + 1:], s.pos, s.end)
        if all(g.slice is not None for g in segs):
            hidden.append(s)
    return hidden
