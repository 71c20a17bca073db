"""Reading file bytes: resolve committed and pending slices, fetch blocks, readahead.

Reads overlay the inode's uncommitted slices (newest) on its committed ones,
so a writer's own unflushed bytes are visible to every reader at once.
Holes read as zeros without any fetch.
"""
from __future__ import annotations

import trio

from agentmount.chunks.blockio import BlockIO
from agentmount.chunks.layout import Slice, block_key, resolve
from agentmount.meta.service import NamespaceService
from agentmount.vfs.writer import DirtyFile, PendingSlice


class Reader:
    """Reads ranges of files of one workspace and prefetches ahead of sequential readers."""

    def __init__(self, ws: str, meta: NamespaceService, blockio: BlockIO, bsize: int, readahead_blocks: int,
                 nursery: trio.Nursery) -> None:
        self.ws = ws
        self.meta = meta
        self.blockio = blockio
        self.bsize = bsize
        self.readahead_blocks = readahead_blocks
        self.nursery = nursery
        self._prefetching: set[str] = set()
        self._prefetch_limit = trio.CapacityLimiter(max(1, readahead_blocks))

    async def _chunk_view(self, ino: int, idx: int, dirty: DirtyFile | None
                          ) -> tuple[list[Slice], dict[str, PendingSlice]]:
        slices = await self.meta.slices(ino, idx)
        pend: dict[str, PendingSlice] = {}
        if dirty is not None:
            for p in dirty.slices:
                if p.chunk == idx and p.length:
                    slices.append(p.as_slice())
                    pend[p.sid] = p
        return slices, pend

    async def _stored(self, s: Slice, off: int, n: int, pend: dict[str, PendingSlice]) -> bytes:
        """Bytes [off, off+n) of the stored data of slice `s`."""
        p = pend.get(s.sid)
        if p is not None:
            data = p.read_stored(off, n)
            if data is not None:
                return data
        bs = s.bsize
        first, last = off // bs, (off + n - 1) // bs
        if first == last:
            blk = await self.blockio.get(block_key(self.ws, s.sid, first))
            o = off - first * bs
            return blk[o:o + n]
        parts = []
        pos = off
        stop = off + n
        for bi in range(first, last + 1):
            if p is not None:
                data = p.read_stored(pos, min(stop, (bi + 1) * bs) - pos)
                if data is not None:
                    parts.append(data)
                    pos += len(data)
                    continue
            blk = await self.blockio.get(block_key(self.ws, s.sid, bi))
            o = pos - bi * bs
            take = min(stop, (bi + 1) * bs) - pos
            parts.append(blk[o:o + take])
            pos += take
        return b"".join(parts)

    async def read(self, ino: int, off: int, size: int, file_size: int, chunk_size: int,
                   dirty: DirtyFile | None) -> bytes:
        end = min(off + size, file_size)
        if off >= end:
            return b""
        first, last = off // chunk_size, (end - 1) // chunk_size
        if first == last:
            base = first * chunk_size
            slices, pend = await self._chunk_view(ino, first, dirty)
            segs = resolve(slices, off - base, end - base)
            if len(segs) == 1:
                g = segs[0]
                if g.slice is None:
                    return bytes(end - off)
                return await self._stored(g.slice, g.slice.off, g.len, pend)
        out = bytearray(end - off)
        for idx in range(first, last + 1):
            base = idx * chunk_size
            a, b = max(off, base) - base, min(end, base + chunk_size) - base
            slices, pend = await self._chunk_view(ino, idx, dirty)
            for g in resolve(slices, a, b):
                if g.slice is None:
                    continue
                data = await self._stored(g.slice, g.slice.off, g.len, pend)
                dst = base + g.pos - off
                out[dst:dst + g.len] = data
        return out  # type: ignore[return-value]  # any buffer does for a FUSE reply

    def readahead(self, ino: int, off: int, file_size: int, chunk_size: int) -> None:
        """Warm the caches with the blocks after `off` (sequential reader detected)."""
        if self.readahead_blocks <= 0 or off >= file_size:
            return
        end = min(file_size, off + self.readahead_blocks * self.bsize)
        self.nursery.start_soon(self._prefetch, ino, off, end, chunk_size)

    async def _block_keys(self, ino: int, off: int, end: int, chunk_size: int) -> list[tuple[str, int]]:
        """(key, file offset where that block's bytes end) of every stored block serving [off, end)."""
        out: list[tuple[str, int]] = []
        for idx in range(off // chunk_size, (end - 1) // chunk_size + 1):
            base = idx * chunk_size
            a, b = max(off, base) - base, min(end, base + chunk_size) - base
            for g in resolve(await self.meta.slices(ino, idx), a, b):
                s = g.slice
                if s is None:
                    continue
                for bi in range(s.off // s.bsize, (s.off + s.len - 1) // s.bsize + 1):
                    out.append((block_key(self.ws, s.sid, bi), base + g.pos + (bi + 1) * s.bsize - s.off))
        return out

    async def _prefetch(self, ino: int, off: int, end: int, chunk_size: int) -> None:
        try:
            for key, _ in await self._block_keys(ino, off, end, chunk_size):
                if key in self._prefetching or self.blockio.mem.get(key) is not None:
                    continue
                self._prefetching.add(key)
                self.nursery.start_soon(self._fetch_one, key)
        except Exception:  # noqa: BLE001 - prefetch is best effort; the real read reports errors
            pass

    def drop_behind(self, ino: int, off: int, end: int, chunk_size: int) -> None:
        """A sequential reader has passed [off, end): its blocks leave the memory cache.

        The kernel's page cache now holds those bytes, so a second copy here only
        crowds out blocks that may still be wanted, and it pins read buffers: a cold
        read would otherwise fault in (zero) a fresh buffer for every block until the
        cache is full. Blocks that also serve bytes at or past `end` stay.
        """
        if off < end:
            self.nursery.start_soon(self._drop, ino, off, end, chunk_size)

    async def _drop(self, ino: int, off: int, end: int, chunk_size: int) -> None:
        try:
            keys = await self._block_keys(ino, off, end, chunk_size)
        except Exception:  # noqa: BLE001 - best effort, like prefetch
            return
        for key, block_end in keys:
            if block_end <= end:
                self.blockio.mem.discard(key)

    async def _fetch_one(self, key: str) -> None:
        try:
            async with self._prefetch_limit:
                await self.blockio.get(key)
        except Exception:  # noqa: BLE001 - best effort
            pass
        finally:
            self._prefetching.discard(key)
