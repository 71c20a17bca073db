"""The lock table as pure logic: flock, POSIX ranges, waiters, deadlocks, interrupts."""
from __future__ import annotations

import errno
from types import SimpleNamespace

import trio
from hypothesis import given, settings
from hypothesis import strategies as hst

from agentmount.locks import (F_RDLCK, F_UNLCK, F_WRLCK, LOCK_EX, LOCK_NB, LOCK_SH, LOCK_UN, OFFSET_MAX,
                              LockTable)

I = 7   # an inode


def granted(res):
    """Idents granted by a Result, or by the tuple of waiters that release_*() return."""
    return [w.ident for w in (res if isinstance(res, tuple) and not hasattr(res, "granted") else res.granted)]


# -- flock ---------------------------------------------------------------------------------
def test_flock_shared_and_exclusive():
    t = LockTable()
    assert t.flock(I, "a", LOCK_SH | LOCK_NB).error == 0
    assert t.flock(I, "b", LOCK_SH | LOCK_NB).error == 0
    assert t.flock(I, "c", LOCK_EX | LOCK_NB).error == errno.EAGAIN
    assert t.flock(I, "a", LOCK_UN).error == 0
    assert t.flock(I, "c", LOCK_EX | LOCK_NB).error == errno.EAGAIN
    assert t.flock(I, "b", LOCK_UN).error == 0
    assert t.flock(I, "c", LOCK_EX | LOCK_NB).error == 0
    assert t.flock_of(I, "c") == F_WRLCK


def test_flock_unlock_not_held_and_relock_same_type_are_noops():
    t = LockTable()
    assert t.flock(I, "a", LOCK_UN) == (0, None, ())
    assert t.flock(I, "a", LOCK_EX).error == 0
    assert t.flock(I, "a", LOCK_EX | LOCK_NB).error == 0
    assert t.flock_of(I, "a") == F_WRLCK


def test_flock_fifo_waiters():
    t = LockTable()
    t.flock(I, "h", LOCK_EX)
    w1 = t.flock(I, "a", LOCK_EX, ident=1).waiter
    w2 = t.flock(I, "b", LOCK_EX, ident=2).waiter
    assert w1 and w2
    assert granted(t.release_flock(I, "h")) == [1]
    assert granted(t.flock(I, "a", LOCK_UN)) == [2]
    assert t.flock_of(I, "b") == F_WRLCK and not t.waiting()


def test_flock_shared_waiters_granted_together():
    t = LockTable()
    t.flock(I, "h", LOCK_EX)
    t.flock(I, "a", LOCK_SH, ident=1)
    t.flock(I, "b", LOCK_SH, ident=2)
    t.flock(I, "c", LOCK_EX, ident=3)
    assert granted(t.flock(I, "h", LOCK_UN)) == [1, 2]
    assert [w.ident for w in t.waiting(I)] == [3]


def test_flock_upgrade_is_not_atomic():
    t = LockTable()
    t.flock(I, "a", LOCK_SH)
    t.flock(I, "b", LOCK_SH)
    # a's upgrade conflicts with b: with LOCK_NB it fails and a has lost its shared lock (flock(2)).
    assert t.flock(I, "a", LOCK_EX | LOCK_NB).error == errno.EAGAIN
    assert t.flock_of(I, "a") is None
    # an exclusive waiter gets in when a converts: a's old lock goes first.
    t2 = LockTable()
    t2.flock(I, "a", LOCK_SH)
    t2.flock(I, "w", LOCK_EX, ident=9)
    r = t2.flock(I, "a", LOCK_EX, ident=10)
    assert granted(r) == [9] and r.waiter is not None
    assert granted(t2.flock(I, "w", LOCK_UN)) == [10]


def test_flock_downgrade_lets_readers_in():
    t = LockTable()
    t.flock(I, "a", LOCK_EX)
    t.flock(I, "b", LOCK_SH, ident=1)
    assert granted(t.flock(I, "a", LOCK_SH)) == [1]


def test_flock_and_posix_are_independent():
    t = LockTable()
    t.flock(I, "a", LOCK_EX)
    assert t.setlk(I, "b", F_WRLCK, 0, OFFSET_MAX).error == 0
    assert t.getlk(I, "c", F_WRLCK, 0, OFFSET_MAX).owner == "b"


