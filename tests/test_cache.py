"""Block caches: hard byte caps, LRU order, corrupt or unwritable disk entries never fail a read."""
import os

from agentmount.chunks import block
from agentmount.chunks.cache import DiskCache, MemoryCache


def test_memory_cache_is_capped_and_lru():
    c = MemoryCache(10_000)
    for i in range(10):
        c.put(f"k{i}", bytes(2000))
        assert c.used <= 10_000
    assert c.get("k0") is None and c.get("k9") is not None
    c.get("k5")
    c.put("new", bytes(2000))
    assert c.get("k5") is not None  # recently used survives
    c.put("huge", bytes(9000))      # larger than a quarter of the cap: not cached
    assert c.get("huge") is None


async def test_disk_cache_cap_eviction_reload_and_corruption(tmp_path):
    root = tmp_path / "cache"
    c = DiskCache(str(root), 300_000)
    c.load()
    blobs = {f"ws/w/blocks/aa/s{i}_0": os.urandom(50_000) for i in range(12)}
    for k, v in blobs.items():
        await c.put(k, block.encode(v))
        assert c.used <= 300_000
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
    assert on_disk <= 300_000
    last = list(blobs)[-1]
    assert await c.get(last) == blobs[last]
    assert await c.get(list(blobs)[0]) is None  # evicted

    # A restart indexes what is there; a corrupt entry is dropped, not returned.
    c2 = DiskCache(str(root), 300_000)
    c2.load()
    assert c2.used == c.used
    name = c2._name(last)
    with open(c2._path(name), "r+b") as f:
        f.seek(40)
        f.write(b"\x00\xff\x00\xff")
    assert await c2.get(last) is None
    assert await c2.get(last) is None


async def test_disk_cache_on_unwritable_dir_is_a_no_op(tmp_path):
    target = tmp_path / "file-not-dir"
    target.write_text("x")
    c = DiskCache(str(target / "cache"), 1 << 20)
    c.load()
    assert c.disabled_reason
    await c.put("k", block.encode(b"data"))
    assert await c.get("k") is None
