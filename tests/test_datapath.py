"""Data path: slices, compaction, garbage collection, write buffer cap, readahead, holes."""
import os
import random

from tests.helpers import wait_for


def _store_blocks(m):
    out = set()
    for d, _, files in os.walk(m.store / "ws" / "default" / "blocks"):
        out |= set(files)
    return out


def _status(m):
    import json
    r = m.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_random_small_writes_are_small_and_get_compacted(make_mount):
    m = make_mount(fs={"block_size_kb": 64, "compact_slices": 8, "gc_grace_s": 0})
    size = 1 << 20
    model = bytearray(os.urandom(size))
    p = m.ws / "db"
    p.write_bytes(model)
    before = _status(m)["bytes_uploaded"]
    rnd = random.Random(1)
    fd = os.open(p, os.O_RDWR)
    try:
        for i in range(40):
            off = rnd.randrange(0, 256 << 10) // 4096 * 4096  # clustered, as database pages are
            data = os.urandom(4096)
            os.pwrite(fd, data, off)
            os.fsync(fd)
            model[off:off + 4096] = data
    finally:
        os.close(fd)
    # 40 random 4 KiB writes + fsync upload about 40 x 4 KiB (plus compaction), not 40 whole blocks.
    uploaded = _status(m)["bytes_uploaded"] - before
    assert uploaded < 40 * 64 * 1024, uploaded
    assert p.read_bytes() == bytes(model)
    wait_for(lambda: _status(m)["workspaces"]["default"]["compactions"] >= 1, 30, what="a compaction")
    assert p.read_bytes() == bytes(model)
    m.remount()
    assert p.read_bytes() == bytes(model)
    assert m.cli("fsck").returncode == 0


def test_deleted_and_overwritten_data_is_collected(make_mount):
    m = make_mount(fs={"block_size_kb": 64, "gc_grace_s": 0})
    (m.ws / "a").write_bytes(os.urandom(1 << 20))
    (m.ws / "b").write_bytes(os.urandom(300_000))
    n_before = len(_store_blocks(m))
    assert n_before >= 16 + 5
    os.unlink(m.ws / "a")
    with open(m.ws / "b", "r+b") as f:
        f.truncate(0)
    wait_for(lambda: len(_store_blocks(m)) == 0, 30, what="blocks of deleted data to be removed")
    m.umount()
    assert m.cli("fsck").returncode == 0


def test_unlinked_open_file_keeps_blocks_until_close(make_mount):
    m = make_mount(fs={"block_size_kb": 64, "gc_grace_s": 0})
    data = os.urandom(500_000)
    (m.ws / "f").write_bytes(data)
    f = open(m.ws / "f", "rb")
    os.unlink(m.ws / "f")
    assert f.read() == data
    f.close()
    wait_for(lambda: not _store_blocks(m), 30, what="blocks of the closed orphan to be removed")


def test_write_buffer_is_capped(make_mount):
    # 4 MiB of buffer, 64 KiB blocks: writers wait for uploads instead of growing memory.
    m = make_mount(fs={"block_size_kb": 64, "write_buffer_mb": 4})
    data = os.urandom(24 << 20)
    with open(m.ws / "big", "wb") as f:
        for i in range(0, len(data), 1 << 20):
            f.write(data[i:i + (1 << 20)])
            assert _status(m)["write_buffer_bytes"] <= (4 << 20) + (1 << 20)
    assert (m.ws / "big").read_bytes() == data


def test_sparse_file_holes_are_not_stored(mount):
    p = mount.ws / "sparse"
    with open(p, "wb") as f:
        f.seek(100 << 20)
        f.write(b"end")
    assert os.path.getsize(p) == (100 << 20) + 3
    with open(p, "rb") as f:
        assert f.read(1 << 20) == bytes(1 << 20)
        f.seek(100 << 20)
        assert f.read() == b"end"
    # One tiny block for "end" (stored in the background), nothing for the 100 MiB hole.
    wait_for(lambda: len(_store_blocks(mount)) == 1, 30, what="the one block")
    mount.umount()
    assert len(_store_blocks(mount)) == 1


