"""LocalStore: the ObjectStore contract on a real directory."""
import threading
import time

import pytest
import trio

from backend.local import LocalStore
from backend.replicated import ReplicatedStore
from tests.store_contract import check_contract


async def test_local_store_contract(tmp_path):
    await check_contract(LocalStore(str(tmp_path / "store")))


async def test_replicated_store_contract(tmp_path):
    await check_contract(ReplicatedStore([LocalStore(str(tmp_path / f"s{i}"), f"s{i}") for i in range(3)], 2))


async def test_a_hung_disk_does_not_hang_the_caller(tmp_path):
    s = LocalStore(str(tmp_path / "store"))
    await s.put("k/v", b"x")
    real = s._get_sync
    stalled = threading.Event()
    s._get_sync = lambda *a: (stalled.wait(10), real(*a))[1]  # a disk that stalls until released
    t = time.monotonic()
    try:
        with pytest.raises(trio.TooSlowError):
            with trio.fail_after(0.3):
                await s.get("k/v")
        assert time.monotonic() - t < 1.5
    finally:
        stalled.set()


async def test_big_objects_use_direct_io_and_read_back_exactly(tmp_path):
    import os
    direct = LocalStore(str(tmp_path / "d"))
    buffered = LocalStore(str(tmp_path / "b"), direct=False)
    for size in (256 << 10, (4 << 20) + 37, 300_001, 5):
        data = os.urandom(size)
        a, b = min(7, size // 2), size // 2
        parts = [data[:a], memoryview(data)[a:b], bytearray(data[b:])]
        for s in (direct, buffered):
            await s.put(f"k/{size}", parts, sync=False)
            await s.sync([f"k/{size}"])
            assert await s.get(f"k/{size}") == data
            assert await s.get(f"k/{size}", 3, 9) == data[3:9]
            assert (await s.head(f"k/{size}")).size == size
    assert os.listdir(tmp_path / "d" / "k") and not [f for f in os.listdir(tmp_path / "d" / "k") if ".tmp" in f]
    await direct.sync(["k/missing"])   # nothing to make durable: not an error


async def test_checked_reads_of_big_objects_share_no_bytes_while_held(tmp_path):
    """Whole-object reads for blocks come from reused buffers: a result kept by a cache or a
    reply must never be overwritten by a later read, and the buffers are reused once dropped."""
    import os
    s = LocalStore(str(tmp_path / "d"), read_buffer_size=(1 << 20) + 4096, read_buffers=4)
    blobs = {f"k/{i}": os.urandom((1 << 20) + i) for i in range(12)}
    for k, v in blobs.items():
        await s.put(k, v)
    held = {}
    for k in blobs:                          # more results held than the pool keeps
        obj, checked = await s.get_checked(k, lambda b: bytes(b[:16]), buffer=True)
        held[k] = obj
        assert checked == blobs[k][:16]
    assert all(bytes(held[k]) == v for k, v in blobs.items())
    assert len(s._read_pool) == 4
    held.clear()
    pooled = {id(b) for b in s._read_pool._bufs}
    obj, _ = await s.get_checked("k/3", len, buffer=True)
    assert bytes(obj) == blobs["k/3"] and id(obj.obj) in pooled   # a dropped buffer came back
    other, _ = await s.get_checked("k/5", len, buffer=True)
    plain, n = await s.get_checked("k/5", len)              # without buffer=True: real bytes
    assert type(plain) is bytes and plain == blobs["k/5"] and n == len(plain)
    assert other.obj is not obj.obj and bytes(obj) == blobs["k/3"]
