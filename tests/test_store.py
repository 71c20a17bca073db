"""LocalStore: the ObjectStore contract on a real directory."""
import threading
import time

import pytest
import trio

from backend.local import LocalStore
from backend.store import AlreadyExists, NotFound, StoreError


async def test_local_store_contract(tmp_path):
    s = LocalStore(str(tmp_path / "store"))
    await s.check()
    await s.put("ws/a/blocks/x1", b"hello world")
    await s.put("ws/a/blocks/x0", [b"hel", bytearray(b"lo"), memoryview(b" there")])
    assert await s.get("ws/a/blocks/x0") == b"hello there"
    assert await s.get("ws/a/blocks/x1", 6, 11) == b"world"
    assert await s.get("ws/a/blocks/x1", 6) == b"world"
    with pytest.raises(AlreadyExists):
        await s.put("ws/a/blocks/x1", b"other", create_only=True)
    assert await s.get("ws/a/blocks/x1") == b"hello world"
    await s.put("ws/a/blocks/x1", b"replaced")
    assert await s.get("ws/a/blocks/x1") == b"replaced"
    await s.put("ws/b/journal/1", b"j")
    assert await s.list_keys("ws/a/") == ["ws/a/blocks/x0", "ws/a/blocks/x1"]
    assert await s.list_keys("ws/") == ["ws/a/blocks/x0", "ws/a/blocks/x1", "ws/b/journal/1"]
    assert (await s.head("ws/b/journal/1")).size == 1
    assert await s.head("nope") is None
    with pytest.raises(NotFound):
        await s.get("nope")
    await s.delete("ws/b/journal/1")
    await s.delete("ws/b/journal/1")
    assert await s.list_keys("ws/b/") == []
    for bad in ("", "/abs", "a/../b"):
        with pytest.raises(StoreError):
            await s.put(bad, b"x")
    await s.barrier()


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