def test_sequential_read_prefetches_and_leaves_only_blocks_ahead_of_it_in_memory(make_mount):
    """A cold sequential read fetches every block; the blocks it has passed leave the memory
    cache (the kernel's page cache holds those bytes): it does not fill the cache, nor fault in a
    read buffer per block."""
    m = make_mount(fs={"block_size_kb": 1024})
    data = os.urandom(40 << 20)
    (m.ws / "seq").write_bytes(data)
    m.remount()
    with open(m.ws / "seq", "rb") as f:
        got = b"".join(iter(lambda: f.read(1 << 20), b""))
    assert got == data
    assert _status(m)["bytes_downloaded"] >= len(data)
    # Without drop-behind all 40 blocks stay cached (the cache holds 512 MiB). The last few
    # may stay: the kernel's last READs can arrive out of order, which is not read as sequential.
    wait_for(lambda: _status(m)["memory_cache_bytes"] <= 10 << 20, 10, what="passed blocks to leave the cache",
             describe=lambda: f"memory cache holds {_status(m)['memory_cache_bytes']} bytes")
    # A random reader keeps what it fetched: a re-read of the same range costs no download.
    with open(m.ws / "seq", "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)   # no kernel readahead into block 6
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # each read below reaches the daemon
        f.seek(5 << 20)
        assert f.read(4096) == data[5 << 20:(5 << 20) + 4096]
        before = _status(m)["bytes_downloaded"]
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        f.seek((5 << 20) + 8192)
        assert f.read(4096) == data[(5 << 20) + 8192:(5 << 20) + 12288]
    assert _status(m)["bytes_downloaded"] == before


def test_a_peer_alone_remembers_no_request_ids(mount):
    """Request ids exist for retries at another leader; alone there is none, so none are kept
    (a busy mount once held hundreds of thousands, and every snapshot serialized them)."""
    for i in range(50):
        (mount.ws / f"f{i}").write_bytes(b"x")
        os.rename(mount.ws / f"f{i}", mount.ws / f"g{i}")
    ws = _status(mount)["workspaces"]["default"]
    assert ws["seq"] > 100 and ws["request_ids"] == 0


def _fuse_ops(m) -> dict:
    import json
    return json.loads(os.getxattr(m.mp, "user.agentmount.fuse"))["ops"]


def test_write_only_handles_send_each_write_whole_and_cached_readers_see_it(mount):
    import mmap
    write_op = "16"   # FUSE_WRITE
    p = mount.ws / "records"
    records = [os.urandom(10240) for _ in range(20)]
    before = _fuse_ops(mount).get(write_op, 0)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for i, rec in enumerate(records):       # tar's pattern: 10 KiB at offsets off page boundaries
            assert os.pwrite(fd, rec, 512 + i * 10240) == 10240
    finally:
        os.close(fd)
    assert _fuse_ops(mount).get(write_op, 0) - before == 20    # one request per write(), none split
    expect = bytearray(512) + b"".join(records)
    assert p.read_bytes() == expect

    # A handle reading through the page cache (and a mapping of it) sees a write-only handle's
    # writes at once: the kernel drops the pages the direct write covers.
    rd = os.open(p, os.O_RDWR)
    try:
        assert os.pread(rd, 8192, 4096) == expect[4096:12288]
        view = mmap.mmap(rd, len(expect), prot=mmap.PROT_READ)
        assert view[4096:12288] == expect[4096:12288]
        new = os.urandom(6000)
        wr = os.open(p, os.O_WRONLY)
        try:
            assert os.pwrite(wr, new, 5000) == 6000
        finally:
            os.close(wr)
        expect[5000:11000] = new
        assert os.pread(rd, 8192, 4096) == expect[4096:12288]
        assert view[4096:12288] == expect[4096:12288]
        view.close()
    finally:
        os.close(rd)
    assert p.read_bytes() == expect


def test_readers_racing_a_write_only_appender_see_each_append_once_it_returns(mount):
    """A write-only handle writes past the page cache while another handle keeps reading (and
    caching) the page being appended to: once write() returns, a read through the caching
    handle shows the new bytes, as on a local file system."""
    import threading
    p = mount.ws / "log"
    p.write_bytes(b"")
    rd = os.open(p, os.O_RDONLY)
    wr = os.open(p, os.O_WRONLY | os.O_APPEND)
    stop = threading.Event()

    def hammer() -> None:                    # keeps re-reading the tail page
        while not stop.is_set():
            size = os.fstat(rd).st_size
            os.pread(rd, 4096, size // 4096 * 4096)

    t = threading.Thread(target=hammer)
    t.start()
    bad = []
    try:
        size = 0
        for i in range(400):
            line = b"%05d " % i + b"x" * (37 + i % 50) + b"\n"
            assert os.write(wr, line) == len(line)
            got = os.pread(rd, len(line), size)
            if got != line:
                bad.append((i, got[:20]))
            size += len(line)
    finally:
        stop.set()
        t.join()
        os.close(wr)
        os.close(rd)
    assert not bad, bad[:5]
