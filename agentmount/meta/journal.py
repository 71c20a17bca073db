"""Journal segments, snapshots and recovery of one workspace's namespace.

Keys: `ws/<ws>/journal/<epoch:010d>-<first_seq:016d>` hold a batch of
records (msgpack, wrapped in the checksummed block format);
`ws/<ws>/snapshots/<seq:016d>` hold the whole state after record `seq`.
On stores that write in place (`ObjectStore.appendable`: a local directory)
batches are instead appended as frames to a log object, the same key plus
`.log`, rolled over every LOG_ROLL_BYTES: a durable commit then costs one
data flush instead of creating a file. Only the last frame of a log can be
torn (by a crash mid-append; it was never acknowledged), and is ignored.

The committer writes one segment at a time, so the durable journal is always
a gap-free prefix. Recovery = newest readable snapshot + replay of later
records in seq order, checking continuity; records of an epoch are ignored
from the first seq a newer epoch wrote (they come from a deposed writer).
"""
from __future__ import annotations

import errno
import logging
import re
import struct
import time
from dataclasses import dataclass
from typing import Callable

import msgpack
import trio

from agentmount.chunks import block
from agentmount.chunks.layout import block_key
from agentmount.errors import Deposed, FsError
from agentmount.meta.state import NamespaceState
from backend.store import NotFound, ObjectStore, StoreError

log = logging.getLogger("agentmount.journal")

_SEG_RE = re.compile(r"/journal/(\d{10})-(\d{16})(\.log)?$")
LOG_SUFFIX = ".log"
LOG_ROLL_BYTES = 4 << 20
_FRAME = struct.Struct("<4sI")
_FRAME_MAGIC = b"AMJF"
_SNAP_RE = re.compile(r"/snapshots/(\d{16})$")


class RecoveryError(Exception):
    """The journal or snapshots of a workspace cannot be replayed consistently."""


def journal_prefix(ws: str) -> str:
    return f"ws/{ws}/journal/"


def snapshot_prefix(ws: str) -> str:
    return f"ws/{ws}/snapshots/"


def segment_key(ws: str, epoch: int, first: int) -> str:
    return f"ws/{ws}/journal/{epoch:010d}-{first:016d}"


def snapshot_key(ws: str, seq: int) -> str:
    return f"ws/{ws}/snapshots/{seq:016d}"


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes):
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def encode_segment(ws: str, epoch: int, records: list[dict], compress: bool = True) -> bytes:
    return block.encode(pack({"ws": ws, "epoch": epoch, "first": records[0]["seq"],
                              "last": records[-1]["seq"], "records": records}), 1, compress)


def decode_segment(data: bytes) -> dict:
    return unpack(block.decode(data))


def log_key(ws: str, epoch: int, first: int) -> str:
    return segment_key(ws, epoch, first) + LOG_SUFFIX


def encode_frame(segment: bytes) -> bytes:
    return _FRAME.pack(_FRAME_MAGIC, len(segment)) + segment


def _frame_at(view: memoryview, pos: int) -> tuple[dict, int]:
    """The segment framed at `pos` and where its frame ends; CorruptBlock/ValueError if bad."""
    if len(view) - pos < _FRAME.size:
        raise block.CorruptBlock("partial frame header")
    magic, n = _FRAME.unpack_from(view, pos)
    if magic != _FRAME_MAGIC:
        raise block.CorruptBlock("bad frame magic")
    end = pos + _FRAME.size + n
    if end > len(view):
        raise block.CorruptBlock("frame runs past the end")
    return decode_segment(bytes(view[pos + _FRAME.size:end])), end


