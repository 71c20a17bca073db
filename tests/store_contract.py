"""The ObjectStore contract, checked the same way on every store kind."""
import time

import pytest

from backend.store import AlreadyExists, NotFound, StoreError


async def check_contract(s) -> None:
    """Run the whole contract on an empty store `s` (leaves x0, x1, new and empty keys behind)."""
    await s.check()
    await s.put("ws/a/blocks/x1", b"hello world")
    await s.put("ws/a/blocks/x0", [b"hel", bytearray(b"lo"), memoryview(b" there")])
    assert await s.get("ws/a/blocks/x0") == b"hello there"
    assert await s.get("ws/a/blocks/x1", 6, 11) == b"world"
    assert await s.get("ws/a/blocks/x1", 6) == b"world"
    assert await s.get("ws/a/blocks/x1", 6, 100) == b"world"
    assert await s.get("ws/a/blocks/x1", None, 5) == b"hello"
    assert await s.get("ws/a/blocks/x1", 11) == b""
    assert await s.get("ws/a/blocks/x1", 50, 60) == b""
    assert await s.get("ws/a/blocks/x1", 3, 3) == b""
    with pytest.raises(AlreadyExists):
        await s.put("ws/a/blocks/x1", b"other", create_only=True)
    assert await s.get("ws/a/blocks/x1") == b"hello world"
    await s.put("ws/a/blocks/x1", b"replaced")
    assert await s.get("ws/a/blocks/x1") == b"replaced"
    await s.put("ws/a/blocks/new", b"n", create_only=True)
    await s.put("ws/b/journal/1", b"j")
    await s.put("ws/empty", b"")
    assert await s.get("ws/empty") == b""
    assert await s.list_keys("ws/a/") == ["ws/a/blocks/new", "ws/a/blocks/x0", "ws/a/blocks/x1"]
    assert await s.list_keys("ws/") == ["ws/a/blocks/new", "ws/a/blocks/x0", "ws/a/blocks/x1",
                                        "ws/b/journal/1", "ws/empty"]
    assert await s.list_keys("nothing/") == []
    info = await s.head("ws/b/journal/1")
    assert info.key == "ws/b/journal/1" and info.size == 1 and abs(info.mtime - time.time()) < 300
    assert await s.head("nope") is None
    with pytest.raises(NotFound):
        await s.get("nope")
    with pytest.raises(NotFound):
        await s.get("nope", 2, 4)
    with pytest.raises(NotFound):
        await s.get("nope", 4, 4)
    await s.delete("ws/b/journal/1")
    await s.delete("ws/b/journal/1")
    assert await s.list_keys("ws/b/") == []
    for bad in ("", "/abs", "a/../b", "a//b", "dir/"):
        with pytest.raises(StoreError):
            await s.put(bad, b"x")
    await s.barrier()
    await s.sync(["ws/a/blocks/x1"])
