"""Write buffering against a real LocalStore: blocks are synced once per flush, and a failed sync
fails the writes for good instead of committing blocks the store may have dropped."""
import errno
import os

import pytest
import trio

from agentmount.chunks import block
from agentmount.chunks.blockio import BlockIO
from agentmount.chunks.cache import DiskCache, MemoryCache
from agentmount.chunks.layout import block_key
from agentmount.errors import FsError
from agentmount.vfs.writer import DirtyFile, WriteBudget
from backend.local import LocalStore
from backend.store import StoreUnavailable


class CountingStore(LocalStore):
    def __init__(self, root, fail_sync=False):
        super().__init__(root)
        self.fail_sync = fail_sync
        self.synced: list[list[str]] = []

    async def sync(self, keys):
        if self.fail_sync:
            raise StoreUnavailable("disk went away", errno.EIO)
        self.synced.append(list(keys))
        await super().sync(keys)


def _file(tmp_path, store, nursery, budget):
    bio = BlockIO(store, MemoryCache(1 << 20), DiskCache(str(tmp_path / "cache"), 1 << 20))
    return DirtyFile("ws", 1, 0, 0, 64 << 20, 1 << 20, bio, budget, nursery)


async def test_blocks_are_synced_once_per_flush(tmp_path):
    store = CountingStore(str(tmp_path / "store"))
    budget = WriteBudget(64 << 20)
    data = os.urandom((3 << 20) + 5)
    async with trio.open_nursery() as n:
        d = _file(tmp_path, store, n, budget)
        for off in range(0, len(data), 1 << 20):
            await d.write(off, data[off:off + (1 << 20)], 1)
        batch = await d.collect()
        assert len(store.synced) == 1 and len(store.synced[0]) == 4
        assert [p.unsynced for p in batch] == [[]]
        sid = batch[0].sid
        got = b"".join([bytes(block.decode(await store.get(block_key("ws", sid, i)))) for i in range(4)])
        assert got == data
        d.committed(batch)
        assert budget.used == 0


async def test_a_failed_sync_fails_the_writes_for_good(tmp_path):
    store = CountingStore(str(tmp_path / "store"), fail_sync=True)
    budget = WriteBudget(64 << 20)
    async with trio.open_nursery() as n:
        d = _file(tmp_path, store, n, budget)
        await d.write(0, os.urandom(3 << 20), 1)
        with pytest.raises(FsError) as first:
            await d.collect()
        assert first.value.errno == errno.EIO
        store.fail_sync = False  # the store recovers, but the bytes are no longer in memory
        with pytest.raises(FsError) as again:
            await d.collect()
        assert again.value.errno == errno.EIO
        with pytest.raises(FsError):
            await d.write(3 << 20, b"more", 2)
        d.drop_all()
        assert budget.used == 0 and d.empty
