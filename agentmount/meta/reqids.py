"""`RequestIds`: the request ids a workspace's namespace remembers, for retries across failovers.

A change sent by a peer carries a request id; when the leader dies or is deposed the change
is retried, same id, wherever leadership goes next, and the record the id made (if any) must
be found there so the change is not applied twice. Each id maps to (seq, inode, time ns) of
its record; the newest `kept` are always remembered, and every one younger than `seconds`
(the failover bound and a margin), judged by the newest record's time so replay decides alike.
A peer that is alone makes no ids: no other leader can ever take its retries.

Invariants: entries are appended in seq order; besides the map they are packed, 40 bytes
each and oldest first, into one buffer that a snapshot copies whole — a busy workspace holds
hundreds of thousands of them, and turning each into a Python list for every snapshot held
the event loop for most of a second (measured: 467,000 ids, 717 ms). Ids longer or shorter
than 16 bytes (never made by this code) are keyed by their 128-bit hash.
"""
from __future__ import annotations

import struct

import xxhash

KEPT = 20000
SKEW_SECONDS = 30.0                 # beyond the failover bound: clock skew between peers
SECONDS = 30.0 + SKEW_SECONDS       # for the default failover bound (`failover_timeout_s`)

_ENTRY = struct.Struct("<16sQQq")       # id, seq, inode, time ns
_COMPACT_BYTES = 1 << 20


def _key(rid: bytes) -> bytes:
    return rid if len(rid) == 16 else xxhash.xxh3_128_digest(rid)


class RequestIds:
    """Request id -> (seq, inode, time ns) of the record it made; see the module docstring."""

    __slots__ = ("kept", "seconds", "_map", "_log", "_start")

    def __init__(self, kept: int = KEPT, seconds: float = SECONDS) -> None:
        self.kept = kept
        self.seconds = seconds
        self._map: dict[bytes, tuple[int, int, int]] = {}
        self._log = bytearray()
        self._start = 0                  # offset of the oldest entry still remembered

    def __len__(self) -> int:
        return len(self._map)

    def get(self, rid: bytes) -> tuple[int, int, int] | None:
        return self._map.get(_key(rid))

    def __getitem__(self, rid: bytes) -> tuple[int, int, int]:
        return self._map[_key(rid)]

    def add(self, rid: bytes, seq: int, ino: int, t: int) -> None:
        rid = _key(rid)
        self._map[rid] = (seq, ino, t)
        self._log += _ENTRY.pack(rid, seq, ino, t)
        horizon = t - int(self.seconds * 1e9)
        log, size = self._log, _ENTRY.size
        while len(self._map) > self.kept and self._start < len(log):
            old, old_seq, _, old_t = _ENTRY.unpack_from(log, self._start)
            if old_t >= horizon:
                break
            self._start += size
            if self._map.get(old, (None,))[0] == old_seq:
                del self._map[old]
        if self._start >= _COMPACT_BYTES and 2 * self._start >= len(log):
            del log[:self._start]
            self._start = 0

    def to_bytes(self) -> bytes:
        """Every remembered entry, packed oldest first (what a snapshot stores)."""
        return bytes(memoryview(self._log)[self._start:])

    @classmethod
    def from_snapshot(cls, v: bytes | list | None) -> "RequestIds":
        """From `to_bytes()` output, or from the list of [id, seq, inode, time] of older snapshots."""
        r = cls()
        if isinstance(v, (bytes, bytearray)):
            if len(v) % _ENTRY.size:
                raise ValueError(f"request ids: {len(v)} bytes is not a whole number of entries")
            r._log = bytearray(v)
            r._map = {rid: (s, i, t) for rid, s, i, t in _ENTRY.iter_unpack(v)}
        else:
            for e in v or ():
                r.add(bytes(e[0]), e[1], e[2], e[3] if len(e) > 3 else 0)
        return r
