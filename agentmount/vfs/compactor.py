"""Background compaction: rewrite a chunk whose committed slices pile up.

The visible bytes of the chunk's committed slices are read and stored again
as one new slice per contiguous non-hole run, then a `compact` record swaps
them in for exactly the slices that were read. Slices committed meanwhile
stay on top (newest wins), and a chunk that changed underneath (truncate)
makes the record void, so compaction never changes what a reader sees.
"""
from __future__ import annotations

import logging

import trio

from agentmount.chunks.blockio import BlockIO
from agentmount.chunks.layout import Slice, block_key, resolve
from agentmount.meta.service import NamespaceService
from agentmount.vfs.writer import new_sid

log = logging.getLogger("agentmount.compactor")


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
        segs = resolve(old, 0, limit)
        runs: list[list] = []
        for g in segs:
            if g.slice is None:
                continue
            if runs and runs[-1][-1].pos + runs[-1][-1].len == g.pos:
                runs[-1].append(g)
            else:
                runs.append([g])
        new: list[Slice] = []
        for run in runs:
            parts = [await self.read_stored(g.slice, g.slice.off, g.len, {}) for g in run]
            data = b"".join(parts)
            sid = new_sid()
            for bi in range(0, (len(data) + self.bsize - 1) // self.bsize):
                await self.blockio.put(block_key(self.meta.ws, sid, bi), data[bi * self.bsize:(bi + 1) * self.bsize])
            new.append(Slice(sid, len(data), self.bsize, run[0].pos, 0, len(data)))
        await self.meta.compact(ino, chunk, old, new)
        self.compactions += 1
        return True
