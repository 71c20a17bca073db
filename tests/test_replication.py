"""ReplicatedStore over real LocalStore replicas: quorum writes, repair on read, the persistent repair
queue, hedged reads, health. (Faults are injected by a LocalStore subclass that fails or stalls on
demand; the same behaviour over real S3 servers and through the mount is in test_replication_s3.py.)"""
import errno
import os
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from agentmount.chunks import block
from backend.local import LocalStore
from backend.replicated import ReplicatedStore
from backend.store import NotFound, StoreError, StoreUnavailable


class Faulty(LocalStore):
    """A LocalStore that can be switched down (every call fails) or slow (every call stalls)."""

    def __init__(self, root, name):
        super().__init__(root, name)
        self.down = False
        self.delay = 0.0
        self.calls = 0

    async def _run(self, fn, *args):
        self.calls += 1
        if self.delay:
            await trio.sleep(self.delay)
        if self.down:
            raise StoreUnavailable(f"{self.name} is down", errno.EIO)
        return await super()._run(fn, *args)


def _replicas(tmp_path, n=3):
    return [Faulty(str(tmp_path / f"s{i}"), f"s{i}") for i in range(n)]


def _read(p):
    try:
        return p.read_bytes()
    except FileNotFoundError:
        return None


async def _wait(cond, deadline=10.0):
    with trio.fail_after(deadline):
        while not cond():
            await trio.sleep(0.02)


async def test_quorum_write_repair_on_read_and_checked_reads(tmp_path):
    reps = _replicas(tmp_path)
    rs = ReplicatedStore(reps, 2, repair_dir=str(tmp_path / "repair"), timeout=5)
    async with trio.open_nursery() as n:
        await n.start(rs.run)
        obj = block.encode(os.urandom(100_000))
        await rs.put("ws/a/blocks/k1", obj)
        await _wait(lambda: all(os.path.exists(tmp_path / f"s{i}/ws/a/blocks/k1") for i in range(3)))
        # One copy missing, one corrupt: reads still return the right bytes and both get rewritten.
        os.unlink(tmp_path / "s0/ws/a/blocks/k1")
        bad = bytearray(obj)
        bad[-10] ^= 0xFF
        (tmp_path / "s1/ws/a/blocks/k1").write_bytes(bad)
        for r in reps:
            r.delay = 0.0
        reps[2].delay = 0.2   # make the good copy the slow one, so the bad ones are tried first
        data, plain = await rs.get_checked("ws/a/blocks/k1", block.decode)
        assert data == obj and bytes(plain) == bytes(block.decode(obj))
        reps[2].delay = 0.0
        await _wait(lambda: all(_read(tmp_path / f"s{i}/ws/a/blocks/k1") == obj for i in range(2)))
        assert rs.repaired >= 2
        with pytest.raises(NotFound):
            await rs.get("ws/a/blocks/nope")
        assert [i.key for i in [x async for x in rs.list("ws/a/")]] == ["ws/a/blocks/k1"]
        n.cancel_scope.cancel()


async def test_missed_writes_are_queued_persisted_and_drained(tmp_path):
    reps = _replicas(tmp_path)
    rs = ReplicatedStore(reps, 2, repair_dir=str(tmp_path / "repair"), timeout=5, health_interval=0.05)
    async with trio.open_nursery() as n:
        await n.start(rs.run)
        reps[2].down = True
        for i in range(20):
            await rs.put(f"ws/a/blocks/x{i}", b"v%d" % i)
        await rs.delete("ws/a/blocks/x0")
        assert not rs.replicas[2].up
        assert rs.queue.length("s2") == 20
        n.cancel_scope.cancel()
    await rs.aclose()
    # A new peer process (same data dir) resumes the queue and drains it once the store is back.
    reps[2].down = False
    rs2 = ReplicatedStore(_replicas(tmp_path), 2, repair_dir=str(tmp_path / "repair"), timeout=5,
                          health_interval=0.05)
    assert rs2.queue.length("s2") == 20
    async with trio.open_nursery() as n:
        await n.start(rs2.run)
        await _wait(lambda: rs2.queue.length("s2") == 0)
        n.cancel_scope.cancel()
    await rs2.aclose()
    for i in range(1, 20):
        assert (tmp_path / f"s2/ws/a/blocks/x{i}").read_bytes() == b"v%d" % i
    assert not (tmp_path / "s2/ws/a/blocks/x0").exists()
    assert os.path.getsize(tmp_path / "repair/s2.queue") == 0


