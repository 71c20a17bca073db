"""Append-only journal logs on a store that writes in place (a real LocalStore).

A durable commit appends one frame to the workspace's current log. These tests check that
recovery reads logs exactly (rolled logs, snapshots and pruning included), that a torn last
append (a crash in the middle of it) is dropped while damage anywhere else is reported, that
a failed append goes on in a new log without losing or repeating a record, and that scrub
and fsck accept the logs a mount writes.
"""
from __future__ import annotations

import os
import stat as st

import pytest
import trio

from agentmount.chunks import block
from agentmount.meta import journal as jr
from agentmount.meta.service import LocalNamespace
from agentmount.meta.state import ROOT_INO, NamespaceState
from backend.local import LocalStore
from backend.store import StoreUnavailable

WS = "w"


def fresh() -> NamespaceState:
    return NamespaceState(WS, 1 << 20)


async def open_ns(store, epoch: int = 1) -> LocalNamespace:
    loaded = await jr.load(store, WS, fresh())
    return LocalNamespace(store, loaded.state, jr.Journal(store, WS, epoch, loaded.state.seq, window=0.0,
                                                          timeout=10))


async def make_files(ns: LocalNamespace, names) -> None:
    for name in names:
        await ns.mknod(ROOT_INO, name, st.S_IFREG | 0o644, 0, 0)
        await ns.sync()      # one durable append each


def logs(root) -> list[str]:
    d = os.path.join(root, "ws", WS, "journal")
    return sorted(os.path.join(d, f) for f in os.listdir(d))


def frames(n: int) -> bytes:
    return b"".join(jr.encode_frame(jr.encode_segment(WS, 1, [{"seq": i + 1, "op": "x", "pad": b"p" * i}]))
                    for i in range(n))


def test_decode_log_reads_every_frame_and_drops_only_a_torn_tail():
    data = frames(3)
    segs, torn = jr.decode_log(data)
    assert [s["first"] for s in segs] == [1, 2, 3] and torn == 0
    last = len(frames(2))
    for cut in range(last + 1, len(data)):           # every way the last append can be torn
        segs, torn = jr.decode_log(data[:cut])
        assert [s["first"] for s in segs] == [1, 2] and torn == cut - last
    segs, torn = jr.decode_log(data + bytes(4096))   # size grew, data never landed
    assert len(segs) == 3 and torn == 4096
    bad = bytearray(data)
    bad[last - 3] ^= 0x40                            # damage inside the second of three frames
    with pytest.raises(block.CorruptBlock):
        jr.decode_log(bytes(bad))
    bad = bytearray(data)
    bad[len(frames(1))] ^= 0x01                      # a frame header in the middle
    with pytest.raises(block.CorruptBlock):
        jr.decode_log(bytes(bad))


async def test_a_big_torn_log_read_from_a_local_store_decodes(tmp_path):
    """Logs over 256 KiB come off a local store by direct I/O; the checked read must still hand
    decode_log real bytes (it searches them for the next frame after a torn one)."""
    store = LocalStore(str(tmp_path / "store"))
    big = b"".join(jr.encode_frame(jr.encode_segment(WS, 1, [{"seq": i + 1, "op": "x", "pad": os.urandom(9000)}]))
                   for i in range(40))
    assert len(big) > 300_000
    await store.put("w/log", big + big[:100])        # a torn last append
    data, (segs, torn) = await store.get_checked("w/log", jr.decode_log)
    assert len(segs) == 40 and torn == 100 and type(data) is bytes


async def test_records_roll_over_logs_and_replay_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(jr, "LOG_ROLL_BYTES", 2000)
    store = LocalStore(str(tmp_path / "s"), "s")
    names = [b"f%03d" % i for i in range(60)]
    async with trio.open_nursery() as n:
        ns = await open_ns(store)
        n.start_soon(ns.journal.run)
        await make_files(ns, names)
        n.cancel_scope.cancel()
    keys = logs(tmp_path / "s")
    assert len(keys) > 3 and all(k.endswith(".log") for k in keys), keys
    assert ns.journal.segments_written == 60     # one append per durable commit
    again = await jr.load(store, WS, fresh())
    assert again.state.seq == ns.state.seq and set(again.state.dirs[ROOT_INO]) == set(names)

    # A snapshot prunes the logs it covers; replay from it still finds everything.
    async with trio.open_nursery() as n:
        ns = await open_ns(store, 2)
        n.start_soon(ns.journal.run)
        await ns.snapshot()
        await make_files(ns, [b"after"])
        n.cancel_scope.cancel()
    assert len(logs(tmp_path / "s")) < len(keys) + 1
    again = await jr.load(store, WS, fresh())
    assert set(again.state.dirs[ROOT_INO]) == set(names) | {b"after"}


