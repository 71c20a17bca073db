"""Namespace services: the metadata API the VFS calls, and its local form.

`NamespaceService` is the interface (so a later remote-leader client can
stand in for it). `LocalNamespace` validates each operation against the live
state, turns it into one journal record, applies it, and queues the record
for group commit. Nothing here touches the store on a lookup: the state is
in memory. Errors are FsError with the errno Linux gives.
"""
from __future__ import annotations

import abc
import errno
import logging
import stat as st
from typing import Awaitable, Callable

import trio

from agentmount.chunks.layout import Slice, slice_block_keys
from agentmount.errors import Deposed, FsError
from agentmount.events.derive import Annotator
from agentmount.meta import journal as jr
from agentmount.meta.state import ROOT_INO, Inode, NamespaceState, chunk_digest
from backend.store import ObjectStore

RECENT_KEEP = 50000    # records with events kept in memory for delivery (twice this at most)
_EVENT_KEYS = ("seq", "epoch", "t", "act", "ev")

log = logging.getLogger("agentmount.meta")

NAME_MAX = 255
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG)
    if not name or b"/" in name or name in (b".", b".."):
        raise FsError(errno.EINVAL)


class NamespaceService(abc.ABC):
    """Metadata operations of one workspace (local inode numbers).

    The async methods may be remote calls (a leader on another peer); the plain methods
    answer from what this peer already holds (its attribute and entry cache) and never
    block, which is what per-entry hot paths such as readdir use.
    """

    ws: str
    chunk_size: int
    # Hooks the VFS sets: called with each block key the collector deletes (to drop cached
    # copies), and awaited before a snapshot for inline blocks it must carry.
    on_gc: Callable[[str], object] | None = None
    before_snapshot: Callable[[], Awaitable[dict[str, bytes]]] | None = None

    @abc.abstractmethod
    def cached(self, ino: int) -> Inode | None:
        """The inode as known here, without a round trip (None when unknown)."""

    @abc.abstractmethod
    def cached_entry(self, parent: int, name: bytes) -> int | None:
        """The inode an entry names, as known here (None when unknown or absent)."""

    @abc.abstractmethod
    def orphans(self) -> list[int]:
        """Inodes unlinked but not yet freed."""

    @abc.abstractmethod
    def stats(self) -> dict:
        """Figures for `agentmount status`."""

    @abc.abstractmethod
    async def run(self) -> None:
        """Background work (group commit, garbage collection) until cancelled or closed."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Make everything durable and stop accepting changes."""

    @abc.abstractmethod
    async def snapshot(self) -> None:
        """Write a snapshot of the namespace."""

    @abc.abstractmethod
    async def collect_garbage(self, *, force: bool = False) -> int:
        """Delete blocks of dropped slices that are safe to delete."""

    @abc.abstractmethod
    def referenced_sids(self) -> set[str]:
        """Ids of every slice the namespace references."""

    @abc.abstractmethod
    async def lookup(self, parent: int, name: bytes) -> Inode: ...

    @abc.abstractmethod
    async def getattr(self, ino: int) -> Inode: ...

    @abc.abstractmethod
    async def mknod(self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0,
                    target: bytes | None = None, opening: bool = False) -> Inode:
        """Make an inode; `opening`: an open of it follows at once (create)."""

    @abc.abstractmethod
    async def link(self, ino: int, parent: int, name: bytes) -> Inode: ...

    @abc.abstractmethod
    async def unlink(self, parent: int, name: bytes, is_dir: bool, is_open: Callable[[int], bool]) -> Inode:
        ...

    @abc.abstractmethod
    async def rename(self, sp: int, sn: bytes, dp: int, dn: bytes, flags: int,
                     is_open: Callable[[int], bool]) -> None: ...

    @abc.abstractmethod
    async def setattr(self, ino: int, changes: dict) -> Inode: ...

    @abc.abstractmethod
    async def readdir(self, ino: int) -> list[tuple[bytes, int]]: ...

    async def readdir_plus(self, ino: int) -> list[tuple[bytes, int, Inode | None]]:
        """Entries with their inodes (None where not known here)."""
        return [(n, i, self.cached(i)) for n, i in await self.readdir(ino)]

    async def open(self, ino: int) -> Inode:
        """The inode, fresh, for an open (a remote service also notes that this peer holds it open)."""
        return await self.getattr(ino)

    async def closed(self, ino: int) -> None:
        """This peer closed its last handle on `ino`."""

    @abc.abstractmethod
    async def getxattr(self, ino: int, name: bytes) -> bytes: ...

    @abc.abstractmethod
    async def listxattr(self, ino: int) -> list[bytes]: ...

    @abc.abstractmethod
    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None: ...

    @abc.abstractmethod
    async def removexattr(self, ino: int, name: bytes) -> None: ...

    @abc.abstractmethod
    async def commit_write(self, ino: int, slices: list[tuple[int, Slice]], end: int, mtime: int,
                           inline: dict[str, bytes] | None = None, durable: bool = False,
                           closing: bool = False) -> int:
        """Commit written slices; with `durable`, return once the record is durable; `closing`:
        a close or fsync commits them (the record yields fs.file.written)."""

    @abc.abstractmethod
    async def written(self, ino: int) -> int:
        """Record that a handle which wrote `ino` was closed or fsync'ed (fs.file.written)."""

    @abc.abstractmethod
    async def compact(self, ino: int, chunk: int, old: list[Slice], new: list[Slice], drop: list[Slice]) -> int:
        ...

    @abc.abstractmethod
    async def free(self, ino: int) -> None: ...

    @abc.abstractmethod
    async def slices(self, ino: int, chunk: int) -> list[Slice]: ...

    @abc.abstractmethod
    async def sync(self, seq: int | None = None) -> None: ...


