"""`RequestIds`, the request ids a namespace remembers for retries (pure logic)."""
from __future__ import annotations

from agentmount.meta.reqids import RequestIds
from agentmount.meta.state import ROOT_INO, NamespaceState

S = 10**9


def rid(i: int) -> bytes:
    return i.to_bytes(16, "big")


def test_keeps_the_newest_and_every_young_one():
    r = RequestIds(kept=3, seconds=5)
    for i in range(10):
        r.add(rid(i), i + 1, 100 + i, i * S)
    # Beyond the newest 3, ids younger than 5 s (by the newest record's time) stay too.
    assert len(r) == 6
    assert r.get(rid(3)) is None and r.get(rid(4)) == (5, 104, 4 * S) and r[rid(9)] == (10, 109, 9 * S)
    for i in range(10, 20):                 # a burst within one second: all young, all kept
        r.add(rid(i), i + 1, 0, 9 * S)
    assert len(r) == 16 and r.get(rid(4)) is not None


def test_snapshot_bytes_round_trip_and_old_list_format():
    r = RequestIds(kept=2, seconds=1)
    for i in range(6):
        r.add(rid(i), i + 1, i, i * S)
    back = RequestIds.from_snapshot(r.to_bytes())
    assert len(back) == len(r) and all(back[rid(i)] == r[rid(i)] for i in (4, 5))
    old = RequestIds.from_snapshot([[rid(1), 7, 8, 9], [b"short", 10, 11]])   # [id, seq, ino(, t)]
    assert old[rid(1)] == (7, 8, 9) and old[b"short"] == (10, 11, 0)
    try:
        RequestIds.from_snapshot(b"x" * 41)
    except ValueError:
        pass
    else:
        raise AssertionError("a torn entry must be refused")


def test_ids_of_any_length_and_compaction():
    r = RequestIds(kept=10, seconds=0)
    r.add(b"free-" + (7).to_bytes(8, "big") + b"-x", 1, 7, 0)     # not 16 bytes: keyed by its hash
    assert r[b"free-" + (7).to_bytes(8, "big") + b"-x"] == (1, 7, 0)
    for i in range(60000):                   # the packed log is compacted as old entries go
        r.add(rid(i), i + 2, 0, i)
    assert len(r) == 10 and len(r.to_bytes()) == 10 * 40
    assert len(r._log) < 2 * (1 << 20) + 40 * 10


def test_state_snapshot_carries_request_ids():
    s = NamespaceState("w", 1 << 20)
    s.apply({"op": "mknod", "seq": 1, "parent": ROOT_INO, "name": b"a", "ino": 2, "mode": 0o100644,
             "uid": 0, "gid": 0, "rdev": 0, "t": 5, "rid": rid(1)})
    s.apply({"op": "mknod", "seq": 2, "parent": ROOT_INO, "name": b"b", "ino": 3, "mode": 0o100644,
             "uid": 0, "gid": 0, "rdev": 0, "t": 6})       # a change no one can retry: no id
    back = NamespaceState.from_obj(s.to_obj())
    assert len(back.rids) == 1 and back.rids[rid(1)] == (1, 2, 5)