async def test_a_local_store_gets_raw_segments_others_compressed(tmp_path):
    recs = [{"seq": 1, "op": "commit_write", "inline": {"s1": b"print('hello')\n" * 400}}]
    packed, raw = jr.encode_segment(WS, 1, recs), jr.encode_segment(WS, 1, recs, compress=False)
    codec = 4   # byte of the block header that names the codec
    assert packed[codec] == block.CODEC_ZSTD and raw[codec] == block.CODEC_RAW and len(raw) > len(packed)
    assert jr.decode_segment(packed) == jr.decode_segment(raw)

    class Remote:   # what Journal reads of a store that is not a local disk
        is_local = False
        appendable = False
    assert jr.Journal(Remote(), WS, 1, 0).compress       # S3: bytes on the wire cost more
    store = LocalStore(str(tmp_path / "s"), "s")
    async with trio.open_nursery() as n:
        ns = await open_ns(store)
        assert not ns.journal.compress      # on a local disk, writing is cheaper than compressing
        n.start_soon(ns.journal.run)
        await make_files(ns, [b"a", b"b"])
        n.cancel_scope.cancel()
    with open(logs(tmp_path / "s")[0], "rb") as f:
        first = f.read()
    assert first[jr._FRAME.size + codec] == block.CODEC_RAW
    assert set((await jr.load(store, WS, fresh())).state.dirs[ROOT_INO]) == {b"a", b"b"}


async def test_snapshots_are_taken_in_the_background_once_records_pile_up(tmp_path):
    store = LocalStore(str(tmp_path / "s"), "s")
    async with trio.open_nursery() as n:
        ns = await open_ns(store)
        ns.snapshot_records = 5
        n.start_soon(ns.run)
        await make_files(ns, [b"f%d" % i for i in range(12)])
        with trio.fail_after(30):
            while not await store.list_keys(jr.snapshot_prefix(WS)):
                await trio.sleep(0.01)
        assert ns.journal.records_since_snapshot < 12
        n.cancel_scope.cancel()
    again = await jr.load(store, WS, fresh())
    assert set(again.state.dirs[ROOT_INO]) == {b"f%d" % i for i in range(12)}


async def test_recovery_keeps_request_ids_as_long_as_configured(tmp_path):
    store = LocalStore(str(tmp_path / "s"), "s")
    async with trio.open_nursery() as n:
        ns = await open_ns(store)
        n.start_soon(ns.journal.run)
        await make_files(ns, [b"a"])
        await ns.snapshot()
        n.cancel_scope.cancel()
    fresh_state = fresh()
    fresh_state.rids.seconds = 123.0
    loaded = await jr.load(store, WS, fresh_state)   # from the snapshot, not the fresh state
    assert loaded.state is not fresh_state and loaded.state.rids.seconds == 123.0


async def test_torn_last_append_is_dropped_and_the_next_leader_goes_on(tmp_path):
    store = LocalStore(str(tmp_path / "s"), "s")
    async with trio.open_nursery() as n:
        ns = await open_ns(store)
        n.start_soon(ns.journal.run)
        await make_files(ns, [b"a", b"b", b"c"])
        n.cancel_scope.cancel()
    (log,) = logs(tmp_path / "s")
    size = os.path.getsize(log)
    os.truncate(log, size - 5)                       # the append of "c" torn by a crash
    again = await jr.load(store, WS, fresh())
    assert set(again.state.dirs[ROOT_INO]) == {b"a", b"b"}
    async with trio.open_nursery() as n:
        ns = await open_ns(store, 2)
        n.start_soon(ns.journal.run)
        await make_files(ns, [b"d"])
        n.cancel_scope.cancel()
    assert len(logs(tmp_path / "s")) == 2            # the next epoch writes a log of its own
    again = await jr.load(store, WS, fresh())
    assert set(again.state.dirs[ROOT_INO]) == {b"a", b"b", b"d"}

    with open(log, "r+b") as f:                      # now damage an acknowledged frame
        f.seek(20)
        b = f.read(1)
        f.seek(20)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(jr.RecoveryError, match="corrupt"):
        await jr.load(store, WS, fresh())


class TearingStore(LocalStore):
    """A real LocalStore whose next append writes half its bytes, then fails (a disk error)."""

    tear_next = False

    async def write_at(self, key, data, offset, *, sync=True):
        if self.tear_next:
            self.tear_next = False
            half = bytes(data)[:len(data) // 2]
            await super().write_at(key, half, offset, sync=sync)
            raise StoreUnavailable(f"{key}: injected write error")
        await super().write_at(key, data, offset, sync=sync)


async def test_failed_append_goes_on_in_a_new_log_without_losing_a_record(tmp_path):
    store = TearingStore(str(tmp_path / "s"), "s")
    async with trio.open_nursery() as n:
        ns = await open_ns(store)
        n.start_soon(ns.journal.run)
        await make_files(ns, [b"a", b"b"])
        store.tear_next = True
        await make_files(ns, [b"c"])                  # acknowledged after the retry
        await make_files(ns, [b"d"])
        assert ns.journal.error is None
        n.cancel_scope.cancel()
    first, second = logs(tmp_path / "s")
    assert jr.decode_log(open(first, "rb").read())[1] > 0    # the torn frame stays the old log's tail
    again = await jr.load(store, WS, fresh())
    assert again.state.seq == ns.state.seq
    assert set(again.state.dirs[ROOT_INO]) == {b"a", b"b", b"c", b"d"}


def test_scrub_and_fsck_accept_a_mounts_journal_logs(mount):
    for i in range(20):
        (mount.ws / f"f{i}").write_bytes(os.urandom(100 + i))
    mount.umount()
    journal = mount.store / "ws" / "default" / "journal"
    assert any(p.name.endswith(".log") for p in journal.iterdir())
    r = mount.cli("fsck")
    assert r.returncode == 0 and "default: clean" in r.stdout, r.stdout + r.stderr
    r = mount.cli("scrub")
    assert r.returncode == 0, r.stdout + r.stderr
    mount.mount()
    assert all((mount.ws / f"f{i}").stat().st_size == 100 + i for i in range(20))
