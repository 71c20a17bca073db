"""The VFS: what the FUSE front calls. Maps the mount onto workspaces.

Owns: global inode numbers (workspace index << 40 | local inode), the
virtual root whose entries are workspaces, open file and directory handles,
per-inode write buffers (DirtyFile), reads and readahead, compaction and the
shutdown sequence. It never talks to the store directly for metadata: that is
the namespace service's job; block bytes go through BlockIO.

Durability: close() (flush) of a handle opened for writing, fsync and
fsyncdir return only once data blocks and the journal records are durable.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import stat as st
import time
from dataclasses import dataclass
from typing import Callable

import trio

from agentmount.chunks import block
from agentmount.chunks.blockio import BlockIO
from agentmount.chunks.layout import block_key
from agentmount.config import Config
from agentmount.errors import Deposed, FsError
from agentmount.meta import workspaces as wsreg
from agentmount.events.delivery import Deliverer
from agentmount.meta import actor
from agentmount.meta import journal as jr
from agentmount.meta.peered import KernelHooks, PeeredNamespace, Role
from agentmount.meta.service import LocalNamespace, check_name
from agentmount.meta.state import ROOT_INO, Inode
from agentmount.vfs.compactor import Compactor
from agentmount.vfs.locking import LockService
from agentmount.vfs.reader import Reader
from agentmount.vfs.writer import DirtyFile, WriteBudget
from agentmount.peer.node import PeerNode
from backend.store import ObjectStore, StoreError

log = logging.getLogger("agentmount.vfs")

MOUNT_ROOT = 1
WS_SHIFT = 40
LOCAL_MASK = (1 << WS_SHIFT) - 1
PID_XATTR = b"user.agentmount.pid"
CAPABILITY_XATTR = b"security.capability"
LOCK_TOKEN_XATTR = b"user.agentmount.lock_token"   # virtual: the fencing token of the newest lock grant
INLINE_MAX = 1 << 20
INLINE_BATCH_SECONDS = 5.0
INLINE_BATCH_BYTES = 32 << 20
INLINE_GROUP = 64          # inline-committed blocks stored per worker-thread call (local store)


@dataclass(slots=True)
class Attr:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    atime: int
    mtime: int
    ctime: int
    version: int
    ttl: float = math.inf   # how long the kernel may cache it at most (a follower: see meta.peered)


class Workspace:
    """A mounted workspace: its namespace service, buffers, reader and background tasks."""

    def __init__(self, name: str, index: int, meta: PeeredNamespace, info: dict) -> None:
        self.name = name
        self.index = index
        self.meta = meta
        self.info = info
        self.base = index << WS_SHIFT
        self.dirty: dict[int, DirtyFile] = {}
        self.opens: dict[int, int] = {}
        self.lookups: dict[int, int] = {}  # the kernel's lookup count per inode (until forget)
        self.nursery: trio.Nursery | None = None
        self.cancel: trio.CancelScope | None = None
        self.reader: Reader | None = None
        self.compactor: Compactor | None = None
        self.inline_pending: set[str] = set()
        self.swept = 0
        self.inline_idle = trio.Event()
        self.inline_queue: list[tuple[str, bytes]] = []
        self.inline_queued_bytes = 0
        self.inline_wake = trio.Event()
        self.deliverer: Deliverer | None = None   # while this peer leads it

    def gino(self, local: int) -> int:
        return self.base | local

    def in_use(self, local: int) -> bool:
        """Whether the kernel still references the inode (open handles or lookups not yet forgotten)."""
        return self.opens.get(local, 0) > 0 or self.lookups.get(local, 0) > 0


class FileHandle:
    __slots__ = ("ws", "ino", "writable", "direct", "wrote", "next_off", "ra_block", "behind", "unreported",
                 "actor")

    def __init__(self, ws: Workspace, ino: int, writable: bool, direct: bool = False) -> None:
        self.ws = ws
        self.ino = ino
        self.writable = writable
        # Write-only: the kernel sends its writes whole, past the page cache (direct I/O).
        self.direct = direct
        self.wrote = False
        # Changed through this handle since its last fs.file.written (reported at close/fsync).
        self.unreported = False
        self.actor = actor.current()   # the opener, named by the events of close and fsync
        self.next_off = -1
        self.ra_block = -1   # block index readahead was last started from
        self.behind = 0      # file offset below which this reader's run has let go of cached blocks


class DirHandle:
    __slots__ = ("ws", "ino", "entries")

    def __init__(self, ws: Workspace | None, ino: int) -> None:
        self.ws = ws
        self.ino = ino
        self.entries: list[tuple[bytes, int]] | None = None


class VFS:
    """See module docstring."""

    def __init__(self, cfg: Config, store: ObjectStore, blockio: BlockIO, nursery: trio.Nursery,
                 node: PeerNode) -> None:
        self.cfg = cfg
        self.node = node
        self.multi = node.multi
        # Set by the FUSE side: kernel cache invalidation, (global inode, attr_only) and
        # (global parent, name); both may block, so they are called in worker threads.
        self.inval_inode: "Callable[[int, bool], None] | None" = None
        self.inval_entry: "Callable[[int, bytes], None] | None" = None
        # Kernel invalidations may wait on a directory lock (and be abandoned meanwhile): their
        # own threads, so they can never starve the journal's, the leases' or the stores'.
        self.inval_limiter = trio.CapacityLimiter(8)
        # Whether any file may carry a security.capability xattr. While none can, the FUSE
        # layer answers the kernel's lookups of it (one per first write and per chown) itself;
        # `on_capability` (set by it) hears when that stops. With peers, any peer may store
        # one at any time, so it is never assumed absent.
        self.capabilities_seen = self.multi
        self.on_capability: "Callable[[], None] | None" = None
        self.store = store
        self.blockio = blockio
        self.nursery = nursery
        self.budget = WriteBudget(cfg.fs.write_buffer_mb << 20)
        self.budget.pressure_cb = self._seal_all
        self.workspaces: dict[str, Workspace] = {}
        self.by_index: dict[int, Workspace] = {}
        self._next_index = 1
        self._fh = 0
        self.files: dict[int, FileHandle] = {}
        self.dirs: dict[int, DirHandle] = {}
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.started = time.time_ns()
        self.bsize = cfg.block_size
        # Slices up to this size commit their bytes inline in the journal record, so a small
        # file's close() costs one durable put (the journal segment) instead of two.
        self.inline_max = min(INLINE_MAX, self.bsize)
        if self.multi:
            # Inline bytes live in the leader's journal until uploaded; a reader on another
            # peer could not fetch them, so with peers every block is stored before its commit.
            self.inline_max = 0
        self._ws_lock = trio.Lock()
        self.write_calls = 0
        self.api: dict | None = None     # the HTTP API's address once it listens (for status)
        self.bytes_written = 0
        self._refreshed = -1e9
        self.locks = LockService(self)
        if self.multi:
            nursery.start_soon(self.locks.watch, cfg.lease.lock_ttl_s)

    # -- workspaces --------------------------------------------------------------------
    async def load_workspaces(self) -> None:
        """Open every registered workspace and create the configured ones that are missing."""
        known = await wsreg.list_workspaces(self.store)
        for name in self.cfg.workspaces:
            if name not in known:
                try:
                    known[name] = await wsreg.create_workspace(self.store, name, uid=self.uid, gid=self.gid,
                                                               chunk_size=self.cfg.chunk_size)
                except FsError as e:
                    if e.errno != errno.EEXIST:
                        raise
                    known = await wsreg.list_workspaces(self.store)   # another peer made it first
        for name in sorted(known):
            await self._open_ws(name, known[name])

    async def refresh_workspaces(self) -> None:
        """Open workspaces other peers created since (with peers; rate-limited by the caller)."""
        known = await wsreg.list_workspaces(self.store)
        async with self._ws_lock:
            for name in sorted(known):
                if name not in self.workspaces:
                    await self._open_ws(name, known[name])

    async def _open_ws(self, name: str, info: dict) -> Workspace:
        ws = Workspace(name, self._next_index, None, info)  # type: ignore[arg-type]
        self._next_index += 1
        meta = PeeredNamespace(self.cfg, self.store, self.node, name, info, _Kernel(self, ws),
                               lambda local, loaded: self._on_lead(ws, local, loaded))
        ws.meta = meta
        meta.on_gc = self._on_gc
        meta.before_snapshot = lambda: self._inline_barrier(ws)
        meta.on_lock_grant = self.locks.granted
        meta.on_lock_leader_change = lambda: self.locks.leader_changed(ws)
        meta.lock_state = lambda ino: self.locks.guarded(ws.gino(ino))
        meta.while_leading = lambda local: self._deliver_events(ws, local)
        self.workspaces[name] = ws
        self.by_index[ws.index] = ws
        try:
            await self.nursery.start(self._run_ws, ws)
            if not self.multi:
                await meta.wait_ready()
        except BaseException:
            del self.workspaces[name]
            del self.by_index[ws.index]
            raise
        return ws

    def _capability_seen(self) -> None:
        if not self.capabilities_seen:
            self.capabilities_seen = True
            if self.on_capability is not None:
                self.on_capability()

    async def _on_lead(self, ws: Workspace, local: LocalNamespace, loaded: jr.Loaded) -> None:
        """This peer now leads `ws` and holds its state: finish what a crash left undone."""
        if not self.capabilities_seen and any(CAPABILITY_XATTR in n.xattrs for n in loaded.state.inodes.values()):
            self._capability_seen()
        if loaded.inline:
            # Blocks committed inline whose upload a crash cut short: store them from the journal.
            live = {s.sid for s in loaded.state.all_slices()}
            for key, data in loaded.inline.items():
                sid = key.rsplit("/", 1)[1].rsplit("_", 1)[0]
                if sid in live and not await self._block_ok(key):
                    await self.blockio.put(key, data)
        orphans = local.orphans()
        if orphans and self.multi:
            # Other peers may still hold them open: they re-register with us within the
            # failover bound; what nobody claims by then is freed.
            assert ws.nursery is not None
            ws.nursery.start_soon(self._free_unclaimed, ws, orphans)
        elif orphans:
            # Inodes left unlinked-but-open by a crash are orphans now: free them.
            for ino in orphans:
                await local.free(ino)
        log.info("workspace %s: snapshot %d + %d records replayed, epoch %d", ws.name, loaded.snapshot_seq,
                 loaded.replayed, local.journal.epoch)

    async def _deliver_events(self, ws: Workspace, local: LocalNamespace) -> None:
        """While this peer leads `ws`: deliver its change events to the webhook subscribers."""
        d = Deliverer(local, self.cfg.events, self.cfg.webhooks, self.node.name)
        ws.deliverer = d
        try:
            await d.run()
        except Deposed:
            pass      # the leadership ends: the next leader resumes from the saved cursors
        finally:
            if ws.deliverer is d:
                ws.deliverer = None

    async def _free_unclaimed(self, ws: Workspace, orphans: list[int]) -> None:
        await trio.sleep(self.cfg.lease.failover_timeout_s)
        for ino in orphans:
            if not ws.in_use(ino):
                try:
                    await ws.meta.free(ino)
                except FsError as e:
                    log.warning("workspace %s: freeing orphan %d failed: %s", ws.name, ino, e)

    async def _block_ok(self, key: str) -> bool:
        try:
            obj = await self.store.get(key)
            await trio.to_thread.run_sync(block.decode, obj)
            return True
        except (StoreError, block.CorruptBlock):
            return False

    async def _run_ws(self, ws: Workspace, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as n:
                ws.nursery = n
                ws.cancel = scope
                ws.reader = Reader(ws.name, ws.meta, self.blockio, self.bsize, self.cfg.fs.readahead_blocks, n)
                ws.compactor = Compactor(ws.meta, self.blockio, ws.reader._stored, self.bsize,
                                         self.cfg.fs.compact_slices)
                n.start_soon(ws.meta.run)
                n.start_soon(ws.compactor.run)
                n.start_soon(self._sweeper, ws)
                n.start_soon(self._inline_uploader, ws)
                task_status.started()

    async def _sweeper(self, ws: Workspace) -> None:
        """Now and then, delete block objects nothing references (left by a crash mid-write)."""
        await trio.sleep(min(60.0, max(1.0, self.cfg.fs.gc_grace_s)))
        while True:
            if not ws.meta.leading:
                await trio.sleep(5.0)     # only the leader sweeps; it may be us after a failover
                continue
            try:
                await self.sweep(ws)
            except Exception as e:  # noqa: BLE001 - retried at the next round
                log.warning("workspace %s: block sweep failed: %s", ws.name, e)
            await trio.sleep(3600)

    async def lock_listing(self, name: str | None) -> dict:
        """Held locks and waiters of every workspace (or `name`), from their leaders."""
        if name is not None and name not in self.workspaces:
            raise FsError(errno.ENOENT, f"no workspace {name!r}")
        out: dict[str, dict] = {}
        for wsname in sorted([name] if name else self.workspaces):
            try:
                out[wsname] = await self.locks.query(self.workspaces[wsname], ["list"])
            except FsError as e:
                out[wsname] = {"error": os.strerror(e.errno)}
        return out

    async def sweep(self, ws: Workspace) -> int:
        """Delete unreferenced blocks older than the grace period; returns how many.

        Never touches blocks of writes in flight: ids buffered in open files, pinned inline
        blocks and compactions in progress are spared — here and, with peers, on every other
        peer (asked first; a round is skipped unless all of them answer) — and so is anything
        younger than the grace. Only the workspace's leader sweeps.
        """
        if not ws.meta.leading:
            return 0
        prefix = f"ws/{ws.name}/blocks/"
        infos = [i async for i in self.store.list(prefix)]
        elsewhere = await ws.meta.pending_elsewhere()
        if elsewhere is None:
            log.info("workspace %s: block sweep skipped (not every peer answered)", ws.name)
            return 0
        if not ws.meta.leading:
            return 0
        # Taken in one step with no await, so no commit can move an id between the sets (a
        # peer's commit that removed an id from its answer is in our state by now).
        spared = ws.meta.referenced_sids() | elsewhere | self.pending_sids(ws)
        cutoff = time.time() - self.cfg.fs.gc_grace_s
        n = 0
        for info in infos:
            sid = info.key.rsplit("/", 1)[1].rsplit("_", 1)[0]
            if sid in spared or info.mtime > cutoff:
                continue
            await self.blockio.delete(info.key)
            n += 1
        if n:
            log.info("workspace %s: swept %d unreferenced block(s)", ws.name, n)
        ws.swept += n
        return n

    def pending_sids(self, ws: Workspace) -> set[str]:
        """Ids of blocks this peer stored or is storing for `ws` that no commit references yet."""
        spared: set[str] = set()
        for d in ws.dirty.values():
            spared |= d.pending_sids()
        spared |= {k.rsplit("/", 1)[1].rsplit("_", 1)[0] for k in self.blockio.pinned}
        if ws.compactor is not None:
            spared |= ws.compactor.inflight
        return spared

    def _on_gc(self, key: str) -> None:
        self.blockio.mem.discard(key)
        self.blockio.disk.discard(key)

    async def create_workspace(self, name: str, uid: int, gid: int, mode: int) -> Workspace:
        async with self._ws_lock:
            if name in self.workspaces:
                raise FsError(errno.EEXIST)
            info = await wsreg.create_workspace(self.store, name, uid=uid, gid=gid, mode=mode,
                                                chunk_size=self.cfg.chunk_size)
            return await self._open_ws(name, info)

    async def delete_workspace(self, name: str, force: bool = False) -> None:
        async with self._ws_lock:
            ws = self.workspaces.get(name)
            if ws is None:
                raise FsError(errno.ENOENT)
            if self.multi:
                # Other peers serve it too (its leader may be elsewhere): deleting its objects
                # under them needs a coordinated close this version does not have.
                raise FsError(errno.EBUSY, f"workspace {name}: deleting a workspace shared by peers "
                                           "is not supported yet")
            if not force and len(await ws.meta.readdir(ROOT_INO)) > 2:
                raise FsError(errno.ENOTEMPTY)
            if any(ws.opens.values()):
                raise FsError(errno.EBUSY)
            await self._close_ws(ws, final=False)
            del self.workspaces[name]
            del self.by_index[ws.index]
            await wsreg.delete_workspace(self.store, name)

    async def _close_ws(self, ws: Workspace, final: bool = True) -> None:
        for ino, d in list(ws.dirty.items()):
            try:
                await self._commit(ws, ino, d, durable=False)
            except FsError as e:
                log.error("workspace %s inode %d: unflushed data lost: %s", ws.name, ino, e)
                ws.dirty.pop(ino, None)
                self._discard(ws, d)
        if final:
            # The kernel sends no forgets at unmount: unlinked inodes it still knew are orphans now.
            for ino in ws.meta.orphans():
                await ws.meta.free(ino)
        await ws.meta.close()
        if final:
            # Let background block uploads land (bounded: a dead store must not hang unmount;
            # whatever is left is carried by the snapshot).
            ws.inline_wake.set()
            with trio.move_on_after(self.cfg.fs.store_timeout_s):
                while ws.inline_pending:
                    ws.inline_idle = trio.Event()
                    await ws.inline_idle.wait()
            await ws.meta.snapshot()
            await ws.meta.collect_garbage(force=True)
        if ws.cancel is not None:
            ws.cancel.cancel()

    async def shutdown(self) -> None:
        """Commit every buffer, make every journal durable, snapshot, stop background work."""
        for ws in list(self.workspaces.values()):
            try:
                await self._close_ws(ws)
            except Exception:  # noqa: BLE001 - keep closing the others
                log.exception("closing workspace %s failed", ws.name)

    # -- inode mapping -----------------------------------------------------------------
    def _resolve(self, gino: int) -> tuple[Workspace, int]:
        ws = self.by_index.get(gino >> WS_SHIFT)
        if ws is None:
            raise FsError(errno.ENOENT)
        return ws, gino & LOCAL_MASK

    def _attr(self, ws: Workspace, node: Inode) -> Attr:
        size, mtime, ctime = node.size, node.mtime, node.ctime
        d = ws.dirty.get(node.ino)
        if d is not None and not d.empty:
            size, mtime, ctime = d.size, d.mtime, max(node.ctime, d.mtime)
        return Attr(ws.gino(node.ino), node.mode, node.nlink, node.uid, node.gid, node.rdev, size, node.atime,
                    mtime, ctime, node.version, ws.meta.kernel_ttl())

    def _ws_root_attr(self, ws: Workspace, node: Inode) -> Attr:
        a = self._attr(ws, node)
        return a

    def root_attr(self) -> Attr:
        return Attr(MOUNT_ROOT, st.S_IFDIR | 0o755, 2 + len(self.workspaces), self.uid, self.gid, 0, 4096,
                    self.started, self.started, self.started, 1)

    # -- metadata ops ------------------------------------------------------------------
    async def lookup(self, parent: int, name: bytes) -> Attr:
        if parent == MOUNT_ROOT:
            if name in (b".", b".."):
                return self.root_attr()
            if len(name) > 255:
                raise FsError(errno.ENAMETOOLONG)
            wname = name.decode("utf-8", "surrogateescape")
            ws = self.workspaces.get(wname)
            if ws is None and self.multi and wsreg.valid_name(wname):
                await self._maybe_refresh()
                ws = self.workspaces.get(wname)
            if ws is None:
                raise FsError(errno.ENOENT)
            return self._attr(ws, await ws.meta.getattr(ROOT_INO))
        ws, ino = self._resolve(parent)
        if name == b".." and ino == ROOT_INO:
            return self.root_attr()
        return self._attr(ws, await ws.meta.lookup(ino, name))

    async def _maybe_refresh(self) -> None:
        now = trio.current_time()
        if now - self._refreshed < 1.0:
            return
        self._refreshed = now
        try:
            await self.refresh_workspaces()
        except (StoreError, FsError) as e:
            log.warning("listing workspaces failed: %s", e)

    def kernel_ttl(self, gino: int) -> float:
        """How long the kernel may cache attributes and entries of `gino` at most."""
        ws = self.by_index.get(gino >> WS_SHIFT)
        return math.inf if ws is None else ws.meta.kernel_ttl()

    def cacheable(self, gino: int, pages: bool = False) -> bool:
        """Whether the kernel may keep cached attributes (`pages`: file pages across opens) of
        `gino`. A follower's kernel drops a file's pages at every open (close-to-open)."""
        ws = self.by_index.get(gino >> WS_SHIFT)
        if ws is None:
            return True
        return ws.meta.role is Role.LEADER if pages else ws.meta.kernel_cacheable

    async def getattr(self, gino: int) -> Attr:
        if gino == MOUNT_ROOT:
            return self.root_attr()
        ws, ino = self._resolve(gino)
        return self._attr(ws, await ws.meta.getattr(ino))

    async def setattr(self, gino: int, changes: dict) -> Attr:
        if gino == MOUNT_ROOT:
            raise FsError(errno.EPERM)
        ws, ino = self._resolve(gino)
        if "size" in changes:
            d = ws.dirty.get(ino)
            if d is not None and not d.empty:
                await self._commit(ws, ino, d, durable=False)
            node = await ws.meta.setattr(ino, changes)
            if d is not None:
                d.size = node.size
        else:
            node = await ws.meta.setattr(ino, changes)
            d = ws.dirty.get(ino)
            if d is not None and "mtime" in changes:
                d.mtime = changes["mtime"]
        return self._attr(ws, node)

    async def readlink(self, gino: int) -> bytes:
        ws, ino = self._resolve(gino)
        node = await ws.meta.getattr(ino)
        if node.target is None:
            raise FsError(errno.EINVAL)
        return node.target

    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int,
                    target: bytes | None = None, opening: bool = False) -> Attr:
        if parent == MOUNT_ROOT:
            if st.S_ISDIR(mode):
                check_name(name)
                ws = await self.create_workspace(name.decode("utf-8", "surrogateescape"), uid, gid, mode)
                return self._attr(ws, await ws.meta.getattr(ROOT_INO))
            raise FsError(errno.EPERM)
        ws, ino = self._resolve(parent)
        fmt = st.S_IFMT(mode)
        if fmt not in (st.S_IFREG, st.S_IFDIR, st.S_IFLNK, st.S_IFIFO, st.S_IFSOCK, st.S_IFCHR, st.S_IFBLK):
            raise FsError(errno.EINVAL)
        node = await ws.meta.mknod(ino, name, mode, uid, gid, rdev, target, opening=opening)
        return self._attr(ws, node)

    async def link(self, gino: int, parent: int, name: bytes) -> Attr:
        if parent == MOUNT_ROOT or gino == MOUNT_ROOT:
            raise FsError(errno.EPERM)
        ws, ino = self._resolve(gino)
        pws, pino = self._resolve(parent)
        if pws is not ws:
            raise FsError(errno.EXDEV)
        return self._attr(ws, await ws.meta.link(ino, pino, name))

    async def unlink(self, parent: int, name: bytes, is_dir: bool) -> None:
        if parent == MOUNT_ROOT:
            if not is_dir:
                raise FsError(errno.EPERM)
            await self.delete_workspace(name.decode("utf-8", "surrogateescape"))
            return
        ws, ino = self._resolve(parent)
        node = await ws.meta.unlink(ino, name, is_dir, ws.in_use)
        if node.nlink == 0 and not ws.in_use(node.ino):
            d = ws.dirty.pop(node.ino, None)
            if d is not None:
                self._discard(ws, d)

    async def rename(self, sp: int, sn: bytes, dp: int, dn: bytes, flags: int) -> None:
        if sp == MOUNT_ROOT or dp == MOUNT_ROOT:
            raise FsError(errno.EPERM)
        ws, sino = self._resolve(sp)
        dws, dino = self._resolve(dp)
        if dws is not ws:
            raise FsError(errno.EXDEV)
        await ws.meta.rename(sino, sn, dino, dn, flags, ws.in_use)

    # -- xattrs ------------------------------------------------------------------------
    async def getxattr(self, gino: int, name: bytes) -> bytes:
        if gino == MOUNT_ROOT:
            if name == PID_XATTR:
                return str(os.getpid()).encode()
            raise FsError(errno.ENODATA)
        ws, ino = self._resolve(gino)
        if name == LOCK_TOKEN_XATTR:
            token = await self.locks.query(ws, ["token", ino])
            if not isinstance(token, str):
                raise FsError(errno.ENODATA)
            return token.encode()
        return await ws.meta.getxattr(ino, name)

    async def listxattr(self, gino: int) -> list[bytes]:
        if gino == MOUNT_ROOT:
            return []
        ws, ino = self._resolve(gino)
        return await ws.meta.listxattr(ino)

    async def setxattr(self, gino: int, name: bytes, value: bytes) -> None:
        if gino == MOUNT_ROOT:
            raise FsError(errno.EPERM)
        ws, ino = self._resolve(gino)
        if name == LOCK_TOKEN_XATTR:
            raise FsError(errno.EPERM, "user.agentmount.lock_token is given by the lock service")
        if name == CAPABILITY_XATTR:
            self._capability_seen()   # before it exists: the FUSE layer must stop answering for it
        await ws.meta.setxattr(ino, name, value)

    async def removexattr(self, gino: int, name: bytes) -> None:
        if gino == MOUNT_ROOT:
            raise FsError(errno.ENODATA)
        if name == LOCK_TOKEN_XATTR:
            raise FsError(errno.EPERM, "user.agentmount.lock_token is given by the lock service")
        ws, ino = self._resolve(gino)
        await ws.meta.removexattr(ino, name)

    # -- files -------------------------------------------------------------------------
    def _new_fh(self) -> int:
        self._fh += 1
        return self._fh

    async def open(self, gino: int, flags: int) -> int:
        if gino == MOUNT_ROOT:
            raise FsError(errno.EISDIR)
        ws, ino = self._resolve(gino)
        node = await ws.meta.open(ino)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        truncated = bool(flags & os.O_TRUNC and node.is_reg)
        if truncated:
            # libfuse negotiates atomic_o_trunc: the kernel leaves O_TRUNC to us. Reported as
            # the fs.file.written of the close, not as an attribute change.
            await self.setattr(gino, {"size": 0, "mtime": time.time_ns(), "quiet": True})
        fh = self._new_fh()
        self.files[fh] = h = FileHandle(ws, ino, writable, (flags & os.O_ACCMODE) == os.O_WRONLY)
        h.unreported = truncated
        ws.opens[ino] = ws.opens.get(ino, 0) + 1
        return fh

    async def create(self, parent: int, name: bytes, mode: int, flags: int, uid: int, gid: int) -> tuple[int, Attr]:
        attr = await self.mknod(parent, name, (mode & 0o7777) | st.S_IFREG, 0, uid, gid, opening=True)
        fh = await self.open(attr.ino, flags & ~os.O_TRUNC)    # (it is empty)
        h = self.files[fh]
        h.wrote = True  # a created file is durable at close like a written one
        h.unreported = True
        return fh, attr

    def _dirty(self, ws: Workspace, node: Inode) -> DirtyFile:
        d = ws.dirty.get(node.ino)
        if d is None:
            assert ws.nursery is not None
            d = DirtyFile(ws.name, node.ino, node.size, node.mtime, ws.meta.chunk_size, self.bsize, self.blockio,
                          self.budget, ws.nursery)
            ws.dirty[node.ino] = d
        elif d.empty:
            d.size, d.mtime = node.size, node.mtime
        return d

    def has_open_handle(self, ws: Workspace, ino: int) -> bool:
        return any(h.ws is ws and h.ino == ino for h in self.files.values())

    def _check_fence(self, ws: Workspace, ino: int) -> None:
        if (ws.name, ino) in self.locks.fenced:
            raise FsError(errno.EIO, f"{ws.name}: the locks held on inode {ino} were given up (leader unreachable)")

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self.files.get(fh)
        if h is None:
            raise FsError(errno.EBADF)
        ws = h.ws
        if self.locks.fenced:
            self._check_fence(ws, h.ino)
        node = await ws.meta.getattr(h.ino)
        d = ws.dirty.get(h.ino)
        if d is not None and d.empty:
            d = None
        fsize = d.size if d is not None else node.size
        assert ws.reader is not None
        data = await ws.reader.read(h.ino, off, size, fsize, ws.meta.chunk_size, d)
        end = off + len(data)
        bs = self.bsize
        if off != h.next_off and abs(off - h.next_off) > 2 * bs:
            h.behind = off // bs * bs   # a seek, not the kernel's readahead arriving out of order
        # Sequential reader: prefetch ahead, once per block entered rather than on every read.
        if (off == h.next_off or off == 0) and end // bs != h.ra_block:
            h.ra_block = end // bs
            ws.reader.readahead(h.ino, end, fsize, ws.meta.chunk_size)
            # Let go of the blocks passed, but the last: a READ of it may still be in flight.
            passed = (h.ra_block - 1) * bs
            if passed > h.behind:
                ws.reader.drop_behind(h.ino, h.behind, passed, ws.meta.chunk_size)
                h.behind = passed
        h.next_off = end
        return data

    async def write(self, fh: int, off: int, data: bytes) -> int:
        h = self.files.get(fh)
        if h is None:
            raise FsError(errno.EBADF)
        ws = h.ws
        if self.locks.fenced:
            self._check_fence(ws, h.ino)
        d = ws.dirty.get(h.ino)
        if d is None or d.empty:
            # (With bytes buffered, the buffer knows size and mtime: no trip to the leader.)
            node = await ws.meta.getattr(h.ino)
            if self.locks.fenced:
                self._check_fence(ws, h.ino)     # fenced while we asked the leader
            d = self._dirty(ws, node)
        if d.error is not None:
            err, d.error = d.error, None
            raise err
        if h.direct and self.capabilities_seen:
            await self._drop_capability(ws, h.ino)
        await d.write(off, data, time.time_ns())
        self.write_calls += 1
        self.bytes_written += len(data)
        h.wrote = h.unreported = True
        if h.direct and ws.opens.get(h.ino, 0) > 1 and self.inval_inode is not None:
            # The kernel dropped the range from its page cache before sending this write, but
            # a read through another handle may have cached the old bytes since: drop them again
            # now that the new ones are readable, before write() returns.
            await trio.to_thread.run_sync(self.inval_inode, ws.gino(h.ino), False, abandon_on_cancel=True,
                                          limiter=self.inval_limiter)
        return len(data)

    async def _drop_capability(self, ws: Workspace, ino: int) -> None:
        """A write removes the file's security.capability, as Linux does for any writer. Through
        the page cache the kernel does that itself; a direct write leaves it to us."""
        node = ws.meta.cached(ino) or await ws.meta.getattr(ino)
        if CAPABILITY_XATTR in node.xattrs:
            try:
                await ws.meta.removexattr(ino, CAPABILITY_XATTR)
            except FsError as e:
                if e.errno != errno.ENODATA:   # gone meanwhile: nothing to drop
                    raise

    async def _commit(self, ws: Workspace, ino: int, d: DirtyFile, durable: bool, closing: bool = False) -> bool:
        """Commit what `d` buffers; False if another task had committed it all meanwhile."""
        async with d.lock:
            # Another task may have committed these bytes while we waited for the lock;
            # a durable caller then still waits for the journal below.
            if not d.empty:
                await self._commit_locked(ws, ino, d, durable, closing)
                return True
        if durable:
            await ws.meta.sync()
        return False

    async def _commit_locked(self, ws: Workspace, ino: int, d: DirtyFile, durable: bool = False,
                             closing: bool = False) -> int:
        batch = await d.collect(self.inline_max)
        slices = [(p.chunk, p.as_slice()) for p in batch]
        cs = ws.meta.chunk_size
        end = max(p.chunk * cs + p.end for p in batch)
        inline = {p.sid: p.buf.tobytes() for p in batch if p.buf}
        keys = {block_key(ws.name, sid, 0): data for sid, data in inline.items()}
        # Pinned before the record exists, so a snapshot taken at any point sees them.
        for key, data in keys.items():
            self.blockio.pinned[key] = data
            ws.inline_pending.add(key)
        try:
            seq = await ws.meta.commit_write(ino, slices, end, d.mtime, inline, durable=durable, closing=closing)
        except BaseException:
            for key in keys:
                self.blockio.pinned.pop(key, None)
                ws.inline_pending.discard(key)
            raise
        assert ws.nursery is not None
        for key, data in keys.items():
            ws.inline_queue.append((key, data))
            ws.inline_queued_bytes += len(data)
        if ws.inline_queued_bytes >= INLINE_BATCH_BYTES:
            ws.inline_wake.set()
        d.committed(batch)
        assert ws.compactor is not None
        node = ws.meta.cached(ino)
        if node is not None:
            for idx in {p.chunk for p in batch}:
                ws.compactor.consider(ino, idx, len(node.chunks.get(idx, ())))
        return seq

    async def _inline_uploader(self, ws: Workspace) -> None:
        """Store inline-committed blocks in batches, off the commit path.

        Writing each block object the moment its record commits made every journal put
        contend with block-file creations (measured during tar: ~2.1 ms per durable put
        vs ~1.4 ms batched); a batch every few seconds, or sooner once 32 MiB is queued or
        under memory pressure, keeps them off the commit path. The bytes are durable in the
        journal (and carried by snapshots) meanwhile.
        """
        assert ws.nursery is not None
        while True:
            with trio.move_on_after(INLINE_BATCH_SECONDS):
                await ws.inline_wake.wait()
            ws.inline_wake = trio.Event()
            batch, ws.inline_queue, ws.inline_queued_bytes = ws.inline_queue, [], 0
            if self.store.is_local:
                # A local store writes a group in one worker-thread call: two thread hops per
                # group instead of per block, which on the trio thread cost as much as a
                # durable commit each (measured with many small files).
                for i in range(0, len(batch), INLINE_GROUP):
                    ws.nursery.start_soon(self._upload_inline, ws, batch[i:i + INLINE_GROUP])
            else:
                for item in batch:
                    ws.nursery.start_soon(self._upload_inline, ws, [item])

    async def _upload_inline(self, ws: Workspace, items: list[tuple[str, bytes]]) -> None:
        delay = 0.1
        try:
            while True:
                try:
                    # Not synced on their own: they are durable in the journal, and the snapshot
                    # barrier syncs the store before those journal segments can go.
                    if len(items) == 1:
                        await self.blockio.put(items[0][0], items[0][1], sync=False)
                    else:
                        await self.blockio.put_many(items, sync=False)
                    return
                except FsError as e:
                    log.warning("storing %d inline-committed block(s) from %s failed (%s); retrying",
                                len(items), items[0][0], e)
                    await trio.sleep(delay)
                    delay = min(delay * 2, 10.0)
        finally:
            for key, data in items:
                self.blockio.pinned.pop(key, None)
                self.budget.release(len(data))
                ws.inline_pending.discard(key)
            if not ws.inline_pending:
                ws.inline_idle.set()

    async def _inline_barrier(self, ws: Workspace) -> dict[str, bytes]:
        """Before a snapshot: sync the store, and return the inline-committed blocks that may
        not be durable yet, for the snapshot to carry (the journal segments holding them are
        pruned once it is written). Never waits for uploads, so a dead store cannot block it."""
        carried = {k: self.blockio.pinned[k] for k in ws.inline_pending if k in self.blockio.pinned}
        await self.store.barrier()
        # Uploads finished before the barrier began are synced by it; every other one is carried.
        carried.update({k: self.blockio.pinned[k] for k in ws.inline_pending if k in self.blockio.pinned})
        return carried

    async def flush(self, fh: int) -> None:
        h = self.files.get(fh)
        if h is None:
            return
        if h.writable or h.wrote:
            await self._sync_file(h)

    async def _sync_file(self, h: FileHandle) -> None:
        """Make what `h` wrote durable (close, fsync), reporting it as one fs.file.written."""
        ws = h.ws
        d = ws.dirty.get(h.ino)
        report, h.unreported = h.unreported, False
        if h.actor is not None:
            actor.ACTOR.set(h.actor)
        try:
            if d is not None and not d.empty and await self._commit(ws, h.ino, d, durable=True, closing=report):
                return
            if report:
                await ws.meta.written(h.ino)
            await ws.meta.sync()
        except BaseException:
            h.unreported = h.unreported or report
            raise

    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self.files.get(fh)
        if h is None:
            raise FsError(errno.EBADF)
        await self._sync_file(h)

    async def release(self, fh: int) -> None:
        h = self.files.pop(fh, None)
        if h is None:
            return
        ws, ino = h.ws, h.ino
        err: FsError | None = None
        try:
            d = ws.dirty.get(ino)
            if d is not None and not d.empty or h.unreported:
                await self._sync_file(h)
        except FsError as e:
            err = e
        n = ws.opens.get(ino, 1) - 1
        if n > 0:
            ws.opens[ino] = n
        else:
            ws.opens.pop(ino, None)
            await ws.meta.closed(ino)
            d = ws.dirty.get(ino)
            if d is not None and (d.empty or err is not None):
                del ws.dirty[ino]
                if err is not None:
                    # The last close already reported the error; like a page cache after a
                    # failed write-back, the unwritable bytes are dropped and their stored blocks freed.
                    log.error("workspace %s inode %d: dropping unwritten data after %s", ws.name, ino, err)
                    self._discard(ws, d)
            if not ws.in_use(ino):
                await self._free_orphan(ws, ino)
        if err is not None:
            raise err

    async def _free_orphan(self, ws: Workspace, ino: int) -> None:
        """Free `ino` if no entry names it any more (its last user is gone)."""
        node = ws.meta.cached(ino)
        if node is not None and node.nlink == 0:
            d = ws.dirty.pop(ino, None)
            if d is not None:
                self._discard(ws, d)
            await ws.meta.free(ino)

    def ref(self, gino: int) -> None:
        """The kernel received an entry for `gino`: one more lookup reference until `forget`."""
        ws = self.by_index.get(gino >> WS_SHIFT)
        if ws is not None and gino != MOUNT_ROOT:
            local = gino & LOCAL_MASK
            ws.lookups[local] = ws.lookups.get(local, 0) + 1

    async def forget(self, items: list[tuple[int, int]]) -> None:
        for gino, n in items:
            ws = self.by_index.get(gino >> WS_SHIFT)
            if ws is None or gino == MOUNT_ROOT:
                continue
            local = gino & LOCAL_MASK
            left = ws.lookups.pop(local, 0) - n
            if left > 0:
                ws.lookups[local] = left
            elif not ws.in_use(local):
                await self._free_orphan(ws, local)

    def _discard(self, ws: Workspace, d: DirtyFile) -> None:
        keys = d.uploaded_keys()
        d.drop_all()
        if keys and ws.nursery is not None:
            async def delete() -> None:
                for k in keys:
                    await self.blockio.delete(k)
            ws.nursery.start_soon(delete)

    def _seal_all(self) -> None:
        for ws in self.workspaces.values():
            ws.inline_wake.set()  # queued inline blocks hold budget too
            for d in ws.dirty.values():
                d.seal()

    # -- directories -------------------------------------------------------------------
    async def opendir(self, gino: int) -> int:
        fh = self._new_fh()
        if gino == MOUNT_ROOT:
            self.dirs[fh] = DirHandle(None, MOUNT_ROOT)
            return fh
        ws, ino = self._resolve(gino)
        node = await ws.meta.getattr(ino)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        self.dirs[fh] = DirHandle(ws, ino)
        return fh

    async def readdir(self, fh: int, off: int):
        """Yield (name, attr, next_offset) from `off`; offsets index a snapshot taken at offset 0."""
        h = self.dirs.get(fh)
        if h is None:
            raise FsError(errno.EBADF)
        if h.entries is None or off == 0:
            if h.ws is None and self.multi:
                await self._maybe_refresh()
            if h.ws is None:
                h.entries = [(b".", MOUNT_ROOT), (b"..", MOUNT_ROOT)] + [
                    (n.encode("utf-8", "surrogateescape"), ws.index) for n, ws in sorted(self.workspaces.items())]
            else:
                h.entries = await h.ws.meta.readdir_plus(h.ino)
        out = []
        ents = h.entries
        if h.ws is None:
            for i in range(off, len(ents)):
                name, idx = ents[i]
                if name in (b".", b".."):
                    out.append((name, self.root_attr(), i + 1))
                    continue
                ws = self.by_index.get(idx)
                if ws is None:
                    continue
                node = ws.meta.cached(ROOT_INO)
                if node is not None:
                    out.append((name, self._attr(ws, node), i + 1))
            return out
        ws = h.ws
        meta = ws.meta
        local = meta.role is Role.LEADER   # entries then come from the live state, else from the answer
        for i in range(off, len(ents)):
            name, ino, node = ents[i]
            if name == b"..":
                if h.ino == ROOT_INO:
                    out.append((name, self.root_attr(), i + 1))
                    continue
            elif local and name != b"." and meta.cached_entry(h.ino, name) != ino:
                continue  # removed since the snapshot
            if local or node is None:
                node = meta.cached(ino)
            if node is None:
                continue
            out.append((name, self._attr(ws, node), i + 1))
        return out

    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    async def fsyncdir(self, fh: int) -> None:
        h = self.dirs.get(fh)
        if h is not None and h.ws is not None:
            await h.ws.meta.sync()

    async def statfs(self) -> dict:
        total_inodes = sum(ws.meta.stats().get("inodes", 0) for ws in self.workspaces.values())
        root = getattr(self.store, "root", None)
        try:
            sv = await trio.to_thread.run_sync(os.statvfs, root) if root else None
        except OSError:
            sv = None
        if sv is not None:
            frsize = sv.f_frsize
            blocks, bfree, bavail = sv.f_blocks, sv.f_bfree, sv.f_bavail
        else:
            frsize, blocks, bfree, bavail = 4096, 1 << 40, 1 << 40, 1 << 40
        return {"bsize": self.bsize, "frsize": frsize, "blocks": blocks, "bfree": bfree, "bavail": bavail,
                "files": total_inodes + (1 << 32), "ffree": 1 << 32, "favail": 1 << 32, "namemax": 255}

    # -- status ------------------------------------------------------------------------
    def status(self) -> dict:
        return {
            "pid": os.getpid(),
            "peers": self.node.status(),
            "refused_connections": self.node.refused(),
            "workspaces": {
                n: {**ws.meta.stats(),
                    "dirty_files": sum(1 for d in ws.dirty.values() if not d.empty),
                    "open_files": sum(ws.opens.values()),
                    "compactions": ws.compactor.compactions if ws.compactor else 0,
                    "blocks_swept": ws.swept}
                for n, ws in self.workspaces.items()},
            "write_buffer_bytes": self.budget.used,
            "write_calls": self.write_calls,
            "bytes_written": self.bytes_written,
            "uploads_in_flight": self.blockio.uploads_in_flight,
            "bytes_uploaded": self.blockio.bytes_uploaded,
            "bytes_downloaded": self.blockio.bytes_downloaded,
            "memory_cache_bytes": self.blockio.mem.used,
            "disk_cache_bytes": self.blockio.disk.used,
            "store_health": self.store.health(),
            "api": self.api,
        }


class _Kernel(KernelHooks):
    """The kernel side of one workspace, as its namespace service sees it (local inodes)."""

    def __init__(self, vfs: VFS, ws: Workspace) -> None:
        self.vfs = vfs
        self.ws = ws

    async def inval(self, attrs: list[int], data: list[int], entries: list[tuple[int, bytes]]) -> None:
        vfs, ws = self.vfs, self.ws
        ii, ie = vfs.inval_inode, vfs.inval_entry
        if ii is None or ie is None:
            return
        dset = set(data)
        todo_i = [(ws.gino(i), i not in dset) for i in set(attrs) | dset if ws.lookups.get(i) or ws.opens.get(i)]
        todo_e = [(ws.gino(p) if p != ROOT_INO else ws.gino(ROOT_INO), n) for p, n in entries
                  if ws.lookups.get(p) or p == ROOT_INO]
        if not todo_i and not todo_e:
            return

        def run() -> None:
            for gino, attr_only in todo_i:
                ii(gino, attr_only)
            for gparent, name in todo_e:
                ie(gparent, name)
        await trio.to_thread.run_sync(run, abandon_on_cancel=True, limiter=self.vfs.inval_limiter)

    async def reset(self) -> None:
        vfs, ws = self.vfs, self.ws
        ii, ie = vfs.inval_inode, vfs.inval_entry
        if ii is None or ie is None:
            return
        inos = [ws.gino(i) for i in list(ws.lookups) + list(ws.opens)]
        name = ws.name.encode("utf-8", "surrogateescape")

        def run() -> None:
            ie(MOUNT_ROOT, name)
            for gino in inos:
                ii(gino, False)
        await trio.to_thread.run_sync(run, abandon_on_cancel=True, limiter=self.vfs.inval_limiter)

    def open_inodes(self) -> list[int]:
        return [i for i, n in self.ws.opens.items() if n > 0]

    def pending_sids(self) -> list[str]:
        return sorted(self.vfs.pending_sids(self.ws))

    def attrs_stale(self, ino: int) -> None:
        ii = self.vfs.inval_inode
        if ii is not None and (self.ws.lookups.get(ino) or self.ws.opens.get(ino)):
            ii(self.ws.gino(ino), True)   # attributes only: no lock the kernel could be holding

    def is_open(self, ino: int) -> bool:
        return self.ws.in_use(ino)