async def test_write_quorum_out_of_reach_fails_fast_and_reads_survive(tmp_path):
    reps = _replicas(tmp_path)
    rs = ReplicatedStore(reps, 2, repair_dir=str(tmp_path / "repair"), timeout=2, health_interval=0.05)
    async with trio.open_nursery() as n:
        await n.start(rs.run)
        await rs.put("k/old", b"old")
        reps[0].down = reps[1].down = True
        t = trio.current_time()
        with pytest.raises(StoreUnavailable):
            await rs.put("k/new", b"new")
        assert trio.current_time() - t < 2.5
        assert await rs.get("k/old") == b"old"
        reps[0].down = reps[1].down = False
        await _wait(lambda: all(r.up for r in rs.replicas))
        await rs.put("k/new", b"new")
        n.cancel_scope.cancel()


@asynccontextmanager
async def _serving(tmp_path, keys: int, value: bytes, **kw):
    """Three Faulty replicas behind a running ReplicatedStore holding k/0 .. k/{keys-1}."""
    reps = _replicas(tmp_path)
    rs = ReplicatedStore(reps, 2, timeout=5, **kw)
    async with trio.open_nursery() as n:
        await n.start(rs.run)
        for i in range(keys):
            await rs.put(f"k/{i}", value)
        yield reps, rs
        n.cancel_scope.cancel()


async def test_hedged_reads_route_around_a_slow_replica(tmp_path):
    async with _serving(tmp_path, 10, b"x" * 1000, hedge_after=0.02) as (reps, rs):
        reps[0].delay = 0.3
        times = []
        for rnd in range(3):
            for i in range(10):
                t = trio.current_time()
                assert await rs.get(f"k/{i}") == b"x" * 1000
                times.append(trio.current_time() - t)
        times.sort()
        assert times[len(times) * 9 // 10] < 0.15, times   # p90 far below the slow replica's 300 ms
        # Once it lost a race it ranks behind the others: it is not asked first again (until stale).
        assert rs.replicas[0].expected(trio.current_time()) >= min(r.latency for r in rs.replicas[1:]) \
            or reps[0].calls <= 12


async def test_a_uniformly_busy_store_is_not_asked_every_read_twice(tmp_path):
    """Every replica answers in 60 ms (say, 4 MiB blocks under load): with hedge_after 20 ms a
    fixed threshold would send every read to two stores; the learned one sends it to one."""
    async with _serving(tmp_path, 20, b"y" * 1000, hedge_after=0.02) as (reps, rs):
        for r in reps:
            r.delay = 0.06
        for i in range(5):                       # learn what reads take
            assert await rs.get(f"k/{i}") == b"y" * 1000
        hedged = sum(h["hedged_reads"] for h in rs.health())
        assert hedged >= 1                       # before it knew, 60 ms reads were hedged at 20 ms
        before = sum(r.calls for r in reps)
        for i in range(5, 20):
            assert await rs.get(f"k/{i}") == b"y" * 1000
        assert sum(r.calls for r in reps) - before == 15   # one store call per read, no hedges
        assert sum(h["hedged_reads"] for h in rs.health()) == hedged
        assert rs._hedge_delay(rs.replicas[0]) <= 10 * rs.hedge_after


async def test_misconfigured_replica_fails_check_but_an_unreachable_one_is_tolerated(tmp_path):
    reps = _replicas(tmp_path)
    reps[1].down = True   # transient: StoreUnavailable
    rs = ReplicatedStore(reps, 2, timeout=5)
    await rs.check()
    assert [r.up for r in rs.replicas] == [True, False, True]
    reps[2].down = True
    with pytest.raises(StoreUnavailable) as e:
        await ReplicatedStore(reps, 2, timeout=5).check()
    assert "s1" in str(e.value) and "s2" in str(e.value)
    (tmp_path / "afile").write_bytes(b"")
    broken = LocalStore(str(tmp_path / "afile" / "store"), "broken")   # a path no directory can be made at
    with pytest.raises(StoreError) as e:
        await ReplicatedStore(_replicas(tmp_path)[:2] + [broken], 2, timeout=5).check()
    assert "store broken" in str(e.value)


async def test_repair_queue_survives_compaction_and_torn_appends(tmp_path):
    from backend.repair import DELETE, PUT, RepairQueue
    q = RepairQueue(str(tmp_path))
    q.load("s")
    for i in range(5000):
        q.add("s", f"k{i}", PUT)
    for i in range(4990):
        q.done("s", f"k{i}", PUT)
    q.add("s", "k0", DELETE)
    assert q.needs_compaction("s")
    async with trio.open_nursery() as n:
        n.start_soon(q.compact, "s")
        await trio.testing.wait_all_tasks_blocked()   # the compaction is writing in its thread now
        assert "s" in q._recording
        q.add("s", "late", PUT)   # appended while the compaction runs: must not be lost
    assert not q.needs_compaction("s")
    with open(tmp_path / "s.queue", "ab") as f:
        f.write(b"P torn-without-newl")   # a crash mid-append
    q2 = RepairQueue(str(tmp_path))
    q2.load("s")
    assert q2.peek("s", 100) == [(f"k{i}", PUT) for i in range(4990, 5000)] + [("k0", DELETE), ("late", PUT)]
