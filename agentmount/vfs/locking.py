"""`LockService`: this peer's end of flock/fcntl locks; the tables live at workspace leaders.

The FUSE layer (fuse/ops.py) hands over every getlk/setlk/flock request with a token and the
kernel's lock owner, plus flush (a close: that owner's POSIX locks go) and release (the last
close of an open file description: its flock, and its OFD locks, go). Each request goes to
the lock table of the file's workspace (`agentmount.locks.leader.LockLeader`): directly when
this peer leads the workspace, as an ``ns.lk`` RPC to the leader otherwise. Answers go back
through a `Replier` (fuse/lowlevel.py in a mount): right away, or, for a request that waits,
when the leader pushes its grant (`granted`) or it is interrupted (EINTR). Every token is
answered exactly once.

When the workspace's leader changes, this peer re-asserts there what its owners hold (a
mirror kept per owner) and the requests it has waiting, in their old queue order.

Self-fencing (with peers): a peer that has not heard from a workspace's leader for
`lock_ttl_s - FENCE_MARGIN_S` while holding locks there gives them up before the leader lets
them lapse: its waiting requests get ENOLCK, I/O through any handle of the files it had
locked fails with EIO until the last of those handles is closed, and it starts a new lock
session (the leader drops whatever the old one still held at its next request).

OFD locks reach FUSE as plain setlk requests whose owner is the open file description, and
FUSE sends no unlock for them on close; so the owners that locked through a file handle since
their last flush are dropped when that handle is released. A process-wide (fcntl) owner always
flushes before its handle's release, which resets that association, so this never drops its
locks early.
"""
from __future__ import annotations

import errno
import logging
import os
from typing import TYPE_CHECKING, Protocol

import trio

from agentmount.errors import FsError
from agentmount.locks.leader import LockLeader
from agentmount.locks.table import F_RDLCK, F_UNLCK, LOCK_EX, LOCK_SH, LOCK_UN, LockTable

if TYPE_CHECKING:
    from agentmount.vfs.vfs import VFS, Workspace

log = logging.getLogger("agentmount.locks")

MOUNT_ROOT = 1   # the kernel's inode of the mount root (vfs.MOUNT_ROOT)
FENCE_CHECK_S = 0.25
# Fence this long before the TTL (at most a quarter of it): the leader counts the TTL from a
# ping it sent up to a ping period (0.5 s) before our last answered one, plus scheduling delays.
FENCE_MARGIN_S = 2.0


class Replier(Protocol):
    def reply_err(self, token: int, err: int) -> bool: ...

    def reply_lock(self, token: int, type: int, start: int, end: int, pid: int) -> bool: ...


class _File:
    """Lock bookkeeping of one file (by the kernel's inode number) while it has any."""
    __slots__ = ("ws", "ino", "gino", "fh_owners", "owner_fhs", "posix_owners", "flock_owners", "waiting", "fenced")

    def __init__(self, ws: "Workspace | None", ino: int, gino: int) -> None:
        self.ws = ws                                # None: the mount root (no workspace)
        self.ino = ino
        self.gino = gino
        self.fh_owners: dict[int, set[int]] = {}   # fh -> POSIX owners that locked through it since their flush
        self.owner_fhs: dict[int, set[int]] = {}   # owner -> those fhs
        self.posix_owners: set[int] = set()        # owners that may hold POSIX locks here
        self.flock_owners: set[int] = set()        # file descriptions that may hold a flock here
        self.waiting = 0                            # requests in flight or waiting
        self.fenced = False                         # its locks were given up: I/O fails until closed

    def idle(self) -> bool:
        return not (self.fh_owners or self.posix_owners or self.flock_owners or self.waiting or self.fenced)

    def locked(self) -> bool:
        return bool(self.posix_owners or self.flock_owners)