def decode_log(data: bytes) -> tuple[list[dict], int]:
    """The segments framed in a journal log, and how many bytes at its end are a torn frame.

    A bad frame is a torn last append when no good frame follows it (appends after a failed
    one go to a new log, and a crash ends the log); otherwise acknowledged records lie
    beyond damage, and that is corruption (CorruptBlock).
    """
    segs: list[dict] = []
    view = memoryview(data)
    pos = 0
    while pos < len(data):
        try:
            seg, end = _frame_at(view, pos)
        except (block.CorruptBlock, ValueError) as e:
            j = data.find(_FRAME_MAGIC, pos + 1)
            while j >= 0:
                try:
                    _frame_at(view, j)
                except (block.CorruptBlock, ValueError):
                    j = data.find(_FRAME_MAGIC, j + 1)
                    continue
                raise block.CorruptBlock(f"journal log frame at byte {pos}: {e}") from None
            return segs, len(data) - pos
        segs.append(seg)
        pos = end
    return segs, 0


@dataclass
class Loaded:
    state: NamespaceState
    epoch: int           # highest epoch seen in the store
    snapshot_seq: int
    replayed: int
    inline: dict[str, bytes]    # block key -> bytes committed inline by replayed records


async def read_records(store: ObjectStore, ws: str, after: int) -> tuple[dict[int, dict], int]:
    """The journal's records with seq > `after` (by seq; records a deposed epoch wrote after a
    newer epoch began are left out), and the highest epoch seen."""
    segs = []
    max_epoch = 0
    for k in await store.list_keys(journal_prefix(ws)):
        m = _SEG_RE.search(k)
        if m:
            segs.append((int(m.group(1)), int(m.group(2)), k))
            max_epoch = max(max_epoch, int(m.group(1)))
    # The first seq each epoch wrote; an older epoch's records from there on are void.
    epoch_start: dict[int, int] = {}
    for e, first, _ in segs:
        epoch_start[e] = min(first, epoch_start.get(e, first))

    def cutoff(e: int) -> float:
        later = [s for ep, s in epoch_start.items() if ep > e]
        return min(later) if later else float("inf")

    records: dict[int, tuple[int, dict]] = {}
    segs.sort(key=lambda x: x[1])
    for i, (e, first, key) in enumerate(segs):
        if first > 10**15:
            continue
        if i + 1 < len(segs) and segs[i + 1][1] <= after + 1 and segs[i + 1][0] >= e:
            continue      # wholly at or before `after` (a later segment of this epoch or newer follows)
        limit = cutoff(e)
        if first >= limit:
            continue
        try:
            if key.endswith(LOG_SUFFIX):
                _, (batches, torn) = await store.get_checked(key, decode_log)
                if torn:
                    log.warning("journal log %s: %d byte(s) of a torn last append ignored", key, torn)
            else:
                _, seg = await store.get_checked(key, decode_segment)
                batches = [seg]
        except (block.CorruptBlock, ValueError) as err:
            raise RecoveryError(f"journal segment {key} is corrupt: {err}") from None
        for seg in batches:
            for rec in seg["records"]:
                s = rec["seq"]
                if s <= after or s >= limit:
                    continue
                prev = records.get(s)
                if prev is None or prev[0] < e:
                    records[s] = (e, rec)
    return {s: r for s, (_, r) in records.items()}, max_epoch


async def load(store: ObjectStore, ws: str, fresh: NamespaceState) -> Loaded:
    """Recover the state of `ws`: newest valid snapshot, then the journal after it."""
    state = fresh
    snap_seq = 0
    snap_inline: dict[str, bytes] = {}
    snaps = sorted(((int(m.group(1)), k) for k in await store.list_keys(snapshot_prefix(ws))
                    if (m := _SNAP_RE.search(k))), reverse=True)
    for seq, key in snaps:
        try:
            _, obj = await store.get_checked(key, lambda data: unpack(block.decode(data)))
            state = NamespaceState.from_obj(obj)
            state.rids.seconds = fresh.rids.seconds    # replay prunes request ids as configured
            snap_inline = dict(obj.get("inline") or {})
            snap_seq = seq
            break
        except (block.CorruptBlock, NotFound, ValueError, KeyError) as e:
            log.warning("snapshot %s unreadable (%s); trying an older one", key, e)
    found, max_epoch = await read_records(store, ws, state.seq)
    records = {s: (0, r) for s, r in found.items()}
    replayed = 0
    inline: dict[str, bytes] = snap_inline
    for s in sorted(records):
        if s != state.seq + 1:
            raise RecoveryError(f"workspace {ws}: journal gap after seq {state.seq} (next is {s})")
        rec = records[s][1]
        for sid, data in (rec.get("inline") or {}).items():
            inline[block_key(ws, sid, 0)] = data
        state.apply(rec)
        replayed += 1
    return Loaded(state=state, epoch=max_epoch, snapshot_seq=snap_seq, replayed=replayed, inline=inline)