# -- POSIX ranges --------------------------------------------------------------------------
def test_posix_ranges_coexist_and_conflict():
    t = LockTable()
    assert t.setlk(I, "a", F_WRLCK, 0, 9, pid=11).error == 0
    assert t.setlk(I, "b", F_WRLCK, 10, 19, pid=12).error == 0
    assert t.setlk(I, "b", F_RDLCK, 5, 5).error == errno.EAGAIN
    c = t.getlk(I, "c", F_RDLCK, 0, OFFSET_MAX)
    assert (c.type, c.start, c.end, c.pid) == (F_WRLCK, 0, 9, 11)
    assert t.getlk(I, "a", F_WRLCK, 0, 9) is None          # own locks never conflict
    assert t.getlk(I, "c", F_RDLCK, 20, 30) is None


def test_posix_readers_share():
    t = LockTable()
    assert t.setlk(I, "a", F_RDLCK, 0, 99).error == 0
    assert t.setlk(I, "b", F_RDLCK, 50, 149).error == 0
    assert t.setlk(I, "c", F_WRLCK, 99, 99).error == errno.EAGAIN
    assert t.setlk(I, "c", F_WRLCK, 150, OFFSET_MAX).error == 0


def test_posix_split_and_merge():
    t = LockTable()
    t.setlk(I, "a", F_WRLCK, 0, 99)
    t.setlk(I, "a", F_UNLCK, 40, 59)
    assert t.posix_locks(I, "a") == [(0, 39, F_WRLCK), (60, 99, F_WRLCK)]
    t.setlk(I, "a", F_RDLCK, 30, 69)
    assert t.posix_locks(I, "a") == [(0, 29, F_WRLCK), (30, 69, F_RDLCK), (70, 99, F_WRLCK)]
    t.setlk(I, "a", F_WRLCK, 30, 69)
    assert t.posix_locks(I, "a") == [(0, 99, F_WRLCK)]
    t.setlk(I, "a", F_WRLCK, 100, 199)   # adjacent: merges
    assert t.posix_locks(I, "a") == [(0, 199, F_WRLCK)]
    t.setlk(I, "a", F_UNLCK, 0, OFFSET_MAX)
    assert t.posix_locks(I, "a") == [] and not t.has_state(I)


def test_posix_unlock_not_held_is_noop():
    t = LockTable()
    assert t.setlk(I, "a", F_UNLCK, 0, OFFSET_MAX) == (0, None, ())
    t.setlk(I, "b", F_WRLCK, 0, 9)
    assert t.setlk(I, "a", F_UNLCK, 0, 9).error == 0
    assert t.posix_locks(I, "b") == [(0, 9, F_WRLCK)]


def test_posix_waiter_granted_on_unlock_fifo():
    t = LockTable()
    t.setlk(I, "h", F_WRLCK, 0, 9)
    t.setlk(I, "a", F_WRLCK, 5, 5, wait=True, ident=1)
    t.setlk(I, "b", F_WRLCK, 0, 0, wait=True, ident=2)
    t.setlk(I, "c", F_WRLCK, 5, 6, wait=True, ident=3)
    # releasing only [0, 4] lets b in; a and c still conflict on 5
    assert granted(t.setlk(I, "h", F_UNLCK, 0, 4)) == [2]
    assert granted(t.release_posix(I, "h")) == [1]
    assert granted(t.release_posix(I, "a")) == [3]


def test_posix_waiter_granted_by_downgrade():
    t = LockTable()
    t.setlk(I, "h", F_WRLCK, 0, 9)
    t.setlk(I, "r", F_RDLCK, 0, 0, wait=True, ident=1)
    assert granted(t.setlk(I, "h", F_RDLCK, 0, 9)) == [1]


def test_deadlock_detected():
    t = LockTable()
    t.setlk(I, "a", F_WRLCK, 0, 0)
    t.setlk(I, "b", F_WRLCK, 1, 1)
    assert t.setlk(I, "a", F_WRLCK, 1, 1, wait=True, ident=1).waiter is not None
    assert t.setlk(I, "b", F_WRLCK, 0, 0, wait=True, ident=2).error == errno.EDEADLK
    assert [w.ident for w in t.waiting()] == [1]
    assert granted(t.release_posix(I, "b")) == [1]


