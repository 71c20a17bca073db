"""`BlockIO`: moves blocks between the VFS and the object store.

Owns: encoding/decoding in worker threads (never on the trio loop), bounded
upload and download concurrency, per-call timeouts, single-flight downloads,
and the memory and disk caches. Store failures become FsError with EIO (or
ENOSPC when the store's disk is full); a corrupt block is EIO, never bad data.
"""
from __future__ import annotations

import errno
import logging

import trio

from agentmount.chunks import block
from agentmount.chunks.cache import DiskCache, MemoryCache
from agentmount.errors import FsError
from backend.store import NotFound, ObjectStore, StoreError

log = logging.getLogger("agentmount.chunks")


def store_errno(e: StoreError) -> int:
    return errno.ENOSPC if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) else errno.EIO


class BlockIO:
    """Upload/download of block objects with caching; see module docstring."""

    def __init__(self, store: ObjectStore, mem: MemoryCache, disk: DiskCache, *, level: int = 1,
                 upload_concurrency: int = 8, download_concurrency: int = 8, cpu_threads: int = 2,
                 timeout: float = 60.0) -> None:
        self.store = store
        self.mem = mem
        self.disk = disk
        self.level = level
        self.timeout = timeout
        self._up = trio.CapacityLimiter(upload_concurrency)
        self._down = trio.CapacityLimiter(download_concurrency)
        self._cpu = trio.CapacityLimiter(cpu_threads)
        self._inflight: dict[str, trio.Event] = {}
        # Blocks committed inline in the journal whose own upload is still running:
        # served from here, never evicted, until the upload lands.
        self.pinned: dict[str, bytes] = {}
        self.uploads_in_flight = 0
        # A local-directory store reads as fast as the disk cache would: no second copy there.
        self.cache_to_disk = not store.is_local
        self.bytes_uploaded = 0
        self.bytes_downloaded = 0

    async def put(self, key: str, plain: "block.Buffer | list[block.Buffer]", sync: bool = True) -> None:
        """Encode and store one block; returns once it is durable in the store (see sync).

        `plain` may be a list of buffers (the block is their concatenation): they
        are hashed, compressed and written without being joined first.
        """
        async with self._up:
            self.uploads_in_flight += 1
            try:
                header, payload = await trio.to_thread.run_sync(block.encode_parts, plain, self.level,
                                                                limiter=self._cpu)
                obj = [header, *payload]
                try:
                    with trio.fail_after(self.timeout):
                        await self.store.put(key, obj, sync=sync)
                except trio.TooSlowError:
                    log.error("upload of %s timed out", key)
                    raise FsError(errno.EIO, f"store timeout writing {key}") from None
                except StoreError as e:
                    log.error("upload of %s failed: %s", key, e)
                    raise FsError(store_errno(e), str(e)) from None
                self.bytes_uploaded += sum(len(b) for b in obj)
            finally:
                self.uploads_in_flight -= 1
        if isinstance(plain, (bytes, memoryview)):
            self.mem.put(key, plain)
        if self.cache_to_disk:
            await self.disk.put(key, obj)

    async def put_many(self, items: list[tuple[str, bytes]], sync: bool = True) -> None:
        """Encode and store small blocks: one worker-thread call to encode them all, one
        store call to write them (a single thread hop for a local store) instead of two hops
        each. EIO (or the store's errno) when any fails; then none is cached."""
        async with self._up:
            self.uploads_in_flight += len(items)
            try:
                encoded = await trio.to_thread.run_sync(
                    lambda: [(k, list(_flat(block.encode_parts(d, self.level)))) for k, d in items],
                    limiter=self._cpu)
                try:
                    with trio.fail_after(self.timeout):
                        await self.store.put_many(encoded, sync=sync)
                except trio.TooSlowError:
                    log.error("upload of %d blocks timed out", len(items))
                    raise FsError(errno.EIO, f"store timeout writing {len(items)} blocks") from None
                except StoreError as e:
                    log.error("upload of %d blocks failed: %s", len(items), e)
                    raise FsError(store_errno(e), str(e)) from None
                self.bytes_uploaded += sum(len(b) for _, obj in encoded for b in obj)
            finally:
                self.uploads_in_flight -= len(items)
        for (key, plain), (_, obj) in zip(items, encoded):
            self.mem.put(key, plain)
            if self.cache_to_disk:
                await self.disk.put(key, obj)

    async def sync(self, keys: list[str]) -> None:
        """Make blocks stored with put(sync=False) durable; EIO/ENOSPC when the store cannot."""
        if not keys:
            return
        try:
            with trio.fail_after(self.timeout):
                await self.store.sync(keys)
        except trio.TooSlowError:
            log.error("syncing %d blocks timed out", len(keys))
            raise FsError(errno.EIO, "store timeout syncing blocks") from None
        except StoreError as e:
            log.error("syncing %d blocks failed: %s", len(keys), e)
            raise FsError(store_errno(e), str(e)) from None

    async def get(self, key: str) -> bytes:
        """Return the verified plain bytes of a block (EIO when missing or corrupt)."""
        v = self.mem.get(key)
        if v is not None:
            return v
        v = self.pinned.get(key)
        if v is not None:
            return v
        while key in self._inflight:
            await self._inflight[key].wait()
            v = self.mem.get(key)
            if v is not None:
                return v
        ev = self._inflight[key] = trio.Event()
        try:
            v = await self.disk.get(key) if self.cache_to_disk else None
            if v is None:
                v = await self._fetch(key)
            self.mem.put(key, v)
            return v
        finally:
            del self._inflight[key]
            ev.set()

    async def _fetch(self, key: str) -> bytes:
        async with self._down:
            try:
                with trio.fail_after(self.timeout):
                    # Checked where it is fetched: a replicated store then falls over to a good copy.
                    obj, plain = await self.store.get_checked(key, block.decode, buffer=True)
            except trio.TooSlowError:
                raise FsError(errno.EIO, f"store timeout reading {key}") from None
            except NotFound:
                log.error("block %s is missing from the store", key)
                raise FsError(errno.EIO, f"missing block {key}") from None
            except block.CorruptObject as e:
                log.error("block %s is corrupt: %s", key, e)
                raise FsError(errno.EIO, f"corrupt block {key}: {e}") from None
            except StoreError as e:
                log.error("reading block %s failed: %s", key, e)
                raise FsError(errno.EIO, str(e)) from None
            self.bytes_downloaded += len(obj)
        if self.cache_to_disk:
            await self.disk.put(key, obj)
        return plain

    async def delete(self, key: str) -> None:
        self.mem.discard(key)
        self.disk.discard(key)
        try:
            with trio.fail_after(self.timeout):
                await self.store.delete(key)
        except (StoreError, trio.TooSlowError) as e:
            log.warning("deleting %s failed (left for the collector): %s", key, e)


def _flat(encoded: "tuple[bytes, list]") -> list:
    header, payload = encoded
    return [header, *payload]
