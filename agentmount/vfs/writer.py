"""Write buffering of one inode: pending slices, block uploads, commit.

A `DirtyFile` holds the writes to an inode not yet committed to the
namespace, as `PendingSlice`s in write order (newest last). Each slice is one
contiguous run inside one chunk, stored under a fresh random id. As soon as a
slice has a full block buffered, that block uploads in the background; the
rest uploads when the file is flushed (close, fsync) or when the global
`WriteBudget` runs out, which also seals the slice. `flush` then commits all
uploaded slices as one journal record and, when asked, waits until it is
durable. Upload failures are kept and reported by the next flush, like a
local filesystem reports write-back errors at fsync/close.
"""
from __future__ import annotations

import errno
import logging
import secrets

import trio

from agentmount.chunks.blockio import BlockIO
from agentmount.chunks.layout import Slice, block_key
from agentmount.errors import FsError
from agentmount.vfs.pieces import Buffer, PieceBuffer, gather, nbytes

log = logging.getLogger("agentmount.vfs")


def new_sid() -> str:
    return secrets.token_hex(12)


class WriteBudget:
    """A hard cap on buffered write bytes; writers wait for room, pressure seals buffers."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._changed = trio.Event()
        self.pressure_cb = None  # set by the VFS: seals every dirty file

    async def reserve(self, n: int, check=None) -> None:
        """Take `n` bytes, waiting while full; `check()` may raise to abort the wait."""
        while self.used > 0 and self.used + n > self.capacity:
            if self.pressure_cb is not None:
                self.pressure_cb()
            ev = self._changed
            await ev.wait()
            if check is not None:
                check()
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n
        self.poke()

    def poke(self) -> None:
        """Wake waiting writers (room was freed, or an upload failed)."""
        ev, self._changed = self._changed, trio.Event()
        ev.set()


class PendingSlice:
    """Buffered bytes of one slice. `buf` holds stored bytes [base, base+len(buf))."""

    __slots__ = ("chunk", "pos", "sid", "bsize", "buf", "base", "inflight", "uploading", "sealed", "error",
                 "done", "unbudgeted", "inline", "unsynced", "lost")

    def __init__(self, chunk: int, pos: int, bsize: int) -> None:
        self.chunk = chunk
        self.pos = pos
        self.sid = new_sid()
        self.bsize = bsize
        self.buf = PieceBuffer()
        self.base = 0                          # stored bytes before `buf` went to blocks
        self.inflight: dict[int, list[Buffer]] = {}   # block index -> buffers being uploaded
        self.uploading = 0
        self.sealed = False
        self.error: FsError | None = None
        self.done = trio.Event()
        self.done.set()
        self.unbudgeted: set[int] = set()     # failed blocks whose bytes no longer count in the budget
        self.inline = False                   # kept in memory to be committed inline, never uploaded here
        self.unsynced: list[str] = []         # uploaded blocks not yet made durable (synced at collect)
        self.lost: FsError | None = None      # syncing its blocks failed: their bytes may be gone

    @property
    def length(self) -> int:
        return self.base + len(self.buf)

    @property
    def end(self) -> int:
        return self.pos + self.length

    def as_slice(self) -> Slice:
        n = self.length
        return Slice(self.sid, n, self.bsize, self.pos, 0, n)

    def read_stored(self, off: int, n: int) -> bytes | None:
        """Bytes [off, off+n) of the stored data if buffered in memory, else None."""
        if off >= self.base:
            rel = off - self.base
            if rel + n > len(self.buf):
                return None  # committed inline meanwhile: the pinned block serves it
            return self.buf.read(rel, n)
        bi = off // self.bsize
        parts = self.inflight.get(bi)
        if parts is not None and off + n <= (bi + 1) * self.bsize:
            return gather(parts, off - bi * self.bsize, n)
        return None


class DirtyFile:
    """Uncommitted writes of one inode; see module docstring."""

    def __init__(self, ws: str, ino: int, size: int, mtime: int, chunk_size: int, bsize: int,
                 blockio: BlockIO, budget: WriteBudget, nursery: trio.Nursery) -> None:
        self.ws = ws
        self.ino = ino
        self.size = size
        self.mtime = mtime
        self.chunk_size = chunk_size
        self.bsize = bsize
        self.blockio = blockio
        self.budget = budget
        self.nursery = nursery
        self.slices: list[PendingSlice] = []
        self.lock = trio.Lock()
        self.error: FsError | None = None

    @property
    def empty(self) -> bool:
        return not self.slices

    def pending_sids(self) -> set[str]:
        return {p.sid for p in self.slices}

    def raise_error(self) -> None:
        """Raise the first upload error of this file (ENOSPC/EIO reach the writer early)."""
        for p in self.slices:
            if p.lost is not None:
                raise p.lost
            if p.error is not None:
                raise p.error

    async def write(self, off: int, data: bytes, now: int) -> None:
        self.raise_error()
        await self.budget.reserve(len(data), self.raise_error)
        view = memoryview(data)
        cs = self.chunk_size
        pos = off
        while view:
            idx, cpos = divmod(pos, cs)
            n = min(len(view), cs - cpos)
            self._write_chunk(idx, cpos, view[:n])
            view = view[n:]
            pos += n
        if off + len(data) > self.size:
            self.size = off + len(data)
        self.mtime = now

    def _write_chunk(self, idx: int, pos: int, data: memoryview) -> None:
        last = self.slices[-1] if self.slices else None
        if (last is not None and not last.sealed and last.chunk == idx
                and last.pos + last.base <= pos <= last.end):
            overlap = last.buf.write_at(pos - last.pos - last.base, data)
            if overlap:
                self.budget.release(overlap)
            p = last
        else:
            p = PendingSlice(idx, pos, self.bsize)
            p.buf.append(data)
            self.slices.append(p)
        while len(p.buf) >= self.bsize:
            self._start_upload(p, final=False)

    def _start_upload(self, p: PendingSlice, final: bool) -> None:
        n = self.bsize if not final else min(self.bsize, len(p.buf))
        if n == 0:
            return
        data = p.buf.take(n)   # buffers never changed after this
        bi = p.base // self.bsize
        p.base += n
        p.inflight[bi] = data
        if p.uploading == 0:
            p.done = trio.Event()
        p.uploading += 1
        self.nursery.start_soon(self._upload, p, bi, data)

    async def _upload(self, p: PendingSlice, bi: int, data: list[Buffer]) -> None:
        key = block_key(self.ws, p.sid, bi)
        try:
            # Not synced one by one: collect() syncs all of a flush's blocks at once, which lets
            # the disk stream a big file instead of stopping at every block.
            await self.blockio.put(key, data, sync=False)
        except Exception as e:  # noqa: BLE001 - reported to the writer and at flush
            if not isinstance(e, FsError):
                log.exception("upload of %s failed", key)
                e = FsError(errno.EIO, str(e))
            p.error = e
            # Hand the bytes back to the budget so other writers never wait on a failed store;
            # they stay in `inflight` for a retry at the next flush.
            if bi not in p.unbudgeted and bi in p.inflight:
                p.unbudgeted.add(bi)
                self.budget.release(nbytes(data))
            else:
                self.budget.poke()
        else:
            p.unsynced.append(key)
            if p.inflight.pop(bi, None) is not None and bi not in p.unbudgeted:
                self.budget.release(nbytes(data))
            p.unbudgeted.discard(bi)
        finally:
            p.uploading -= 1
            if p.uploading == 0:
                p.done.set()

    def seal(self, inline_max: int = 0) -> None:
        """Upload every buffered byte now; later writes start new slices.

        Slices of at most `inline_max` bytes that never uploaded a block stay
        in memory: the caller commits their bytes inline in the journal record.
        """
        for p in self.slices:
            if not p.sealed:
                p.sealed = True
                if inline_max and p.base == 0 and len(p.buf) <= inline_max:
                    p.inline = True
                    continue
                while p.buf:
                    self._start_upload(p, final=True)

    async def _retry_failed(self, p: PendingSlice) -> None:
        """Re-upload blocks whose upload failed (their bytes are still in `inflight`)."""
        p.error = None
        for bi, data in sorted(p.inflight.items()):
            if p.uploading == 0:
                p.done = trio.Event()
            p.uploading += 1
            self.nursery.start_soon(self._upload, p, bi, data)
        await p.done.wait()

    async def collect(self, inline_max: int = 0) -> list[PendingSlice]:
        """Seal, wait for uploads, return the slices (raise the first upload error).

        Slices still holding bytes in `buf` afterwards are the inline ones.
        """
        self.seal(inline_max)
        batch = list(self.slices)
        for p in batch:
            await p.done.wait()
            if p.lost is not None:
                raise p.lost
            if p.error is not None:
                await self._retry_failed(p)
            if p.error is not None:
                raise p.error
        keys = [k for p in batch for k in p.unsynced]
        try:
            await self.blockio.sync(keys)
        except FsError as e:
            # The store may have dropped the bytes, and they are no longer in memory:
            # these writes fail for good (like write-back errors of a local file system).
            for p in batch:
                if p.unsynced:
                    p.lost = FsError(errno.EIO, f"store lost written blocks: {e}")
            raise
        for p in batch:
            p.unsynced.clear()
        return batch

    def committed(self, batch: list[PendingSlice]) -> None:
        for p in batch:
            if p.buf:
                # Committed inline: the bytes now live in the journal and the pinned cache; their
                # share of the budget is released when their background upload lands.
                p.buf.clear()
        ids = {id(p) for p in batch}
        self.slices = [p for p in self.slices if id(p) not in ids]

    def uploaded_keys(self) -> list[str]:
        """Keys of blocks already stored for the pending slices (garbage if they are dropped)."""
        keys = []
        for p in self.slices:
            for bi in range((p.base + self.bsize - 1) // self.bsize):
                if bi not in p.inflight:
                    keys.append(block_key(self.ws, p.sid, bi))
        return keys

    def drop_all(self) -> None:
        """Forget buffered writes (the inode is gone, or they failed); release their budget."""
        for p in self.slices:
            n = len(p.buf) + sum(nbytes(d) for bi, d in p.inflight.items() if bi not in p.unbudgeted)
            p.buf.clear()
            p.inflight.clear()
            if n:
                self.budget.release(n)
        self.slices = []