class Journal:
    """Group commit of records into segments; durable-seq tracking for waiters."""

    def __init__(self, store: ObjectStore, ws: str, epoch: int, last_seq: int, *, window: float = 0.02,
                 timeout: float = 60.0) -> None:
        self.store = store
        self.ws = ws
        self.epoch = epoch
        self.next_seq = last_seq + 1
        self.durable_seq = last_seq
        self.window = window
        self.timeout = timeout
        self._pending: list[dict] = []
        self._wake = trio.Event()
        self._urgent = False
        self._urgent_ev = trio.Event()
        self._progress = trio.Event()
        self.error: str | None = None
        self.records_since_snapshot = 0
        self.segments_written = 0
        self.put_seconds = 0.0       # time spent writing segments (for status)
        self.closed = False
        # Fencing: while it returns False (the lease lapsed) nothing more is written, and a
        # segment whose put ends after that is never acknowledged (waiters get Deposed).
        self.fence: "Callable[[], bool] | None" = None
        self.deposed = False
        # Append-only log (stores that write in place): current log key and its durable length.
        self.appendable = store.appendable
        # Segments to a local disk are written raw: there, compressing a small file's inline
        # bytes on the event loop (50-90 us a segment) cost more than writing them does.
        self.compress = not store.is_local
        self._log: str | None = None
        self._log_size = 0

    def append(self, rec: dict) -> int:
        """Stamp `rec` with the next seq and queue it for the next segment."""
        if self.closed or self.deposed:
            raise Deposed(self.ws)   # after close (shutdown) or deposition nothing more is written
        rec["seq"] = seq = self.next_seq
        rec["epoch"] = self.epoch
        self.next_seq += 1
        self._pending.append(rec)
        self.records_since_snapshot += 1
        self._wake.set()
        return seq

    @property
    def last_seq(self) -> int:
        return self.next_seq - 1

    async def wait_durable(self, seq: int | None = None) -> None:
        """Return once record `seq` (default: every record so far) is durable; EIO after the timeout."""
        if seq is None:
            seq = self.last_seq
        if self.durable_seq >= seq:
            return
        if self.deposed:
            raise Deposed(self.ws)
        self._urgent = True
        self._urgent_ev.set()
        self._wake.set()
        with trio.move_on_after(self.timeout) as scope:
            while self.durable_seq < seq:
                if self.deposed:
                    raise Deposed(self.ws)
                ev = self._progress
                await ev.wait()
        if scope.cancelled_caught:
            raise FsError(errno.EIO, f"journal of {self.ws} not durable: {self.error or 'store timeout'}")

    async def wait_past(self, seq: int) -> None:
        """Until some record after `seq` is durable (no hurry: the group-commit window applies)."""
        while self.durable_seq <= seq:
            if self.deposed:
                raise Deposed(self.ws)
            await self._progress.wait()

    async def run(self) -> None:
        """The committer task: batches pending records into segments, one put at a time."""
        backoff = 0.05
        while True:
            if not self._pending:
                self._wake = trio.Event()
                if self.closed:
                    return
                await self._wake.wait()
            if not self._urgent and self.window > 0:
                # Wait out the group-commit window, unless a waiter needs durability now.
                with trio.move_on_after(self.window):
                    await self._urgent_ev.wait()
            self._urgent = False
            self._urgent_ev = trio.Event()
            if not self._pending:
                continue  # woken to stop, or a waiter found nothing left to write
            batch = self._pending
            self._pending = []
            if len(batch) <= 32 and sum(len(d) for r in batch for d in (r.get("inline") or {}).values()) <= 65536:
                # Tens of microseconds at most: not worth a thread hop.
                data = encode_segment(self.ws, self.epoch, batch, self.compress)
            else:
                data = await trio.to_thread.run_sync(encode_segment, self.ws, self.epoch, batch, self.compress)
            if self.appendable:
                data = encode_frame(data)
            started = trio.current_time()
            while True:
                if self.fence is not None and not self.fence():
                    self._depose()
                    return
                key = self._target(batch[0]["seq"])
                try:
                    with trio.fail_after(self.timeout):
                        if self.appendable:
                            await self.store.write_at(key, data, self._log_size)
                            self._log_size += len(data)
                        else:
                            await self.store.put(key, data)
                    self.error = None
                    backoff = 0.05
                    break
                except (StoreError, trio.TooSlowError) as e:
                    self.error = str(e) or type(e).__name__
                    log.error("journal segment %s not written (%s); retrying", key, self.error)
                    # A failed append may have left a torn frame: go on in a new log, which
                    # starts with this batch (the torn frame stays the old log's last).
                    self._log = None
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
            if self.fence is not None and not self.fence():
                self._depose()   # written after the lease lapsed: never acknowledged
                return
            self.segments_written += 1
            self.put_seconds += trio.current_time() - started
            self.durable_seq = batch[-1]["seq"]
            ev, self._progress = self._progress, trio.Event()
            ev.set()

    def _target(self, first: int) -> str:
        """Where the batch starting at `first` goes: a segment of its own, or the current log
        (a new one at the first batch, after a failed append, and every LOG_ROLL_BYTES)."""
        if not self.appendable:
            return segment_key(self.ws, self.epoch, first)
        if self._log is None or self._log_size >= LOG_ROLL_BYTES:
            self._log, self._log_size = log_key(self.ws, self.epoch, first), 0
        return self._log

    def _depose(self) -> None:
        self.deposed = True
        self.error = "no longer the leader"
        self._pending = []
        ev, self._progress = self._progress, trio.Event()
        ev.set()

    async def close(self) -> None:
        """Flush everything pending and stop the committer once drained."""
        if self.deposed:
            self.closed = True
            return
        await self.wait_durable()
        self.closed = True
        self._wake.set()