def test_deadlock_detected_across_inodes_and_three_owners():
    t = LockTable()
    t.setlk(1, "a", F_WRLCK, 0, 0)
    t.setlk(2, "b", F_WRLCK, 0, 0)
    t.setlk(3, "c", F_WRLCK, 0, 0)
    assert t.setlk(2, "a", F_WRLCK, 0, 0, wait=True, ident=1).waiter     # a waits for b
    assert t.setlk(3, "b", F_WRLCK, 0, 0, wait=True, ident=2).waiter     # b waits for c
    assert t.setlk(1, "c", F_RDLCK, 0, 0, wait=True, ident=3).error == errno.EDEADLK
    assert t.setlk(1, "d", F_RDLCK, 0, 0, wait=True, ident=4).waiter      # no cycle through d


def test_no_false_deadlock_when_waiting_for_someone_else():
    t = LockTable()
    t.setlk(I, "a", F_RDLCK, 0, 0)
    t.setlk(I, "b", F_RDLCK, 0, 0)
    assert t.setlk(I, "c", F_WRLCK, 0, 0, wait=True, ident=1).waiter
    # b also wants to write: it waits for a and c's... c holds nothing, so only for a: no cycle
    assert t.setlk(I, "b", F_WRLCK, 0, 0, wait=True, ident=2).waiter


def test_cancel_leaves_nothing_behind():
    t = LockTable()
    t.setlk(I, "h", F_WRLCK, 0, 9)
    t.setlk(I, "a", F_WRLCK, 0, 9, wait=True, ident=1)
    t.flock(I, "h", LOCK_EX)
    t.flock(I, "b", LOCK_EX, ident=2)
    assert t.cancel(1).owner == "a" and t.cancel(2).owner == "b"
    assert t.cancel(1) is None
    assert not t.waiting()
    assert granted(t.release_posix(I, "h")) == [] and granted(t.release_flock(I, "h")) == []
    assert not t.has_state(I)
    # a cancelled waiter no longer counts in the wait-for graph
    t.setlk(I, "a", F_WRLCK, 0, 0)
    t.setlk(I, "b", F_WRLCK, 1, 1)
    t.setlk(I, "a", F_WRLCK, 1, 1, wait=True, ident=3)
    t.cancel(3)
    assert t.setlk(I, "b", F_WRLCK, 0, 0, wait=True, ident=4).waiter is not None


def test_release_owner_everywhere():
    t = LockTable()
    t.setlk(1, "a", F_WRLCK, 0, 9)
    t.flock(2, "a", LOCK_EX)
    t.setlk(1, "b", F_WRLCK, 0, 0, wait=True, ident=1)
    t.flock(2, "c", LOCK_SH, ident=2)
    t.setlk(3, "x", F_WRLCK, 0, 0)
    t.setlk(3, "a", F_WRLCK, 0, 0, wait=True, ident=3)
    g, c = t.release_owner("a")
    assert sorted(w.ident for w in g) == [1, 2] and [w.ident for w in c] == [3]
    assert not t.waiting()


def test_invalid_requests():
    t = LockTable()
    assert t.setlk(I, "a", F_WRLCK, 5, 4).error == errno.EINVAL
    assert t.setlk(I, "a", F_WRLCK, -1, 4).error == errno.EINVAL
    assert t.flock(I, "a", 0).error == errno.EINVAL
    assert not t.has_state(I)


# -- model-based: POSIX ranges against a per-byte model ------------------------------------
N = 24   # bytes 0..N-2 are themselves; byte N-1 stands for [N-1, OFFSET_MAX], reached only "to the end"
OWNERS = ["a", "b", "c"]

op_st = hst.tuples(hst.sampled_from(OWNERS), hst.sampled_from([F_RDLCK, F_WRLCK, F_UNLCK, "get"]),
                   hst.integers(0, N - 2), hst.integers(0, N - 2), hst.booleans())


def _bytes(start, end):
    return range(start, min(end, N - 1) + 1)


