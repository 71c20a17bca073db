"""Background compaction: keep reads at a few fetches per block window.

A chunk's committed slices pile up under small random writes and appends.
Per block-sized window of the chunk, when `threshold` or more slices overlap
it, the window is rewritten as one new slice on top: just the visible bytes
of the small slices inside it when they form one run (appends: cheap), else
the window's visible extent. Slices hidden by the result are dropped in the
same record. The record applies only if the chunk's slice list is still the
one that was read (digest), so compaction never changes what a reader sees;
a void compaction's blocks become garbage.
"""
from __future__ import annotations

import logging

import trio

from agentmount.chunks.blockio import BlockIO
from agentmount.chunks.layout import Slice, block_key, resolve
from agentmount.meta.service import NamespaceService
from agentmount.vfs.writer import new_sid

log = logging.getLogger("agentmount.compactor")


def hidden_slices(slices: list[Slice]) -> list[Slice]:
    """Slices of which no byte is visible (newer slices cover them entirely)."""
    out = []
    for i, s in enumerate(slices):
        later = [t for t in slices[i + 1:] if t.pos < s.end and t.end > s.pos]
        if later and all(g.slice is not None for g in resolve(later, s.pos, s.end)):
            out.append(s)
    return out


def plan(slices: list[Slice], bsize: int, limit: int, threshold: int) -> list[tuple[int, int, bool]]:
    """Windows to rewrite, as (start, end, only_small) byte ranges of the chunk."""
    counts: dict[int, int] = {}
    for s in slices:
        for w in range(s.pos // bsize, (s.end - 1) // bsize + 1):
            counts[w] = counts.get(w, 0) + 1
    out = []
    for w in sorted(w for w, c in counts.items() if c >= threshold):
        a, b = w * bsize, min((w + 1) * bsize, limit)
        if a >= b:
            continue
        inner = {s.sid for s in slices if s.pos >= a and s.end <= b}
        runs: list[list[int]] = []
        for g in resolve(slices, a, b):
            if g.slice is not None and g.slice.sid in inner:
                if runs and runs[-1][1] == g.pos:
                    runs[-1][1] = g.pos + g.len
                else:
                    runs.append([g.pos, g.pos + g.len])
        if len(runs) == 1:
            out.append((runs[0][0], runs[0][1], True))
        else:
            segs = [g for g in resolve(slices, a, b) if g.slice is not None]
            if segs:
                out.append((segs[0].pos, segs[-1].pos + segs[-1].len, False))
    return out


class Compactor:
    """Queue and run chunk compactions for one workspace."""

    def __init__(self, meta: NamespaceService, blockio: BlockIO, read_stored, bsize: int, threshold: int) -> None:
        self.meta = meta
        self.blockio = blockio
        self.read_stored = read_stored   # async (slice, off, n, pend) -> bytes
        self.bsize = bsize
        self.threshold = threshold
        self._queue: set[tuple[int, int]] = set()
        self._wake = trio.Event()
        self.compactions = 0
        self.inflight: set[str] = set()   # ids being written, not yet committed (the sweep spares them)

    def consider(self, ino: int, chunk: int, nslices: int) -> None:
        if nslices >= self.threshold:
            self._queue.add((ino, chunk))
            self._wake.set()

    async def run(self) -> None:
        while True:
            if not self._queue:
                self._wake = trio.Event()
                await self._wake.wait()
            ino, chunk = self._queue.pop()
            try:
                await self.compact(ino, chunk)
            except Exception as e:  # noqa: BLE001 - compaction is an optimisation; retried on next trigger
                log.warning("compaction of inode %d chunk %d failed: %s", ino, chunk, e)

    async def _read(self, slices: list[Slice], a: int, b: int) -> bytes:
        parts = []
        for g in resolve(slices, a, b):
            if g.slice is None:
                parts.append(bytes(g.len))
            else:
                parts.append(await self.read_stored(g.slice, g.slice.off, g.len, {}))
        return b"".join(parts)

    async def compact(self, ino: int, chunk: int) -> bool:
        try:
            node = await self.meta.getattr(ino)
        except Exception:  # noqa: BLE001 - inode gone
            return False
        old = await self.meta.slices(ino, chunk)
        if len(old) < 2:
            return False
        cs = self.meta.chunk_size
        limit = min(cs, max(0, node.size - chunk * cs))
        windows = plan(old, self.bsize, limit, self.threshold)
        if not windows and len(old) < 8 * self.threshold:
            return False  # scattered slices, few per window: reads are still cheap
        new: list[Slice] = []
        started: list[str] = []
        try:
            for a, b, _ in windows:
                data = await self._read(old, a, b)
                sid = new_sid()
                started.append(sid)
                self.inflight.add(sid)
                for bi in range(0, (len(data) + self.bsize - 1) // self.bsize):
                    await self.blockio.put(block_key(self.meta.ws, sid, bi),
                                           data[bi * self.bsize:(bi + 1) * self.bsize])
                new.append(Slice(sid, len(data), self.bsize, a, 0, len(data)))
            drop = hidden_slices(old + new)
            drop = [s for s in drop if s not in new]
            if not new and not drop:
                return False
            await self.meta.compact(ino, chunk, old, new, drop)
        finally:
            self.inflight.difference_update(started)
        self.compactions += 1
        return True