async def write_snapshot(store: ObjectStore, state: NamespaceState,
                         inline: dict[str, bytes] | None = None, obj: dict | None = None) -> str:
    """Write the state (`obj`: as taken earlier by `state.to_obj()`), and inline-committed
    blocks not yet durable as objects, as a snapshot."""
    obj = state.to_obj() if obj is None else obj
    if inline:
        obj["inline"] = inline
    data = await trio.to_thread.run_sync(lambda: block.encode(pack(obj), 1))
    key = snapshot_key(state.ws, obj["seq"])
    await store.put(key, data)
    return key


async def prune(store: ObjectStore, ws: str, snapshot_seq: int, keep_snapshots: int = 2,
                hold: int | None = None) -> int:
    """Delete snapshots beyond the newest `keep_snapshots`, and the journal segments wholly
    covered by the oldest snapshot kept (so falling back to it still finds its records);
    segments holding records after `hold` (undelivered events) are kept too."""
    removed = 0
    snaps = sorted((int(m.group(1)), k) for k in await store.list_keys(snapshot_prefix(ws))
                   if (m := _SNAP_RE.search(k)))
    for _, k in snaps[:-keep_snapshots]:
        await store.delete(k)
        removed += 1
    kept = [s for s, _ in snaps[-keep_snapshots:]]
    cutoff = min(kept) if kept else 0
    if hold is not None:
        cutoff = min(cutoff, hold)
    segs = []
    for k in await store.list_keys(journal_prefix(ws)):
        m = _SEG_RE.search(k)
        if m:
            segs.append((int(m.group(2)), k))
    segs.sort()
    # A segment is covered when the next one starts at or before cutoff + 1.
    for i, (first, key) in enumerate(segs):
        nxt = segs[i + 1][0] if i + 1 < len(segs) else None
        if nxt is not None and nxt <= cutoff + 1:
            await store.delete(key)
            removed += 1
    return removed


def now_ns() -> int:
    return time.time_ns()
