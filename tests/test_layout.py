"""Unit tests of the pure data-layout and namespace logic (no I/O)."""
import random

from agentmount.chunks import block
from agentmount.chunks.layout import Slice, resolve, truncate_slices
from agentmount.meta.state import NamespaceState

import pytest


def _paint(slices, size):
    buf = [None] * size
    for s in slices:
        for i in range(s.len):
            buf[s.pos + i] = (s.sid, s.off + i)
    return buf


def test_resolve_matches_naive_painting():
    rnd = random.Random(7)
    for trial in range(300):
        slices = []
        for i in range(rnd.randint(0, 8)):
            pos = rnd.randint(0, 90)
            ln = rnd.randint(1, 40)
            off = rnd.randint(0, 5)
            slices.append(Slice(f"s{i}", off + ln + rnd.randint(0, 3), 16, pos, off, ln))
        want = _paint(slices, 140)
        a, b = sorted(rnd.sample(range(141), 2))
        got = [None] * 140
        segs = resolve(slices, a, b)
        assert sum(g.len for g in segs) == b - a
        pos = a
        for g in segs:
            assert g.pos == pos
            pos += g.len
            if g.slice is not None:
                for i in range(g.len):
                    got[g.pos + i] = (g.slice.sid, g.slice.off + i)
        assert got[a:b] == want[a:b]


def test_truncate_slices_clips_and_drops():
    s1 = Slice("a", 100, 16, 0, 0, 100)
    s2 = Slice("b", 50, 16, 120, 0, 50)
    kept, dropped = truncate_slices([s1, s2], 60)
    assert kept == [Slice("a", 100, 16, 0, 0, 60)]
    assert dropped == [s2]


def test_block_roundtrip_and_corruption():
    data = b"hello world " * 1000
    obj = block.encode(data, 1)
    assert len(obj) < len(data)
    assert block.decode(obj) == data
    raw = block.encode(bytes(range(256)) * 0 + __import__("os").urandom(5000), 1)
    assert block.decode(raw)
    bad = bytearray(obj)
    bad[-5] ^= 0xFF
    with pytest.raises(block.CorruptBlock):
        block.decode(bytes(bad))
    with pytest.raises(block.CorruptBlock):
        block.decode(obj[:10])


def test_state_snapshot_roundtrip_and_replay_determinism():
    def run(records):
        s = NamespaceState("w", 1 << 20)
        for r in records:
            s.apply(dict(r))
        return s

    recs = [
        {"op": "mknod", "seq": 1, "ino": 2, "parent": 1, "name": b"d", "mode": 0o40755, "uid": 0, "gid": 0, "t": 5},
        {"op": "mknod", "seq": 2, "ino": 3, "parent": 2, "name": b"f", "mode": 0o100644, "uid": 0, "gid": 0, "t": 6},
        {"op": "write", "seq": 3, "ino": 3, "slices": [(0, ("x" * 24, 10, 4096, 0, 0, 10))], "end": 10,
         "mtime": 7, "t": 7},
        {"op": "link", "seq": 4, "ino": 3, "parent": 1, "name": b"g", "t": 8},
        {"op": "rename", "seq": 5, "sp": 2, "sn": b"f", "dp": 1, "dn": b"h", "t": 9},
        {"op": "setattr", "seq": 6, "ino": 3, "size": 4, "t": 10},
    ]
    a = run(recs)
    b = NamespaceState.from_obj(a.to_obj())
    assert a.to_obj() == b.to_obj()
    assert a.inodes[3].nlink == 2 and a.inodes[3].size == 4
    assert a.dirs[1] == {b"d": 2, b"g": 3, b"h": 3}