class LockService:
    """See module docstring."""

    def __init__(self, vfs: "VFS") -> None:
        self._vfs = vfs
        self.replier: Replier | None = None
        self.me = vfs.node.name
        self._inc: dict[str, bytes] = {}          # workspace -> our lock session there (new after a restart or fence)
        self.fenced: set[tuple[str, int]] = set()  # (workspace, inode) whose I/O fails: see module docstring
        self._contact: dict[str, float] = {}      # workspace -> when its lock table was last known reachable
        self._cut_off: set[str] = set()           # fenced workspaces whose lock table is still out of reach
        self.fences = 0
        # The mount root belongs to no workspace: its locks are kept here.
        self._root = LockLeader(self.me, "", 3600.0, lambda peer, w, err: self.granted(w.ident[1], {"err": err}),
                                lambda peer: None)
        self._files: dict[int, _File] = {}        # gino -> bookkeeping, while the file has lock state
        self._req: dict[int, tuple[int, list]] = {}   # token of a setlk/flock not answered yet -> (gino, request)
        self._inflight: set[int] = set()          # tokens of requests on their way to a leader
        self._waiting: dict[int, int] = {}        # token of a waiting request -> gino
        self._wait_key: dict[int, tuple[int, int]] = {}   # its place in the leader's queue (epoch, qseq)
        self._early: dict[int, int] = {}          # answers pushed before the "wait" answer got here
        self._interrupted: set[int] = set()       # interrupted while the request was in flight
        # What this peer's owners hold, per (workspace, owner): re-asserted at a new leader.
        self._mine: dict[tuple[str, int], LockTable] = {}
        self.requests = 0
        self.grants_after_wait = 0
        self.remote_requests = 0
        self.reasserts = 0

    # -- requests from the FUSE layer ------------------------------------------------------
    def getlk(self, token: int, gino: int, owner: int, type: int, start: int, end: int) -> None:
        self.requests += 1
        f = self._file(gino)
        self._submit(token, f, ["getlk", f.ino, owner, type, start, end])

    def setlk(self, token: int, gino: int, fh: int, owner: int, type: int, start: int, end: int, sleep: bool,
              pid: int) -> None:
        self.requests += 1
        if type == F_UNLCK and gino not in self._files:
            self._replier().reply_err(token, 0)   # nothing held here: unlocking is a no-op
            return
        f = self._file(gino)
        a = ["setlk", f.ino, owner, type, start, end, pid, bool(sleep), token]
        if type == F_UNLCK:
            self._apply_mine(f, a)   # at once: a grant to another owner may overtake our answer
        else:
            f.posix_owners.add(owner)
            f.fh_owners.setdefault(fh, set()).add(owner)
            f.owner_fhs.setdefault(owner, set()).add(fh)
        self._submit(token, f, a)

    def flock(self, token: int, gino: int, fh: int, owner: int, type: int, sleep: bool, pid: int) -> None:
        self.requests += 1
        if type == F_UNLCK and gino not in self._files:
            self._replier().reply_err(token, 0)
            return
        f = self._file(gino)
        a = ["flock", f.ino, owner, type, pid, bool(sleep), token]
        if type == F_UNLCK:
            self._apply_mine(f, a)
        else:
            f.flock_owners.add(owner)
        self._submit(token, f, a)

    def interrupt(self, token: int) -> None:
        """The kernel interrupted a waiting request (a signal): withdraw it, answer EINTR."""
        gino = self._waiting.get(token)
        if gino is None:
            if token in self._inflight:
                self._interrupted.add(token)    # withdrawn once its "wait" answer arrives
            return
        f = self._files[gino]
        leader = self._direct(f)
        if leader is not None:
            self._cancel_done(token, leader.request(self.me, self.inc(f.ws), ["cancel", token]))
        else:
            trio.lowlevel.spawn_system_task(self._cancel_remote, token, f)

    async def flush(self, gino: int, owner: int) -> None:
        """A close by `owner`: its POSIX locks on the file go."""
        f = self._files.get(gino)
        if f is None:
            return
        for fh in f.owner_fhs.pop(owner, ()):
            owners = f.fh_owners[fh]
            owners.discard(owner)
            if not owners:
                del f.fh_owners[fh]
        if owner in f.posix_owners:
            f.posix_owners.discard(owner)
            await self._release(f, ["release_posix", f.ino, owner])
        self._forget_if_idle(gino, f)

    async def release(self, gino: int, fh: int, owner: int, flock_release: bool) -> None:
        """The last close of an open file description: its flock, and OFD locks taken through it, go."""
        f = self._files.get(gino)
        if f is None:
            return
        if flock_release and owner in f.flock_owners:
            f.flock_owners.discard(owner)
            await self._release(f, ["release_flock", f.ino, owner])
        for o in f.fh_owners.pop(fh, ()):
            fhs = f.owner_fhs[o]
            fhs.discard(fh)
            if not fhs:
                del f.owner_fhs[o]
            if o in f.posix_owners:
                f.posix_owners.discard(o)
                await self._release(f, ["release_posix", f.ino, o])
        self._unfence_if_closed(f)
        self._forget_if_idle(gino, f)

    # -- from the workspace layer ------------------------------------------------------------
    def granted(self, token: int, body: dict | None = None) -> None:
        """The leader answered waiting request `token` (pushed to us): granted, or an errno."""
        err = (body or {}).get("err", 0)
        err = err if isinstance(err, int) else errno.ENOLCK
        gino = self._waiting.pop(token, None)
        if body is not None and "ws" in body:
            self._heard(body["ws"])        # a push from the leader: it reached us just now
        if gino is None:
            if token in self._inflight:
                self._early[token] = err   # its "wait" answer is still on its way
            elif body is not None and err == 0:
                log.warning("event=lock_grant_unknown token=%s", token)
            return
        self._wait_key.pop(token, None)
        if err == 0:
            self.grants_after_wait += 1
        f = self._files[gino]
        self._done(token, f, err)
        if not self._replier().reply_err(token, err):
            log.warning("lock request %s answered twice", token)
        self._forget_if_idle(gino, f)

    async def query(self, ws: "Workspace", a: list):
        """A read-only request (``["token", ino]``, ``["list"]``) at the workspace's leader."""
        if a[0] == "list":
            return await ws.meta.lock_listing(self.inc(ws))
        return await ws.meta.lock_rpc(a, self.inc(ws))

    def leader_changed(self, ws: "Workspace") -> None:
        """`ws` has a new leader (or none yet): re-assert there what we hold and wait for."""
        trio.lowlevel.spawn_system_task(self._reassert, ws)

    def status(self) -> dict:
        return {"files": len(self._files), "waiting": len(self._waiting), "requests": self.requests,
                "remote_requests": self.remote_requests, "grants_after_wait": self.grants_after_wait,
                "reasserts": self.reasserts, "fences": self.fences, "fenced_files": len(self.fenced)}

    # -- self-fencing ------------------------------------------------------------------------
    async def watch(self, ttl: float) -> None:
        """Fence workspaces whose lock table went silent while we hold locks there (peers only)."""
        limit = ttl - min(FENCE_MARGIN_S, ttl / 4)
        while True:
            await trio.sleep(FENCE_CHECK_S)
            now = trio.current_time()
            for ws in {f.ws for f in self._files.values() if f.ws is not None and f.locked()}:
                c = ws.meta.lock_contact()
                last = max(self._contact.get(ws.name, now if c is None else c), c if c is not None else -1e18)
                self._contact[ws.name] = last
                if now - last > limit:
                    self._fence(ws, now - last)
            for name in [n for n in self._contact if n not in {f.ws.name for f in self._files.values()
                                                              if f.ws is not None and f.locked()}]:
                del self._contact[name]
            for name in list(self._cut_off):
                ws = self._vfs.workspaces.get(name)
                c = ws.meta.lock_contact() if ws is not None else None
                if ws is None or (c is not None and now - c < limit):
                    self._cut_off.discard(name)

    def _heard(self, name: str) -> None:
        if name in self._contact:
            self._contact[name] = max(self._contact[name], trio.current_time())

    def _fence(self, ws: "Workspace", silent: float) -> None:
        self.fences += 1
        files = [f for f in self._files.values() if f.ws is ws and f.locked()]
        log.warning("event=lock_fenced ws=%s files=%d silent_s=%.1f", ws.name, len(files), silent)
        self._inc.pop(ws.name, None)          # a new session: the old one's locks are given up
        self._cut_off.add(ws.name)            # lock calls fail at once until the leader is back
        self._contact.pop(ws.name, None)
        for key in [k for k in self._mine if k[0] == ws.name]:
            del self._mine[key]
        for f in files:
            f.fenced = True
            f.posix_owners.clear()
            f.flock_owners.clear()
            f.fh_owners.clear()
            f.owner_fhs.clear()
            self.fenced.add((ws.name, f.ino))
        for token, gino in list(self._waiting.items()):
            f = self._files.get(gino)
            if f is not None and f.ws is ws:
                self.granted(token, {"err": errno.ENOLCK})

    def guarded(self, gino: int) -> _File | None:
        """The file's lock state while this peer holds locks on it or has fenced it (its
        `fenced` turns true when the locks are given up), else None."""
        f = self._files.get(gino)
        return f if f is not None and (f.fenced or f.locked()) else None

    def _unfence_if_closed(self, f: _File) -> None:
        if f.fenced and f.ws is not None and not self._vfs.has_open_handle(f.ws, f.ino):
            f.fenced = False
            self.fenced.discard((f.ws.name, f.ino))

    # -- internals ------------------------------------------------------------------------
    def _replier(self) -> Replier:
        if self.replier is None:
            raise RuntimeError("LockService has no replier (the FUSE layer sets it)")
        return self.replier

    def _file(self, gino: int) -> _File:
        f = self._files.get(gino)
        if f is None:
            if gino == MOUNT_ROOT:
                f = _File(None, gino, gino)
            else:
                ws, ino = self._vfs._resolve(gino)   # FsError(ENOENT) for an unknown workspace
                f = _File(ws, ino, gino)
            self._files[gino] = f
        return f

    def inc(self, ws: "Workspace | None") -> bytes:
        """Our lock session at `ws`'s leader."""
        name = ws.name if ws is not None else ""
        inc = self._inc.get(name)
        if inc is None:
            inc = self._inc[name] = os.urandom(8)
        return inc

    def _direct(self, f: _File) -> LockLeader | None:
        """The table to call synchronously: the mount root's, or the workspace's when we lead
        it and it is past its grace period; None: go through `lock_rpc`."""
        if f.ws is None:
            return self._root
        leader = f.ws.meta.lock_leader()
        return leader if leader is not None and not leader.in_grace else None

    def _submit(self, token: int, f: _File, a: list) -> None:
        if f.ws is not None and f.ws.name in self._cut_off:
            self._replier().reply_err(token, errno.ENOLCK)
            self._forget_if_idle(f.gino, f)
            return
        f.waiting += 1
        gino = f.gino
        if a[0] != "getlk":
            self._req[token] = (gino, a)
        leader = self._direct(f)
        if leader is None:
            self._inflight.add(token)
            trio.lowlevel.spawn_system_task(self._remote, token, gino, f, a)
            return
        try:
            r = leader.request(self.me, self.inc(f.ws), a)
        except BaseException:
            self._done(token, f, errno.ENOLCK)
            raise
        self._answer(token, gino, f, a, r)

    async def _remote(self, token: int, gino: int, f: _File, a: list) -> None:
        self.remote_requests += 1
        try:
            r = await f.ws.meta.lock_rpc(a, self.inc(f.ws))
            self._heard(f.ws.name)
        except FsError as e:
            r = e.errno
        except Exception:   # noqa: BLE001 - never leave a token unanswered
            log.exception("lock request failed")
            r = errno.ENOLCK
        finally:
            self._inflight.discard(token)
        self._answer(token, gino, f, a, r)

    def _answer(self, token: int, gino: int, f: _File, a: list, r) -> None:
        rep = self._replier()
        if a[0] == "getlk":
            self._done(token, f, 0)
            if isinstance(r, int):
                rep.reply_err(token, r)
            elif r is None:
                rep.reply_lock(token, F_UNLCK, a[4], a[5], 0)
            else:
                rep.reply_lock(token, r[0], r[1], r[2], r[3])
            self._forget_if_idle(gino, f)
            return
        if isinstance(r, list) and r and r[0] == "wait":
            self._waiting[token] = gino
            self._wait_key[token] = (r[1], r[2]) if len(r) == 3 else (0, 0)
            if token in self._early:
                self.granted(token, {"err": self._early.pop(token)})
            elif token in self._interrupted:
                self._interrupted.discard(token)
                self.interrupt(token)
            return
        err = r if isinstance(r, int) else errno.ENOLCK
        self._done(token, f, err)
        rep.reply_err(token, err)
        self._forget_if_idle(gino, f)

    def _done(self, token: int, f: _File, err: int) -> None:
        """Request `token` is answered with `err`: note what our owners now hold. A flock owner
        whose request failed holds no flock any more (a failed conversion drops the old lock)."""
        f.waiting -= 1
        self._interrupted.discard(token)
        req = self._req.pop(token, None)
        if req is None:
            return
        a = req[1]
        if err == 0:
            self._apply_mine(f, a)
            if a[0] == "flock" and a[3] == F_UNLCK:
                f.flock_owners.discard(a[2])
        elif a[0] == "flock":
            f.flock_owners.discard(a[2])
            self._apply_mine(f, ["release_flock", a[1], a[2]])

    def _apply_mine(self, f: _File, a: list) -> None:
        """Mirror a granted request or a release in what our owners hold (one table per owner,
        so the order grants and answers arrive in never matters)."""
        if f.ws is None:
            return
        kind, ino, owner = a[0], a[1], a[2]
        key = (f.ws.name, owner)
        t = self._mine.get(key)
        if t is None:
            if kind.startswith("release") or a[3] == F_UNLCK:
                return
            t = self._mine[key] = LockTable()
        if kind == "setlk":
            t.setlk(ino, owner, a[3], a[4], a[5], a[6])
        elif kind == "flock":
            t.flock(ino, owner, LOCK_UN if a[3] == F_UNLCK else LOCK_SH if a[3] == F_RDLCK else LOCK_EX, a[4])
        elif kind == "release_posix":
            t.release_posix(ino, owner)
        elif kind == "release_flock":
            t.release_flock(ino, owner)
        if not len(t):
            del self._mine[key]

    async def _reassert(self, ws: "Workspace") -> None:
        held: list[list] = []
        for (name, owner), t in list(self._mine.items()):
            if name != ws.name:
                continue
            for ino in t.inodes():
                fl, posix = t.held(ino, owner)
                if fl is not None:
                    held.append([ino, owner, "flock", fl[0], fl[1]])
                held.extend([ino, owner, "posix", typ, start, end, pid] for start, end, typ, pid in posix)
        waits = []
        for token, gino in self._waiting.items():
            f = self._files.get(gino)
            req = self._req.get(token)
            if f is not None and f.ws is ws and req is not None:
                waits.append([*self._wait_key.get(token, (0, 0)), req[1]])
        try:
            conflicts = await ws.meta.lock_rpc(["reassert", held, waits], self.inc(ws))
        except FsError as e:
            log.warning("event=lock_reassert_failed ws=%s error=%s", ws.name, e)
            for token, gino in list(self._waiting.items()):
                f = self._files.get(gino)
                if f is not None and f.ws is ws:
                    self.granted(token, {"err": errno.ENOLCK})
            return
        self.reasserts += 1
        if conflicts:
            log.error("event=lock_reassert_conflicts ws=%s count=%s", ws.name, conflicts)

    def _cancel_done(self, token: int, cancelled: bool) -> None:
        if not cancelled or token not in self._waiting:
            return   # granted meanwhile: the grant (pushed) answers it
        self.granted(token, {"err": errno.EINTR})

    async def _cancel_remote(self, token: int, f: _File) -> None:
        try:
            cancelled = await f.ws.meta.lock_rpc(["cancel", token], self.inc(f.ws))
        except FsError:
            cancelled = True    # no leader: nothing will be granted to it there
        self._cancel_done(token, bool(cancelled))

    async def _release(self, f: _File, a: list) -> None:
        self._apply_mine(f, a)
        leader = self._direct(f)
        if leader is not None:
            leader.request(self.me, self.inc(f.ws), a)
            return
        try:
            await f.ws.meta.lock_rpc(a, self.inc(f.ws))
        except FsError as e:
            log.warning("event=lock_release_failed ws=%s error=%s", f.ws.name, e)

    def _forget_if_idle(self, gino: int, f: _File) -> None:
        if f.idle():
            self._files.pop(gino, None)
