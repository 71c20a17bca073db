"""`LockService`: the FUSE layer's lock requests against one lock table per workspace.

The FUSE layer (fuse/ops.py) hands over every getlk/setlk/flock request with a token and the
kernel's lock owner, plus flush (a close: that owner's POSIX locks go) and release (the last
close of an open file description: its flock, and its OFD locks, go). Answers go back through a
`Replier` (fuse/lowlevel.py in a mount), right away or, for a waiter, when it is granted or
interrupted (EINTR). Every token is answered exactly once.

Tables: one `LockTable` per workspace, keyed by the workspace-local inode, with the kernel's
lock owners as owners: the state a workspace leader will hold once locks span peers (owners
qualified by session then). Deadlock detection spans one workspace.

OFD locks reach FUSE as plain setlk requests whose owner is the open file description, and
FUSE sends no unlock for them on close; so the owners that locked through a file handle since
their last flush are dropped when that handle is released. A process-wide (fcntl) owner always
flushes before its handle's release, which resets that association, so this never drops its
locks early.
"""
from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING, Protocol

from agentmount.locks.table import F_RDLCK, F_UNLCK, LOCK_EX, LOCK_NB, LOCK_SH, LOCK_UN, LockTable, Result

if TYPE_CHECKING:
    from agentmount.vfs.vfs import VFS

log = logging.getLogger("agentmount.locks")

MOUNT_ROOT = 1   # the kernel's inode of the mount root (vfs.MOUNT_ROOT)


class Replier(Protocol):
    def reply_err(self, token: int, err: int) -> bool: ...

    def reply_lock(self, token: int, type: int, start: int, end: int, pid: int) -> bool: ...


class _File:
    """Lock bookkeeping of one file (by the kernel's inode number) while it has any."""
    __slots__ = ("table", "ino", "fh_owners", "owner_fhs")

    def __init__(self, table: LockTable, ino: int) -> None:
        self.table = table
        self.ino = ino
        self.fh_owners: dict[int, set[int]] = {}   # fh -> POSIX owners that locked through it since their flush
        self.owner_fhs: dict[int, set[int]] = {}   # owner -> those fhs


class LockService:
    """See module docstring."""

    def __init__(self, vfs: "VFS") -> None:
        self._vfs = vfs
        self.replier: Replier | None = None
        self._tables: dict[str, LockTable] = {}   # workspace name -> its table
        self._files: dict[int, _File] = {}        # gino -> bookkeeping, while the file has lock state
        self._waiting: dict[int, int] = {}        # token of a waiting request -> gino
        self.requests = 0
        self.grants_after_wait = 0

    # -- requests from the FUSE layer ------------------------------------------------------
    def getlk(self, token: int, gino: int, owner: int, type: int, start: int, end: int) -> None:
        self.requests += 1
        f = self._files.get(gino)
        c = f.table.getlk(f.ino, owner, type, start, end) if f is not None else None
        if c is None:
            self._replier().reply_lock(token, F_UNLCK, start, end, 0)
        else:
            self._replier().reply_lock(token, c.type, c.start, c.end, c.pid)

    def setlk(self, token: int, gino: int, fh: int, owner: int, type: int, start: int, end: int, sleep: bool,
              pid: int) -> None:
        self.requests += 1
        if type == F_UNLCK and gino not in self._files:
            self._replier().reply_err(token, 0)   # nothing held here: unlocking is a no-op
            return
        f = self._file(gino)
        res = f.table.setlk(f.ino, owner, type, start, end, pid, wait=sleep, ident=token)
        if type != F_UNLCK and not res.error:
            f.fh_owners.setdefault(fh, set()).add(owner)
            f.owner_fhs.setdefault(owner, set()).add(fh)
        self._finish(token, gino, f, res)

    def flock(self, token: int, gino: int, fh: int, owner: int, type: int, sleep: bool, pid: int) -> None:
        self.requests += 1
        if type == F_UNLCK and gino not in self._files:
            self._replier().reply_err(token, 0)
            return
        op = LOCK_UN if type == F_UNLCK else LOCK_SH if type == F_RDLCK else LOCK_EX
        f = self._file(gino)
        res = f.table.flock(f.ino, owner, op | (0 if sleep else LOCK_NB), pid, ident=token)
        self._finish(token, gino, f, res)

    def interrupt(self, token: int) -> None:
        """The kernel interrupted a waiting request (a signal): withdraw it, answer EINTR."""
        gino = self._waiting.pop(token, None)
        if gino is None:
            return   # answered already
        f = self._files[gino]
        f.table.cancel(token)
        self._replier().reply_err(token, errno.EINTR)
        self._forget_if_idle(gino, f)

    def flush(self, gino: int, owner: int) -> None:
        """A close by `owner`: its POSIX locks on the file go."""
        f = self._files.get(gino)
        if f is None:
            return
        for fh in f.owner_fhs.pop(owner, ()):
            owners = f.fh_owners[fh]
            owners.discard(owner)
            if not owners:
                del f.fh_owners[fh]
        self._grant(f.table.release_posix(f.ino, owner))
        self._forget_if_idle(gino, f)

    def release(self, gino: int, fh: int, owner: int, flock_release: bool) -> None:
        """The last close of an open file description: its flock, and OFD locks taken through it, go."""
        f = self._files.get(gino)
        if f is None:
            return
        if flock_release:
            self._grant(f.table.release_flock(f.ino, owner))
        for o in f.fh_owners.pop(fh, ()):
            fhs = f.owner_fhs[o]
            fhs.discard(fh)
            if not fhs:
                del f.owner_fhs[o]
            self._grant(f.table.release_posix(f.ino, o))
        self._forget_if_idle(gino, f)

    def status(self) -> dict:
        return {"files": len(self._files), "waiting": len(self._waiting), "requests": self.requests,
                "grants_after_wait": self.grants_after_wait}

    # -- internals ------------------------------------------------------------------------
    def _replier(self) -> Replier:
        if self.replier is None:
            raise RuntimeError("LockService has no replier (the FUSE layer sets it)")
        return self.replier

    def _file(self, gino: int) -> _File:
        f = self._files.get(gino)
        if f is None:
            if gino == MOUNT_ROOT:
                name, ino = "", gino   # the mount root belongs to no workspace
            else:
                ws, ino = self._vfs._resolve(gino)   # FsError(ENOENT) for an unknown workspace
                name = ws.name
            table = self._tables.get(name)
            if table is None:
                table = self._tables[name] = LockTable()
            f = self._files[gino] = _File(table, ino)
        return f

    def _finish(self, token: int, gino: int, f: _File, res: Result) -> None:
        if res.waiter is not None:
            self._waiting[token] = gino
        else:
            self._replier().reply_err(token, res.error)
        self._grant(res.granted)
        if res.waiter is None:
            self._forget_if_idle(gino, f)

    def _grant(self, granted) -> None:
        for w in granted:
            if self._waiting.pop(w.ident, None) is not None:
                self.grants_after_wait += 1
                if not self._replier().reply_err(w.ident, 0):
                    log.warning("lock granted to request %s, which was answered already", w.ident)

    def _forget_if_idle(self, gino: int, f: _File) -> None:
        if not f.fh_owners and not f.table.has_state(f.ino):
            self._files.pop(gino, None)