@settings(max_examples=300, deadline=None)
@given(hst.lists(op_st, max_size=40))
def test_posix_model(ops):
    t = LockTable()
    model: list[dict] = [{} for _ in range(N)]   # byte -> {owner: type}
    for owner, typ, x, y, to_end in ops:
        start, end = min(x, y), (OFFSET_MAX if to_end else max(x, y))
        rng = _bytes(start, end)
        conflict = any(o != owner and (typ == F_WRLCK or tt == F_WRLCK)
                       for b in rng for o, tt in model[b].items())
        if typ == "get":
            got = t.getlk(I, owner, F_WRLCK, start, end)
            wr_conflict = any(o != owner for b in rng for o in model[b])
            assert (got is not None) == wr_conflict
            if got is not None:   # the reported lock really is held, whole, by that owner
                assert got.owner != owner
                assert all(model[b].get(got.owner) == got.type for b in _bytes(got.start, got.end))
                assert any(b in rng for b in _bytes(got.start, got.end))
            continue
        res = t.setlk(I, owner, typ, start, end)
        if typ != F_UNLCK and conflict:
            assert res.error == errno.EAGAIN
        else:
            assert res.error == 0
            for b in rng:
                if typ == F_UNLCK:
                    model[b].pop(owner, None)
                else:
                    model[b][owner] = typ
        for o in OWNERS:   # the table holds exactly the model's bytes, merged
            segs = t.posix_locks(I, o)
            held = {}
            for s, e, tt in segs:
                for b in _bytes(s, e):
                    held[b] = tt
            assert held == {b: m[o] for b, m in enumerate(model) if o in m}
            for (s1, e1, t1), (s2, e2, t2) in zip(segs, segs[1:]):
                assert e1 < s2 and not (t1 == t2 and e1 + 1 == s2)


# -- model-based: waiters are granted exactly when nothing conflicts -------------------------
wop_st = hst.tuples(hst.sampled_from(OWNERS + ["d"]),
                    hst.sampled_from(["sh", "ex", "un", "wsh", "wex", "cancel"]), hst.integers(0, 20))


@settings(max_examples=300, deadline=None)
@given(hst.lists(wop_st, max_size=50))
def test_flock_waiters_model(ops):
    """Random flock traffic: no two conflicting holders ever, every waiter conflicts with a
    holder, and each ident is granted at most once."""
    t = LockTable()
    seen_granted: set = set()
    waiting: dict = {}   # ident -> owner
    ident = 0
    for owner, op, k in ops:
        ident += 1
        if op == "cancel":
            if waiting:
                victim = sorted(waiting)[k % len(waiting)]
                assert t.cancel(victim) is not None
                del waiting[victim]
            continue
        if any(o == owner for o in waiting.values()):
            continue   # one blocked call per open file description
        base = {"sh": LOCK_SH | LOCK_NB, "ex": LOCK_EX | LOCK_NB, "un": LOCK_UN, "wsh": LOCK_SH,
                "wex": LOCK_EX}[op]
        res = t.flock(I, owner, base, ident=ident)
        if res.waiter is not None:
            waiting[ident] = owner
        for w in res.granted:
            assert w.ident not in seen_granted
            seen_granted.add(w.ident)
            del waiting[w.ident]
        holders = {o: t.flock_of(I, o) for o in OWNERS + ["d"] if t.flock_of(I, o) is not None}
        ex = [o for o, tt in holders.items() if tt == F_WRLCK]
        assert len(ex) <= 1 and (not ex or len(holders) == 1)
        for w in t.waiting(I):
            assert any(o != w.owner and (w.type == F_WRLCK or tt == F_WRLCK) for o, tt in holders.items())
        assert set(waiting) == {w.ident for w in t.waiting(I)}


# -- LockService: the FUSE-facing bookkeeping (tokens, flush/release, OFD owners) -----------
class _Meta:
    """This peer leads the workspace: lock requests go to its LockLeader directly."""
    leader = None

    def lock_leader(self):
        return self.leader


class _Ws:
    name = "default"

    def __init__(self) -> None:
        self.meta = _Meta()


class _FakeVFS:
    def __init__(self) -> None:
        self.node = SimpleNamespace(name="me")
        self.ws = _Ws()

    def _resolve(self, gino):
        return self.ws, gino & 0xFFFF


class _Replies:
    def __init__(self):
        self.log: list[tuple] = []

    def reply_err(self, token, err):
        assert all(t != token for t, *_ in self.log), f"token {token} answered twice"
        self.log.append((token, err))
        return True

    def reply_lock(self, token, type, start, end, pid):
        self.log.append((token, "lock", type, start, end, pid))
        return True

    def of(self, token):
        return [r[1:] for r in self.log if r[0] == token]


def _service():
    from agentmount.locks.leader import LockLeader
    from agentmount.vfs.locking import LockService
    vfs = _FakeVFS()
    s = LockService(vfs)
    s.replier = _Replies()
    vfs.ws.meta.leader = LockLeader("me", "default", 10.0, lambda peer, w, err: s.granted(w.ident[1], {"err": err}),
                                    lambda p: None)
    return s, s.replier