class LocalNamespace(NamespaceService):
    """The namespace held in this process; see module docstring."""

    def __init__(self, store: ObjectStore, state: NamespaceState, journal: jr.Journal, *,
                 snapshot_records: int = 20000, gc_grace: float = 30.0) -> None:
        self.store = store
        self.state = state
        self.ws = state.ws
        self.chunk_size = state.chunk_size
        self.journal = journal
        self.snapshot_records = snapshot_records
        self.gc_grace = gc_grace
        self._garbage: list[tuple[int, float, list[Slice]]] = []
        self._gc_wake = trio.Event()
        self._snapshot_lock = trio.Lock()
        self._snapshot_due = trio.Event()
        self.blocks_deleted = 0
        # Set by a leader: raises Deposed once its lease is gone (checked before every change).
        self.fence: Callable[[], None] | None = None
        # The request id the next change carries (set by the caller right before a change;
        # the change methods do not await before committing, so it cannot leak to another).
        self.current_rid: bytes | None = None
        # Likewise who makes it: [peer, uid, pid] (stamped on the record for its events).
        self.current_actor: list | None = None
        # Resolves each record's change events into it (the journal is the event outbox).
        self.annotator = Annotator(state)
        # Records with events, newest last; complete from seq `recent_from` on (older ones are
        # read back from the journal). `event_hold`, set by event delivery: journal segments
        # with records after the seq it returns are kept (their events are not delivered yet).
        self.recent: list[dict] = []
        self.recent_from = state.seq + 1
        self.event_hold: Callable[[], int | None] | None = None
        self.lock_events_wanted = False   # some subscription wants fs.lock.* (set by delivery)
        self.strict_inodes = False   # with peers: a write to an unknown inode is an error
        self.on_gc: Callable[[str], object] | None = None
        # Awaited before a snapshot: returns the inline-committed blocks (key -> bytes) not yet
        # durable as objects, which the snapshot carries since it lets their segments go.
        self.before_snapshot: Callable[[], Awaitable[dict[str, bytes]]] | None = None

    # -- helpers -----------------------------------------------------------------------
    def _node(self, ino: int) -> Inode:
        node = self.state.inodes.get(ino)
        if node is None:
            self._missing(ino)
        return node

    def _missing(self, ino: int) -> None:
        if self.state.lost and self.state.lost_ino(ino):
            raise FsError(errno.EIO, f"inode {ino} of {self.ws} was lost in a leader failover")
        raise FsError(errno.ENOENT)

    def _dir(self, ino: int) -> Inode:
        node = self._node(ino)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        if node.nlink == 0:
            raise FsError(errno.ENOENT)
        return node

    def _commit(self, rec: dict) -> int:
        if self.fence is not None:
            self.fence()
        if self.journal.deposed:
            raise Deposed(self.ws)
        rid, self.current_rid = self.current_rid, None
        if rid is not None:
            rec["rid"] = rid
        act, self.current_actor = self.current_actor, None
        if act is not None:
            rec["act"] = act
        rec.setdefault("t", jr.now_ns())
        pre = self.annotator.before(rec)
        seq = self.journal.append(rec)
        dropped = self.state.apply(rec)
        # Same step as the append: the committer has not encoded the record yet.
        self.annotator.after(rec, pre)
        if "ev" in rec:
            recent = self.recent
            recent.append({k: rec[k] for k in _EVENT_KEYS if k in rec})   # not its data
            if len(recent) > 2 * RECENT_KEEP:
                del recent[:RECENT_KEEP]
                self.recent_from = recent[0]["seq"]
        if dropped:
            self._garbage.append((seq, trio.current_time() + self.gc_grace, dropped))
            self._gc_wake.set()
        return seq

    # -- queries -----------------------------------------------------------------------
    def outcome(self, rid: bytes) -> tuple[int, int] | None:
        """(seq, inode) of the record request `rid` made, if it was applied (a retry)."""
        v = self.state.rids.get(rid)
        return None if v is None else (v[0], v[1])

    def cached(self, ino: int) -> Inode | None:
        return self.state.inodes.get(ino)

    def cached_entry(self, parent: int, name: bytes) -> int | None:
        d = self.state.dirs.get(parent)
        return None if d is None else d.get(name)

    def orphans(self) -> list[int]:
        return [n.ino for n in self.state.inodes.values() if n.nlink == 0]

    def stats(self) -> dict:
        j = self.journal
        return {"inodes": len(self.state.inodes), "seq": self.state.seq, "durable_seq": j.durable_seq,
                "epoch": j.epoch, "journal_segments": j.segments_written,
                "journal_put_ms_avg": round(1000 * j.put_seconds / max(1, j.segments_written), 3),
                "journal_error": j.error, "blocks_deleted": self.blocks_deleted,
                "request_ids": len(self.state.rids)}

    async def run(self) -> None:
        async with trio.open_nursery() as n:
            n.start_soon(self.journal.run)
            n.start_soon(self.run_gc)
            n.start_soon(self._run_snapshots)

    async def close(self) -> None:
        await self.journal.close()

    async def lookup(self, parent: int, name: bytes) -> Inode:
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        d = self._dir(parent)
        if name == b".":
            return d
        if name == b"..":
            return self._node(d.parent)
        ino = self.state.dirs[parent].get(name)
        if ino is None:
            raise FsError(errno.ENOENT)
        return self.state.inodes[ino]

    async def getattr(self, ino: int) -> Inode:
        return self._node(ino)

    async def readdir(self, ino: int) -> list[tuple[bytes, int]]:
        d = self._dir(ino)
        return [(b".", ino), (b"..", d.parent)] + list(self.state.dirs[ino].items())

    async def slices(self, ino: int, chunk: int) -> list[Slice]:
        return list(self._node(ino).chunks.get(chunk, ()))

    # -- namespace changes -------------------------------------------------------------
    async def mknod(self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0,
                    target: bytes | None = None, opening: bool = False) -> Inode:
        check_name(name)
        d = self._dir(parent)
        if name in self.state.dirs[parent]:
            raise FsError(errno.EEXIST)
        if d.mode & st.S_ISGID:
            gid = d.gid
            if st.S_ISDIR(mode):
                mode |= st.S_ISGID
        ino = self.state.next_ino
        self.state.next_ino += 1
        rec = {"op": "mknod", "ino": ino, "parent": parent, "name": name, "mode": mode, "uid": uid, "gid": gid}
        if rdev:
            rec["rdev"] = rdev
        if target is not None:
            rec["target"] = target
        self._commit(rec)
        return self.state.inodes[ino]

    async def link(self, ino: int, parent: int, name: bytes) -> Inode:
        check_name(name)
        node = self._node(ino)
        if node.is_dir:
            raise FsError(errno.EPERM)
        self._dir(parent)
        if name in self.state.dirs[parent]:
            raise FsError(errno.EEXIST)
        if node.nlink == 0:
            raise FsError(errno.ENOENT)
        self._commit({"op": "link", "ino": ino, "parent": parent, "name": name})
        return node

    async def unlink(self, parent: int, name: bytes, is_dir: bool, is_open: Callable[[int], bool]) -> Inode:
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        self._dir(parent)
        ino = self.state.dirs[parent].get(name)
        if ino is None:
            raise FsError(errno.ENOENT)
        node = self.state.inodes[ino]
        if is_dir:
            if not node.is_dir:
                raise FsError(errno.ENOTDIR)
            if ino == ROOT_INO:
                raise FsError(errno.EBUSY)
            if self.state.dirs[ino]:
                raise FsError(errno.ENOTEMPTY)
        elif node.is_dir:
            raise FsError(errno.EISDIR)
        last = node.nlink <= 1 or node.is_dir
        self._commit({"op": "unlink", "parent": parent, "name": name, "ino": ino,
                      "free": bool(last and not is_open(ino))})
        return node

    def _is_ancestor(self, anc: int, ino: int) -> bool:
        """Whether directory `anc` is `ino` or one of its ancestors."""
        seen = 0
        while True:
            if ino == anc:
                return True
            if ino == ROOT_INO or seen > 100000:
                return False
            ino = self.state.inodes[ino].parent
            seen += 1

    async def rename(self, sp: int, sn: bytes, dp: int, dn: bytes, flags: int,
                     is_open: Callable[[int], bool]) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise FsError(errno.EINVAL)
        check_name(dn)
        if len(sn) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        self._dir(sp)
        self._dir(dp)
        sino = self.state.dirs[sp].get(sn)
        if sino is None:
            raise FsError(errno.ENOENT)
        src = self.state.inodes[sino]
        dino = self.state.dirs[dp].get(dn)
        dst = self.state.inodes[dino] if dino is not None else None
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise FsError(errno.ENOENT)
            if src.is_dir and self._is_ancestor(sino, dp) or dst.is_dir and self._is_ancestor(dino, sp):
                raise FsError(errno.EINVAL)
            if sino == dino:
                return
            self._commit({"op": "rename", "sp": sp, "sn": sn, "dp": dp, "dn": dn, "exchange": True, "ino": sino})
            return
        if dst is not None and flags & RENAME_NOREPLACE:
            raise FsError(errno.EEXIST)
        if src.is_dir and self._is_ancestor(sino, dp):
            raise FsError(errno.EINVAL)
        if dst is not None:
            if sino == dino:
                return
            if src.is_dir and not dst.is_dir:
                raise FsError(errno.ENOTDIR)
            if not src.is_dir and dst.is_dir:
                raise FsError(errno.EISDIR)
            if dst.is_dir and self.state.dirs[dino]:
                raise FsError(errno.ENOTEMPTY)
            if dst.is_dir and self._is_ancestor(dino, sp):
                raise FsError(errno.ENOTEMPTY)
        rec = {"op": "rename", "sp": sp, "sn": sn, "dp": dp, "dn": dn, "ino": sino}
        if dst is not None:
            last = dst.nlink <= 1 or dst.is_dir
            rec["free"] = bool(last and not is_open(dino))
        self._commit(rec)

    async def setattr(self, ino: int, changes: dict) -> Inode:
        node = self._node(ino)
        if "size" in changes:
            if node.is_dir:
                raise FsError(errno.EISDIR)
            if not node.is_reg:
                raise FsError(errno.EINVAL)
        rec = {"op": "setattr", "ino": ino}
        rec.update(changes)
        self._commit(rec)
        return node

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        v = self._node(ino).xattrs.get(name)
        if v is None:
            raise FsError(errno.ENODATA)
        return v

    async def listxattr(self, ino: int) -> list[bytes]:
        return list(self._node(ino).xattrs)

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        node = self._node(ino)
        if len(name) > XATTR_NAME_MAX or not name:
            raise FsError(errno.ERANGE)
        if len(value) > XATTR_SIZE_MAX:
            raise FsError(errno.E2BIG)
        if not name.startswith((b"user.", b"trusted.", b"security.", b"system.")):
            raise FsError(errno.EOPNOTSUPP)
        if name.startswith(b"user.") and not (node.is_reg or node.is_dir):
            raise FsError(errno.EPERM)
        self._commit({"op": "setxattr", "ino": ino, "name": name, "value": value})

    async def removexattr(self, ino: int, name: bytes) -> None:
        node = self._node(ino)
        if name not in node.xattrs:
            raise FsError(errno.ENODATA)
        self._commit({"op": "rmxattr", "ino": ino, "name": name})

    # -- data --------------------------------------------------------------------------
    async def commit_write(self, ino: int, slices: list[tuple[int, Slice]], end: int, mtime: int,
                           inline: dict[str, bytes] | None = None, durable: bool = False,
                           closing: bool = False) -> int:
        """Commit uploaded slices; `inline` carries the bytes of small slices (sid -> data) whose
        blocks upload after the commit (recovery re-stores them from the journal). `closing`:
        the close or fsync of a handle commits them (an fs.file.written event)."""
        seq = self._commit_write(ino, slices, end, mtime, inline, closing)
        if durable:
            await self.sync(seq)
        return seq

    async def written(self, ino: int) -> int:
        """A handle that wrote `ino` (its bytes already committed) was closed or fsync'ed."""
        node = self.state.inodes.get(ino)
        if node is None or node.nlink == 0:
            return self.journal.last_seq
        return self._commit({"op": "written", "ino": ino})

    def _commit_write(self, ino: int, slices: list[tuple[int, Slice]], end: int, mtime: int,
                      inline: dict[str, bytes] | None, closing: bool = False) -> int:
        node = self.state.inodes.get(ino)
        if node is None and self.strict_inodes:
            self._missing(ino)
        if node is None:
            # Freed while the write was in flight: its blocks are garbage.
            self._garbage.append((self.journal.last_seq, trio.current_time() + self.gc_grace,
                                  [s for _, s in slices]))
            self._gc_wake.set()
            return self.journal.last_seq
        rec = {"op": "write", "ino": ino, "slices": [(i, s.to_tuple()) for i, s in slices], "end": end,
               "mtime": mtime}
        if inline:
            rec["inline"] = inline
        if closing:
            rec["cw"] = True
        return self._commit(rec)

    async def compact(self, ino: int, chunk: int, old: list[Slice], new: list[Slice], drop: list[Slice]) -> int:
        """Replace `drop` (hidden once `new` is on top) by `new`, if the chunk still is `old`."""
        return self._commit({"op": "compact", "ino": ino, "chunk": chunk, "n": len(old),
                             "digest": chunk_digest(old), "new": [s.to_tuple() for s in new],
                             "drop": [s.to_tuple() for s in drop]})

    def lock_event(self, what: str, ino: int, peer: str, details: dict) -> None:
        """Journal a lock event (acquired, released, revoked) for webhook subscribers that want
        them: a record that changes nothing, so delivery is at least once like other events."""
        if not self.lock_events_wanted or ino not in self.state.inodes:
            return
        rec = {"op": "lock", "ino": ino, "kind": f"fs.lock.{what}"}
        if "kind" in details:
            rec["lock"] = {"kind": details["kind"], "type": details.get("type")}
        if "token" in details:
            rec["token"] = details["token"]
        saved = self.current_rid, self.current_actor
        self.current_rid, self.current_actor = None, [peer, None, details.get("pid")]
        try:
            self._commit(rec)
        except (Deposed, FsError):
            pass          # no longer the leader: the lock table goes with the leadership
        finally:
            self.current_rid, self.current_actor = saved

    async def free(self, ino: int) -> None:
        node = self.state.inodes.get(ino)
        if node is not None and node.nlink == 0:
            self._commit({"op": "free", "ino": ino})

    async def sync(self, seq: int | None = None) -> None:
        await self.journal.wait_durable(seq)
        if self.journal.records_since_snapshot >= self.snapshot_records:
            self._snapshot_due.set()     # taken by run(): a caller of sync never waits for one

    async def _run_snapshots(self) -> None:
        while True:
            await self._snapshot_due.wait()
            self._snapshot_due = trio.Event()
            if self.journal.records_since_snapshot < self.snapshot_records:
                continue
            try:
                await self.snapshot()
            except Exception as e:  # noqa: BLE001 - the journal still holds every record; the next sync retries
                log.warning("snapshot of %s failed: %s", self.ws, e)

    # -- maintenance -------------------------------------------------------------------
    async def snapshot(self) -> None:
        """Write a snapshot of the current state, then prune covered journal segments."""
        async with self._snapshot_lock:
            carried = await self.before_snapshot() if self.before_snapshot is not None else {}
            self.journal.records_since_snapshot = 0
            seq = self.state.seq
            obj = self.state.to_obj()
            # Only what is durable goes into a snapshot, and only while we may write: a deposed
            # leader's snapshot could otherwise hold records replay ignores.
            await self.journal.wait_durable(seq)
            if self.fence is not None:
                self.fence()
            await jr.write_snapshot(self.store, self.state, carried, obj=obj)
            await jr.prune(self.store, self.ws, seq, hold=self.event_hold() if self.event_hold else None)

    def referenced_sids(self) -> set[str]:
        return {s.sid for s in self.state.all_slices()}

    async def collect_garbage(self, *, force: bool = False) -> int:
        """Delete blocks of dropped slices whose record is durable and whose grace has passed."""
        now = trio.current_time()
        keep, ready = [], []
        for item in self._garbage:
            seq, due, _ = item
            if seq <= self.journal.durable_seq and (force or due <= now):
                ready.append(item)
            else:
                keep.append(item)
        self._garbage = keep
        n = 0
        live = None
        for _, _, slices in ready:
            for s in slices:
                if live is None:
                    live = self.referenced_sids()
                if s.sid in live:
                    continue
                for key in slice_block_keys(self.ws, s):
                    if self.on_gc:
                        self.on_gc(key)
                    try:
                        await self.store.delete(key)
                    except Exception as e:  # noqa: BLE001 - the sweep retries later
                        log.warning("gc: delete %s failed: %s", key, e)
                    n += 1
        self.blocks_deleted += n
        return n

    async def run_gc(self) -> None:
        while True:
            if not self._garbage:
                self._gc_wake = trio.Event()
                await self._gc_wake.wait()
            await trio.sleep(max(1.0, min(self.gc_grace, 10.0)))
            await self.collect_garbage()

    async def maybe_snapshot(self) -> None:
        if self.journal.records_since_snapshot >= self.snapshot_records:
            await self.snapshot()