def _run(fn, *args, **kw):
    """Run one of the service's async calls (flush/release) to completion."""
    return trio.run(lambda: fn(*args, **kw))


G = (1 << 40) | 5   # a kernel inode number


def test_service_flush_drops_posix_locks_of_the_owner_only():
    s, r = _service()
    s.setlk(1, G, fh=10, owner=100, type=F_WRLCK, start=0, end=9, sleep=False, pid=1)
    s.setlk(2, G, fh=11, owner=200, type=F_WRLCK, start=20, end=29, sleep=False, pid=2)
    s.setlk(3, G, fh=11, owner=200, type=F_WRLCK, start=0, end=0, sleep=True, pid=2)   # waits for 100
    assert r.of(1) == [(0,)] and r.of(2) == [(0,)] and r.of(3) == []
    _run(s.flush, G, 999)                     # someone else's close: nothing
    assert r.of(3) == []
    _run(s.flush, G, 100)                     # 100 closes any fd: its locks go, 200 is granted
    assert r.of(3) == [(0,)]
    s.getlk(4, G, owner=300, type=F_WRLCK, start=0, end=OFFSET_MAX)
    assert r.of(4) == [("lock", F_WRLCK, 0, 0, 2)]
    _run(s.flush, G, 200)
    assert s.status()["files"] == 0


def test_service_release_drops_flock_and_ofd_locks_not_process_locks():
    s, r = _service()
    s.flock(1, G, fh=10, owner=7010, type=F_WRLCK, sleep=False, pid=1)
    s.setlk(2, G, fh=10, owner=7010, type=F_WRLCK, start=0, end=9, sleep=False, pid=1)   # OFD: owner = file
    s.setlk(3, G, fh=11, owner=500, type=F_RDLCK, start=50, end=59, sleep=False, pid=2)  # process lock
    s.flock(4, G, fh=12, owner=7012, type=F_WRLCK, sleep=True, pid=3)
    _run(s.release, G, fh=10, owner=7010, flock_release=True)
    assert r.of(4) == [(0,)]
    s.getlk(5, G, owner=1, type=F_WRLCK, start=0, end=OFFSET_MAX)
    assert r.of(5) == [("lock", F_RDLCK, 50, 59, 2)]    # the OFD lock went, the process lock stayed
    # a process lock is tied to a handle only until its owner's next flush (any close)
    _run(s.flush, G, 500)
    s.setlk(6, G, fh=11, owner=500, type=F_RDLCK, start=50, end=59, sleep=False, pid=2)
    _run(s.flush, G, 500)
    s.setlk(7, G, fh=13, owner=500, type=F_RDLCK, start=50, end=59, sleep=False, pid=2)
    _run(s.release, G, fh=11, owner=0, flock_release=False)   # fh 11 no longer carries 500's lock
    s.getlk(8, G, owner=1, type=F_WRLCK, start=0, end=OFFSET_MAX)
    assert r.of(8) == [("lock", F_RDLCK, 50, 59, 2)]


def test_service_interrupt_answers_eintr_once_and_leaves_nothing():
    s, r = _service()
    s.flock(1, G, fh=10, owner=1, type=F_WRLCK, sleep=False, pid=1)
    s.flock(2, G, fh=11, owner=2, type=F_WRLCK, sleep=True, pid=2)
    s.interrupt(2)
    s.interrupt(2)                      # a late second interrupt: nothing more
    assert r.of(2) == [(errno.EINTR,)]
    s.flock(3, G, fh=10, owner=1, type=F_UNLCK, sleep=False, pid=1)
    assert r.of(3) == [(0,)] and len(r.log) == 3   # nobody was granted behind our back
    assert s.status()["waiting"] == 0 and s.status()["files"] == 0


def test_service_unlock_of_unknown_file_and_nb_conflicts():
    s, r = _service()
    s.setlk(1, G, fh=1, owner=1, type=F_UNLCK, start=0, end=OFFSET_MAX, sleep=False, pid=1)
    s.flock(2, G, fh=1, owner=1, type=F_UNLCK, sleep=False, pid=1)
    s.flock(3, G, fh=1, owner=1, type=F_RDLCK, sleep=False, pid=1)
    s.flock(4, G, fh=2, owner=2, type=F_WRLCK, sleep=False, pid=2)
    assert [x[1] for x in r.log] == [0, 0, 0, errno.EAGAIN]
